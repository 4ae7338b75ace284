"""Checkpoints of a run: orbax ``CheckpointManager`` with the train state and a JSON sidecar.

Each checkpoint ``RUN_DIR/checkpoints/<step>/`` holds two items:

* ``state``: the ``TrainState`` pytree (params, optimizer state, step, RNG key, skipped
  update count), saved with ``StandardSave`` (sharded arrays are written per shard).
* ``meta``: JSON with the data-iterator state, the loop's counters and the resolved config.

Saves are asynchronous by default: ``save`` returns after the device→host copy, so the
next step may donate the state's buffers; the write finishes in the background. orbax
commits a step atomically (a partially written step is never listed), so a process killed
mid-write resumes from the previous complete checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxrl.train.step import TrainState


class Checkpointer:
    """Saves/restores ``(TrainState, meta dict)`` under ``directory``, keeping the last ``keep``."""

    def __init__(self, directory: str, *, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        """The newest fully written checkpoint step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every fully written checkpoint step, ascending."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: TrainState, meta: dict[str, Any]) -> None:
        """Start saving ``state`` + ``meta`` (JSON-serialisable) as checkpoint ``step``."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._manager.save(step, args=args, force=True)

    def restore(self, step: int, template: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """Checkpoint ``step`` restored into the shapes, dtypes and shardings of ``template``."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        restored = self._manager.restore(step, args=args)
        return restored["state"], dict(restored["meta"])

    def restore_meta(self, step: int) -> dict[str, Any]:
        """Only the JSON sidecar of checkpoint ``step``."""
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def wait(self) -> None:
        """Block until every started save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self._manager.wait_until_finished()
        self._manager.close()
