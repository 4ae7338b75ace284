"""Policy losses against an independent float64 numpy reference, plus gradient checks."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl.rl.losses import LossConfig, policy_loss

# One compiled function per (config, shapes): much cheaper than op-by-op dispatch.
loss_fn = jax.jit(policy_loss, static_argnums=4)


def np_select(entropy, mask, cfg):
    """Forking-token selection in float64 NumPy, independent of jaxrl.rl.token_masks:
    quantile rule = TRL's get_high_entropy_mask (torch.quantile, linear), keep H ≥ τ."""
    valid = mask > 0
    if cfg.token_mask == "all":
        return valid
    tau = np.quantile(entropy.astype(np.float64)[valid], 1 - cfg.entropy_rho, method="linear")
    top = valid & (entropy >= tau)
    return top if cfg.token_mask == "top" else valid & ~top


def np_reference(logp, old, adv, mask, cfg, ref=None, entropy=None, select=None):
    """Row-by-row float64 reference of docs/algorithms.md → (loss, pg_loss)."""
    logp, old = logp.astype(np.float64), old.astype(np.float64)
    b, t = logp.shape
    valid = mask > 0
    adv = np.broadcast_to(adv.reshape(b, -1).astype(np.float64), (b, t))
    select = valid if select is None else (select & valid)
    pg = np.zeros((b, t))
    for i in range(b):
        cols = np.flatnonzero(valid[i])
        if len(cols) == 0:
            continue
        log_r = np.clip(logp[i, cols] - old[i, cols], -cfg.log_ratio_clamp, cfg.log_ratio_clamp)
        a = adv[i, cols]
        if cfg.loss_type in ("gspo", "gspo_token"):
            seq = np.clip(log_r.mean(), -cfg.log_ratio_clamp, cfg.log_ratio_clamp)
            r, lo, hi = np.full(len(cols), np.exp(seq)), cfg.gspo_eps_low, cfg.gspo_eps_high
        else:
            r, lo, hi = np.exp(log_r), cfg.clip_eps_low, cfg.clip_eps_high
        if cfg.loss_type == "cispo":
            row = -np.minimum(r, cfg.cispo_eps_max) * a * logp[i, cols]
        else:
            row = np.maximum(-a * r, -a * np.clip(r, 1 - lo, 1 + hi))
            if cfg.dual_clip_c is not None:
                row = np.where(a < 0, np.minimum(row, -cfg.dual_clip_c * a), row)
        pg[i, cols] = row * select[i, cols]

    def agg(values, counted):
        rows_present = valid.any(-1).sum()
        if cfg.aggregation == "token-mean":
            return values.sum() / max(counted.sum(), 1)
        if cfg.aggregation == "seq-mean-token-mean":
            per_row = [values[i].sum() / max(counted[i].sum(), 1) for i in range(b)]
            return sum(per_row) / max(rows_present, 1)
        if cfg.aggregation == "seq-mean-token-sum":
            return values.sum() / max(rows_present, 1)
        return values.sum() / (cfg.norm_constant * b)

    counted = valid if cfg.mask_normalizer == "all_tokens" else select
    pg_loss = agg(pg, counted)
    loss = pg_loss
    if cfg.kl_coef > 0:
        d = np.clip(ref.astype(np.float64) - logp, -cfg.kl_delta_clamp, cfg.kl_delta_clamp)
        kl = {"k1": -d, "k2": d**2 / 2, "k3": np.exp(d) - d - 1}[cfg.kl_type]
        kl = np.clip(kl, -cfg.kl_value_clamp, cfg.kl_value_clamp) * valid
        if cfg.kl_ratio_correction:  # TRL use_bias_correction_kl: per_token_kl * coef_1
            kl = kl * np.exp(np.clip(np.where(valid, logp - old, 0), -cfg.log_ratio_clamp, cfg.log_ratio_clamp))
        loss += cfg.kl_coef * agg(kl, valid)
    if cfg.entropy_coef:
        loss -= cfg.entropy_coef * agg(entropy.astype(np.float64) * valid, valid)
    return loss, pg_loss


