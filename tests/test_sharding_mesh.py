"""Mesh construction, sharding rules, and single- vs 8-device equivalence (subprocess)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxrl.models.config import ModelConfig
from jaxrl.models.transformer import init_params, param_shapes
from jaxrl.sharding.mesh import (batch_sharding, detect_cluster, make_mesh,
                                 maybe_initialize_distributed, resolve_axis_sizes)
from jaxrl.sharding.rules import (constrain, logical_to_spec, param_shardings, rules_without_fsdp,
                                  shard_shape, shardings_like_params)

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = 1e-5
# Less LLVM optimisation: the subprocess compiles ~15 tiny programs; this halves its CPU time.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def test_resolve_axis_sizes_infers_and_names_the_bad_axis():
    assert resolve_axis_sizes(8) == (8, 1, 1)
    assert resolve_axis_sizes(8, data=-1, fsdp=2, tensor=2) == (2, 2, 2)
    assert resolve_axis_sizes(8, data=1, fsdp=-1, tensor=4) == (1, 2, 4)
    with pytest.raises(ValueError, match="'fsdp'"):
        resolve_axis_sizes(8, data=1, fsdp=-1, tensor=3)
    with pytest.raises(ValueError, match="multiply to 6"):
        resolve_axis_sizes(8, data=3, fsdp=2, tensor=1)
    with pytest.raises(ValueError, match="'tensor'"):
        resolve_axis_sizes(8, data=-1, fsdp=1, tensor=0)
    with pytest.raises(ValueError, match="only one"):
        resolve_axis_sizes(8, data=-1, fsdp=-1)


def test_make_mesh_single_device_has_all_axes():
    mesh = make_mesh()
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    assert batch_sharding(mesh).spec == P(("data", "fsdp"), None)


def test_logical_to_spec_divisibility_fallbacks():
    sizes = {"data": 2, "fsdp": 2, "tensor": 4}
    # batch of 2 only fits the data axis; batch of 8 takes data and fsdp
    assert logical_to_spec(("batch", "length"), (2, 5), sizes) == P("data", None)
    assert logical_to_spec(("batch", "length"), (8, 5), sizes) == P(("data", "fsdp"), None)
    # 2 KV heads cannot be split 4 ways -> replicated; head-major dims can
    assert logical_to_spec(("act_kv_heads",), (2,), sizes) == P(None)
    assert logical_to_spec(("layers", "embed", "mlp"), (2, 32, 64), sizes) == P(None, "fsdp", "tensor")
    assert shard_shape((2, 32, 64), P(None, "fsdp", "tensor"), sizes) == (2, 16, 16)
    assert logical_to_spec(("layers", "embed", "mlp"), (2, 32, 64), sizes, rules_without_fsdp()) == \
        P(None, None, "tensor")
    with pytest.raises(KeyError, match="no sharding rule"):
        logical_to_spec(("nonsense",), None, sizes)


def test_param_shardings_cover_every_parameter():
    cfg = ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    shardings = param_shardings(cfg, make_mesh())
    shapes = param_shapes(cfg)
    assert jax.tree_util.tree_structure(shardings) == jax.tree_util.tree_structure(
        jax.tree_util.tree_map(lambda s: 0, shapes, is_leaf=lambda x: isinstance(x, tuple)))


def test_detect_cluster_and_noop_initialize():
    assert detect_cluster({}) is None
    assert detect_cluster({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}) is None
    assert detect_cluster({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"}) == "slurm"
    assert detect_cluster({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}) == "tpu_pod"
    assert detect_cluster({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
    assert maybe_initialize_distributed(None, env={}) is False
    with pytest.raises(ValueError, match="num_processes"):
        maybe_initialize_distributed({"coordinator_address": "localhost:1234"}, env={})


@pytest.fixture(scope="module")
def eight_device_results():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 " + FAST_COMPILE,
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sharding_mesh_script.py")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("shape", ["(8, 1, 1)", "(1, 8, 1)", "(2, 2, 2)", "(1, 2, 4)"])
def test_meshes_match_single_device(eight_device_results, shape):
    got = eight_device_results["meshes"][shape]
    assert got["logits_diff"] < TOL
    assert got["loss_diff"] < TOL
    assert got["grads_diff"] < TOL and got["grads_max"] > 1e-3  # non-trivial gradients
    assert got["loss_threshold_diff"] < TOL
    assert got["greedy_equal"]
    assert got["engine_greedy_equal"]  # jaxrl.sampling.engine, T = 0, on the sharded params
    assert got["continuous_greedy_equal"]  # the paged continuous backend, replicated over the mesh
    assert got["num_shards"] == 8


def test_engine_greedy_matches_the_cache_decoder(eight_device_results):
    assert eight_device_results["engine_matches_decoder"]


def test_forking_threshold_identical_on_1_and_8_devices(eight_device_results):
    reference_bits = eight_device_results["reference"]["mask_threshold_bits"]
    for got in eight_device_results["meshes"].values():
        assert got["mask_threshold_bits"] == reference_bits  # bit-identical float32
        assert got["mask_equal"]


def test_parameters_and_cache_are_really_sharded(eight_device_results):
    # tiny model: V=64, D=32, F=64, H*hd=32, K*hd=16, L=2; cache [L=2, B=8, S=14, K=2, hd=8]
    meshes = eight_device_results["meshes"]
    assert eight_device_results["reference"]["shard_shapes"]["q_proj"] == [2, 32, 32]
    assert meshes["(8, 1, 1)"]["shard_shapes"]["q_proj"] == [2, 32, 32]  # pure DP: replicated
    assert meshes["(8, 1, 1)"]["cache_shard_shape"] == [2, 1, 14, 2, 8]
    assert meshes["(1, 8, 1)"]["shard_shapes"] == {
        "embed": [64, 4], "q_proj": [2, 4, 32], "k_proj": [2, 4, 16], "down_proj": [2, 64, 4]}
    assert meshes["(2, 2, 2)"]["shard_shapes"] == {
        "embed": [32, 16], "q_proj": [2, 16, 16], "k_proj": [2, 16, 8], "down_proj": [2, 32, 16]}
    assert meshes["(2, 2, 2)"]["cache_shard_shape"] == [2, 2, 14, 1, 8]
    assert meshes["(1, 2, 4)"]["shard_shapes"] == {
        "embed": [16, 16], "q_proj": [2, 16, 8], "k_proj": [2, 16, 4], "down_proj": [2, 16, 16]}
    # 2 KV heads do not split over tensor=4: the cache keeps heads whole, rows over fsdp
    assert meshes["(1, 2, 4)"]["cache_shard_shape"] == [2, 4, 14, 2, 8]


def test_load_into_shards_and_reshard_to_sampling_mesh(eight_device_results):
    load = eight_device_results["load"]
    assert load["max_diff"] == 0.0
    assert load["q_proj_shard_shape"] == [2, 4, 32] and "fsdp" in load["q_proj_spec"]
    assert eight_device_results["reshard_same_mesh_no_copy"]
    moved = eight_device_results["reshard_other_mesh"]
    assert moved["max_diff"] == 0.0
    assert moved["q_proj_shard_shape"] == [2, 32, 8] and "fsdp" not in moved["q_proj_spec"]


def test_constrain_is_identity_without_mesh_and_a_constraint_under_one():
    x = jnp.ones((4, 3, 8))
    assert constrain(x, "hidden") is x
    mesh = make_mesh()
    with jax.set_mesh(mesh):
        text = jax.jit(lambda y: constrain(y, "hidden") * 2).lower(x).as_text()
    assert "sharding" in text.lower()


def test_optimizer_state_follows_parameter_shardings():
    cfg = ModelConfig(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True)
    mesh = make_mesh()
    p_sh = param_shardings(cfg, mesh)
    state = jax.eval_shape(optax.adamw(1e-3).init, jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))
    shardings = shardings_like_params(state, p_sh, mesh)
    mu = shardings[0].mu
    assert mu["blocks"]["q_proj"] is p_sh["blocks"]["q_proj"] and mu["embed"] is p_sh["embed"]
    assert shardings[0].count.spec == P()
    assert set(mu["blocks"]) == set(param_shapes(cfg)["blocks"])
