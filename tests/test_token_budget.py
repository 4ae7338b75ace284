"""Token-budget micro-batches (``rl.micro_batch_tokens``): grouping, padding cost, the update and
log-prob pass against a plain full-batch reference, no retrace, 8-device mesh, config, planner."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxrl.config import ConfigError, base_config, loss_config, validate
from jaxrl.data import token_budget as tb
from jaxrl.models.config import ModelConfig
from jaxrl.models.transformer import init_params
from jaxrl.plan import KNOWN_MODELS, parse_hardware, plan
from jaxrl.plan.memory import PlanSettings, activation_bytes
from jaxrl.rl.losses import LossConfig, policy_loss, select_tokens
from jaxrl.train import budget_step
from jaxrl.train import optimise as train_optimise
from jaxrl.train import step as train_step
from jaxrl.types import TrainBatch

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPT, RESPONSE = 6, 64
BUDGET = 2 * (PROMPT + RESPONSE)  # widths 16, 32, 64 of 6, 3, 2 rows
# Response lengths: ragged; row 5 is truncated and filtered (loss mask 0, attention set), row 6
# is a dynamic-sampling padding row (loss mask 0).
LENGTHS = (64, 3, 10, 20, 33, 50, 7, 28)


def tiny_model_config() -> ModelConfig:
    return ModelConfig(model_type="qwen3", vocab_size=40, hidden_size=32, intermediate_size=48, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True)


def ragged_batch(seed: int = 0, lengths=LENGTHS, prompt: int = PROMPT, response: int = RESPONSE,
                 dead_rows=(5, 6), per_token_adv: bool = False, ref: bool = False) -> TrainBatch:
    rng = np.random.default_rng(seed)
    rows = len(lengths)
    lengths = np.asarray(lengths)
    assert lengths.max() <= response
    prompt_lengths = rng.integers(2, prompt + 1, rows)
    tokens = rng.integers(3, 40, (rows, prompt + response)).astype(np.int32)
    mask = np.zeros((rows, prompt + response), bool)
    for i in range(rows):
        mask[i, prompt - prompt_lengths[i]: prompt + lengths[i]] = True
    tokens = np.where(mask, tokens, 0)
    loss_mask = (np.arange(response)[None] < lengths[:, None]).astype(np.float32)
    loss_mask[list(dead_rows)] = 0.0
    adv_shape = (rows, response) if per_token_adv else (rows,)
    return TrainBatch(
        input_tokens=jnp.asarray(tokens), attention_mask=jnp.asarray(mask),
        positions=jnp.asarray(np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)),
        targets=jnp.asarray(tokens[:, prompt:]), loss_mask=jnp.asarray(loss_mask),
        advantages=jnp.asarray(rng.normal(size=adv_shape).astype(np.float32)),
        old_logp=jnp.asarray(-3.7 + 0.3 * rng.normal(size=(rows, response)), jnp.float32),
        rollout_entropy=jnp.asarray(rng.uniform(0, 3, (rows, response)), jnp.float32),
        group_ids=jnp.asarray(np.arange(rows) // 4, jnp.int32),
        ref_logp=jnp.asarray(-3.7 + 0.3 * rng.normal(size=(rows, response)), jnp.float32) if ref else None)


def grad_capture() -> optax.GradientTransformation:
    """An "optimizer" that stores the gradient it is given as its state and moves nothing."""
    return optax.GradientTransformation(
        init=lambda params: jax.tree.map(jnp.zeros_like, params),
        update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def budget_update(loss_cfg, params, batch, select, budget=BUDGET):
    """(grads, metrics) of one token-budget update (params copied: the state is donated)."""
    model_cfg = tiny_model_config()
    update = train_step.make_update_fn(model_cfg, loss_cfg, grad_capture(), micro_batch_rows=2,
                                       temperature=1.0, chunk_size=4, micro_batch_tokens=budget)
    state = train_step.init_train_state(jax.tree.map(jnp.copy, params), grad_capture(), seed=0)
    state, metrics = update(state, batch, select)
    return jax.tree.map(np.asarray, state.opt_state), {k: float(v) for k, v in metrics.items()}


def full_batch_reference(loss_cfg, params, batch, select):
    """The definition: one forward over the whole padded batch, ``policy_loss`` with its own
    (whole-batch) normalisers, one ``value_and_grad``. No micro-batches, no trimming."""
    model_cfg = tiny_model_config()

    def loss_fn(p):
        logp, entropy = train_step.response_logprobs(
            p, model_cfg, batch.input_tokens, batch.attention_mask, batch.positions, batch.targets,
            temperature=1.0, chunk_size=RESPONSE, entropy_grad=loss_cfg.entropy_coef != 0)
        return policy_loss(logp, batch.old_logp, batch.advantages, batch.loss_mask, loss_cfg,
                           ref_logp=batch.ref_logp, entropy=entropy, token_select=select)

    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    return jax.tree.map(np.asarray, grads), {k: float(v) for k, v in metrics.items()}


def assert_matches(grads, metrics, ref_grads, ref_metrics):
    """float32 tolerance: both sides sum the same per-token terms (≤ 8·16 tokens) in another
    order and the trimmed forward runs other matmul shapes; each reordered float32 sum is off by
    ≲ n·2⁻²⁴ relative, so |Δg| ≤ 1e-5·max|g| per leaf and rtol 1e-5 on the loss hold with margin."""
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5, atol=1e-7)
    for name in ("logp_mean", "ratio_mean", "approx_kl", "clip_frac_low"):
        np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=1e-5, atol=1e-7)
    assert metrics["ratio_max"] == pytest.approx(ref_metrics["ratio_max"], rel=1e-5)
    for a, b in zip(jax.tree.leaves(ref_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max())
    assert max(float(np.abs(a).max()) for a in jax.tree.leaves(ref_grads)) > 0


# ------------------------------------------------------------------------------ grouping
def test_bucket_shapes_fit_the_budget_and_the_row_shards():
    shapes = tb.bucket_shapes(8 * 1024, 64, 960, row_multiple=4, max_rows=64)
    assert [w for w, _ in shapes] == [64, 128, 256, 512, 960]
    for width, rows in shapes:
        assert rows % 4 == 0 and rows >= 4 and rows * (64 + width) <= 8 * 1024
    assert [r for _, r in shapes] == [64, 40, 24, 12, 8]  # 8192 // 128 = 64 rows; 8192 // 192 = 42 → 40
    assert tb.bucket_widths(5) == (5,) and tb.bucket_widths(40) == (16, 32, 40)
    assert tb.bucket_widths(4096) == (256, 512, 1024, 2048, 4096)
    with pytest.raises(ValueError, match="rl.micro_batch_tokens=4000"):
        tb.bucket_shapes(4000, 64, 960, row_multiple=4)  # 4 full rows need 4096 tokens


def test_every_row_with_loss_tokens_runs_once_in_a_micro_batch_that_holds_it():
    """The trainer's walk, step by step on the host: each micro-batch's width holds all its
    rows, rows × (P + width) ≤ budget, every row with extent > 0 runs exactly once, and the
    positions run equal the host cost model ``padded_tokens``."""
    rng = np.random.default_rng(1)
    extent = rng.integers(0, 97, 50).astype(np.int32)
    shapes = tb.bucket_shapes(600, 8, 96, row_multiple=2, max_rows=50)
    assert [w for w, _ in shapes] == [16, 32, 64, 96]
    widths = tuple(w for w, _ in shapes)
    order, live = tb.sort_rows(jnp.asarray(extent))
    seen, start, positions = [], 0, 0
    while start < int(live):
        k = int(tb.width_index(jnp.asarray(extent)[order[start]], widths))
        width, rows = shapes[k]
        index, valid = map(np.asarray, tb.micro_rows(order, live, jnp.int32(start), rows))
        assert np.all(extent[index] <= width) and rows * (8 + width) <= 600 and rows % 2 == 0
        assert k == 0 or extent[index[0]] > widths[k - 1]  # the narrowest width for its longest row
        seen += index[valid].tolist()
        positions += rows * (8 + width)
        start += rows
    assert sorted(seen) == np.flatnonzero(extent > 0).tolist()
    assert positions == tb.padded_tokens(extent, shapes, 8)


def test_response_extent_is_one_past_the_last_set_position():
    mask = jnp.asarray([[1, 1, 0, 0], [0, 1, 0, 1], [0, 0, 0, 0]], bool)
    assert tb.response_extent(mask).tolist() == [2, 4, 0]


def test_ragged_batch_pays_far_less_padding_than_fixed_micro_batches():
    """64 rows, S = 64 + 960: 90% of responses ≤ 128 tokens. Fixed micro-batches run 64 × 1024
    positions whatever the lengths; the budget runs the short rows at width 128 or 64 (the
    real prompt + response positions are ~20% of the fixed cost; the rest is the budget's
    granularity: 3 micro-batches of ≤ 8192 positions)."""
    rng = np.random.default_rng(0)
    extents = np.where(rng.random(64) < 0.9, rng.integers(1, 129, 64), 960)
    shapes = tb.bucket_shapes(8 * 1024, 64, 960, max_rows=64)
    fixed = 64 * (64 + 960)
    budget = tb.padded_tokens(extents, shapes, 64)
    assert budget < 0.4 * fixed, (budget, fixed)
    assert tb.padded_tokens(np.full(64, 960), shapes, 64) == fixed  # all full: no saving, no loss


# ------------------------------------------------------------------------------ update vs reference
CASES = {
    "token-mean": dict(aggregation="token-mean"),
    "seq-mean-token-mean": dict(aggregation="seq-mean-token-mean"),
    "seq-mean-token-sum": dict(aggregation="seq-mean-token-sum"),
    "seq-mean-token-sum-norm": dict(aggregation="seq-mean-token-sum-norm", norm_constant=64.0),
    "forking-top-selected": dict(token_mask="top", entropy_rho=0.3, mask_normalizer="selected_tokens",
                                 entropy_source="rollout"),
    "kl-entropy-tis": dict(aggregation="seq-mean-token-mean", kl_coef=0.1, entropy_coef=0.01),
}


@pytest.mark.parametrize("case", list(CASES))
def test_budget_update_matches_the_full_batch_reference(case):
    loss_cfg = LossConfig(**CASES[case])
    batch = ragged_batch(per_token_adv=case == "kl-entropy-tis", ref=case == "kl-entropy-tis")
    select, _ = select_tokens(loss_cfg, batch.loss_mask, rollout_entropy=batch.rollout_entropy)
    params = init_params(tiny_model_config(), jax.random.PRNGKey(0))
    grads, metrics = budget_update(loss_cfg, params, batch, select)
    assert_matches(grads, metrics, *full_batch_reference(loss_cfg, params, batch, select))
    assert metrics["tokens"] == float(np.sum(np.asarray(batch.loss_mask)))


def test_reference_check_catches_a_grouping_that_cuts_tokens(monkeypatch):
    """The comparison above can fail: group rows by half their length (micro-batches too narrow
    for their rows) and the loss no longer matches."""
    loss_cfg = LossConfig()
    batch = ragged_batch()
    select = batch.loss_mask > 0
    params = init_params(tiny_model_config(), jax.random.PRNGKey(0))
    ref_grads, ref_metrics = full_batch_reference(loss_cfg, params, batch, select)
    real = tb.response_extent
    monkeypatch.setattr(budget_step, "response_extent", lambda m: jnp.maximum(real(m) // 2, jnp.minimum(real(m), 1)))
    grads, metrics = budget_update(loss_cfg, params, batch, select)
    with pytest.raises(AssertionError):
        assert_matches(grads, metrics, ref_grads, ref_metrics)


def test_one_compile_for_any_length_mix():
    loss_cfg = LossConfig()
    model_cfg = tiny_model_config()
    update = train_step.make_update_fn(model_cfg, loss_cfg, grad_capture(), micro_batch_rows=2, temperature=1.0,
                                       chunk_size=4, micro_batch_tokens=BUDGET)
    state = train_step.init_train_state(init_params(model_cfg, jax.random.PRNGKey(0)), grad_capture(), seed=0)
    before = train_step.TRACE_COUNTS["update"]
    for lengths in (LENGTHS, (64,) * 8, (1,) * 8):
        batch = ragged_batch(lengths=lengths, dead_rows=())
        state, metrics = update(state, batch, batch.loss_mask > 0)
        assert metrics["tokens"] == sum(lengths)
    assert train_step.TRACE_COUNTS["update"] - before == 1


def test_logprob_pass_matches_the_full_batch_forward():
    model_cfg = tiny_model_config()
    params = init_params(model_cfg, jax.random.PRNGKey(0))
    batch = ragged_batch()
    args = (batch.input_tokens, batch.attention_mask, batch.positions, batch.targets)
    logp, entropy = train_step.make_logprob_fn(model_cfg, micro_batch_rows=2, temperature=0.7, chunk_size=4,
                                               micro_batch_tokens=BUDGET)(params, *args)
    ref_logp, ref_entropy = jax.jit(lambda p: train_step.response_logprobs(
        p, model_cfg, *args, temperature=0.7, chunk_size=RESPONSE))(params)
    response = np.asarray(batch.attention_mask[:, PROMPT:])
    assert response.sum() > np.asarray(batch.loss_mask).sum()  # the filtered row is computed too
    for got, want in ((logp, ref_logp), (entropy, ref_entropy)):
        got, want = np.asarray(got), np.asarray(want)
        np.testing.assert_allclose(got[response], want[response], rtol=1e-5, atol=1e-5)
        assert np.all(got[~response] == 0.0)


def test_optimise_with_a_token_budget_matches_fixed_micro_batches():
    """Through ``make_updater`` / ``optimise`` (config key, row shards of the row sharding):
    trainer log-prob pass → step-start forking selection → 2 updates, fixed vs budget. The
    selection threshold, the gap metrics and every update's loss agree."""
    outs = []
    for tokens in (0, BUDGET):
        cfg = base_config()
        cfg.rl.prompts_per_step, cfg.rl.mini_batch_prompts, cfg.rl.samples_per_prompt = 2, 1, 4
        cfg.rl.micro_batch_rows, cfg.rl.micro_batch_tokens, cfg.rl.logprob_chunk_size = 2, tokens, 4
        for key, value in dict(token_mask="top", entropy_rho=0.3, aggregation="seq-mean-token-mean").items():
            cfg.rl.loss[key] = value
        model_cfg = tiny_model_config()
        optimizer = optax.sgd(1e-2)
        state = train_step.init_train_state(init_params(model_cfg, jax.random.PRNGKey(0)), optimizer, seed=0)
        mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
        replicated = NamedSharding(mesh, PartitionSpec())
        updater = train_optimise.make_updater(cfg, model_cfg, loss_config(cfg), optimizer,
                                              jax.tree.map(lambda _: replicated, state),
                                              NamedSharding(mesh, PartitionSpec(("data", "fsdp"))), replicated)
        state, metrics = train_optimise.optimise(updater, state, ragged_batch(seed=3), jnp.zeros(8, bool))
        outs.append((jax.tree.map(np.asarray, state.params), metrics))
    (params_fixed, fixed), (params_budget, budget) = outs
    for name in ("loss", "grad_norm", "entropy_threshold", "logprob_gap/abs_mean", "selected_fraction", "tokens"):
        np.testing.assert_allclose(budget[name], fixed[name], rtol=1e-5, atol=1e-7, err_msg=name)
    for a, b in zip(jax.tree.leaves(params_fixed), jax.tree.leaves(params_budget)):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------ mesh
