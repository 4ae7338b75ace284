"""Overlapped RL (rl.rollout_staleness=1) on 2 processes x 4 devices equals 1 process x 8
devices (its own file so that pytest-xdist's loadfile runs it beside test_sharding_loop.py)."""

import pytest

from tests.test_sharding_loop import _result, _start, assert_same_steps, finish_processes, free_port
from tests.test_train_loop import tiny_model_dir  # noqa: F401  (fixture)


@pytest.mark.slow
def test_overlapped_steps_on_two_processes_match_one_process(tiny_model_dir, tmp_path):
    """rl.rollout_staleness=1: every process dispatches the next step's sampling before the
    update in the same order, so 2 processes x 4 devices still equal 1 x 8 (same tolerances as
    the on-policy test); step 2 samples with the initial params, so its sampler-trainer gap is
    far above step 1's (float32 noise only)."""
    root, port = str(tmp_path), free_port()
    procs = [_start(tiny_model_dir, root, "single", 8, staleness=1)]
    procs += [_start(tiny_model_dir, root, "multi", 4, port=port, process_id=i, staleness=1) for i in range(2)]
    single_out, *multi_out = finish_processes(procs)
    single, multi = _result(single_out), [_result(t) for t in multi_out]
    assert multi[0]["metrics"] == multi[1]["metrics"]
    assert_same_steps(single["metrics"], multi[0]["metrics"], rel=1e-5, abs_=1e-6)
    first, second = single["metrics"]
    assert [first["rollout/policy_lag"], second["rollout/policy_lag"]] == [0.0, 1.0]
    assert second["logprob_gap/abs_mean"] > 10 * first["logprob_gap/abs_mean"]