def _batch(seed, b, t, token_adv=False, spread=0.4):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, t + 1, size=b)
    lengths[0] = t
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
    old = -rng.exponential(1.0, size=(b, t)).astype(np.float32)
    logp = (old + rng.normal(scale=spread, size=(b, t))).astype(np.float32)
    logp = np.minimum(logp, 0.0)
    logp[mask == 0] = 123.0  # garbage in padding must not leak
    adv = rng.normal(size=(b, t) if token_adv else (b,)).astype(np.float32)
    ref = (logp + rng.normal(scale=0.5, size=(b, t))).astype(np.float32)
    entropy = rng.exponential(0.5, size=(b, t)).astype(np.float32)
    return logp, old, adv, mask, ref, entropy


_CASES = [  # (cfg, b, t, token-level advantages)
    (LossConfig(), 4, 9, False),
    (LossConfig(dual_clip_c=3.0, aggregation="seq-mean-token-mean"), 5, 7, False),
    (LossConfig(clip_eps_high=0.2, kl_coef=0.1, kl_type="k3", aggregation="seq-mean-token-mean"), 3, 16, False),
    (LossConfig(kl_coef=0.05, kl_type="k1", aggregation="seq-mean-token-sum"), 6, 5, True),
    (LossConfig(kl_coef=0.5, kl_type="k2", kl_delta_clamp=0.3, kl_value_clamp=0.02), 3, 8, False),
    (LossConfig(aggregation="seq-mean-token-sum-norm", norm_constant=32.0, entropy_coef=0.01), 4, 12, False),
    (LossConfig(loss_type="gspo", aggregation="seq-mean-token-mean", gspo_eps_low=0.02, gspo_eps_high=0.03), 6, 10, False),
    (LossConfig(loss_type="gspo_token", dual_clip_c=2.0, gspo_eps_low=0.02, gspo_eps_high=0.03), 5, 11, True),
    (LossConfig(loss_type="cispo", cispo_eps_max=1.2), 4, 13, False),
    (LossConfig(loss_type="cispo", cispo_eps_max=2.0, aggregation="seq-mean-token-mean", log_ratio_clamp=0.5), 3, 6, True),
    (LossConfig(token_mask="top", entropy_rho=0.3), 5, 9, False),
    (LossConfig(token_mask="bottom", mask_normalizer="selected_tokens", aggregation="seq-mean-token-mean"), 4, 10, False),
    (LossConfig(token_mask="top", mask_normalizer="selected_tokens", dual_clip_c=3.0, kl_coef=0.1), 6, 8, True),
    (LossConfig(kl_coef=0.2, kl_ratio_correction=True), 5, 9, False),
    (LossConfig(kl_coef=0.1, kl_ratio_correction=True, aggregation="seq-mean-token-mean", token_mask="top"), 4, 7, True),
]


@pytest.mark.parametrize("case", range(len(_CASES)))
def test_matches_float64_reference(case):
    cfg, b, t, token_adv = _CASES[case]
    logp, old, adv, mask, ref, entropy = _batch(case, b, t, token_adv)
    loss, metrics = loss_fn(logp, old, adv, mask, cfg, ref_logp=ref, entropy=entropy)
    want_loss, want_pg = np_reference(logp, old, adv, mask, cfg, ref, entropy, np_select(entropy, mask, cfg))
    np.testing.assert_allclose(float(loss), want_loss, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["pg_loss"]), want_pg, atol=1e-6, rtol=1e-6)
    assert all(v.shape == () and v.dtype == jnp.float32 for v in metrics.values())
    assert np.isfinite(float(loss))


def test_ppo_hand_worked():
    # Four tokens of one row, old_logp = 0, so r = exp(logp).
    logp = np.log(np.array([[1.5, 0.5, 5.0, 1.1]], np.float32))
    adv = np.array([[1.0, -1.0, -1.0, 2.0]], np.float32)
    mask = np.ones_like(logp)
    cfg = LossConfig(clip_eps_high=0.28, dual_clip_c=3.0)  # DAPO clip-higher
    # token 0: A>0, r=1.5 → clipped at 1.28 → −1.28         (high clip)
    # token 1: A<0, r=0.5 → max(0.5, 0.8) = 0.8             (low clip)
    # token 2: A<0, r=5.0 → max(5, 1.28)=5 → min(5, 3) = 3  (dual clip)
    # token 3: A=2, r=1.1 → −2.2                            (no clip)
    loss, m = loss_fn(logp, np.zeros_like(logp), adv, mask, cfg)
    assert float(loss) == pytest.approx((-1.28 + 0.8 + 3.0 - 2.2) / 4, abs=1e-6)
    assert float(m["clip_frac_high"]) == pytest.approx(0.25)
    assert float(m["clip_frac_low"]) == pytest.approx(0.25)
    assert float(m["clip_frac_dual"]) == pytest.approx(0.25)
    assert float(m["ratio_max"]) == pytest.approx(5.0, rel=1e-6)
    assert float(m["ratio_mean"]) == pytest.approx((1.5 + 0.5 + 5.0 + 1.1) / 4, rel=1e-6)
    r = np.array([1.5, 0.5, 5.0, 1.1])
    assert float(m["approx_kl"]) == pytest.approx(np.mean(r - 1 - np.log(r)), rel=1e-5)


