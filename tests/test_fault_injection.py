"""Fault injection (issue 18): corrupt checkpoints, disk full, ruined weights, collapse.

In every case the newest healthy checkpoint survives, and where the run is resumable,
resume reaches parameters bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxrl.train import health, loop
from jaxrl.train.checkpoint import CORRUPT_DIR, CheckpointError, Checkpointer
from tests.test_train_loop import tiny_config, tiny_model_dir  # noqa: F401  (fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

META = {"data_state": {"position": 0}, "consecutive_bad_steps": 0}


def state_at(step: int) -> dict:
    return {"w": jnp.full((3, 4), float(step), jnp.float32), "step": jnp.asarray(step, jnp.int32)}


def saved(tmp_path, steps, *, keep=3, healthy=lambda s: True) -> Checkpointer:
    checkpointer = Checkpointer(str(tmp_path / "run" / "checkpoints"), keep=keep, async_save=False)
    for step in steps:
        checkpointer.save(step, state_at(step), {**META, "data_state": {"position": step}}, healthy=healthy(step))
    return checkpointer


def test_rotation_never_drops_the_newest_healthy_checkpoint(tmp_path):
    checkpointer = saved(tmp_path, [1, 2, 3, 4], keep=2, healthy=lambda s: s <= 2)
    try:
        assert checkpointer.all_steps() == [2, 3, 4]  # 1 rotated out, 2 kept as the newest healthy
        assert checkpointer.newest_healthy() == 2
        assert checkpointer.quarantine_unhealthy() == 2
        assert checkpointer.all_steps() == [2]
    finally:
        checkpointer.close()
    assert sorted(int(n.split("-")[0]) for n in os.listdir(tmp_path / "run" / "checkpoints_unhealthy")) == [3, 4]


def _truncate_an_array_file(path):
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(path, "state")) for f in fs
             if os.path.getsize(os.path.join(d, f)) > 64 and "_METADATA" not in f and "manifest" not in f]
    for name in files:
        with open(name, "r+b") as handle:
            handle.truncate(16)


CORRUPTIONS = {
    "truncated_arrays": _truncate_an_array_file,
    "no_state_metadata": lambda path: os.remove(os.path.join(path, "state", "_METADATA")),
    "garbage_meta": lambda path: open(os.path.join(path, "meta", "metadata"), "wb").write(b"\x00\xffnot json"),
    "no_state_dir": lambda path: shutil.rmtree(os.path.join(path, "state")),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, kind):
    saved(tmp_path, [2, 4]).close()
    CORRUPTIONS[kind](str(tmp_path / "run" / "checkpoints" / "4"))
    lines = []
    checkpointer = Checkpointer(str(tmp_path / "run" / "checkpoints"), keep=3, async_save=False)
    try:
        step, state, meta = checkpointer.restore_latest(state_at(0), lines.append)
    finally:
        checkpointer.close()
    # Without state/_METADATA the arrays still restore exactly into the template: good work is kept.
    expected = 4 if kind == "no_state_metadata" else 2
    assert step == expected and meta["data_state"] == {"position": expected}
    np.testing.assert_array_equal(np.asarray(state["w"]), np.full((3, 4), float(expected), np.float32))
    if expected == 2:
        assert len(lines) == 1 and lines[0].startswith("checkpoint step 4 is unreadable") and "\n" not in lines[0]
        assert len(os.listdir(tmp_path / "run" / CORRUPT_DIR)) == 1
    else:
        assert lines == []


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    checkpointer = saved(tmp_path, [1], keep=1)
    real_save = ocp.CheckpointManager.save

    def disk_full(self, step, *args, **kwargs):
        if step == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", disk_full)
    try:
        with pytest.raises(CheckpointError, match="checkpoint step 2 could not be written.*No space left on device"):
            checkpointer.save(2, state_at(2), META)
        assert checkpointer.all_steps() == [1]
        step, state, _ = checkpointer.restore_latest(state_at(0), print)
        assert step == 1 and float(state["w"][0, 0]) == 1.0
    finally:
        checkpointer.close()


def test_all_finite_and_collapse_reasons():
    assert health.all_finite({"a": jnp.ones(3), "n": jnp.arange(3), "b": (jnp.zeros((2, 2)),)})
    assert not health.all_finite({"a": jnp.ones(3), "b": jnp.asarray([1.0, jnp.inf])})
    assert not health.all_finite([jnp.asarray([[0.0, jnp.nan]], jnp.bfloat16)])
    lively = {"reward/mean": 0.25, "rollout/entropy_mean": 1.3}
    assert health.collapse_reasons(["12", "3+4", "", "x"], lively) == []
    assert health.collapse_reasons(["", " ", ""], lively) == ["every completion is empty"]
    assert health.collapse_reasons(["aaaa"] * 8, lively) == ["every completion is identical"]
    assert health.collapse_reasons(["a", "b"], {"reward/mean": 0.0, "rollout/entropy_mean": 0.0}) == [
        "reward and rollout entropy are zero"]
    assert health.collapse_reasons(["a", "b"], {"reward/mean": 0.0, "rollout/entropy_mean": float("nan")}) == [
        "rollout entropy is not finite"]


def _params_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_corrupt_newest_checkpoint_then_resume_is_bitwise_identical(tiny_model_dir, tmp_path, capsys):
    root = str(tmp_path)
    straight = loop.train(tiny_config(tiny_model_dir, root, "grpo", name="straight", train__num_steps=6))
    cfg = tiny_config(tiny_model_dir, root, "grpo", name="broken", train__num_steps=6)
    loop.train(cfg, max_steps=4)  # checkpoints 2 and 4
    CORRUPTIONS["garbage_meta"](os.path.join(root, "broken", "checkpoints", "4"))
    capsys.readouterr()
    resumed = loop.train(cfg)
    err = capsys.readouterr().err
    assert "checkpoint step 4 is unreadable" in err and "resumed from checkpoint step 2" in err
    assert len(resumed.metrics) == 4  # steps 3-6
    _params_equal(straight.state, resumed.state)
    lines = [json.loads(line) for line in open(os.path.join(root, "broken", "metrics.jsonl"))]
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_ruined_weights_stop_the_run_and_keep_the_healthy_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_model_dir, str(tmp_path), "grpo", name="ruined", train__num_steps=2,
                      checkpoint__keep=1)
    loop.train(cfg)  # healthy checkpoint 2
    monkeypatch.setattr(loop, "validate", lambda *a, **k: None)  # validation refuses a NaN lr
    cfg.rl.lr, cfg.train.num_steps, cfg.checkpoint.every_steps = float("nan"), 10, 1
    with pytest.raises(health.RunUnhealthy, match="step 3: parameters or optimizer state became non-finite.*"
                                                  "newest healthy checkpoint: step 2"):
        loop.train(cfg, allow_config_change=("rl.lr",))
    checkpointer = Checkpointer(os.path.join(str(tmp_path), "ruined", "checkpoints"), keep=1)
    try:
        assert checkpointer.all_steps() == [2]
    finally:
        checkpointer.close()


@pytest.mark.slow
def test_collapse_stops_the_run_and_unhealthy_checkpoints_never_rotate_the_healthy_one_out(
        tiny_model_dir, tmp_path, monkeypatch):
    real = health.collapse_reasons
    steps = {"n": 0}

    def collapsed_from_step_3(completions, metrics):
        steps["n"] += 1
        return ["every completion is empty"] if steps["n"] >= 3 else real(completions, metrics)

    monkeypatch.setattr(health, "collapse_reasons", collapsed_from_step_3)
    cfg = tiny_config(tiny_model_dir, str(tmp_path), "grpo", name="collapse", train__num_steps=20,
                      train__max_bad_steps=4, checkpoint__every_steps=1, checkpoint__keep=2)
    with pytest.raises(health.RunUnhealthy, match="policy collapsed for 4 steps.*newest healthy checkpoint: step 1"):
        loop.train(cfg)
    run_dir = os.path.join(str(tmp_path), "collapse")
    checkpointer = Checkpointer(os.path.join(run_dir, "checkpoints"), keep=2)
    try:
        # Step 2's weights produced the first collapsed rollouts (step 3), so step 1 is the
        # newest healthy checkpoint. keep=2 rotated 2 and 3 out, never 1; the unhealthy 4
        # and 5 were moved aside (step 6 stopped the run unsaved), so a resume starts from 1.
        assert checkpointer.all_steps() == [1]
    finally:
        checkpointer.close()
    moved = sorted(int(n.split("-")[0]) for n in os.listdir(os.path.join(run_dir, "checkpoints_unhealthy")))
    assert moved == [4, 5]


# ---------------------------------------------------------------------------------------
# Disk full on a real tiny tmpfs, and a failure in the background (async) write.
# ---------------------------------------------------------------------------------------


def _tmpfs(path, size: str):
    """Mount a tmpfs of ``size`` (e.g. "1m") at ``path`` and yield it; needs root with
    CAP_SYS_ADMIN (skipped otherwise: the injected ENOSPC test above still covers disk full)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 1 MiB tmpfs."""
    yield from _tmpfs(tmp_path / "tmpfs", "1m")


@pytest.fixture
def run_root_tmpfs(tmp_path):
    """A 256 KiB tmpfs: a tiny run's config and data fit, its first checkpoint (~340 KiB) does not."""
    yield from _tmpfs(tmp_path / "runs", "256k")


