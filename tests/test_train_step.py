"""The jitted update: grad accumulation equivalence, non-finite skip, no retrace, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl.config import base_config, loss_config
from jaxrl.models.config import ModelConfig
from jaxrl.models.transformer import init_params
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


def setup(micro_rows: int, *, dtype: str = "float32", **loss_overrides):
    cfg = base_config()
    cfg.rl.lr = 1e-2
    cfg.rl.prompts_per_step = 2
    cfg.rl.mini_batch_prompts = 2
    cfg.rl.samples_per_prompt = 4
    for key, value in loss_overrides.items():
        cfg.rl.loss[key] = value
    model_cfg = tiny_model_config(dtype=dtype)
    params = init_params(model_cfg, jax.random.PRNGKey(0))
    optimizer = train_step.make_optimizer(cfg)
    state = train_step.init_train_state(params, optimizer, seed=0)
    update = train_step.make_update_fn(
        model_cfg, loss_config(cfg), optimizer, micro_batch_rows=micro_rows, temperature=1.0, chunk_size=2
    )
    return state, update


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-sum-norm"])
def test_micro_batch_accumulation_matches_one_pass(aggregation):
    batch = make_batch()
    select = batch.loss_mask > 0
    results = []
    for micro_rows in (ROWS, 2):
        state, update = setup(micro_rows, aggregation=aggregation)
        state, metrics = update(state, batch, select)
        results.append((state.params, metrics))
    (params_one, metrics_one), (params_acc, metrics_acc) = results
    np.testing.assert_allclose(metrics_one["loss"], metrics_acc["loss"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(metrics_one["grad_norm"], metrics_acc["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(params_one), jax.tree.leaves(params_acc)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert float(metrics_one["grad_norm"]) > 0


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
