"""The jitted update: grad accumulation equivalence, non-finite skip, no retrace, dtypes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxrl.config import base_config, loss_config
from jaxrl.models.config import ModelConfig
from jaxrl.models.transformer import init_params
from jaxrl.train import optimise as train_optimise
from jaxrl.train import step as train_step
from jaxrl.types import TrainBatch

PROMPT, RESPONSE, ROWS = 6, 5, 8


def tiny_model_config(**overrides) -> ModelConfig:
    fields = dict(model_type="qwen3", vocab_size=40, hidden_size=32, intermediate_size=48, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True)
    fields.update(overrides)
    return ModelConfig(**fields)


def make_batch(seed: int = 0, rows: int = ROWS, nan_advantage: bool = False) -> TrainBatch:
    rng = np.random.default_rng(seed)
    prompt_lengths = rng.integers(2, PROMPT + 1, rows)
    lengths = rng.integers(1, RESPONSE + 1, rows)
    tokens = rng.integers(3, 40, (rows, PROMPT + RESPONSE)).astype(np.int32)
    mask = np.zeros((rows, PROMPT + RESPONSE), bool)
    for i in range(rows):
        mask[i, PROMPT - prompt_lengths[i] : PROMPT + lengths[i]] = True
    tokens = np.where(mask, tokens, 0)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    loss_mask = (np.arange(RESPONSE)[None] < lengths[:, None]).astype(np.float32)
    advantages = rng.normal(size=rows).astype(np.float32)
    if nan_advantage:
        advantages[0] = np.nan
    return TrainBatch(
        input_tokens=jnp.asarray(tokens),
        attention_mask=jnp.asarray(mask),
        positions=jnp.asarray(positions),
        targets=jnp.asarray(tokens[:, PROMPT:]),
        loss_mask=jnp.asarray(loss_mask),
        advantages=jnp.asarray(advantages),
        old_logp=jnp.asarray(-3.0 + 0.1 * rng.normal(size=(rows, RESPONSE)), jnp.float32),
        rollout_entropy=jnp.asarray(rng.uniform(0, 3, (rows, RESPONSE)), jnp.float32),
        group_ids=jnp.asarray(np.arange(rows) // 4, jnp.int32),
    )


def grad_capture() -> optax.GradientTransformation:
    """An "optimizer" that stores the gradient it is given as its state and moves nothing."""
    return optax.GradientTransformation(
        init=lambda params: jax.tree.map(jnp.zeros_like, params),
        update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def setup(micro_rows: int, *, dtype: str = "float32", optimizer=None, weight_decay: float = 0.0,
          **loss_overrides):
    cfg = base_config()
    cfg.rl.lr = 1e-2
    cfg.rl.prompts_per_step = 2
    cfg.rl.mini_batch_prompts = 2
    cfg.rl.samples_per_prompt = 4
    cfg.optim.weight_decay = weight_decay
    for key, value in loss_overrides.items():
        cfg.rl.loss[key] = value
    model_cfg = tiny_model_config(dtype=dtype)
    params = init_params(model_cfg, jax.random.PRNGKey(0))
    optimizer = optimizer or train_step.make_optimizer(cfg)
    state = train_step.init_train_state(params, optimizer, seed=0)
    update = train_step.make_update_fn(
        model_cfg, loss_config(cfg), optimizer, micro_batch_rows=micro_rows, temperature=1.0, chunk_size=2
    )
    return state, update


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-sum-norm"])
def test_micro_batch_accumulation_matches_one_pass(aggregation):
    """The claim is about the gradient and the loss, so compare those (not params after Adam,
    whose 1/sqrt(v) turns summation-order noise of near-zero gradients into O(1e-4) relative
    differences that depend on the CPU's vector width). Summing 4 micro-batch gradients
    instead of one pass reorders float32 sums of ≤ 40 tokens: |Δg| ≲ 40·2⁻²⁴·max|g| per leaf,
    so atol = 1e-5·max|g| holds with margin on any CPU."""
    batch = make_batch()
    select = batch.loss_mask > 0
    results = []
    for micro_rows in (ROWS, 2):
        state, update = setup(micro_rows, optimizer=grad_capture(), aggregation=aggregation)
        params_before = jax.tree.map(np.asarray, state.params)
        state, metrics = update(state, batch, select)
        for a, b in zip(jax.tree.leaves(params_before), jax.tree.leaves(state.params)):
            np.testing.assert_array_equal(a, np.asarray(b))  # the capture optimizer moves nothing
        results.append((jax.tree.map(np.asarray, state.opt_state), metrics))
    (grads_one, metrics_one), (grads_acc, metrics_acc) = results
    np.testing.assert_allclose(metrics_one["loss"], metrics_acc["loss"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(metrics_one["grad_norm"], metrics_acc["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads_one), jax.tree.leaves(grads_acc)):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max())
    assert float(metrics_one["grad_norm"]) > 0


def test_empty_mini_batch_does_not_move_the_weights():
    """After one real update (so Adam's moments are non-zero) and with weight decay on, a
    mini-batch of padding rows only (loss mask 0 everywhere) leaves params and optimizer state
    bit-identical and is reported as empty, not skipped."""
    state, update = setup(4, weight_decay=0.1)
    batch = make_batch()
    state, _ = update(state, batch, batch.loss_mask > 0)
    before = jax.tree.map(np.asarray, (state.params, state.opt_state))
    empty = make_batch(seed=3)
    empty = empty.replace(loss_mask=jnp.zeros_like(empty.loss_mask))
    state, metrics = update(state, empty, empty.loss_mask > 0)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves((state.params, state.opt_state))):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert float(metrics["update_empty"]) == 1.0 and float(metrics["update_skipped"]) == 0.0
    assert int(state.skipped_updates) == 0


def test_non_finite_loss_skips_update_and_counts():
    state, update = setup(4)
    before = jax.tree.map(np.asarray, (state.params, state.opt_state))
    state, metrics = update(state, make_batch(nan_advantage=True), make_batch().loss_mask > 0)
    assert float(metrics["update_skipped"]) == 1.0
    assert int(state.skipped_updates) == 1
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves((state.params, state.opt_state))):
        np.testing.assert_array_equal(a, np.asarray(b))
    state, metrics = update(state, make_batch(seed=1), make_batch(seed=1).loss_mask > 0)
    assert float(metrics["update_skipped"]) == 0.0 and np.isfinite(float(metrics["loss"]))
    assert int(state.skipped_updates) == 1


def test_no_retrace_and_state_donated():
    state, update = setup(4)
    traces = train_step.TRACE_COUNTS["update"]
    for seed in range(3):
        batch = make_batch(seed)
        old_leaf = jax.tree.leaves(state.params)[0]
        state, _ = update(state, batch, batch.loss_mask > 0)
        assert old_leaf.is_deleted()  # donated
    assert train_step.TRACE_COUNTS["update"] == traces + 1


def test_bf16_compute_keeps_float32_master_weights():
    state, update = setup(4, dtype="bfloat16")
    batch = make_batch()
    state, metrics = update(state, batch, batch.loss_mask > 0)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["update_skipped"]) == 0.0


def test_schedule_warmup_then_cosine_in_rl_steps():
    cfg = base_config()
    cfg.rl.lr = 1.0
    cfg.optim.warmup_steps = 4
    cfg.optim.schedule = "cosine"
    cfg.optim.min_lr_ratio = 0.1
    cfg.train.num_steps = 14
    schedule = train_step.learning_rate_schedule(cfg)
    values = [float(schedule(s)) for s in range(15)]
    np.testing.assert_allclose(values[:4], [0.25, 0.5, 0.75, 1.0], rtol=1e-6)
    np.testing.assert_allclose(values[4], 1.0, rtol=1e-6)
    np.testing.assert_allclose(values[9], 0.55, rtol=1e-5)
    np.testing.assert_allclose(values[14], 0.1, rtol=1e-5)


def test_logprob_gap_k3_is_the_sampler_to_trainer_kl():
    """kl_k3 = mean(e^Δ − 1 − Δ), Δ = trainer − sampler: hand-worked values, and over 200k tokens
    drawn from the sampler it estimates the exact KL(sampler ‖ trainer) (float64) within 4
    standard errors."""
    trainer = np.log(np.array([[0.5, 0.2, 0.9]], np.float32))
    sampler = np.log(np.array([[0.25, 0.25, 0.1]], np.float32))
    mask = np.array([[1, 1, 0]], np.float32)
    m = train_optimise.logprob_gap_metrics(trainer, sampler, mask)
    # Δ = ln 2, ln 0.8: (2 − 1 − ln 2 + 0.8 − 1 − ln 0.8) / 2 = (0.8 − ln 1.6) / 2 ≈ 0.165
    assert float(m["logprob_gap/kl_k3"]) == pytest.approx((0.8 - np.log(1.6)) / 2, rel=1e-5)
    assert float(m["logprob_gap/mean"]) == pytest.approx(np.log(1.6) / 2, rel=1e-5)
    assert float(m["logprob_gap/abs_max"]) == pytest.approx(np.log(2.0), rel=1e-6)

    rng = np.random.default_rng(0)
    p_sampler = np.array([0.5, 0.3, 0.15, 0.05])
    p_trainer = np.array([0.3, 0.3, 0.2, 0.2])
    tokens = rng.choice(4, size=(400, 500), p=p_sampler)
    m = train_optimise.logprob_gap_metrics(np.log(p_trainer)[tokens].astype(np.float32),
                                           np.log(p_sampler)[tokens].astype(np.float32), np.ones(tokens.shape))
    exact = float(np.sum(p_sampler * np.log(p_sampler / p_trainer)))
    terms = np.expm1(np.log(p_trainer / p_sampler)) - np.log(p_trainer / p_sampler)
    stderr = np.sqrt(np.sum(p_sampler * terms**2) - exact**2) / np.sqrt(tokens.size)
    assert abs(float(m["logprob_gap/kl_k3"]) - exact) < 4 * stderr


def test_tis_weights_hand_worked():
    trainer = np.log(np.array([[0.5, 0.1, 0.9, 1.0]], np.float32))
    sampler = np.log(np.array([[0.25, 0.4, 0.9, 1e-30]], np.float32))
    w = np.asarray(train_optimise.tis_weights(trainer, sampler, 1.5))
    # ratios 2, 0.25, 1, e^20 (log-ratio clamped at 20) → capped at 1.5
    np.testing.assert_allclose(w, [[1.5, 0.25, 1.0, 1.5]], rtol=1e-6)
    assert np.asarray(train_optimise.tis_weights(trainer, sampler, 1e12))[0, 3] == pytest.approx(np.exp(20.0), rel=1e-5)


def _np_quantile_select(entropy, mask, rho):
    valid = mask > 0
    tau = np.quantile(entropy.astype(np.float64)[valid], 1 - rho)
    return valid & (entropy >= tau)


@pytest.mark.parametrize("source", ["step_start", "current"])
def test_entropy_source_picks_the_params_that_choose_the_tokens(source):
    """mask_scope=minibatch, 2 updates: the second update's selection is the float64 quantile
    rule applied to the entropies under the step-start params ("step_start") or under the
    params that update itself trains ("current")."""
    cfg = base_config()
    cfg.rl.lr = 5e-2
    cfg.rl.prompts_per_step, cfg.rl.mini_batch_prompts, cfg.rl.samples_per_prompt = 2, 1, 4
    cfg.rl.micro_batch_rows = 4
    cfg.rl.logprob_chunk_size = 2
    cfg.rl.measure_logprob_gap = False
    for key, value in dict(token_mask="top", entropy_rho=0.3, mask_scope="minibatch", entropy_source=source).items():
        cfg.rl.loss[key] = value
    model_cfg = tiny_model_config()
    optimizer = train_step.make_optimizer(cfg)
    state = train_step.init_train_state(init_params(model_cfg, jax.random.PRNGKey(0)), optimizer, seed=0)
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    replicated = NamedSharding(mesh, PartitionSpec())
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    updater = train_optimise.make_updater(cfg, model_cfg, loss_config(cfg), optimizer,
                                          jax.tree.map(lambda _: replicated, state), rows, replicated)
    seen = []

    def spy(state, mini, select):
        seen.append((jax.tree.map(np.asarray, state.params), np.asarray(select)))
        return updater.update_fn(state, mini, select)

    batch = make_batch(seed=5)
    logprob_fn = train_step.make_logprob_fn(model_cfg, micro_batch_rows=4, temperature=1.0, chunk_size=2)
    start_params = jax.tree.map(np.asarray, state.params)
    train_optimise.optimise(dataclasses.replace(updater, update_fn=spy), state, batch, jnp.zeros(ROWS, bool))
    assert len(seen) == 2
    second = slice(4, 8)
    inputs = (batch.input_tokens[second], batch.attention_mask[second], batch.positions[second],
              batch.targets[second])
    params = start_params if source == "step_start" else seen[1][0]
    entropy = np.asarray(logprob_fn(params, *inputs)[1])
    mask = np.asarray(batch.loss_mask[second])
    np.testing.assert_array_equal(seen[1][1], _np_quantile_select(entropy, mask, 0.3))
    moved = np.asarray(logprob_fn(seen[1][0], *inputs)[1]) - np.asarray(logprob_fn(start_params, *inputs)[1])
    assert np.abs(moved).max() > 1e-4  # the two sources really see different entropies
