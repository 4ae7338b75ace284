#!/usr/bin/env bash
# Single-host run (one or more local GPUs, or CPU).
#   launch/local_gpu.sh configs/qwen2_5_math_1_5b_grpo.py [--config.key=value ...]
# Re-running the same command resumes from the newest checkpoint of the run directory.
set -euo pipefail
CONFIG="${1:?usage: launch/local_gpu.sh CONFIG [--config.key=value ...]}"
shift
# Let XLA use most of the GPU memory up front (the KV cache and activations are large).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
exec jaxrl train --config "$CONFIG" "$@"
