"""On 8 fake CPU devices (subprocesses): blocked attention with heads over tensor equals dense
attention on one device, and the fsdp gather of the layer weights is one layer at a time."""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# The scripts import ``tests.*``: the repository root goes on their path.
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
           PYTHONPATH=os.pathsep.join([REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
GATHER_CASE = {"model": {"model_type": "llama", "vocab_size": 256, "hidden_size": 128, "intermediate_size": 256,
                         "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "head_dim": 32, "remat": "full",
                         "dtype": "bfloat16"},
               "mesh": [1, 8, 1], "rows": 8, "micro": 8, "prompt": 16, "response": 16, "chunk": 16}


def _run(script, *args):
    proc = subprocess.run([sys.executable, os.path.join(HERE, script), *args], env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_blocked_attention_sharded_equals_dense_single_device():
    results = _run("sharding_attention_script.py")
    assert [tuple(r["mesh"]) for r in results] == [(2, 2, 2), (1, 2, 4), (1, 8, 1)]
    for r in results:
        # float32, 2 layers, 40 positions, differently ordered sums across shards: ~1e-6 relative
        assert r["logit_diff"] < 2e-5 * r["logit_scale"], r
        assert r["grad_diff"] < 1e-5 * r["grad_scale"], r


@pytest.mark.slow
def test_fsdp_gathers_one_layer_at_a_time():
    (result,) = _run("sharding_gather_script.py", json.dumps([GATHER_CASE]))
    assert result["stacked_gathers"] == 0, result
    assert result["layer_gathers"] > 0, result