def test_forking_mask_normalisers_hand_worked():
    # 5 valid tokens, all with ratio 1 and advantage 1 → per-token pg = −1.
    logp = np.zeros((1, 6), np.float32)
    mask = np.array([[1, 1, 1, 1, 1, 0]], np.float32)
    entropy = np.array([[0.1, 0.9, 0.5, 0.3, 0.0, 9.0]], np.float32)
    adv = np.ones((1,), np.float32)
    # Sorted population 0 0.1 0.3 0.5 0.9; the 0.6-quantile sits at position 2.4:
    # τ = 0.3 + 0.4·0.2 = 0.38, so tokens 1 (0.9) and 2 (0.5) are kept.
    cfg = LossConfig(token_mask="top", entropy_rho=0.4)
    loss, m = loss_fn(logp, logp, adv, mask, cfg, entropy=entropy)
    assert float(loss) == pytest.approx(-2 / 5)  # all-token normaliser (the paper)
    assert float(m["selected_fraction"]) == pytest.approx(0.4)
    assert float(m["entropy_threshold"]) == pytest.approx(0.38)
    count = dataclasses.replace(cfg, mask_rule="count")  # k = ⌈0.4·5⌉ = 2: the same tokens, τ = 0.5
    assert float(loss_fn(logp, logp, adv, mask, count, entropy=entropy)[1]["entropy_threshold"]) == pytest.approx(0.5)
    assert float(m["entropy_mean"]) == pytest.approx(1.8 / 5)
    assert float(m["entropy_selected_mean"]) == pytest.approx(0.7)
    sel_cfg = dataclasses.replace(cfg, mask_normalizer="selected_tokens")
    assert float(loss_fn(logp, logp, adv, mask, sel_cfg, entropy=entropy)[0]) == pytest.approx(-1.0)
    bottom = dataclasses.replace(cfg, token_mask="bottom")
    assert float(loss_fn(logp, logp, adv, mask, bottom, entropy=entropy)[0]) == pytest.approx(-3 / 5)
    # rollout entropy source: the mask follows rollout_entropy, not entropy.
    roll = dataclasses.replace(cfg, entropy_source="rollout")
    _, m = loss_fn(logp, logp, adv, mask, roll, entropy=entropy, rollout_entropy=np.array([[0, 0, 0, 0.8, 0.6, 0]], np.float32))
    assert float(m["entropy_threshold"]) == pytest.approx(0.24)  # sorted 0 0 0 .6 .8, position 2.4: 0.4·0.6


def test_ppo_and_cispo_gradients_match_analytic():
    logp, old, adv, mask, _, _ = _batch(11, 4, 10, token_adv=True, spread=0.5)
    n = mask.sum()
    valid = mask > 0
    r = np.exp(logp.astype(np.float64) - old)
    cfg = LossConfig(dual_clip_c=3.0)
    g = np.asarray(jax.grad(lambda lp: loss_fn(lp, old, adv, mask, cfg)[0])(logp))
    clipped = ((r > 1 + cfg.clip_eps_high) & (adv > 0)) | ((r < 1 - cfg.clip_eps_low) & (adv < 0))
    clipped |= (adv < 0) & (r > cfg.dual_clip_c)
    want = np.where(valid & ~clipped, -adv * r / n, 0.0)
    assert clipped[valid].any() and (~clipped[valid]).any()
    np.testing.assert_allclose(g, want, atol=1e-6)

    cispo = LossConfig(loss_type="cispo", cispo_eps_max=1.3)
    g = np.asarray(jax.grad(lambda lp: loss_fn(lp, old, adv, mask, cispo)[0])(logp))
    want = np.where(valid, -np.minimum(r, 1.3) * adv / n, 0.0)  # every valid token gets one
    np.testing.assert_allclose(g, want, atol=1e-6)


