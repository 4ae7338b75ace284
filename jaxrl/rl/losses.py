"""The policy loss around a registered per-token loss (PPO-clip, GSPO, CISPO, KL-Cov, Clip-Cov):
token selection, aggregation, KL and entropy terms, metrics (docs/algorithms.md).

``policy_loss`` is pure and jittable with ``cfg`` static. Shapes: B rows, T response
positions; every per-token input is [B, T] and ``mask`` marks the valid response tokens.

Normalisers and gradient accumulation
-------------------------------------
Each aggregation is a sum over tokens/rows divided by a normaliser. By default the
normaliser is computed from the arrays this call sees. When one optimizer update is split
into micro-batches whose gradients are *summed*, pass the normalisers of the whole update
(or of the whole step batch, to match DAPO's Σ_i|o_i|) so that
``Σ_micro policy_loss(micro, num_tokens=N_global, ...) == policy_loss(full batch)``:

* ``num_tokens``: global count of valid response tokens (``token-mean``; also used for the
  KL and entropy terms, and for the pg term under ``mask_normalizer="all_tokens"``).
* ``num_selected_tokens``: global count of selected tokens (``token-mean`` with
  ``mask_normalizer="selected_tokens"``).
* ``num_sequences``: global count of rows (``seq-mean-*`` modes). Default: rows with at
  least one valid token, except ``seq-mean-token-sum-norm`` which uses the static row
  count B so that the Dr.GRPO normaliser never varies between batches.

Forking-token mask contract
---------------------------
With ``cfg.token_mask`` "top"/"bottom" the policy-gradient term of each token is multiplied
by a boolean selection (KL and entropy terms are not). Either pass ``token_select`` [B, T]
(computed with ``select_tokens`` over the population of ``cfg.mask_scope``: for "batch", all
response tokens of the step's train batch — the trainer must do this once per step when the
step has several minibatches), or let the loss compute it from the tokens it sees (exactly
the "minibatch" scope, or "batch" scope when the loss sees the whole step batch).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxrl.rl.loss_registry import LossInputs, TokenLoss, get_loss, loss_names, register_loss
from jaxrl.rl.token_losses import clipped_surrogate, token_covariance
from jaxrl.rl.token_masks import MASK_RULES, forking_token_mask

# The registry and the built-in losses live in loss_registry / token_losses; importing
# token_losses above registers them. Re-exported here for extensions and tests.
__all__ = ["LossConfig", "LossInputs", "TokenLoss", "register_loss", "loss_names", "policy_loss",
           "select_tokens", "aggregate", "kl_penalty", "clipped_surrogate", "token_covariance"]

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_TYPES = ("k1", "k2", "k3")
TOKEN_MASKS = ("all", "top", "bottom")
MASK_SCOPES = ("batch", "minibatch")
MASK_NORMALIZERS = ("all_tokens", "selected_tokens")
ENTROPY_SOURCES = ("step_start", "current", "rollout")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Static (hashable) configuration of ``policy_loss``.

    loss_type: "ppo" (token ratio), "gspo" (sequence ratio), "gspo_token" (sequence ratio
      value, per-token gradient and advantages), "cispo" (clipped IS weight, REINFORCE
      gradient on every token), "kl_cov" / "clip_cov" (covariance-selected penalties,
      Cui et al. 2025; ``jaxrl.rl.token_losses``).
    clip_eps_low / clip_eps_high: PPO clip range [1 − low, 1 + high] (DAPO clip-higher).
    dual_clip_c: if set (> 1), caps the loss of negative-advantage tokens at −c·Â.
    log_ratio_clamp: |log r| is clamped to this before exponentiating.
    gspo_eps_low / gspo_eps_high: clip range of the GSPO sequence ratio.
    cispo_eps_max: CISPO's IS weight is min(r, cispo_eps_max) (an upper bound on r).
    aggregation: "token-mean" | "seq-mean-token-mean" | "seq-mean-token-sum" |
      "seq-mean-token-sum-norm" (token sum / (norm_constant · rows), Dr.GRPO).
    norm_constant: the fixed constant for "seq-mean-token-sum-norm" (e.g. max response len).
    kl_coef / kl_type / kl_delta_clamp / kl_value_clamp: β, estimator k1|k2|k3 of
      KL(π_θ‖π_ref) with δ = ref_logp − logp clamped to ±kl_delta_clamp and the estimate to
      ±kl_value_clamp.
    kl_ratio_correction: multiply the per-token KL by the (differentiated) importance ratio
      r = π_θ/π_old, TRL's ``use_bias_correction_kl``: samples come from π_old, so
      E_old[r·k3] estimates KL(π_θ‖π_ref) under π_θ's own samples.
    kl_cov_ratio / kl_cov_coef: KL-Cov's fraction k of tokens (largest Cov) and its β.
    clip_cov_ratio / clip_cov_low / clip_cov_high: Clip-Cov's fraction r of tokens and the
      open Cov interval (ω_low, ω_high) they are picked from.
    entropy_coef: weight α of the entropy bonus (loss −= α · aggregated entropy).
    token_mask: "all" | "top" (top-ρ forking tokens) | "bottom" (the complement).
    entropy_rho: ρ in (0, 1].
    mask_rule: "quantile" (keep H ≥ the (1 − ρ)-quantile, linear interpolation; the paper
      and TRL) | "count" (exactly ⌈ρN⌉, ties by flattened index). ``jaxrl.rl.token_masks``.
    mask_scope: "batch" (step batch, the paper) | "minibatch" (each optimizer update).
    mask_normalizer: "all_tokens" (1/Σ|o_i|, the paper) | "selected_tokens".
    entropy_source: which entropies pick the forking tokens: "step_start" (trainer pass with
      the params at the start of the step, before any update) | "current" (the params of the
      mini-batch's own update, i.e. the values its training forward computes) | "rollout"
      (the sampler's). All at the rollout temperature, full vocabulary.
    mask_include_truncated: whether truncated rows count in the threshold population.
    """

    loss_type: str = "ppo"
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    dual_clip_c: float | None = None
    log_ratio_clamp: float = 20.0
    gspo_eps_low: float = 3e-4
    gspo_eps_high: float = 4e-4
    cispo_eps_max: float = 4.0
    aggregation: str = "token-mean"
    norm_constant: float | None = None
    kl_coef: float = 0.0
    kl_type: str = "k3"
    kl_delta_clamp: float = 20.0
    kl_value_clamp: float = 10.0
    entropy_coef: float = 0.0
    token_mask: str = "all"
    entropy_rho: float = 0.2
    mask_scope: str = "batch"
    mask_normalizer: str = "all_tokens"
    entropy_source: str = "step_start"
    mask_include_truncated: bool = True
    mask_rule: str = "quantile"  # issue 12: the paper's / TRL's rule by default
    kl_ratio_correction: bool = False  # TRL use_bias_correction_kl
    kl_cov_ratio: float = 2e-3  # KL-Cov k (Cui et al. 2025: 2e-3 for Qwen2.5-7B, 2e-4 for 32B)
    kl_cov_coef: float = 1.0  # KL-Cov β
    clip_cov_ratio: float = 2e-4  # Clip-Cov r
    clip_cov_low: float = 1.0  # Clip-Cov ω_low
    clip_cov_high: float = 5.0  # Clip-Cov ω_high

    def __post_init__(self):
        choices = {
            "loss_type": loss_names(),
            "aggregation": AGGREGATIONS,
            "kl_type": KL_TYPES,
            "token_mask": TOKEN_MASKS,
            "mask_scope": MASK_SCOPES,
            "mask_normalizer": MASK_NORMALIZERS,
            "entropy_source": ENTROPY_SOURCES,
            "mask_rule": MASK_RULES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"LossConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        ranges = {
            "clip_eps_low": (0.0, 1.0, "[0, 1)"),
            "gspo_eps_low": (0.0, 1.0, "[0, 1)"),
        }
        for name, (lo, hi, text) in ranges.items():
            if not lo <= getattr(self, name) < hi:
                raise ValueError(f"LossConfig.{name} must be in {text}, got {getattr(self, name)}")
        for name in ("clip_eps_high", "gspo_eps_high", "kl_coef", "kl_cov_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"LossConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("log_ratio_clamp", "cispo_eps_max", "kl_delta_clamp", "kl_value_clamp"):
            if not getattr(self, name) > 0:
                raise ValueError(f"LossConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ("kl_cov_ratio", "clip_cov_ratio"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"LossConfig.{name} must be in (0, 1], got {getattr(self, name)}")
        if not self.clip_cov_low < self.clip_cov_high:
            raise ValueError(f"LossConfig.clip_cov_low must be < clip_cov_high, got "
                             f"({self.clip_cov_low}, {self.clip_cov_high})")
        if self.dual_clip_c is not None and not self.dual_clip_c > 1.0:
            raise ValueError(f"LossConfig.dual_clip_c must be > 1 or None, got {self.dual_clip_c}")
        if not 0.0 < self.entropy_rho <= 1.0:
            raise ValueError(f"LossConfig.entropy_rho must be in (0, 1] (ρ = 0 would train on no "
                             f"token; use token_mask='all' for every token), got {self.entropy_rho}")
        if self.aggregation == "seq-mean-token-sum-norm":
            if self.norm_constant is None or not self.norm_constant > 0:
                raise ValueError(
                    "LossConfig.norm_constant must be > 0 with aggregation "
                    f"'seq-mean-token-sum-norm', got {self.norm_constant}"
                )


def select_tokens(
    cfg: LossConfig,
    mask: jax.Array,
    *,
    train_entropy: jax.Array | None = None,
    rollout_entropy: jax.Array | None = None,
    truncated: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Tokens whose policy-gradient term is kept, per ``cfg.token_mask``.

    mask: [B, T] valid response tokens. train_entropy: float [B, T], the trainer's entropies
    for ``cfg.entropy_source`` "step_start" or "current" (the caller computes them with the
    right params); rollout_entropy: float [B, T], the sampler's, for "rollout". The one the
    source needs is required unless token_mask is "all". truncated: optional bool [B].
    Call it on the population of ``cfg.mask_scope``.
    Returns (select bool [B, T], threshold float32 scalar; see ``forking_token_mask``).
    """
    if cfg.token_mask == "all":
        return jnp.asarray(mask) > 0, jnp.float32(-jnp.inf)
    rollout = cfg.entropy_source == "rollout"
    entropy = rollout_entropy if rollout else train_entropy
    if entropy is None:
        raise ValueError(
            f"LossConfig.token_mask={cfg.token_mask!r} with entropy_source="
            f"{cfg.entropy_source!r} needs the {'rollout' if rollout else 'trainer'} entropies"
        )
    return forking_token_mask(
        entropy,
        mask,
        rho=cfg.entropy_rho,
        mode=cfg.token_mask,
        truncated=truncated,
        include_truncated=cfg.mask_include_truncated,
        rule=cfg.mask_rule,
    )


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, cfg: LossConfig) -> jax.Array:
    """Per-token estimate of KL(π_θ‖π_ref), float32 [B, T] (k1, k2 or k3 with clamps)."""
    delta = jnp.clip(ref_logp - logp, -cfg.kl_delta_clamp, cfg.kl_delta_clamp)
    if cfg.kl_type == "k1":
        kl = -delta
    elif cfg.kl_type == "k2":
        kl = 0.5 * delta * delta
    else:
        kl = jnp.expm1(delta) - delta
    return jnp.clip(kl, -cfg.kl_value_clamp, cfg.kl_value_clamp)


def _safe_div(num, den):
    return num / jnp.maximum(den, 1.0)


def _masked_mean(values, weights):
    return _safe_div(jnp.sum(values * weights), jnp.sum(weights))


def aggregate(
    values: jax.Array,
    count_mask: jax.Array,
    row_mask: jax.Array,
    aggregation: str,
    *,
    total_count: jax.Array | float | None = None,
    num_sequences: jax.Array | float | None = None,
    norm_constant: float | None = None,
) -> jax.Array:
    """Reduce per-token ``values`` [B, T] (already zero off the tokens that contribute).

    count_mask: float [B, T], the tokens the token-level normalisers count.
    row_mask: float [B, T], valid tokens; a row with none is not a sequence for seq-mean.
    total_count / num_sequences: global normalisers (see module docstring); None → local.
    Returns a float32 scalar.
    """
    if aggregation == "token-mean":
        count = jnp.sum(count_mask) if total_count is None else total_count
        return _safe_div(jnp.sum(values), count)
    if aggregation == "seq-mean-token-sum-norm":
        rows = values.shape[0] if num_sequences is None else num_sequences
        return jnp.sum(values) / (norm_constant * jnp.maximum(rows, 1.0))
    if num_sequences is None:
        num_sequences = jnp.sum(jnp.any(row_mask > 0, axis=-1))
    row_sums = jnp.sum(values, axis=-1)
    if aggregation == "seq-mean-token-mean":
        row_sums = _safe_div(row_sums, jnp.sum(count_mask, axis=-1))
    return _safe_div(jnp.sum(row_sums), num_sequences)


def policy_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    cfg: LossConfig,
    *,
    ref_logp: jax.Array | None = None,
    entropy: jax.Array | None = None,
    token_select: jax.Array | None = None,
    rollout_entropy: jax.Array | None = None,
    truncated: jax.Array | None = None,
    num_tokens: jax.Array | float | None = None,
    num_selected_tokens: jax.Array | float | None = None,
    num_sequences: jax.Array | float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Policy loss of one (micro-)batch → (loss float32 scalar, metrics of float32 scalars).

    logp: float [B, T] current-policy log-probs of the response tokens (differentiated).
    old_logp: float [B, T] log-probs of the sampling policy (no gradient).
    advantages: float [B] (broadcast over tokens) or [B, T].
    mask: bool/float [B, T], valid response tokens (padding and filtered rows are 0).
    ref_logp: float [B, T], reference log-probs; required when ``cfg.kl_coef > 0``.
    entropy: float [B, T], current-policy entropy at the rollout temperature; required for
      the entropy bonus, and the mask source for entropy_source "step_start" / "current"
      when ``token_select`` is not given (the caller's params decide which of the two it
      is). Gradient flows through it only via the bonus.
    token_select: bool [B, T] precomputed selection (see module docstring); wins over the
      in-loss selection. rollout_entropy: float [B, T], the source for entropy_source=
      "rollout". truncated: bool [B] (only for the in-loss threshold population).
    num_tokens / num_selected_tokens / num_sequences: global normalisers (module docstring).

    Metrics (all over this call's valid tokens): loss, pg_loss, clip_frac_low/high/dual,
    approx_kl (k3 of KL(π_old‖π_θ)), ratio_mean, ratio_max, selected_fraction, the
    entropy-collapse moments logp_mean, adv_mean, logp_adv_mean and cov_logp_adv
    (= logp_adv_mean − logp_mean·adv_mean), and when available kl / kl_loss, entropy_mean,
    entropy_selected_mean, entropy_bonus, cov_selected_fraction (KL-Cov / Clip-Cov),
    entropy_threshold (only when the selection is computed here).
    """
    valid = jnp.asarray(mask) > 0
    weights = valid.astype(jnp.float32)
    logp = jnp.asarray(logp, jnp.float32)
    old_logp = jax.lax.stop_gradient(jnp.asarray(old_logp, jnp.float32))
    adv = jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32))
    if adv.ndim == 1:
        adv = adv[:, None]
    adv = jnp.broadcast_to(adv, logp.shape)

    metrics: dict[str, jax.Array] = {}
    if token_select is not None:
        select = jnp.asarray(token_select, bool) & valid
    else:
        select, threshold = select_tokens(
            cfg, valid, train_entropy=entropy, rollout_entropy=rollout_entropy, truncated=truncated
        )
        if cfg.token_mask != "all":
            metrics["entropy_threshold"] = threshold
    select_weights = select.astype(jnp.float32)

    # Padding may hold arbitrary log-probs; zero the log-ratio there before exp.
    token_log_ratio = jnp.where(valid, logp - old_logp, 0.0)
    token_log_ratio = jnp.clip(token_log_ratio, -cfg.log_ratio_clamp, cfg.log_ratio_clamp)
    inputs = LossInputs(logp=logp, old_logp=old_logp, advantages=adv, valid=valid, log_ratio=token_log_ratio)
    token_loss = get_loss(cfg.loss_type)(inputs, cfg)
    pg, ratio = token_loss.loss, token_loss.ratio
    clip_low, clip_high, clip_dual = token_loss.clip_low, token_loss.clip_high, token_loss.clip_dual

    pg_count = weights if cfg.mask_normalizer == "all_tokens" else select_weights
    pg_total = num_tokens if cfg.mask_normalizer == "all_tokens" else num_selected_tokens
    agg = dict(num_sequences=num_sequences, norm_constant=cfg.norm_constant)
    pg_loss = aggregate(
        jnp.where(select, pg, 0.0), pg_count, weights, cfg.aggregation, total_count=pg_total, **agg
    )
    loss = pg_loss

    if cfg.kl_coef > 0:
        if ref_logp is None:
            raise ValueError("LossConfig.kl_coef > 0 needs ref_logp")
        kl = kl_penalty(logp, jnp.asarray(ref_logp, jnp.float32), cfg)
        if cfg.kl_ratio_correction:  # TRL's bias-corrected KL: r·k (r differentiated)
            kl = kl * ratio
        kl = jnp.where(valid, kl, 0.0)
        kl_loss = aggregate(kl, weights, weights, cfg.aggregation, total_count=num_tokens, **agg)
        loss = loss + cfg.kl_coef * kl_loss
        metrics["kl_loss"] = kl_loss
    if ref_logp is not None:
        kl_all = kl_penalty(logp, jnp.asarray(ref_logp, jnp.float32), cfg)
        metrics["kl"] = _masked_mean(jax.lax.stop_gradient(kl_all), weights)

    if cfg.entropy_coef != 0:
        if entropy is None:
            raise ValueError("LossConfig.entropy_coef != 0 needs entropy")
        masked_entropy = jnp.where(valid, jnp.asarray(entropy, jnp.float32), 0.0)
        entropy_bonus = aggregate(
            masked_entropy, weights, weights, cfg.aggregation, total_count=num_tokens, **agg
        )
        loss = loss - cfg.entropy_coef * entropy_bonus
        metrics["entropy_bonus"] = entropy_bonus
    if entropy is not None:
        ent = jax.lax.stop_gradient(jnp.asarray(entropy, jnp.float32))
        metrics["entropy_mean"] = _masked_mean(ent, weights)
        metrics["entropy_selected_mean"] = _masked_mean(ent, select_weights)
    if token_loss.cov_selected is not None:
        metrics["cov_selected_fraction"] = _masked_mean(token_loss.cov_selected.astype(jnp.float32), weights)
    # Entropy-collapse signal (Cui et al. 2025): covariance of log-prob and advantage.
    sg_logp = jax.lax.stop_gradient(logp)
    moments = {"logp_mean": sg_logp, "adv_mean": adv, "logp_adv_mean": sg_logp * adv}
    metrics.update({name: _masked_mean(jnp.where(valid, v, 0.0), weights) for name, v in moments.items()})
    metrics["cov_logp_adv"] = metrics["logp_adv_mean"] - metrics["logp_mean"] * metrics["adv_mean"]

    sg_ratio = jax.lax.stop_gradient(ratio)
    sg_log_ratio = jax.lax.stop_gradient(token_log_ratio)
    metrics.update(
        loss=loss,
        pg_loss=pg_loss,
        clip_frac_low=_masked_mean(clip_low.astype(jnp.float32), weights),
        clip_frac_high=_masked_mean(clip_high.astype(jnp.float32), weights),
        clip_frac_dual=_masked_mean(clip_dual.astype(jnp.float32), weights),
        approx_kl=_masked_mean(jnp.expm1(sg_log_ratio) - sg_log_ratio, weights),
        ratio_mean=_masked_mean(sg_ratio, weights),
        ratio_max=jnp.max(jnp.where(valid, sg_ratio, 0.0)),
        selected_fraction=_safe_div(jnp.sum(select_weights), jnp.sum(weights)),
    )
    metrics = {k: jax.lax.stop_gradient(v).astype(jnp.float32) for k, v in metrics.items()}
    return loss, metrics
