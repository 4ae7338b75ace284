"""The policy-loss registry: what a registered per-token loss receives and returns.

``jaxrl.rl.losses.policy_loss`` applies a registered loss (``rl.loss.loss_type``) and does
everything shared around it (masking, aggregation, KL, entropy, metrics). The built-in
losses are in ``jaxrl.rl.token_losses``; an outside module registers its own with
``register_loss`` (docs/design.md, "Extension points"). Every array here is [B, T].
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import struct


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
    ratio the loss used (metrics; also the factor of ``kl_ratio_correction``, so keep it
    differentiable). clip_low / clip_high / clip_dual: bool, where each clip binds (for the
    clip-fraction metrics; all False when the loss has no such clip). cov_selected: optional
    bool, the tokens a covariance rule (KL-Cov / Clip-Cov) picked (``cov_selected_fraction``).
    """

    loss: jax.Array
    ratio: jax.Array
    clip_low: jax.Array
    clip_high: jax.Array
    clip_dual: jax.Array
    cov_selected: jax.Array | None = None


TokenLossFn = Callable[[LossInputs, Any], TokenLoss]
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


def get_loss(name: str) -> TokenLossFn:
    """The registered per-token loss ``name`` (KeyError naming the registered ones)."""
    if name not in _LOSSES:
        raise KeyError(f"no policy loss {name!r}; registered: {list(_LOSSES)}")
    return _LOSSES[name]