def random_state(step: int) -> dict:
    """600 KiB of incompressible float32: one checkpoint fits the 1 MiB tmpfs, two do not."""
    values = np.random.default_rng(step).standard_normal((150, 1024)).astype(np.float32)
    return {"w": jnp.asarray(values), "step": jnp.asarray(step, jnp.int32)}


@pytest.mark.parametrize("async_save", [False, True])
def test_real_disk_full_is_one_line_and_keeps_the_previous_checkpoint(tiny_tmpfs, async_save):
    checkpointer = Checkpointer(str(tiny_tmpfs / "run" / "checkpoints"), keep=1, async_save=async_save)
    try:
        checkpointer.save(1, random_state(1), {**META, "data_state": {"position": 1}})
        checkpointer.wait()
        with pytest.raises(CheckpointError) as raised:
            # Async: save() returns after the device->host copy; the background write fails
            # and the failure surfaces, in one line, when the save is finished.
            checkpointer.save(2, random_state(2), {**META, "data_state": {"position": 2}})
            checkpointer.wait()
        message = str(raised.value)
        assert "\n" not in message and message.startswith("checkpoint step 2 ")
        assert "No space left on device" in message or "ENOSPC" in message or "not committed" in message, message
        assert checkpointer.all_steps() == [1]
        step, state, meta = checkpointer.restore_latest(random_state(0), print)
        assert step == 1 and meta["data_state"] == {"position": 1}
        np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(random_state(1)["w"]))
    finally:
        try:
            checkpointer.close()
        except CheckpointError:  # the failed save was already reported above
            pass


def test_an_error_in_the_background_write_is_one_line_and_the_previous_checkpoint_survives(tmp_path, monkeypatch):
    from orbax.checkpoint._src.path import atomicity  # the commit step of an async save

    checkpointer = saved(tmp_path, [1], keep=1)
    checkpointer.close()
    checkpointer = Checkpointer(str(tmp_path / "run" / "checkpoints"), keep=1, async_save=True)
    real_finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def failing_finalize(self, *args, **kwargs):
        if self.get().name.startswith("2"):
            raise OSError(errno.EIO, "Input/output error", str(self.get()))
        return await real_finalize(self, *args, **kwargs)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", failing_finalize)
    try:
        checkpointer.save(2, state_at(2), META)  # returns; the write fails in the background
        with pytest.raises(CheckpointError) as raised:
            checkpointer.save(3, state_at(3), META)  # finishing step 2 first reports its failure
        assert str(raised.value).startswith("checkpoint step 2 ") and "\n" not in str(raised.value)
        assert "Input/output error" in str(raised.value) or "not committed" in str(raised.value)
        assert checkpointer.all_steps() == [1]
        step, state, _ = checkpointer.restore_latest(state_at(0), print)
        assert step == 1 and float(state["w"][0, 0]) == 1.0
    finally:
        checkpointer.close()


# ---------------------------------------------------------------------------------------
# kill -9 at random points of a real run (a subprocess), and once inside orbax's save.
# ---------------------------------------------------------------------------------------

KILL_RUN = dict(train__num_steps=6, checkpoint__every_steps=1, checkpoint__keep=2, rewards__num_workers=2)

# The run as a subprocess. With JAXRL_KILL_IN_SAVE=<step>, the process SIGKILLs itself inside
# orbax's save of that step: every file is written, the atomic rename (the commit) is not.
DRIVER = """
import os, signal, sys
from orbax.checkpoint._src.path import atomicity
from tests.test_train_loop import tiny_config
from tests.test_fault_injection import KILL_RUN
from jaxrl.train import loop

kill_step = os.environ.get("JAXRL_KILL_IN_SAVE")
real_finalize = atomicity.AtomicRenameTemporaryPath.finalize

async def finalize(self, *args, **kwargs):
    if kill_step and self._final_path.name == kill_step:
        with open(os.environ["JAXRL_KILL_MARKER"], "w") as marker:
            marker.write(str(self.get()))
        os.kill(os.getpid(), signal.SIGKILL)
    return await real_finalize(self, *args, **kwargs)

atomicity.AtomicRenameTemporaryPath.finalize = finalize
loop.train(tiny_config(sys.argv[1], sys.argv[2], "grpo", name="killed", **KILL_RUN))
"""


def _steps_logged(path: str) -> list[int]:
    try:
        with open(path) as handle:
            return [json.loads(line)["step"] for line in handle if line.strip()]
    except FileNotFoundError:
        return []


def _checkpoint_steps(run_dir: str) -> list[int]:
    folder = os.path.join(run_dir, "checkpoints")
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def _start(model_dir: str, root: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, model_dir, root], cwd=REPO,
                            env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _kill_after(process: subprocess.Popen, metrics: str, step: int, delay_s: float) -> None:
    """SIGKILL ``process`` ``delay_s`` seconds after step ``step`` is logged."""
    deadline = time.monotonic() + 900
    while not _steps_logged(metrics) or _steps_logged(metrics)[-1] < step:
        assert process.poll() is None, f"run ended before step {step}: {process.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "run made no progress"
        time.sleep(0.05)
    time.sleep(delay_s)
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.mark.slow
def test_kill_9_at_random_points_and_inside_a_checkpoint_write_then_resume_is_bitwise_identical(
        tiny_model_dir, tmp_path):
    root = str(tmp_path)
    run_dir, metrics = os.path.join(root, "killed"), os.path.join(root, "killed", "metrics.jsonl")
    rng = random.Random(18)  # seeded: the kill points are the same on every machine

    # 1. A fresh run killed at a random point (after step 1 or 2, 0-1.5 s later).
    _kill_after(_start(tiny_model_dir, root), metrics, rng.randint(1, 2), rng.uniform(0.0, 1.5))
    committed = _checkpoint_steps(run_dir)

    # 2. Resumed, then killed inside orbax's save of the next checkpoint: files written, not committed.
    target = (committed[-1] if committed else 0) + 1
    marker = os.path.join(root, "killed_in_save")
    process = _start(tiny_model_dir, root, {"JAXRL_KILL_IN_SAVE": str(target), "JAXRL_KILL_MARKER": marker})
    assert process.wait(timeout=900) == -signal.SIGKILL, process.stderr.read()[-2000:]
    assert os.path.exists(marker), "the kill did not happen inside the save"
    assert target not in _checkpoint_steps(run_dir)  # never committed, so never listed
    assert _checkpoint_steps(run_dir) == committed

    # 3. Resumed again and killed at another random point.
    _kill_after(_start(tiny_model_dir, root), metrics, target + rng.randint(0, 1), rng.uniform(0.0, 1.5))

    # 4. Finish in this process, and compare with a run that was never interrupted.
    resumed = loop.train(tiny_config(tiny_model_dir, root, "grpo", name="killed", **KILL_RUN))
    straight = loop.train(tiny_config(tiny_model_dir, root, "grpo", name="straight", **KILL_RUN))
    assert resumed.stop_reason == "completed" and int(resumed.state.step) == 6
    _params_equal(straight.state, resumed.state)  # params, optimizer state, RNG key, counters
    assert _steps_logged(metrics) == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_a_real_run_filling_the_disk_exits_2_with_one_line(tiny_model_dir, tmp_path, run_root_tmpfs):
    from tests.test_cli_errors import write_experiment  # the experiment-file helper of the CLI tests

    config = write_experiment(tmp_path / "exp.py", tiny_model_dir, str(run_root_tmpfs),
                              "    cfg.train.num_steps = 2\n    cfg.checkpoint.every_steps = 2\n"
                              "    cfg.data.synthetic_num_train = 64\n    cfg.data.synthetic_num_heldout = 8\n"
                              "    cfg.rl.prompts_per_step = 2\n    cfg.rl.samples_per_prompt = 4\n"
                              "    cfg.rl.mini_batch_prompts = 1\n    cfg.rl.micro_batch_rows = 2\n"
                              "    cfg.sampling.max_new_tokens = 8\n    cfg.data.max_prompt_tokens = 32\n"
                              "    cfg.logging.progress_bar = False\n    cfg.logging.tensorboard = 'off'\n"
                              "    cfg.checkpoint.save_final_model = False\n")
    result = subprocess.run([sys.executable, "-m", "jaxrl.cli", "train", "--config", config], cwd=REPO,
                            capture_output=True, text=True, timeout=900)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and "No space left on device" in lines[0], result.stderr[-3000:]
    assert lines[0].startswith("jaxrl train: error: ")
