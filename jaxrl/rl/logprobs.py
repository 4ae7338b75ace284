"""Per-token log-probs and entropies from final hidden states, chunked over positions.

The logits of a whole response batch are [B, T, V] floats (e.g. 16 x 20k x 150k x 4 bytes
≈ 190 GB), so they are never formed: a ``lax.scan`` walks over position chunks of size C,
each step materialises only [B, C, V] logits, reduces them to [B, C] results, and is wrapped
in ``jax.checkpoint`` so the backward pass recomputes the chunk's logits instead of keeping
them. Peak logits memory is O(B·C·V) for both the forward and the backward pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _chunk_logprob_entropy(hidden, targets, unembed, *, temperature, compute_entropy):
    """hidden [B,C,D], targets [B,C] → (logp [B,C] f32, entropy [B,C] f32)."""
    logits = jnp.einsum("bcd,dv->bcv", hidden, unembed, preferred_element_type=jnp.float32)
    logits = logits.astype(jnp.float32) / temperature
    log_norm = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    logp = target_logits - log_norm
    if not compute_entropy:
        return logp, jnp.zeros_like(logp)
    probs = jnp.exp(logits - log_norm[..., None])
    # H = log Z − Σ p·z  (no log p of tiny probabilities is formed)
    entropy = log_norm - jnp.sum(probs * logits, axis=-1)
    return logp, entropy


def token_logprobs_and_entropy(
    hidden: jax.Array,
    unembed: jax.Array,
    targets: jax.Array,
    *,
    temperature: float = 1.0,
    chunk_size: int = 256,
    compute_entropy: bool = True,
    entropy_grad: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Log-prob of each target token and entropy of softmax(z / temperature).

    hidden: [B, T, D] final hidden states (after the last norm), any float dtype; position t
      predicts ``targets[:, t]``.
    unembed: [D, V] output projection (pass ``embedding.T`` for tied embeddings).
    targets: int [B, T] token ids in [0, V).
    temperature: logits are ``(hidden @ unembed)`` accumulated in float32, divided by this.
    chunk_size: positions per scan step; T is padded up to a multiple internally.
    compute_entropy: if False the entropy output is zeros and costs nothing.
    entropy_grad: if False, no gradient flows through the entropy (use when the entropy only
      feeds token masks and metrics, not an entropy bonus).

    Returns (logp float32 [B, T] in nats, entropy float32 [B, T] in nats). Gradients flow
    to ``hidden`` and ``unembed`` through both outputs (entropy only if ``entropy_grad``).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    batch, length, dim = hidden.shape
    chunk = min(chunk_size, length)
    num_chunks = -(-length // chunk)
    padded = num_chunks * chunk
    if padded != length:
        hidden = jnp.pad(hidden, ((0, 0), (0, padded - length), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, padded - length)))
    # [num_chunks, B, C, ...] so that scan walks over position chunks.
    hidden_chunks = hidden.reshape(batch, num_chunks, chunk, dim).swapaxes(0, 1)
    target_chunks = targets.astype(jnp.int32).reshape(batch, num_chunks, chunk).swapaxes(0, 1)

    body = jax.checkpoint(
        functools.partial(
            _chunk_logprob_entropy, temperature=temperature, compute_entropy=compute_entropy
        )
    )

    def step(carry, xs):
        h, tgt = xs
        logp, entropy = body(h, tgt, unembed)
        if not entropy_grad:
            entropy = jax.lax.stop_gradient(entropy)
        return carry, (logp, entropy)

    _, (logp, entropy) = jax.lax.scan(step, None, (hidden_chunks, target_chunks))
    logp = logp.swapaxes(0, 1).reshape(batch, padded)[:, :length]
    entropy = entropy.swapaxes(0, 1).reshape(batch, padded)[:, :length]
    return logp, entropy


def full_logits_logprobs_and_entropy(
    hidden: jax.Array, unembed: jax.Array, targets: jax.Array, *, temperature: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """Unchunked reference (materialises [B, T, V]); same contract as the chunked version.

    Meant for tests and tiny models only.
    """
    return _chunk_logprob_entropy(
        hidden, targets.astype(jnp.int32), unembed, temperature=temperature, compute_entropy=True
    )
