"""The RL loop on 8 CPU devices (data=8) equals the loop on one device, step for step."""

import json
import math
import os
import subprocess
import sys

import pytest

from tests.test_train_loop import tiny_model_dir  # noqa: F401  (fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_loop(model_dir, root, name, devices, max_rows_per_call=0):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-m", "tests.sharding_loop_script", model_dir, root, name,
                          str(max_rows_per_call)], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    assert result["devices"] == devices
    return result["metrics"]


def test_loop_on_eight_devices_matches_one_device(tiny_model_dir, tmp_path):
    one = run_loop(tiny_model_dir, str(tmp_path), "one", 1)
    eight = run_loop(tiny_model_dir, str(tmp_path), "eight", 8, max_rows_per_call=0)
    assert len(one) == len(eight) == 2
    for a, b in zip(one, eight):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key


def test_capped_rows_per_call_samples_in_chunks_on_eight_devices(tiny_model_dir, tmp_path):
    metrics = run_loop(tiny_model_dir, str(tmp_path), "chunked", 8, max_rows_per_call=4)  # 1 prompt a call
    for step in metrics:
        assert step["rows_trained"] > 0 and math.isfinite(step["loss"])
        assert step["dynamic_sampling/groups_kept"] <= 2  # group ids stay per prompt across chunks
