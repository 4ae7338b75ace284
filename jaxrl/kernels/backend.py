"""Which implementation a kernel entry point runs: the Pallas kernel or the pure-jnp reference.

One rule for the whole stack (the fused sampler and the sampling engine both use it): "auto"
picks the Pallas kernel on GPU/TPU and the jnp reference elsewhere (CPU). Also: the switch
for JAX's persistent compilation cache (:func:`enable_compilation_cache`).
"""

from __future__ import annotations

import os

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


def enable_compilation_cache(path: str | os.PathLike) -> str:
    """Turn on JAX's persistent compilation cache in directory ``path`` (created if missing).

    Every compiled program is written there and a later process with the same program, jax
    version and device reuses it instead of compiling (a second ``jaxrl train`` start pays no
    compile for the programs it has seen). Caches every program, however fast it compiled.
    Returns the absolute directory. Raises ValueError naming ``path`` if it is not a usable
    directory.
    """
    directory = os.path.abspath(os.path.expanduser(os.fspath(path)))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as error:
        raise ValueError(f"compilation cache path {directory!r} is not a usable directory: {error}") from None
    if not os.access(directory, os.W_OK):
        raise ValueError(f"compilation cache path {directory!r} is not writable")
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory
