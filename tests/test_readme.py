"""README.md: every python config snippet loads as an experiment file, and every shell command
(the lines of its ```bash blocks and its inline `jaxrl ...`, `make ...`, `launch/...` spans) is
either run here or listed in ``EXEMPT`` with the reason it cannot run on a CPU machine.

Commands run as written, from a directory outside the repository that looks like a checkout
after ``make setup``: ``Makefile`` and ``pyproject.toml`` linked in, ``.venv/bin/jaxrl`` a
shim for this interpreter's ``python -m jaxrl.cli``, ``launch/`` linked in. ``configs/...``
paths are therefore found from the installed package. The only change to a command is
``FAST``, config overrides appended (for ``make run``: through ``ARGS``) that make a run one
step of 2 x 2 rollouts on the embedded model; a shared JAX compilation cache keeps the later
runs short.
"""

import json
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

# First words that make an inline code span (or a ```bash line) a shell command.
_COMMAND_RE = re.compile(r"^(?:[A-Z_]+=\S+ )*(?:make|jaxrl|\.venv/bin/jaxrl|pip|pytest|python|sbatch|gcloud|"
                         r"launch/\S+\.sh)(?: |$)")


def readme_commands(text: str) -> list[str]:
    """Every shell command of ``text``, in order, without duplicates: each line of a ```bash
    block (trailing ``# comment`` dropped) and each inline code span that starts with a command
    word and has at least one argument (``make`` alone names the tool, not a command)."""
    found = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                found.append(line)
    for span in re.findall(r"`([^`\n]+)`", text):
        if _COMMAND_RE.match(span) and " " in span.strip():
            found.append(span.strip())
    return list(dict.fromkeys(found))


COMMANDS = readme_commands(README)
FAST = ("--config.train.num_steps=1 --config.rl.prompts_per_step=2 --config.rl.samples_per_prompt=2 "
        "--config.rl.mini_batch_prompts=2 --config.rl.micro_batch_rows=4 --config.rl.dynamic_sampling=False "
        "--config.eval.max_examples=2 --config.eval.num_samples=2 --config.data.synthetic_num_train=64 "
        "--config.data.synthetic_num_heldout=8 --config.sampling.max_new_tokens=8 --config.checkpoint.async_save=False")
TRAIN_TRY1 = ".venv/bin/jaxrl train --config configs/default.py --config.rl.lr=1e-4 --config.run.name=try1"

EXEMPT = {
    "make test": "runs this suite, so running it here would recurse",
    "pytest -n 2": "what `make test` runs (this suite itself)",
    "make setup": "creates .venv and pip-installs the package and its dependencies from the network; the "
                  "workspace's prepared .venv stands in for it in every other command",
    "pip install -e '.[gpu]'": "installs CUDA wheels from the network (needs a GPU machine)",
    "pip install -e '.[tpu]'": "installs TPU wheels from the network (needs a TPU VM)",
    "GPUS=3 launch/local_gpu.sh ...": "the `launch/local_gpu.sh CONFIG [overrides]` run here, with "
                                      "CUDA_VISIBLE_DEVICES=3, which means something only on a 4-GPU host",
    "launch/tpu_pod.sh TPU_NAME ZONE CONFIG [overrides]": "needs gcloud and a TPU pod slice "
                                                          "(tests/test_launch.py checks its start-up)",
    "gcloud ... ssh --worker=all": "part of launch/tpu_pod.sh: needs gcloud and a TPU pod slice",
    "sbatch --nodes=N launch/slurm_gpu.sbatch CONFIG [overrides]": "needs a SLURM cluster "
                                                                  "(tests/test_launch.py checks its start-up)",
    "jaxrl train --config C --config.distributed.coordinator_address=HOST0:PORT "
    "--config.distributed.num_processes=N --config.distributed.process_id=I":
        "needs N hosts; tests/test_sharding_multiprocess.py runs this form with 2 processes on localhost",
    "jaxrl train": "names the subcommand in prose; its full forms (`.venv/bin/jaxrl train --config ...`) run here",
}


class Workspace:
    """A directory outside the repository that looks like a set-up checkout; ``run`` runs a
    README command there once (later calls return the first result)."""

    def __init__(self, root):
        self.root = str(root)
        bin_dir = os.path.join(self.root, ".venv", "bin")
        os.makedirs(bin_dir)
        shim = os.path.join(bin_dir, "jaxrl")
        with open(shim, "w") as handle:
            handle.write(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m jaxrl.cli "$@"\n')
        os.chmod(shim, 0o755)
        for name in ("Makefile", "pyproject.toml", "launch"):
            os.symlink(os.path.join(REPO, name), os.path.join(self.root, name))
        open(os.path.join(self.root, ".venv", ".installed"), "w").close()  # newer than pyproject.toml
        self.env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", PATH=f"{bin_dir}:{os.environ['PATH']}",
                        JAX_COMPILATION_CACHE_DIR=os.path.join(self.root, ".jax_cache"),
                        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
                        ARGS=FAST)
        self.done: dict[str, subprocess.CompletedProcess] = {}

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def run(self, command: str) -> subprocess.CompletedProcess:
        if command not in self.done:
            line = command.replace("CONFIG [overrides]", f"configs/default.py {FAST}")
            if re.match(r"(\.venv/bin/)?jaxrl (train|eval|ablate) ", line):
                line = f"{line} {FAST}"
            if line.startswith("jaxrl sample "):
                line = f"{line} --max-new-tokens 8"
            self.done[command] = subprocess.run(["bash", "-c", line], cwd=self.root, env=self.env,
                                                capture_output=True, text=True, timeout=900)
        result = self.done[command]
        assert result.returncode in RETURN_CODES.get(command, (0,)), (command, result.stdout[-3000:],
                                                                       result.stderr[-3000:])
        return result


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return Workspace(tmp_path_factory.mktemp("readme"))


def _check_train_default(ws, out):
    assert os.path.isfile(ws.path("runs", "default", "final_model", "model.safetensors"))
    assert "before training" in out and "after training" in out


def _check_try1(ws, out):
    assert json.load(open(ws.path("runs", "try1", "config.json")))["rl"]["lr"] == 1e-4
    assert os.path.isfile(ws.path("runs", "try1", "final_model", "config.json"))


def _check_eval(ws, out):
    summary = json.load(open(ws.path("runs", "default", "eval", "eval.json")))["sets"]["heldout"]["summary"]
    assert summary["num_problems"] == 2 and 0.0 <= summary["maj_at_k"] <= 1.0


def _check_export(ws, out):
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(ws.path("try1_hf")))


def _check_plot(ws, out):
    assert any(name.endswith(".png") for name in os.listdir(ws.path("runs", "try1", "plots")))


def _check_sample(ws, out):
    assert out.count("--- sample") == 4  # --n defaults to 4


def _check_plan(ws, out):
    assert "peak" in out


def _check_ablate(ws, out):
    runs = json.load(open(ws.path("runs", "ablate", "ablation.json")))
    assert len(json.dumps(runs)) > 0 and "top20" in json.dumps(runs)


def _check_local_gpu(ws, out):
    assert "run dir runs/default" in out


# command -> (commands it needs first, check(workspace, stdout), slow)
RUN = {
    "make run": ((), _check_train_default, True),
    ".venv/bin/jaxrl train --config configs/default.py": ((), _check_train_default, True),
    TRAIN_TRY1: ((), _check_try1, True),
    "jaxrl eval --config configs/default.py --model runs/try1/final_model": ((TRAIN_TRY1,), _check_eval, True),
    "jaxrl export runs/try1 --out try1_hf": ((TRAIN_TRY1,), _check_export, True),
    "jaxrl plot runs/try1": ((TRAIN_TRY1,), _check_plot, True),
    'jaxrl sample --model runs/try1/final_model --prompt "make 9 from 3 5 7"': ((TRAIN_TRY1,), _check_sample, True),
    "jaxrl plan --config configs/qwen3_8b_dapo_forking.py --hardware h100x8": ((), _check_plan, False),
    "jaxrl ablate --config configs/default.py --arms full,top20,bottom80 --seeds 3": ((), _check_ablate, True),
    "launch/local_gpu.sh CONFIG [overrides]": ((), _check_local_gpu, True),
}
RETURN_CODES = {"jaxrl plan --config configs/qwen3_8b_dapo_forking.py --hardware h100x8": (0, 1)}  # 1 = no fit


def test_every_readme_command_is_run_or_exempt():
    unclassified = [c for c in COMMANDS if c not in RUN and c not in EXEMPT]
    assert not unclassified, f"README commands neither run nor exempt (add them to RUN or EXEMPT): {unclassified}"
    stale = [c for c in list(RUN) + list(EXEMPT) if c not in COMMANDS]
    assert not stale, f"listed commands no longer in README.md: {stale}"
    assert COMMANDS[:2] == ["make run", "make test"]  # the README opens with the two fresh-machine commands
    assert all(reason.strip() for reason in EXEMPT.values())


def test_readme_commands_are_found():
    text = "```bash\nmake run   # note\n\n# a comment\nfoo --x\n```\nsee `make` and `jaxrl plot runs/a` or `jaxrl.cli`"
    assert readme_commands(text) == ["make run", "foo --x", "jaxrl plot runs/a"]


@pytest.mark.parametrize("command", [pytest.param(c, marks=[pytest.mark.slow] if RUN[c][2] else [], id=c[:60])
                                     for c in RUN])
def test_readme_command_runs(command, workspace):
    needs, check, _ = RUN[command]
    for earlier in needs:
        workspace.run(earlier)
    check(workspace, workspace.run(command).stdout)


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


def test_default_config_and_model_found_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config_lib.load_config("default")  # checks model.path holds config.json
    assert os.path.isfile(os.path.join(cfg.model.path, "model.safetensors"))
