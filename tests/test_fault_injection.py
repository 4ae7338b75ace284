"""Fault injection (issue 18): corrupt checkpoints, disk full, ruined weights, collapse.

In every case the newest healthy checkpoint survives, and where the run is resumable,
resume reaches parameters bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import errno
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxrl.train import health, loop
from jaxrl.train.checkpoint import CORRUPT_DIR, CheckpointError, Checkpointer
from tests.test_train_loop import tiny_config, tiny_model_dir  # noqa: F401  (fixture)

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
