"""Which implementation a kernel entry point runs: the Pallas kernel or the pure-jnp reference.

One rule for the whole stack (the fused sampler and the sampling engine both use it): "auto"
picks the Pallas kernel on GPU/TPU and the jnp reference elsewhere (CPU).
"""

from __future__ import annotations

import jax

IMPLS = ("auto", "pallas", "reference")


def resolve_impl(impl: str) -> str:
    """"pallas" or "reference" for an impl name in ``IMPLS`` ("auto": Pallas on GPU/TPU, else
    reference); ValueError for any other name. Reads ``jax.default_backend()`` at call time."""
    if impl == "auto":
        return "pallas" if jax.default_backend() in ("gpu", "tpu") else "reference"
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl
