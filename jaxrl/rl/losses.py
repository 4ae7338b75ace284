"""Policy-gradient losses: PPO-clip (asymmetric + dual-clip), GSPO, CISPO (docs/algorithms.md).

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
from typing import Callable

import jax
import jax.numpy as jnp
from flax import struct

from jaxrl.rl.token_masks import forking_token_mask

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_TYPES = ("k1", "k2", "k3")
TOKEN_MASKS = ("all", "top", "bottom")
MASK_SCOPES = ("batch", "minibatch")
MASK_NORMALIZERS = ("all_tokens", "selected_tokens")
ENTROPY_SOURCES = ("train", "rollout")


@struct.dataclass
class LossInputs:
    """What a registered per-token loss sees (every array float32/bool [B, T]).

    logp: current-policy log-probs (differentiated). old_logp: sampling-policy log-probs
    (no gradient). advantages: broadcast to [B, T] (no gradient). valid: response tokens.
    log_ratio: logp − old_logp, 0 off ``valid``, clamped to ±``cfg.log_ratio_clamp``.
    """

    logp: jax.Array
    old_logp: jax.Array
    advantages: jax.Array
    valid: jax.Array
    log_ratio: jax.Array


@struct.dataclass
class TokenLoss:
    """What a registered per-token loss returns (every array [B, T]).

    loss: float32 per-token loss before masking and aggregation. ratio: the importance
    ratio the loss used (metrics only). clip_low / clip_high / clip_dual: bool, where each
    clip binds (for the clip-fraction metrics; all False when the loss has no such clip).
    """

    loss: jax.Array
    ratio: jax.Array
    clip_low: jax.Array
    clip_high: jax.Array
    clip_dual: jax.Array


TokenLossFn = Callable[[LossInputs, "LossConfig"], TokenLoss]
_LOSSES: dict[str, TokenLossFn] = {}


def register_loss(name: str) -> Callable[[TokenLossFn], TokenLossFn]:
    """Decorator: registers ``fn(inputs: LossInputs, cfg: LossConfig) -> TokenLoss`` as
    ``rl.loss.loss_type = name``. Aggregation, KL, entropy bonus and the forking-token mask
    are applied around it by ``policy_loss`` (docs/algorithms.md, "Policy losses")."""

    def register(fn: TokenLossFn) -> TokenLossFn:
        if name in _LOSSES and _LOSSES[name] is not fn:
            raise ValueError(f"a policy loss named {name!r} is already registered")
        _LOSSES[name] = fn
        return fn

    return register


def loss_names() -> tuple[str, ...]:
    """Names of the registered policy losses (valid ``rl.loss.loss_type`` values)."""
    return tuple(_LOSSES)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Static (hashable) configuration of ``policy_loss``.

    loss_type: "ppo" (token ratio), "gspo" (sequence ratio), "gspo_token" (sequence ratio
      value, per-token gradient and advantages), "cispo" (clipped IS weight, REINFORCE
      gradient on every token).
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
    entropy_coef: weight α of the entropy bonus (loss −= α · aggregated entropy).
    token_mask: "all" | "top" (top-ρ forking tokens) | "bottom" (the complement).
    entropy_rho: ρ in (0, 1].
    mask_scope: "batch" (step batch, the paper) | "minibatch" (each optimizer update).
    mask_normalizer: "all_tokens" (1/Σ|o_i|, the paper) | "selected_tokens".
    entropy_source: "train" (current policy at the rollout temperature) | "rollout".
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
    entropy_source: str = "train"
    mask_include_truncated: bool = True

    def __post_init__(self):
        choices = {
            "loss_type": loss_names(),
            "aggregation": AGGREGATIONS,
            "kl_type": KL_TYPES,
            "token_mask": TOKEN_MASKS,
            "mask_scope": MASK_SCOPES,
            "mask_normalizer": MASK_NORMALIZERS,
            "entropy_source": ENTROPY_SOURCES,
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
        for name in ("clip_eps_high", "gspo_eps_high", "kl_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"LossConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("log_ratio_clamp", "cispo_eps_max", "kl_delta_clamp", "kl_value_clamp"):
            if not getattr(self, name) > 0:
                raise ValueError(f"LossConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.dual_clip_c is not None and not self.dual_clip_c > 1.0:
            raise ValueError(f"LossConfig.dual_clip_c must be > 1 or None, got {self.dual_clip_c}")
        if not 0.0 < self.entropy_rho <= 1.0:
            raise ValueError(f"LossConfig.entropy_rho must be in (0, 1], got {self.entropy_rho}")
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

    mask: [B, T] valid response tokens; train_entropy / rollout_entropy: float [B, T]
    (the one named by ``cfg.entropy_source`` is required unless token_mask is "all");
    truncated: optional bool [B]. Call it on the population of ``cfg.mask_scope``.
    Returns (select bool [B, T], threshold float32 scalar; see ``forking_token_mask``).
    """
    if cfg.token_mask == "all":
        return jnp.asarray(mask) > 0, jnp.float32(-jnp.inf)
    entropy = train_entropy if cfg.entropy_source == "train" else rollout_entropy
    if entropy is None:
        raise ValueError(
            f"LossConfig.token_mask={cfg.token_mask!r} with entropy_source="
            f"{cfg.entropy_source!r} needs the {cfg.entropy_source} entropies"
        )
    return forking_token_mask(
        entropy,
        mask,
        rho=cfg.entropy_rho,
        mode=cfg.token_mask,
        truncated=truncated,
        include_truncated=cfg.mask_include_truncated,
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


def clipped_surrogate(ratio: jax.Array, adv: jax.Array, eps_low: float, eps_high: float,
                      dual_clip_c: float | None) -> TokenLoss:
    """PPO-clip per-token loss max(−r·Â, −clip(r, 1−ε_low, 1+ε_high)·Â) (dual-clip for Â < 0:
    min(·, −c·Â)) and where each clip binds; ratio, adv float [B, T]."""
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = jnp.maximum(unclipped, clipped)
    clip_low = (ratio < 1.0 - eps_low) & (adv < 0)
    clip_high = (ratio > 1.0 + eps_high) & (adv > 0)
    if dual_clip_c is None:
        return TokenLoss(loss, ratio, clip_low, clip_high, jnp.zeros_like(clip_low))
    dual_bound = -adv * dual_clip_c
    clip_dual = (adv < 0) & (loss > dual_bound)
    loss = jnp.where(adv < 0, jnp.minimum(loss, dual_bound), loss)
    return TokenLoss(loss, ratio, clip_low, clip_high, clip_dual)


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
      the entropy bonus, and the mask source for entropy_source="train" when
      ``token_select`` is not given. Gradient flows through it only via the bonus.
    token_select: bool [B, T] precomputed selection (see module docstring); wins over the
      in-loss selection. rollout_entropy: float [B, T], the source for entropy_source=
      "rollout". truncated: bool [B] (only for the in-loss threshold population).
    num_tokens / num_selected_tokens / num_sequences: global normalisers (module docstring).

    Metrics (all over this call's valid tokens): loss, pg_loss, clip_frac_low/high/dual,
    approx_kl (k3 of KL(π_old‖π_θ)), ratio_mean, ratio_max, selected_fraction, and when
    available kl / kl_loss, entropy_mean, entropy_selected_mean, entropy_bonus,
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
    token_loss = _LOSSES[cfg.loss_type](inputs, cfg)
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
        kl = jnp.where(valid, kl_penalty(logp, jnp.asarray(ref_logp, jnp.float32), cfg), 0.0)
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


# ----------------------------------------------------------------------------- registered losses
@register_loss("ppo")
def ppo_token_loss(inputs: LossInputs, cfg: LossConfig) -> TokenLoss:
    """PPO-clip on the token ratio r = exp(log_ratio), clip range [1 − ε_low, 1 + ε_high]."""
    ratio = jnp.exp(inputs.log_ratio)
    return clipped_surrogate(ratio, inputs.advantages, cfg.clip_eps_low, cfg.clip_eps_high, cfg.dual_clip_c)


def _gspo_log_ratio(inputs: LossInputs, cfg: LossConfig) -> jax.Array:
    """Sequence log-ratio mean_t(log r), clamped, [B, 1]."""
    weights = inputs.valid.astype(jnp.float32)
    seq = _safe_div(jnp.sum(inputs.log_ratio * weights, axis=-1), jnp.sum(weights, axis=-1))
    return jnp.clip(seq, -cfg.log_ratio_clamp, cfg.log_ratio_clamp)[:, None]


@register_loss("gspo")
def gspo_token_loss(inputs: LossInputs, cfg: LossConfig) -> TokenLoss:
    """GSPO: every token carries the clipped sequence ratio s = exp(mean_t log r)."""
    ratio = jnp.exp(jnp.broadcast_to(_gspo_log_ratio(inputs, cfg), inputs.logp.shape))
    return clipped_surrogate(ratio, inputs.advantages, cfg.gspo_eps_low, cfg.gspo_eps_high, cfg.dual_clip_c)


@register_loss("gspo_token")
def gspo_token_variant_loss(inputs: LossInputs, cfg: LossConfig) -> TokenLoss:
    """GSPO-token: value of the sequence ratio, gradient of each token's own log-prob."""
    sg = jax.lax.stop_gradient
    ratio = jnp.exp(sg(_gspo_log_ratio(inputs, cfg)) + inputs.logp - sg(inputs.logp))
    return clipped_surrogate(ratio, inputs.advantages, cfg.gspo_eps_low, cfg.gspo_eps_high, cfg.dual_clip_c)


@register_loss("cispo")
def cispo_token_loss(inputs: LossInputs, cfg: LossConfig) -> TokenLoss:
    """CISPO: −sg(min(r, ε_max))·Â·logp; gradients reach every token."""
    ratio = jnp.exp(inputs.log_ratio)
    is_weight = jax.lax.stop_gradient(jnp.minimum(ratio, cfg.cispo_eps_max))
    clip_high = ratio > cfg.cispo_eps_max
    none = jnp.zeros_like(clip_high)
    return TokenLoss(loss=-is_weight * inputs.advantages * inputs.logp, ratio=ratio,
                     clip_low=none, clip_high=clip_high, clip_dual=none)
