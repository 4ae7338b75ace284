"""The built-in per-token policy losses, registered by name (docs/algorithms.md, section 2).

PPO-clip (asymmetric + dual-clip), GSPO (sequence and token variants), CISPO, and the two
covariance-selected losses of Cui et al. 2025, "The Entropy Mechanism of Reinforcement
Learning for Reasoning Language Models": KL-Cov and Clip-Cov. Each maps ``LossInputs``
(arrays [B, T]) and the static ``LossConfig`` to a ``TokenLoss``; ``policy_loss`` does the
masking and aggregation around it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxrl.rl.loss_registry import LossInputs, TokenLoss, register_loss
from jaxrl.rl.token_masks import top_count_mask


def _safe_div(num, den):
    return num / jnp.maximum(den, 1.0)


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


@register_loss("ppo")
def ppo_token_loss(inputs: LossInputs, cfg) -> TokenLoss:
    """PPO-clip on the token ratio r = exp(log_ratio), clip range [1 − ε_low, 1 + ε_high]."""
    ratio = jnp.exp(inputs.log_ratio)
    return clipped_surrogate(ratio, inputs.advantages, cfg.clip_eps_low, cfg.clip_eps_high, cfg.dual_clip_c)


def _gspo_log_ratio(inputs: LossInputs, cfg) -> jax.Array:
    """Sequence log-ratio mean_t(log r), clamped, [B, 1]."""
    weights = inputs.valid.astype(jnp.float32)
    seq = _safe_div(jnp.sum(inputs.log_ratio * weights, axis=-1), jnp.sum(weights, axis=-1))
    return jnp.clip(seq, -cfg.log_ratio_clamp, cfg.log_ratio_clamp)[:, None]


@register_loss("gspo")
def gspo_token_loss(inputs: LossInputs, cfg) -> TokenLoss:
    """GSPO: every token carries the clipped sequence ratio s = exp(mean_t log r)."""
    ratio = jnp.exp(jnp.broadcast_to(_gspo_log_ratio(inputs, cfg), inputs.logp.shape))
    return clipped_surrogate(ratio, inputs.advantages, cfg.gspo_eps_low, cfg.gspo_eps_high, cfg.dual_clip_c)


@register_loss("gspo_token")
def gspo_token_variant_loss(inputs: LossInputs, cfg) -> TokenLoss:
    """GSPO-token: value of the sequence ratio, gradient of each token's own log-prob."""
    sg = jax.lax.stop_gradient
    ratio = jnp.exp(sg(_gspo_log_ratio(inputs, cfg)) + inputs.logp - sg(inputs.logp))
    return clipped_surrogate(ratio, inputs.advantages, cfg.gspo_eps_low, cfg.gspo_eps_high, cfg.dual_clip_c)


@register_loss("cispo")
def cispo_token_loss(inputs: LossInputs, cfg) -> TokenLoss:
    """CISPO: −sg(min(r, ε_max))·Â·logp; gradients reach every token."""
    ratio = jnp.exp(inputs.log_ratio)
    is_weight = jax.lax.stop_gradient(jnp.minimum(ratio, cfg.cispo_eps_max))
    clip_high = ratio > cfg.cispo_eps_max
    none = jnp.zeros_like(clip_high)
    return TokenLoss(loss=-is_weight * inputs.advantages * inputs.logp, ratio=ratio,
                     clip_low=none, clip_high=clip_high, clip_dual=none)


# ----------------------------------------------------------------- covariance-selected losses
def token_covariance(logp: jax.Array, advantages: jax.Array, valid: jax.Array) -> jax.Array:
    """Per-token centred product Cov_t = (logp_t − mean logp)·(Â_t − mean Â), means over the
    ``valid`` tokens; float32 [B, T], 0 off ``valid``, no gradient (Cui et al. 2025, eq. 9)."""
    weights = valid.astype(jnp.float32)
    logp, advantages = lax.stop_gradient(logp), lax.stop_gradient(advantages)
    count = jnp.sum(weights)
    logp_mean = _safe_div(jnp.sum(logp * weights), count)
    adv_mean = _safe_div(jnp.sum(advantages * weights), count)
    return jnp.where(valid, (logp - logp_mean) * (advantages - adv_mean), 0.0)


def _cov_count(valid: jax.Array, fraction: float) -> jax.Array:
    """int32 max(1, ⌊fraction·N⌋) for N = #valid > 0, else 0 (verl's ``max(1, int(N·r))``)."""
    n = jnp.sum(valid, dtype=jnp.int32)
    k = jnp.floor(n.astype(jnp.float32) * jnp.float32(fraction)).astype(jnp.int32)
    return jnp.where(n > 0, jnp.maximum(k, 1), 0)


def _token_priority(old_logp: jax.Array) -> jax.Array:
    """float32 [B, T] in [0, 2²⁴): a pseudo-random order of the tokens, a murmur3 finaliser of
    the old log-prob's bits and the flattened index (Clip-Cov's random pick, without RNG state)."""
    index = jnp.arange(old_logp.size, dtype=jnp.uint32).reshape(old_logp.shape)
    h = lax.bitcast_convert_type(old_logp.astype(jnp.float32), jnp.uint32) ^ (index * jnp.uint32(0x9E3779B9))
    for shift, mult in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
        h = (h ^ (h >> shift)) * jnp.uint32(mult)
    h = h ^ (h >> 16)
    return (h >> 8).astype(jnp.float32)


@register_loss("kl_cov")
def kl_cov_token_loss(inputs: LossInputs, cfg) -> TokenLoss:
    """KL-Cov: ℓ = −r·Â on every token, plus β·|logp − old_logp| on the ⌊k·N⌋ (at least 1)
    tokens with the largest Cov_t; no ratio clip. k = ``kl_cov_ratio``, β = ``kl_cov_coef``."""
    ratio = jnp.exp(inputs.log_ratio)
    cov = token_covariance(inputs.logp, inputs.advantages, inputs.valid)
    chosen, _ = top_count_mask(cov, inputs.valid, _cov_count(inputs.valid, cfg.kl_cov_ratio))
    penalty = cfg.kl_cov_coef * jnp.abs(inputs.log_ratio)
    none = jnp.zeros_like(chosen)
    return TokenLoss(loss=-inputs.advantages * ratio + jnp.where(chosen, penalty, 0.0), ratio=ratio,
                     clip_low=none, clip_high=none, clip_dual=none, cov_selected=chosen)


@register_loss("clip_cov")
def clip_cov_token_loss(inputs: LossInputs, cfg) -> TokenLoss:
    """Clip-Cov: PPO-clip, with the loss (and so the gradient) of max(1, ⌊r·N⌋) tokens set to 0,
    picked pseudo-randomly among the tokens PPO does not clip whose Cov_t lies in
    (``clip_cov_low``, ``clip_cov_high``); r = ``clip_cov_ratio``."""
    ratio = jnp.exp(inputs.log_ratio)
    base = clipped_surrogate(ratio, inputs.advantages, cfg.clip_eps_low, cfg.clip_eps_high, cfg.dual_clip_c)
    unclipped = -inputs.advantages * ratio
    clipped_by_ppo = base.loss != unclipped
    cov = token_covariance(inputs.logp, inputs.advantages, inputs.valid)
    candidates = inputs.valid & ~clipped_by_ppo & (cov > cfg.clip_cov_low) & (cov < cfg.clip_cov_high)
    chosen, _ = top_count_mask(_token_priority(inputs.old_logp), candidates,
                               _cov_count(inputs.valid, cfg.clip_cov_ratio))
    return base.replace(loss=jnp.where(chosen, 0.0, base.loss), cov_selected=chosen)
