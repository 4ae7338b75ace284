"""One of two ``jax.distributed`` CPU processes (4 devices each) under ``jaxrl.sharding.watchdog``.

Usage: watchdog_script.py PORT PROCESS_ID MODE RUN_DIR [NUM_STEPS]

Each step adds ``step`` to a [8, 4] float32 array sharded over the 8 devices of both
processes, then saves it with ``jaxrl.train.checkpoint.Checkpointer`` (orbax, synchronous).
A run resumes from the newest checkpoint in RUN_DIR, so after NUM_STEPS steps every element is
1 + 2 + ... + NUM_STEPS whatever the restarts. MODE ``run``: plain; ``raise``: process 1 raises
RuntimeError at step 2. Each process prints "process I step S saved" after each checkpoint.
"""

from __future__ import annotations

import os
import sys
import time

import jax

# Cross-process collectives on CPU go through gloo (the default in jax 0.10).
jax.config.update("jax_cpu_collectives_implementation", "gloo")
# the module under test starts jax.distributed, which must happen before any device is used
from jaxrl.sharding.mesh import maybe_initialize_distributed  # noqa: E402

PORT, PID, MODE, RUN_DIR = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
NUM_STEPS = int(sys.argv[5]) if len(sys.argv) > 5 else 6
assert maybe_initialize_distributed({"coordinator_address": f"localhost:{PORT}", "num_processes": 2,
                                     "process_id": PID, "heartbeat_timeout_s": 20})

import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from jaxrl.sharding.mesh import make_mesh, replicated  # noqa: E402
from jaxrl.sharding.watchdog import PEER_FAILED_EXIT, PeerFailure, start_watchdog  # noqa: E402
from jaxrl.train.checkpoint import Checkpointer  # noqa: E402


def main() -> int:
    mesh = make_mesh(8, 1, 1)
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    state = {"x": jax.make_array_from_callback((8, 4), sharding, lambda i: np.ones((8, 4), np.float32)[i])}
    add = jax.jit(lambda s, v: {"x": s["x"] + v}, out_shardings={"x": sharding})
    checkpointer = Checkpointer(os.path.join(RUN_DIR, "checkpoints"), keep=2, async_save=False)
    step = 0
    latest = checkpointer.latest_step()
    if latest is not None:
        state, meta = checkpointer.restore(latest, state)
        step = int(meta["step"])
        print(f"process {PID} resumed from step {step}", flush=True)
    watchdog = start_watchdog(timeout_s=10, interval_s=0.5)
    try:
        with watchdog.guard():
            while step < NUM_STEPS:
                step += 1
                watchdog.check(step)
                if MODE == "raise" and PID == 1 and step == 2:
                    raise RuntimeError(f"boom at step {step}")
                state = add(state, np.float32(step))
                checkpointer.save(step, state, {"step": step, "data_state": {}})  # the loop's meta always has data_state
                print(f"process {PID} step {step} saved", flush=True)
                time.sleep(0.3)
            full = jax.jit(lambda s: s, out_shardings=replicated(mesh))(state["x"])
            print(f"process {PID} final {np.asarray(full.addressable_data(0)).tolist()}", flush=True)
    except PeerFailure:
        watchdog.exit(PEER_FAILED_EXIT)
    except Exception as err:
        print(f"process {PID} error: {type(err).__name__}: {str(err)[:200]}", flush=True)
        watchdog.exit(1)
    checkpointer.close()
    watchdog.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
