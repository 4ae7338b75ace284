"""Rollout backends: the one interface the trainer and the evaluator sample through.

A backend turns host prompts into a :class:`~jaxrl.types.Rollout` on device. Backends are
built by name (:func:`make_backend`) from factories registered with :func:`register_backend`.

"static" (:class:`StaticBackend`) runs the engine of :mod:`jaxrl.sampling.static` on the
parameters it is handed at each call, in chunks of at most ``max_rows_per_call`` rows:

* chunk = N prompts if ``max_rows_per_call <= 0``, else ``max(1, min(N, cap // n))``;
* the chunk starting at prompt ``first`` passes ``first_prompt=first`` to the engine: its
  rows draw the noise of rows ``first * n + r`` of the whole batch under the call's ``key``,
  so a rollout depends only on (params, prompts, n, key) and not on the chunking, up to float
  rounding of the batch-size-dependent matmuls (which can flip a token only at a near-tie);
* a short tail chunk is padded to the full chunk with copies of its first prompt (static
  shapes: no recompile) and the padding rows are dropped;
* with a mesh, each chunk's prompts are placed on it with the batch rule (rows over
  (data, fsdp), replicated where they do not divide);
* on a single-process CPU run the chunks run on ``cpu_threads`` host threads at once (one
  XLA:CPU program uses about one core); "auto" (0) is the cores this process may use, at most
  ``MAX_AUTO_CPU_THREADS``, and 1 wherever threads do not apply.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl.kernels.backend import resolve_impl
from jaxrl.models.config import ModelConfig
from jaxrl.sampling.config import SamplingConfig
from jaxrl.sampling.static import generate_from_params
from jaxrl.sharding.rules import named_sharding
from jaxrl.sharding.transfer import put_on_mesh
from jaxrl.types import Rollout


class RolloutBackend(Protocol):
    """What the trainer and evaluator need from a sampler.

    pad_id: the id filling prompt padding and completion slots after a stop.
    stop_token_ids: a row stops after emitting any of these.
    """

    pad_id: int
    stop_token_ids: tuple[int, ...]

    def generate(self, params, prompt_tokens: np.ndarray, prompt_lengths: np.ndarray, n: int,
                 key: jax.Array, *, temperature: float | None = None,
                 top_p: float | None = None) -> Rollout:
        """``n`` completions per prompt. prompt_tokens: int32 [N, P] left-padded host array,
        prompt_lengths: int32 [N]; temperature / top_p: None = the SamplingConfig's. Returns
        N * n rows grouped by prompt in prompt order, group_ids in 0..N-1 (device arrays)."""
        ...

    def update_params(self, params) -> None:
        """Hand the backend new policy parameters (a no-op for backends given params per call)."""
        ...

    def wait(self, rollout: Rollout) -> Rollout:
        """Block until ``rollout`` (from this backend's ``generate``, which may return before
        the device is done) is computed and run the backend's own checks; returns it."""
        ...


BackendFactory = Callable[..., RolloutBackend]
_BACKENDS: dict[str, BackendFactory] = {}


def register_backend(name: str) -> Callable[[BackendFactory], BackendFactory]:
    """Decorator registering a factory ``(model_cfg, sampling_cfg, mesh, *, max_rows_per_call)
    -> RolloutBackend`` under ``name``; ValueError when the name is taken."""

    def register(factory: BackendFactory) -> BackendFactory:
        if name in _BACKENDS:
            raise ValueError(f"rollout backend {name!r} is already registered")
        _BACKENDS[name] = factory
        return factory

    return register


