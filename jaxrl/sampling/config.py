"""How to sample: :class:`SamplingConfig`, validated on construction."""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxrl.kernels.backend import IMPLS
from jaxrl.models.config import ModelConfig


LAYER_LOOPS = ("auto", "rolled", "unrolled")  # SamplingConfig.layer_loop (jaxrl.sampling.decode)


def _is_power_of_two(x: int) -> bool:
    return x >= 1 and (x & (x - 1)) == 0


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample; validated on construction.

    max_prompt_tokens: longest accepted prompt (tokens); longer prompts are an error.
    max_new_tokens: completion budget per row (tokens, the stop token included).
    temperature: >= 0; 0 means greedy (argmax). top_k: 0 = off. top_p in (0, 1]; 1 = off.
        These three are defaults for every row; ``generate`` also takes per-row arrays. They
        are traced values, so changing them does not recompile.
    stop_token_ids: a row stops after emitting any of these; None = the model's eos ids,
        () = stop only on max_new_tokens.
    pad_id: fills prompt padding and completion slots after a stop; None = the model's
        pad_token_id, or 0 when the model has none.
    impl: "auto" | "pallas" | "reference" for both the sampler and decode attention ("auto" =
        Pallas kernels on GPU/TPU, pure jnp on CPU). attention_impl / sampler_impl override
        it for one of the two (None = use ``impl``).
    min_prompt_bucket, min_new_tokens_bucket, min_batch_bucket: smallest bucket (power of two)
        for the padded prompt width, the decode budget and the number of prompts.
    compute_entropy: False skips the full-vocabulary entropy in the sampler (Rollout.entropies
        are then zeros); log-probs are always computed. Only losses/metrics that read the
        rollout entropies (the forking-token mask) need it.
    cpu_threads: the static backend on a single-process CPU run splits the rows into this many
        chunks of whole prompts and decodes them concurrently, one engine call per host thread
        (one XLA:CPU program uses about one core; 2 threads on 2 cores decode ~1.7x faster).
        Chunks draw the whole batch's noise for their rows, so the count does not change what
        is sampled (up to float rounding). 0 = auto: the available cores (at most 8) where
        threads can run, else 1; 1 = one call; > 1 is refused where threads cannot run.
    layer_loop: "auto" | "rolled" | "unrolled": the static engine's decode step as one layer
        body in a loop (compiles ~4x faster on a 28-layer model, slower at long windows on
        CPU) or one copy per layer; "auto" = rolled on the jnp path for models of >= 16
        layers and caches of <= 256 slots (:func:`jaxrl.sampling.decode.choose_layer_loop`).
        Same outputs either way.
    """

    max_prompt_tokens: int = 512
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] | None = None
    pad_id: int | None = None
    impl: str = "auto"
    attention_impl: str | None = None
    sampler_impl: str | None = None
    min_prompt_bucket: int = 16
    min_new_tokens_bucket: int = 16
    min_batch_bucket: int = 1
    compute_entropy: bool = True
    cpu_threads: int = 0
    layer_loop: str = "auto"

    def __post_init__(self):
        for name in ("max_prompt_tokens", "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"SamplingConfig.{name} must be a positive int, got {value!r}")
        if not self.temperature >= 0.0:
            raise ValueError(f"SamplingConfig.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise ValueError(f"SamplingConfig.top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.stop_token_ids is not None:
            ids = tuple(self.stop_token_ids) if not isinstance(self.stop_token_ids, (int, np.integer)) else (self.stop_token_ids,)
            if any(not isinstance(i, (int, np.integer)) or i < 0 for i in ids):
                raise ValueError(f"SamplingConfig.stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}")
            object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in ids))
        if self.pad_id is not None and (not isinstance(self.pad_id, (int, np.integer)) or self.pad_id < 0):
            raise ValueError(f"SamplingConfig.pad_id must be a non-negative int or None, got {self.pad_id!r}")
        for name in ("impl", "attention_impl", "sampler_impl"):
            value = getattr(self, name)
            if value is None and name != "impl":
                continue
            if value not in IMPLS:
                raise ValueError(f"SamplingConfig.{name}={value!r} must be one of {IMPLS}")
        if not isinstance(self.cpu_threads, (int, np.integer)) or isinstance(self.cpu_threads, bool) or self.cpu_threads < 0:
            raise ValueError(f"SamplingConfig.cpu_threads must be an int >= 0 (0 = auto), got {self.cpu_threads!r}")
        if self.layer_loop not in LAYER_LOOPS:
            raise ValueError(f"SamplingConfig.layer_loop={self.layer_loop!r} must be one of {LAYER_LOOPS}")
        if not isinstance(self.compute_entropy, (bool, np.bool_)):
            raise ValueError(f"SamplingConfig.compute_entropy must be a bool, got {self.compute_entropy!r}")
        for name in ("min_prompt_bucket", "min_new_tokens_bucket", "min_batch_bucket"):
            if not _is_power_of_two(int(getattr(self, name))):
                raise ValueError(f"SamplingConfig.{name} must be a power of two, got {getattr(self, name)}")

    def replace(self, **changes) -> "SamplingConfig":
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def resolved_stop_token_ids(self, model_cfg: ModelConfig) -> tuple[int, ...]:
        """The stop ids in force for this model, checked against its vocabulary."""
        ids = model_cfg.stop_token_ids if self.stop_token_ids is None else self.stop_token_ids
        bad = [i for i in ids if not 0 <= i < model_cfg.vocab_size]
        if bad:
            raise ValueError(
                f"SamplingConfig.stop_token_ids contains {bad}, outside the vocabulary "
                f"[0, {model_cfg.vocab_size})"
            )
        return tuple(ids)

    def resolved_pad_id(self, model_cfg: ModelConfig) -> int:
        """The pad id in force for this model, checked against its vocabulary."""
        pad = self.pad_id if self.pad_id is not None else model_cfg.pad_token_id
        pad = 0 if pad is None else int(pad)
        if not 0 <= pad < model_cfg.vocab_size:
            raise ValueError(f"SamplingConfig.pad_id={pad} is outside the vocabulary [0, {model_cfg.vocab_size})")
        return pad
