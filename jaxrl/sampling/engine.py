"""The sampling engine's historical import path, kept as re-exports.

The engine lives in :mod:`jaxrl.sampling.static` (prefill once, fan out, jitted decode loop),
its config in :mod:`jaxrl.sampling.config`, and the rollout-backend interface the trainer and
evaluator use in :mod:`jaxrl.sampling.backend`.
"""

from jaxrl.sampling.config import SamplingConfig
from jaxrl.sampling.static import bucket_size, generate, generate_from_params, trace_count

__all__ = ["SamplingConfig", "bucket_size", "generate", "generate_from_params", "trace_count"]
