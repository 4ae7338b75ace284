#!/usr/bin/env bash
# Run the same training command on every worker of a TPU VM slice (no Pathways).
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG [--config.key=value ...]
# Needs: gcloud, the repository checked out at the same path on every worker ($REPO_DIR,
# default ~/jaxrl) with `pip install -e .[tpu]` done, and the model/data at the config's
# paths on every worker (or on a shared filesystem).
# Start-up: jaxrl calls jax.distributed.initialize() with no cluster arguments on a Cloud TPU
# VM, so jax's own detection reads the worker list and this worker's index from the metadata
# server (or TPU_WORKER_HOSTNAMES on GKE); every chip of every worker is used. Each worker
# prints "jax.distributed started: process i of N, 4 local devices, 4N in all" on stderr.
# Process 0 writes the logs and final model; every worker writes its shards of each checkpoint
# (put run.root on a shared filesystem or GCS fuse). If one worker dies, the others print which
# and exit (jaxrl/sharding/watchdog.py, once the training loop starts it; otherwise jax's
# coordination service aborts them after its heartbeat timeout, 60 s); rerun this command to
# resume from the last checkpoint.
set -euo pipefail
TPU_NAME="${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG [overrides]}"
ZONE="${2:?zone}"
CONFIG="${3:?config}"
shift 3
REPO_DIR="${REPO_DIR:-~/jaxrl}"
OVERRIDES=""
for arg in "$@"; do OVERRIDES+=" $(printf '%q' "$arg")"; done
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all \
  --command "cd $REPO_DIR && jaxrl train --config $(printf '%q' "$CONFIG")$OVERRIDES 2>&1 | tee -a train_\$(hostname).log; exit \${PIPESTATUS[0]}"
