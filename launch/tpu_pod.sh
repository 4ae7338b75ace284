#!/usr/bin/env bash
# Run the same training command on every worker of a TPU VM slice.
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG [--config.key=value ...]
# Needs: gcloud, the repository checked out at the same path on every worker ($REPO_DIR,
# default ~/jaxrl) with `pip install -e .[tpu]` done, and the model/data at the config's
# paths on every worker (or on a shared filesystem). jax.distributed initialises itself
# from the TPU environment; process 0 writes the logs and final model, and every worker
# writes its shards of each checkpoint (put run.root on a shared filesystem or GCS fuse).
set -euo pipefail
TPU_NAME="${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG [overrides]}"
ZONE="${2:?zone}"
CONFIG="${3:?config}"
shift 3
REPO_DIR="${REPO_DIR:-~/jaxrl}"
OVERRIDES=""
for arg in "$@"; do OVERRIDES+=" $(printf '%q' "$arg")"; done
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all \
  --command "cd $REPO_DIR && jaxrl train --config $(printf '%q' "$CONFIG")$OVERRIDES 2>&1 | tee -a train_\$(hostname).log"
