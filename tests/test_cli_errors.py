"""Start-up errors are one line, exit 2, no traceback; malformed rows are skipped and counted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jaxrl import cli
from jaxrl.config import ConfigError, base_config, validate
from jaxrl.train import loop
from tests.test_train_loop import tiny_config, tiny_model_dir  # noqa: F401  (fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_experiment(path, model_dir, root, body=""):
    path.write_text(
        "from jaxrl.config import base_config\n"
        "def get_config():\n"
        "    cfg = base_config()\n"
        f"    cfg.model.path = {model_dir!r}\n"
        f"    cfg.run.root = {root!r}\n"
        f"{body}"
        "    return cfg\n"
    )
    return str(path)


@pytest.mark.parametrize(
    "body, overrides, message",
    [
        ("", ["--config.rl.lrr=1e-6"], "unknown config key 'rl.lrr'; did you mean 'rl.lr'?"),
        ("    cfg.rl.los = 1\n", [], "unknown config key 'los'; did you mean 'rl.loss'?"),
        ("", ["--config.rl.samples_per_prompt=abc"], "expects an integer"),
        ("", ["--config.model.path=/nonexistent/model"], "model directory not found: /nonexistent/model"),
        ("", ["--config.mesh.data=3"], "mesh"),
        ("", ["--config.rl.loss.entropy_rho=1.5"], "rl.loss.entropy_rho must be in (0, 1]"),
        ("", ["--config.rl.mini_batch_prompts=3"], "rl.mini_batch_prompts=3 must divide"),
        ("", ["--config.sampling.max_rows_per_call=2"], "sampling.max_rows_per_call=2 must be 0"),
        ("", ["--config.distributed.coordinator_address=localhost:1234"],
         "set distributed.num_processes and distributed.process_id too"),
    ],
)
def test_train_start_up_errors_are_one_line(tmp_path, tiny_model_dir, capsys, body, overrides, message):
    config = write_experiment(tmp_path / "exp.py", tiny_model_dir, str(tmp_path / "runs"), body)
    status = cli.main(["train", "--config", config, *overrides])
    err = capsys.readouterr().err
    assert status == cli.USER_ERROR
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "runs")  # nothing started


def test_console_script_error_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "jaxrl.cli", "train", "--config", str(tmp_path / "missing.py")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == f"jaxrl train: error: config file not found: {tmp_path / 'missing.py'}"


def test_override_types_and_lists():
    cfg = base_config()
    from jaxrl.config import apply_override

    apply_override(cfg, "rl.lr", "1e-6")
    apply_override(cfg, "rl.dynamic_sampling", "true")
    apply_override(cfg, "data.train_files", "a.jsonl,b.jsonl")
    apply_override(cfg, "data.system_prompt", "be brief")
    apply_override(cfg, "rl.epochs", "2")
    assert (cfg.rl.lr, cfg.rl.dynamic_sampling, cfg.data.train_files) == (1e-6, True, ("a.jsonl", "b.jsonl"))
    assert (cfg.data.system_prompt, cfg.rl.epochs) == ("be brief", 2)
    with pytest.raises(ConfigError, match="expects true/false"):
        apply_override(cfg, "rl.dynamic_sampling", "maybe")
    with pytest.raises(ConfigError, match="is a section"):
        apply_override(cfg, "rl.loss", "1")


def test_mesh_must_divide_devices():
    cfg = base_config()
    cfg.mesh.data, cfg.mesh.fsdp = 1, 3
    with pytest.raises(ConfigError, match="mesh"):
        validate(cfg, num_devices=1, check_files=False)


def test_malformed_rows_are_skipped_and_counted(tiny_model_dir, tmp_path):
    good = [{"prompt": f"make {t} from 1 2", "answer": str(t), "numbers": [1, 2], "target": t} for t in (3, -1, 1)]
    lines = [json.dumps(row) for row in good * 2]
    lines += [
        "{not json",
        json.dumps({"answer": "3"}),  # missing prompt
        json.dumps({"prompt": 7, "answer": "3"}),  # wrong type
        json.dumps({"prompt": "   ", "answer": "3"}),  # empty prompt
        json.dumps(["a", "list"]),  # not an object
    ]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines) + "\n")
    cfg = tiny_config(tiny_model_dir, str(tmp_path), "grpo", name="malformed", train__num_steps=1,
                      data__source="files", data__train_files=(str(data),))
    result = loop.train(cfg)
    assert result.metrics[0]["data/rows_malformed"] == 5.0
    assert result.stop_reason == "completed" and result.metrics[0]["rows_trained"] > 0