def test_eight_device_mesh_matches_the_single_device_reference():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 "
               "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "token_budget_mesh_script.py")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["row_multiple"] == 8
    assert all(rows % 8 == 0 for _, rows in result["shapes"])
    assert result["loss_rel_diff"] < 1e-5 and result["grad_rel_diff"] < 1e-5
    assert result["logp_max_diff"] < 1e-5
    assert result["too_small"].startswith("rl.micro_batch_tokens=")


# ------------------------------------------------------------------------------ config, planner
def test_config_names_the_field():
    cfg = base_config()
    cfg.data.max_prompt_tokens, cfg.sampling.max_new_tokens = 100, 500  # prompt bucket 128
    cfg.rl.micro_batch_tokens = 627
    with pytest.raises(ConfigError, match=r"^rl.micro_batch_tokens=627 .* = 628 tokens$"):
        validate(cfg, check_files=False)
    cfg.rl.micro_batch_tokens = -1
    with pytest.raises(ConfigError, match="rl.micro_batch_tokens=-1"):
        validate(cfg, check_files=False)
    cfg.rl.micro_batch_tokens = 628
    validate(cfg, check_files=False)
    cfg.mesh.data, cfg.mesh.fsdp = 2, 2
    with pytest.raises(ConfigError, match=r"rl.micro_batch_tokens=628 .*mesh.data x mesh.fsdp = 4 = 2512 tokens"):
        validate(cfg, num_devices=4, check_files=False)