def test_gspo_token_equals_gspo_gradient_for_sequence_advantages():
    logp, old, adv, mask, _, _ = _batch(12, 5, 8, spread=0.01)
    base = LossConfig(loss_type="gspo", aggregation="seq-mean-token-mean", gspo_eps_low=0.5, gspo_eps_high=0.5)
    tok = dataclasses.replace(base, loss_type="gspo_token")
    grad = lambda c: np.asarray(jax.grad(lambda lp: loss_fn(lp, old, adv, mask, c)[0])(logp))
    np.testing.assert_allclose(grad(tok), grad(base), atol=1e-6)
    assert np.abs(grad(base)).max() > 1e-3


def test_masks_stop_pg_gradient_but_not_kl_or_entropy():
    logp, old, adv, mask, ref, entropy = _batch(13, 3, 7)
    select = np.zeros_like(mask, bool)
    cfg = LossConfig(token_mask="top", kl_coef=0.1, entropy_coef=0.01)
    grads = jax.grad(
        lambda lp, ent: loss_fn(lp, old, adv, mask, cfg, ref_logp=ref, entropy=ent, token_select=select)[0],
        argnums=(0, 1),
    )(logp, entropy)
    d = np.clip(ref.astype(np.float64) - logp, -20, 20)
    want_logp = np.where(mask > 0, 0.1 * (1 - np.exp(d)) / mask.sum(), 0.0)  # d k3 / d logp only
    np.testing.assert_allclose(np.asarray(grads[0]), want_logp, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grads[1]), np.where(mask > 0, -0.01 / mask.sum(), 0.0), atol=1e-7)


@pytest.mark.parametrize(
    "cfg",
    [
        LossConfig(),
        LossConfig(aggregation="seq-mean-token-mean"),
        LossConfig(aggregation="seq-mean-token-sum", kl_coef=0.1),
        LossConfig(aggregation="seq-mean-token-sum-norm", norm_constant=16.0),
        LossConfig(token_mask="top", mask_normalizer="selected_tokens", entropy_coef=0.01),
    ],
    ids=lambda c: f"{c.aggregation}-{c.mask_normalizer}",
)
def test_micro_batches_with_global_normalisers_sum_to_full_batch(cfg):
    """Σ over micro-batches (with the mini-batch normalisers) = the float64 reference of the
    whole batch. float32 sums of ≤ 54 terms of size ≤ ~10: error ≲ 1e-5 absolute."""
    logp, old, adv, mask, ref, entropy = _batch(14, 6, 9)
    mask[3] = 0  # a fully filtered row is not a sequence for seq-mean
    select = np_select(entropy, mask, cfg)
    want, _ = np_reference(logp, old, adv, mask, cfg, ref, entropy, select)
    kwargs = lambda rows: dict(ref_logp=ref[rows], entropy=entropy[rows], token_select=select[rows])
    rows_present = int((mask.sum(-1) > 0).sum())
    normalisers = dict(
        num_tokens=mask.sum(), num_selected_tokens=select.sum(),
        num_sequences=6 if cfg.aggregation == "seq-mean-token-sum-norm" else rows_present)
    total = 0.0
    for rows in (slice(0, 2), slice(2, 6)):
        part, _ = loss_fn(logp[rows], old[rows], adv[rows], mask[rows], cfg, **kwargs(rows), **normalisers)
        total += float(part)
    assert total == pytest.approx(want, abs=1e-5)


