#!/usr/bin/env bash
# Single-host run: one process driving every local GPU (or the CPU when there is none).
#   launch/local_gpu.sh configs/qwen2_5_math_1_5b_grpo.py [--config.key=value ...]
# One GPU only (e.g. GPU 3 of a shared machine): GPUS=3 launch/local_gpu.sh CONFIG ...
# Re-running the same command resumes from the newest checkpoint of the run directory.
set -euo pipefail
CONFIG="${1:?usage: [GPUS=0,1] launch/local_gpu.sh CONFIG [--config.key=value ...]}"
shift
if [[ -n "${GPUS:-}" ]]; then export CUDA_VISIBLE_DEVICES="$GPUS"; fi
# Let XLA use most of the GPU memory up front (the KV cache and activations are large).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
exec jaxrl train --config "$CONFIG" "$@"