def test_planner_follows_the_token_budget():
    model = tiny_model_config()
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    fixed = PlanSettings(micro_batch_rows=8, mini_batch_rows=64, prompt_len=64, response_len=960, remat="full",
                         attention="blocked")
    budget = PlanSettings(micro_batch_rows=8, micro_batch_tokens=8 * 1024, mini_batch_rows=64, prompt_len=64,
                          response_len=960, remat="full", attention="blocked")
    a_fixed = activation_bytes(model, fixed, sizes, "blocked")
    a_budget = activation_bytes(model, budget, sizes, "blocked")
    # rows × width ≤ budget everywhere, so per-position terms stay near the fixed 8 × 1024 ...
    assert a_fixed["activations_saved"] * 0.9 <= a_budget["activations_saved"] <= a_fixed["activations_saved"]
    # ... but narrow micro-batches hold more rows: the logits chunk peaks at width 256 (25 rows
    # of a full 256 chunk) against 8 rows for fixed micro-batches
    assert a_budget["logprob_chunk_buffers"] == pytest.approx(a_fixed["logprob_chunk_buffers"] * 25 / 8, rel=0.01)
    halved = activation_bytes(model, PlanSettings(**{**budget.__dict__, "micro_batch_tokens": 4 * 1024}), sizes,
                              "blocked")
    assert halved["activations_saved"] == pytest.approx(a_budget["activations_saved"] / 2, rel=0.05)
    rows_ignored = activation_bytes(model, PlanSettings(**{**budget.__dict__, "micro_batch_rows": 2}), sizes,
                                    "blocked")
    assert rows_ignored == a_budget


def test_planner_advice_turns_the_token_budget_not_the_rows():
    """When the budget does not fit, the advice lowers rl.micro_batch_tokens (in whole
    full-width rows per row shard); rl.micro_batch_rows would change nothing."""
    settings = PlanSettings(mesh=(1, -1, 1), remat="full", micro_batch_rows=8, micro_batch_tokens=256 * 5120,
                            mini_batch_rows=256, prompt_len=1024, response_len=4096, sampling_rows=64)
    result = plan(KNOWN_MODELS["qwen3-8b"], settings, parse_hardware("h100x8"))
    assert not result.fits
    assert result.advice[0].startswith("turn first: rl.micro_batch_tokens=")
    tokens = int(result.advice[0].split("=")[1])
    assert tokens < 256 * 5120 and tokens % (8 * 5120) == 0
    assert result.advice[-1].endswith("(fits)")