def test_config_is_static_and_validated():
    cfg = LossConfig(token_mask="top")
    assert hash(cfg) == hash(LossConfig(token_mask="top"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.entropy_rho = 0.5  # type: ignore[misc]
    bad = [
        (dict(entropy_rho=0.0), "entropy_rho"), (dict(entropy_rho=1.2), "entropy_rho"),
        (dict(loss_type="reinforce"), "loss_type"), (dict(aggregation="mean"), "aggregation"),
        (dict(kl_type="k4"), "kl_type"), (dict(token_mask="middle"), "token_mask"),
        (dict(mask_scope="device"), "mask_scope"), (dict(mask_normalizer="x"), "mask_normalizer"),
        (dict(entropy_source="ref"), "entropy_source"), (dict(clip_eps_low=1.0), "clip_eps_low"),
        (dict(clip_eps_high=-0.1), "clip_eps_high"), (dict(dual_clip_c=1.0), "dual_clip_c"),
        (dict(aggregation="seq-mean-token-sum-norm"), "norm_constant"),
        (dict(cispo_eps_max=0.0), "cispo_eps_max"), (dict(kl_coef=-1.0), "kl_coef"),
        (dict(entropy_source="train"), "entropy_source"), (dict(mask_rule="sort"), "mask_rule"),
        (dict(kl_cov_ratio=0.0), "kl_cov_ratio"), (dict(clip_cov_ratio=1.5), "clip_cov_ratio"),
        (dict(clip_cov_low=5.0, clip_cov_high=1.0), "clip_cov_low"), (dict(kl_cov_coef=-1.0), "kl_cov_coef"),
    ]
    for kwargs, field in bad:
        with pytest.raises(ValueError, match=field):
            LossConfig(**kwargs)


def test_missing_inputs_name_what_is_needed():
    logp, old, adv, mask, _, _ = _batch(15, 2, 3)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, old, adv, mask, LossConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(logp, old, adv, mask, LossConfig(entropy_coef=0.1))
    with pytest.raises(ValueError, match="trainer entropies"):
        policy_loss(logp, old, adv, mask, LossConfig(token_mask="top"))
    with pytest.raises(ValueError, match="rollout entropies"):
        policy_loss(logp, old, adv, mask, LossConfig(token_mask="top", entropy_source="rollout"))


def _trl_grpo_loss_and_grad(logp, old, adv, mask, ref, beta, eps_low, eps_high):
    """TRL GRPOTrainer._compute_loss in float64 (TRL 1.x docs, "GRPO Trainer": loss_type
    "dapo"/"bnpo", use_bias_correction_kl=True): coef_1 = exp(logp − old), coef_2 = clamp(coef_1,
    1 − ε_low, 1 + ε_high), per_token_kl = (exp(ref − logp) − (ref − logp) − 1) · coef_1,
    per_token_loss = −min(coef_1·A, coef_2·A) + β·per_token_kl, loss = Σ mask·ℓ / Σ mask.
    Returns (loss, d loss / d logp) with the gradient worked by hand."""
    logp, old, ref = (x.astype(np.float64) for x in (logp, old, ref))
    a = adv.astype(np.float64)[:, None]
    valid = mask > 0
    n = valid.sum()
    r = np.exp(np.where(valid, logp - old, 0))
    d = ref - logp
    k3 = np.exp(d) - d - 1
    surrogate = -np.minimum(r * a, np.clip(r, 1 - eps_low, 1 + eps_high) * a)
    loss = np.sum(np.where(valid, surrogate + beta * k3 * r, 0)) / n
    unclipped = r * a <= np.clip(r, 1 - eps_low, 1 + eps_high) * a
    grad = np.where(unclipped, -r * a, 0) + beta * (r * (1 - np.exp(d)) + k3 * r)
    return loss, np.where(valid, grad / n, 0)


def test_bias_corrected_kl_matches_trl_value_and_gradient():
    logp, old, adv, mask, ref, _ = _batch(21, 4, 8, spread=0.3)
    cfg = LossConfig(kl_coef=0.04, kl_ratio_correction=True, clip_eps_low=0.2, clip_eps_high=0.28)
    want_loss, want_grad = _trl_grpo_loss_and_grad(logp, old, adv, mask, ref, 0.04, 0.2, 0.28)
    value_and_grad = jax.value_and_grad(lambda lp: loss_fn(lp, old, adv, mask, cfg, ref_logp=ref)[0])
    loss, grad = value_and_grad(logp)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-7)
    # Without the correction the KL term differs (TRL's use_bias_correction_kl=False).
    plain = dataclasses.replace(cfg, kl_ratio_correction=False)
    assert abs(float(loss_fn(logp, old, adv, mask, plain, ref_logp=ref)[0]) - want_loss) > 1e-5


def _np_cov(logp, adv, valid):
    lp, a = logp.astype(np.float64)[valid], np.broadcast_to(adv.astype(np.float64)[:, None], logp.shape)[valid]
    out = np.zeros(logp.shape)
    out[valid] = (lp - lp.mean()) * (a - a.mean())
    return out


def test_kl_cov_matches_float64_reference():
    """Cui et al. 2025 (KL-Cov; verl compute_policy_loss_kl_cov): ℓ = −A·r, plus β·|logp − old|
    on the max(1, ⌊k·N⌋) tokens with the largest Cov = (logp − mean)(A − mean); token-mean."""
    logp, old, adv, mask, _, _ = _batch(22, 6, 10, spread=0.3)
    valid = mask > 0
    cfg = LossConfig(loss_type="kl_cov", kl_cov_ratio=0.1, kl_cov_coef=0.7)
    cov = _np_cov(logp, adv, valid)
    n = int(valid.sum())
    k = max(1, int(n * 0.1))
    flat = np.where(valid, cov, -np.inf).ravel()
    chosen = np.zeros(flat.shape, bool)
    chosen[np.argsort(-flat, kind="stable")[:k]] = True
    chosen = chosen.reshape(cov.shape)
    lr = logp.astype(np.float64) - old
    r = np.exp(lr)
    per_token = -adv[:, None] * r + np.where(chosen, 0.7 * np.abs(lr), 0.0)
    want = np.sum(np.where(valid, per_token, 0)) / n
    loss, m = loss_fn(logp, old, adv, mask, cfg)
    np.testing.assert_allclose(float(loss), want, rtol=1e-6, atol=1e-6)
    assert float(m["cov_selected_fraction"]) == pytest.approx(k / n)


def test_clip_cov_zeroes_only_covariance_band_tokens():
    """Clip-Cov (Cui et al. 2025; verl compute_policy_loss_clip_cov): among tokens PPO does not
    clip with ω_low < Cov < ω_high, max(1, ⌊r·N⌋) lose their loss; the rest is PPO-clip."""
    logp, old, adv, mask, _, _ = _batch(23, 6, 12, spread=0.3)
    adv = adv * 4.0  # widen Cov so that the band (0.2, 2) holds several tokens
    valid = mask > 0
    cov = _np_cov(logp, adv, valid)
    lr = logp.astype(np.float64) - old
    r = np.exp(lr)
    a = adv[:, None].astype(np.float64)
    ppo = np.maximum(-a * r, -a * np.clip(r, 0.8, 1.2))
    candidates = valid & (ppo == -a * r) & (cov > 0.2) & (cov < 2.0)
    assert candidates.sum() >= 3
    n = int(valid.sum())
    for ratio in (1.0, 2.5 / n):  # every candidate, then exactly two of them
        cfg = LossConfig(loss_type="clip_cov", clip_cov_ratio=ratio, clip_cov_low=0.2, clip_cov_high=2.0)
        zeroed = min(max(1, int(ratio * n)), int(candidates.sum()))
        loss, m = loss_fn(logp, old, adv, mask, cfg)
        assert float(m["cov_selected_fraction"]) == pytest.approx(zeroed / n)
        if ratio == 1.0:
            want = np.sum(np.where(valid & ~candidates, ppo, 0)) / n
            np.testing.assert_allclose(float(loss), want, rtol=1e-6, atol=1e-6)
        grad = np.asarray(jax.grad(lambda lp: loss_fn(lp, old, adv, mask, cfg)[0])(logp))
        no_grad = valid & (grad == 0) & (ppo == -a * r)  # unclipped tokens left without a gradient
        assert no_grad.sum() == zeroed and not (no_grad & ~candidates).any()


def test_entropy_collapse_metrics_match_float64():
    logp, old, adv, mask, _, entropy = _batch(24, 5, 9, token_adv=True)
    valid = mask > 0
    _, m = loss_fn(logp, old, adv, mask, LossConfig(), entropy=entropy)
    lp, a = logp.astype(np.float64)[valid], adv.astype(np.float64)[valid]
    assert float(m["cov_logp_adv"]) == pytest.approx(np.mean((lp - lp.mean()) * (a - a.mean())), abs=1e-5)
    assert float(m["entropy_mean"]) == pytest.approx(entropy.astype(np.float64)[valid].mean(), rel=1e-5)