def make_backend(name: str, model_cfg: ModelConfig, sampling_cfg: SamplingConfig,
                 mesh: jax.sharding.Mesh | None, *, max_rows_per_call: int = 0) -> RolloutBackend:
    """The rollout backend registered as ``name``. mesh: where prompts go (None = no
    placement); max_rows_per_call: rows (prompts x n) decoded at once, <= 0 = no cap."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown rollout backend {name!r}; registered: {sorted(_BACKENDS)}")
    return _BACKENDS[name](model_cfg, sampling_cfg, mesh, max_rows_per_call=max_rows_per_call)


def prompts_per_call(num_prompts: int, n: int, max_rows_per_call: int) -> int:
    """Prompts decoded per engine call: all of them when ``max_rows_per_call <= 0``, else as
    many as fit the cap (at least one)."""
    if max_rows_per_call <= 0:
        return num_prompts
    return max(1, min(num_prompts, max_rows_per_call // n))


MAX_AUTO_CPU_THREADS = 8  # "auto" threads cap: measured on 2 cores only; chunks shrink with k


def _cpu_threads_unsupported(sampling_cfg: SamplingConfig, mesh: jax.sharding.Mesh | None) -> str | None:
    """Why concurrent engine calls cannot run here, or None. They are for one process on the
    CPU with the jnp kernels only: other processes would dispatch their collectives in another
    order, and Pallas interpret-mode callbacks can deadlock with concurrent work."""
    if jax.default_backend() != "cpu" or jax.process_count() > 1 or (mesh is not None and mesh.size > 1):
        return (f"needs a single-process CPU run on one device (backend {jax.default_backend()!r}, "
                f"{jax.process_count()} processes, mesh of {1 if mesh is None else mesh.size} devices)")
    impls = {resolve_impl(sampling_cfg.sampler_impl or sampling_cfg.impl),
             resolve_impl(sampling_cfg.attention_impl or sampling_cfg.impl)}
    if impls != {"reference"}:
        return "needs the jnp kernels (impl 'auto' or 'reference'), not the Pallas interpreter"
    return None


def available_cpu_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve_cpu_threads(sampling_cfg: SamplingConfig, mesh: jax.sharding.Mesh | None) -> int:
    """Host threads the static backend decodes on: ``sampling_cfg.cpu_threads`` when >= 1
    (ValueError where more than 1 cannot run); for 0 ("auto") the available cores, at most
    ``MAX_AUTO_CPU_THREADS``, where threads can run, else 1."""
    requested = int(sampling_cfg.cpu_threads)
    reason = _cpu_threads_unsupported(sampling_cfg, mesh) if requested != 1 else None
    if requested == 0:
        return 1 if reason else min(available_cpu_cores(), MAX_AUTO_CPU_THREADS)
    if reason and requested > 1:
        raise ValueError(f"sampling.cpu_threads={requested} {reason}; set it to 1 or 0 (auto)")
    return requested


@functools.partial(jax.jit, static_argnames="rows")
def _join_chunks(parts: list[Rollout], rows: int) -> Rollout:
    """The chunks' rollouts end to end, cut to the first ``rows`` rows (drops the tail chunk's
    padding): one program for every field."""
    return jax.tree.map(lambda *xs: jnp.concatenate(xs)[:rows], *parts)


@register_backend("static")
class StaticBackend:
    """The jitted engine of :mod:`jaxrl.sampling.static`, called chunk by chunk (see the
    module docstring); parameters are passed to every ``generate`` call."""

    def __init__(self, model_cfg: ModelConfig, sampling_cfg: SamplingConfig,
                 mesh: jax.sharding.Mesh | None, *, max_rows_per_call: int = 0):
        self.model_cfg = model_cfg
        self.sampling_cfg = sampling_cfg
        self.mesh = mesh
        self.max_rows_per_call = int(max_rows_per_call)
        self.pad_id = sampling_cfg.resolved_pad_id(model_cfg)
        self.stop_token_ids = sampling_cfg.resolved_stop_token_ids(model_cfg)
        self.threads = resolve_cpu_threads(sampling_cfg, mesh)

    def update_params(self, params) -> None:
        """No-op: this backend is handed the parameters at each ``generate``."""

    def wait(self, rollout: Rollout) -> Rollout:
        """Block until ``rollout`` is computed (this backend has no checks of its own)."""
        return jax.block_until_ready(rollout)

    def _place(self, array: np.ndarray, logical: tuple[str | None, ...]):
        """A host prompt array laid out on the mesh by ``logical`` (as is without a mesh)."""
        if self.mesh is None:
            return array
        return put_on_mesh(array, named_sharding(logical, self.mesh, array.shape))

    def generate(self, params, prompt_tokens: np.ndarray, prompt_lengths: np.ndarray, n: int,
                 key: jax.Array, *, temperature: float | None = None,
                 top_p: float | None = None) -> Rollout:
        """See :class:`RolloutBackend`; rows have the engine's layout (prompt_tokens [N * n, P_b],
        tokens / logprobs / entropies [N * n, max_new_tokens])."""
        prompt_tokens = np.asarray(prompt_tokens, np.int32)
        prompt_lengths = np.asarray(prompt_lengths, np.int32)
        if prompt_tokens.ndim != 2 or prompt_lengths.shape != prompt_tokens.shape[:1]:
            raise ValueError(f"prompt_tokens must be [N, P] and prompt_lengths [N], got shapes "
                             f"{prompt_tokens.shape} and {prompt_lengths.shape}")
        num_prompts = prompt_tokens.shape[0]
        chunk = prompts_per_call(num_prompts, n, self.max_rows_per_call)
        if self.threads > 1:
            chunk = min(chunk, -(-num_prompts // self.threads))
        starts = range(0, num_prompts, chunk)

        def run(first: int) -> Rollout:
            tokens_in, lengths_in = prompt_tokens[first:first + chunk], prompt_lengths[first:first + chunk]
            real = tokens_in.shape[0]
            if real < chunk:  # static shape: no recompile on the tail
                tokens_in = np.concatenate([tokens_in, np.repeat(tokens_in[:1], chunk - real, axis=0)])
                lengths_in = np.concatenate([lengths_in, np.repeat(lengths_in[:1], chunk - real)])
            return generate_from_params(
                params, self.model_cfg, self._place(tokens_in, ("batch", None)),
                self._place(lengths_in, ("batch",)), n, self.sampling_cfg, key,
                temperature=temperature, top_p=top_p, first_prompt=first,
            )

        if self.threads > 1 and len(starts) > 1:
            # XLA:CPU runs a program on about one core: concurrent calls use more of them.
            with concurrent.futures.ThreadPoolExecutor(max_workers=self.threads) as pool:
                parts = list(pool.map(lambda first: jax.block_until_ready(run(first)), starts))
        else:
            parts = [run(first) for first in starts]
        if len(parts) == 1:
            return parts[0]
        return _join_chunks(parts, num_prompts * n)
