"""Exact resume after SIGKILL, and the non-finite-update guard with the last good checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxrl.train import loop, rollouts
from jaxrl.train.checkpoint import Checkpointer
from tests.test_train_loop import comparable, tiny_config, tiny_model_dir  # noqa: F401  (fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = """
import sys
from tests.test_train_loop import tiny_config
from jaxrl.train import loop
cfg = tiny_config(sys.argv[1], sys.argv[2], "dapo_forking", name="resumed", train__num_steps=6,
                  checkpoint__every_steps=3, checkpoint__async_save=False)
loop.train(cfg)
"""


def test_sigkill_then_resume_is_bitwise_identical(tiny_model_dir, tmp_path):
    root = str(tmp_path)
    straight = loop.train(tiny_config(tiny_model_dir, root, "dapo_forking", name="straight", train__num_steps=6,
                                      checkpoint__every_steps=3))

    child = subprocess.Popen([sys.executable, "-c", CHILD, tiny_model_dir, root], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": REPO})
    commit = os.path.join(root, "resumed", "checkpoints", "3", "commit_success.txt")
    deadline = time.monotonic() + 300
    while not os.path.exists(commit):
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the child never wrote checkpoint 3"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL

    resumed = loop.train(tiny_config(tiny_model_dir, root, "dapo_forking", name="resumed", train__num_steps=6,
                                     checkpoint__every_steps=3))
    assert [int(x) for x in (resumed.state.step, straight.state.step)] == [6, 6]
    assert len(resumed.metrics) == 3  # steps 4-6 ran in the resumed process
    for a, b in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [comparable(m) for m in straight.metrics[3:]] == [comparable(m) for m in resumed.metrics]
    lines = [json.loads(line) for line in open(os.path.join(root, "resumed", "metrics.jsonl"))]
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]  # lines of killed steps replaced


def test_non_finite_steps_are_skipped_then_the_run_stops(tiny_model_dir, tmp_path, monkeypatch):
    real_advantages = rollouts.group_advantages
    calls = {"n": 0}

    def poisoned_after_two_steps(adv_cfg, rewards, group_ids, num_groups):
        calls["n"] += 1
        adv = real_advantages(adv_cfg, rewards, group_ids, num_groups)
        return adv * np.nan if calls["n"] > 2 else adv

    monkeypatch.setattr(rollouts, "group_advantages", poisoned_after_two_steps)
    cfg = tiny_config(tiny_model_dir, str(tmp_path), "grpo", name="nan", train__num_steps=10,
                      train__max_bad_steps=2, checkpoint__every_steps=1)
    with pytest.raises(loop.TrainingDiverged, match="2 consecutive steps"):
        loop.train(cfg)
    checkpointer = Checkpointer(os.path.join(str(tmp_path), "nan", "checkpoints"), keep=3)
    try:
        assert checkpointer.latest_step() == 2  # the bad steps 3 and 4 were not saved
    finally:
        checkpointer.close()
    lines = [json.loads(line) for line in open(os.path.join(str(tmp_path), "nan", "metrics.jsonl"))]
    assert [line["update_skipped"] > 0 for line in lines] == [False, False, True, True]
    assert lines[-1]["skipped_updates_total"] == 2 * cfg.rl.prompts_per_step // cfg.rl.mini_batch_prompts
