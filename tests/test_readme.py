"""README.md: every python config snippet loads as an experiment file, and the cheap shell
commands run (from a directory outside the repository)."""

import os
import re
import shlex
import subprocess
import sys

import pytest

from jaxrl import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
PYTHON_SNIPPETS = re.findall(r"```python\n(.*?)```", README, re.S)
PLAN_COMMANDS = [m for m in re.findall(r"`(jaxrl plan [^`]+)`", README)]


@pytest.mark.parametrize("index", range(len(PYTHON_SNIPPETS)))
def test_config_snippet_loads(index, tmp_path):
    path = tmp_path / "experiment.py"
    path.write_text(PYTHON_SNIPPETS[index])
    cfg = config_lib.load_config(str(path), check_files=False)  # paths like /models/... do not exist here
    assert cfg.data.source in ("files", "synthetic")


def test_readme_names_only_existing_config_keys():
    known = {k for k in config_lib.loading._dotted_keys(config_lib.base_config())}
    for key in re.findall(r"`((?:data|eval|sampling|rewards|model|rl|run|train)\.[a-z_.]+)", README):
        assert key.rstrip(".") in known, key


@pytest.mark.parametrize("command", PLAN_COMMANDS)
def test_plan_commands_run_from_anywhere(command, tmp_path):
    argv = shlex.split(command)[1:]
    done = subprocess.run([sys.executable, "-m", "jaxrl.cli", *argv], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"), timeout=300)
    assert done.returncode in (0, 1), done.stderr[-2000:]  # 1 = planned, does not fit
    assert "peak" in done.stdout


def test_default_config_and_model_found_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config_lib.load_config("default")  # checks model.path holds config.json
    assert os.path.isfile(os.path.join(cfg.model.path, "model.safetensors"))
