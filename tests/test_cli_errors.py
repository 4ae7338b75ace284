"""Start-up errors are one line, exit 2, no traceback; malformed rows are skipped and counted."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import types

import pytest

from jaxrl import cli
from jaxrl.config import ConfigError, base_config, config_changes, to_json, validate
from jaxrl.train import loop
from jaxrl.train import run_dir as run_dir_io
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
        ("", ["--config.sampling.cpu_threads=-1"], "sampling.cpu_threads must be an int >= 0"),
        ("", ["--config.sampling.layer_loop=scan"], "sampling.layer_loop='scan'; choose one of auto, rolled, unrolled"),
        ("", ["--config.sampling.cpu_threads=2", "--config.sampling.backend=continuous"],
         "sampling.cpu_threads=2 works with sampling.backend='static' only"),
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


# Issue 18: every start-up failure is one line naming the key, file or line (exit 2).
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--config.rl.lr=nan"], "rl.lr must be a finite number, got nan"),
        (["--config.rl.lr=inf"], "rl.lr must be a finite number, got inf"),
        (["--config.rewards.timeout_s=nan"], "rewards.timeout_s must be a finite number"),
        (["--config.rewards.failure_reward=nan"], "rewards.failure_reward must be a finite number"),
        (["--config.optim.b2=1.5"], "optim.b2 must be in [0, 1), got 1.5"),
        (["--config.run.seed=-1"], "run.seed must be in [0, 2**32)"),
        (["--config.run.seed=4294967296"], "run.seed must be in [0, 2**32)"),
        (["--config.run.name=../../x"], "run.name must be a single directory name"),
        (["--config.run.name=/tmp/abs"], "run.name must be a single directory name"),
        (["--config.run.name="], "run.name must be a single directory name"),
    ],
)
def test_non_finite_out_of_range_and_escaping_values_are_refused(tmp_path, tiny_model_dir, capsys, overrides,
                                                                  message):
    config = write_experiment(tmp_path / "exp.py", tiny_model_dir, str(tmp_path / "runs"))
    status = cli.main(["train", "--config", config, *overrides])
    err = capsys.readouterr().err
    assert status == cli.USER_ERROR and message in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "runs") and not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize(
    "body, message",
    [
        ("    cfg.rl.lr = (\n", "exp.py:6: syntax error"),
        ("    cfg.rl.lr = undefined_name\n", "exp.py:6: get_config(): NameError: name 'undefined_name' is not defined"),
        ("    import no_such_module_xyz\n", "exp.py:6: get_config(): ModuleNotFoundError"),
    ],
)
def test_config_file_errors_are_one_line_with_the_line_number(tmp_path, tiny_model_dir, capsys, body, message):
    config = write_experiment(tmp_path / "exp.py", tiny_model_dir, str(tmp_path / "runs"), body)
    status = cli.main(["train", "--config", config])
    err = capsys.readouterr().err
    assert status == cli.USER_ERROR and message in err and len(err.strip().splitlines()) == 1


def test_model_dir_without_a_valid_config_json_is_one_line(tmp_path, tiny_model_dir, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "config.json").write_text("{not json")
    config = write_experiment(tmp_path / "exp.py", str(model), str(tmp_path / "runs"))
    status = cli.main(["train", "--config", config])
    err = capsys.readouterr().err
    assert status == cli.USER_ERROR and "is not a valid config.json" in err and len(err.strip().splitlines()) == 1


def test_all_bad_data_file_is_one_line_and_leaves_no_run_dir(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"answer": "3"}\n[1, 2]\n')
    config = write_experiment(tmp_path / "exp.py", tiny_model_dir, str(tmp_path / "runs"))
    status = cli.main(["train", "--config", config, "--config.data.source=files",
                       f"--config.data.train_files={data}", "--config.logging.progress_bar=false"])
    err = capsys.readouterr().err
    assert status == cli.USER_ERROR and "data.train_files: no usable prompts" in err
    assert len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "runs" / "default")  # the failed start-up left nothing


def _fake_previous_run(run_dir, cfg):
    os.makedirs(os.path.join(run_dir, "checkpoints", "12"))
    with open(os.path.join(run_dir, "config.json"), "w") as handle:
        handle.write(to_json(cfg))


def test_resuming_with_a_changed_experiment_is_refused_in_one_line(tmp_path, tiny_model_dir, capsys):
    config = write_experiment(tmp_path / "exp.py", tiny_model_dir, str(tmp_path / "runs"))
    stored = cli.load_config(config, [])
    _fake_previous_run(str(tmp_path / "runs" / "default"), stored)
    for key, value in (("rl.lr", "1e-5"), ("rl.samples_per_prompt", "4"), ("run.seed", "7")):
        status = cli.main(["train", "--config", config, f"--config.{key}={value}"])
        err = capsys.readouterr().err
        assert status == cli.USER_ERROR and f"resuming {tmp_path / 'runs' / 'default'} with a changed config ({key}:" \
            in err and f"--allow-config-change {key}" in err
        assert len(err.strip().splitlines()) == 1
    status = cli.main(["train", "--config", config, "--allow-config-change", "rl.nope"])
    assert status == cli.USER_ERROR and "unknown config key 'rl.nope'" in capsys.readouterr().err


def test_config_changes_ignore_keys_that_do_not_change_the_experiment():
    cfg = base_config()
    stored = json.loads(to_json(cfg))
    cfg.train.num_steps, cfg.logging.progress_bar, cfg.checkpoint.keep = 5, False, 9
    assert config_changes(stored, cfg) == {}
    cfg.rl.loss.token_mask, cfg.rl.prompts_per_step = "top", 16
    assert config_changes(stored, cfg) == {"rl.loss.token_mask": (base_config().rl.loss.token_mask, "top"),
                                           "rl.prompts_per_step": (8, 16)}


def test_no_resume_moves_the_old_run_aside(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    os.makedirs(run_dir / "checkpoints" / "18")
    (run_dir / "metrics.jsonl").write_text('{"step": 18}\n')
    run_dir_io.move_old_run_aside(str(run_dir))
    assert not run_dir.exists()
    (aside,) = [p for p in os.listdir(tmp_path / "runs") if p.startswith("r.old-")]
    assert os.path.isdir(tmp_path / "runs" / aside / "checkpoints" / "18")


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_run_stopped_by_a_signal_exits_128_plus_the_signal(tmp_path, tiny_model_dir, monkeypatch, capsys, signum,
                                                             status):
    config = write_experiment(tmp_path / "exp.py", tiny_model_dir, str(tmp_path / "runs"))
    stopped = loop.RunResult(state=types.SimpleNamespace(step=3), run_dir="runs/default", metrics=[],
                             stop_reason="signal", signal=int(signum))
    monkeypatch.setattr(cli, "train", lambda cfg, **kwargs: stopped)
    assert cli.main(["train", "--config", config]) == status


@pytest.mark.parametrize("code, text", [(errno.EACCES, "Permission denied"), (errno.EROFS, "Read-only file system"),
                                        (errno.ENOSPC, "No space left on device")])
def test_unwritable_or_full_disk_is_one_line(tmp_path, tiny_model_dir, monkeypatch, capsys, code, text):
    config = write_experiment(tmp_path / "exp.py", tiny_model_dir, str(tmp_path / "runs"))

    def fails(cfg, **kwargs):
        raise OSError(code, text, str(tmp_path / "runs" / "default"))

    monkeypatch.setattr(cli, "train", fails)
    status = cli.main(["train", "--config", config])
    err = capsys.readouterr().err
    assert status == cli.USER_ERROR
    assert err.strip() == f"jaxrl train: error: {tmp_path / 'runs' / 'default'}: {text}"


# Issue 18, item 10 (second part): a missing logging package and a parquet file without a
# needed column are one line, exit 2, and the failed start-up leaves no run directory.
@pytest.mark.parametrize(
    "override, blocked, message",
    [
        ("--config.logging.tensorboard=on", ("tensorboardX", "tensorboard"),
         "logging.tensorboard='on' needs tensorboardX"),
        ("--config.logging.wandb=true", ("wandb",), "logging.wandb=True needs wandb"),
    ],
)
def test_missing_logging_package_is_one_line(tmp_path, tiny_model_dir, monkeypatch, capsys, override, blocked,
                                             message):
    for name in blocked:  # as if not installed, whatever this machine has
        monkeypatch.setitem(sys.modules, name, None)
    config = write_experiment(tmp_path / "exp.py", tiny_model_dir, str(tmp_path / "runs"))
    status = cli.main(["train", "--config", config, override, "--config.rewards.num_workers=0"])
    err = capsys.readouterr().err
    assert status == cli.USER_ERROR and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "runs" / "default")


def test_parquet_without_a_needed_column_is_one_line_naming_file_and_column(tmp_path, tiny_model_dir, capsys):
    import pyarrow as pa  # the parquet writer: only this test needs it
    import pyarrow.parquet as pq

    data = str(tmp_path / "train.parquet")
    pq.write_table(pa.table({"question": ["make 3 from 1 2"], "answer": ["3"]}), data)
    config = write_experiment(tmp_path / "exp.py", tiny_model_dir, str(tmp_path / "runs"))
    status = cli.main(["train", "--config", config, "--config.data.source=files", f"--config.data.train_files={data}",
                       "--config.data.prompt_field=prompt", "--config.rewards.num_workers=0"])
    err = capsys.readouterr().err
    assert status == cli.USER_ERROR and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert data in err and "prompt" in err, err
    assert not os.path.exists(tmp_path / "runs" / "default")


def test_rewards_run_in_worker_processes_by_default():
    assert base_config().rewards.num_workers > 0
