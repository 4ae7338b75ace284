"""The RL loop on 8 CPU devices (data=8) equals the loop on one device, and 2 processes x 4
devices (jax.distributed, gloo) equal 1 process x 8 devices, step for step.

What is compared (tests/sharding_loop_script.py: 2 steps, 4 prompts x 4 samples, dynamic
sampling that drops about half the groups and draws a second round, forking-token updates):

* metrics computed on the host from the sampled tokens (rewards, accuracy, lengths, dynamic
  sampling counts, rows, token counts): exactly equal. They change only if a sampled token does.
* metrics reduced on device (loss, grad_norm, entropies, ratios, ...): equal up to the order
  of float32 summation. Between 1 and 8 devices every reduction over rows (at most 16 rows x
  8 tokens = 128 terms) is split differently: |error| <= 127 * 2**-24 ~ 7.6e-6 of the sum of
  magnitudes, so rel=1e-4 (abs=1e-5 near zero). Between 1 x 8 and 2 x 4 the per-device
  programs are the same and only the 8-way cross-device sums change order (in-process vs
  gloo): 7 * 2**-24 ~ 4.2e-7, so rel=1e-5 (abs=1e-6).
* final parameters (2 x 4 vs 1 x 8): the script sets optim.eps = 1e-4, so an Adam update
  g / (sqrt(v) + eps) moves by at most lr * |dg| / eps for a gradient difference dg; clipped
  gradients (norm <= 1) summed over 8 devices in another order differ by |dg| <= 8 * 4.2e-7
  < 4e-6 per entry, hence atol = lr * updates * 4e-6 / eps (about 8 % of what the updates
  move the parameters, which is about lr per update).
"""

import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.test_train_loop import tiny_model_dir  # noqa: F401  (fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Host-side metrics: functions of the sampled tokens and of counts (compared exactly).
EXACT_PREFIXES = ("reward/", "accuracy", "rollout/response_length", "rollout/truncated_fraction", "rollout/length_fill",
                  "generated_tokens", "dynamic_sampling/", "rows_trained", "tokens", "update_", "lr", "data/",
                  "health/", "skipped_updates_total", "compiles/")


def _env(devices: int) -> dict:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
                PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _start(model_dir, root, name, devices, max_rows_per_call=0, port=None, process_id=None, staleness=0):
    extra = [] if port is None else [str(port), str(process_id)]
    return subprocess.Popen([sys.executable, "-m", "tests.sharding_loop_script", model_dir, root, name,
                             str(max_rows_per_call), *extra], cwd=REPO,
                            env={**_env(devices), "ROLLOUT_STALENESS": str(staleness)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish_processes(procs, timeout=900):
    """stdout of each process (all must exit 0); kills the rest on failure."""
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-4000:]
    return outputs


def _result(output: str) -> dict:
    line = [l for l in output.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def run_loop(model_dir, root, name, devices, max_rows_per_call=0):
    result = _result(finish_processes([_start(model_dir, root, name, devices, max_rows_per_call)])[0])
    assert result["devices"] == devices
    return result["metrics"]


def assert_same_steps(reference, other, rel, abs_):
    assert len(reference) == len(other) == 2
    for step, (a, b) in enumerate(zip(reference, other), start=1):
        assert a.keys() == b.keys()
        for key in a:
            if key.startswith(EXACT_PREFIXES):
                assert b[key] == a[key], (step, key)
            else:
                assert b[key] == pytest.approx(a[key], rel=rel, abs=abs_), (step, key)


@pytest.mark.slow
def test_loop_on_eight_devices_matches_one_device(tiny_model_dir, tmp_path):
    one = run_loop(tiny_model_dir, str(tmp_path), "one", 1)
    eight = run_loop(tiny_model_dir, str(tmp_path), "eight", 8, max_rows_per_call=0)
    assert_same_steps(one, eight, rel=1e-4, abs_=1e-5)
    assert one[0]["dynamic_sampling/groups_dropped"] > 0 and one[0]["dynamic_sampling/rounds"] == 2


def test_capped_rows_per_call_samples_in_chunks_on_eight_devices(tiny_model_dir, tmp_path):
    metrics = run_loop(tiny_model_dir, str(tmp_path), "chunked", 8, max_rows_per_call=4)  # 1 prompt a call
    for step in metrics:
        assert step["rows_trained"] > 0 and math.isfinite(step["loss"])
        assert step["dynamic_sampling/groups_kept"] <= 4  # group ids stay per prompt across chunks


def free_port() -> int:
    """A TCP port free on localhost now (for the jax.distributed coordinator)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _scored(root, name, process):
    with open(os.path.join(root, f"{name}.scored.{process}"), encoding="utf-8") as handle:
        return handle.read().splitlines()


@pytest.mark.slow
def test_two_processes_run_the_loop_like_one_process_and_score_only_their_prompts(tiny_model_dir, tmp_path):
    root, port = str(tmp_path), free_port()
    # All three processes run at once; the single-process reference is independent.
    procs = [_start(tiny_model_dir, root, "single", 8)]
    procs += [_start(tiny_model_dir, root, "multi", 4, port=port, process_id=i) for i in range(2)]
    single_out, *multi_out = finish_processes(procs)
    single, multi = _result(single_out), [_result(text) for text in multi_out]
    assert (single["processes"], single["devices"]) == (1, 8)
    assert [(m["processes"], m["devices"]) for m in multi] == [(2, 8), (2, 8)]
    assert multi[0]["metrics"] == multi[1]["metrics"]  # every process logs the same numbers
    # jaxrl eval's code path on every process: the same report everywhere, equal to one process's
    assert multi[0]["eval"] == multi[1]["eval"] == single["eval"] and single["eval"]["heldout"]["problems"]
    assert_same_steps(single["metrics"], multi[0]["metrics"], rel=1e-5, abs_=1e-6)
    first = single["metrics"][0]
    assert first["dynamic_sampling/groups_dropped"] > 0 and first["dynamic_sampling/rounds"] == 2

    # Each process scored only its block of every batch: 2 of the 4 prompts of each round.
    assert "data: process 0/2 scores prompts [0, 2) of each batch of 4" in multi_out[0]
    assert "data: process 1/2 scores prompts [2, 4) of each batch of 4" in multi_out[1]
    mine, theirs, everything = _scored(root, "multi", 0), _scored(root, "multi", 1), _scored(root, "single", 0)
    rounds = sum(m["dynamic_sampling/rounds"] for m in single["metrics"])
    assert len(mine) == len(theirs) == rounds * 2 * 4  # 2 prompts x 4 samples a round each
    assert not set(mine) & set(theirs)
    assert sorted(mine + theirs) == sorted(everything)

    # Same final parameters, and both runs saved the step-2 checkpoint.
    lr, eps, updates = 3e-3, 1e-4, 2 * 2 * 2  # steps x epochs x mini-batches (tiny_config, script)
    a, b = np.load(os.path.join(root, "single.npz")), np.load(os.path.join(root, "multi.npz"))
    assert set(a.files) == set(b.files) and len(a.files) >= 10
    for name in a.files:
        np.testing.assert_allclose(b[name], a[name], rtol=0, atol=lr * updates * 4e-6 / eps, err_msg=name)
    for name in ("single", "multi"):
        assert os.path.isdir(os.path.join(root, name, "checkpoints", "2"))

