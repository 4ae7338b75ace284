"""Checkpoints of a run: orbax ``CheckpointManager`` with the train state and a JSON sidecar.

Each checkpoint ``RUN_DIR/checkpoints/<step>/`` holds two items:

* ``state``: the ``TrainState`` pytree (params, optimizer state, step, RNG key, skipped
  update count), saved with ``StandardSave`` (sharded arrays are written per shard).
* ``meta``: JSON with the data-iterator state, the loop's counters, the resolved config and
  ``healthy`` (False when written while the policy looked collapsed, see ``train.health``).
* ``sampler`` (only with ``rl.rollout_staleness=1``): the params the next step samples
  with (the previous step's); ``meta["sampler_params"]`` is then True.

Saves are asynchronous by default: ``save`` returns after the device→host copy, so the
next step may donate the state's buffers; the write finishes in the background. orbax
commits a step atomically (a partially written step is never listed), so a process killed
mid-write resumes from the previous complete checkpoint.

Rotation is done here, not by orbax: a checkpoint is *verified* (orbax's commit, then a
read-back of its metadata) before any older one is deleted, the newest ``keep`` verified
checkpoints are kept, and the newest healthy one is always kept too, so a run that goes bad
can never rotate its last good checkpoint away. On resume, a checkpoint that does not
restore is moved to ``RUN_DIR/checkpoints_corrupt/<step>`` with a one-line message and the
previous one is tried.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from jaxrl.train.step import TrainState

CORRUPT_DIR = "checkpoints_corrupt"
UNHEALTHY_DIR = "checkpoints_unhealthy"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or verified (the message names step and cause)."""


# tensorstore (orbax's writer) reports an OS error deep inside a long message: "... [os_error_code='28']".
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def _cause(error: BaseException) -> str:
    """The innermost cause of ``error`` as ``Type: message`` on one line (at most 300 characters
    of the message), led by the OS error's text when tensorstore names one (e.g. ``No space left
    on device``), so that disk full is said first and never cut off."""
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    text = " ".join(str(error).split())
    code = _OS_ERROR_CODE.search(text)
    lead = f"{os.strerror(int(code.group(1)))}: " if code else ""
    return f"{lead}{type(error).__name__}: {text[:300]}" if text else type(error).__name__


class Checkpointer:
    """Saves/restores ``(TrainState, meta dict)`` under ``directory``, keeping the last ``keep``
    verified checkpoints plus the newest healthy one."""

    def __init__(self, directory: str, *, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.keep = keep
        self.async_save = async_save
        options = ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=async_save, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta", "sampler"))
        self._pending: int | None = None  # started, not yet verified
        self._healthy: dict[int, bool] = {}

    def latest_step(self) -> int | None:
        """The newest fully written checkpoint step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every fully written checkpoint step, ascending."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: TrainState, meta: dict[str, Any], *, healthy: bool = True,
             sampler_params=None) -> None:
        """Start saving ``state`` + ``meta`` (JSON-serialisable) + optional ``sampler_params``
        (a params pytree) as checkpoint ``step``.

        The previous save is finished and verified first (CheckpointError if it failed); a
        synchronous checkpointer also verifies this one before returning.
        """
        self.finish()
        items = {"state": ocp.args.StandardSave(state),
                 "meta": ocp.args.JsonSave({**meta, "healthy": bool(healthy),
                                            "sampler_params": sampler_params is not None})}
        if sampler_params is not None:
            items["sampler"] = ocp.args.StandardSave(sampler_params)
        args = ocp.args.Composite(**items)
        try:
            self._manager.save(step, args=args, force=True)
        except Exception as error:
            raise CheckpointError(f"checkpoint step {step} could not be written to {self.directory}: "
                                  f"{_cause(error)}") from error
        self._pending = step
        self._healthy[step] = bool(healthy)
        if not self.async_save:
            self.finish()

    def finish(self) -> None:
        """Wait for the started save, verify it, then delete what rotation allows."""
        step, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
        except Exception as error:
            raise CheckpointError(f"checkpoint step {step} could not be written to {self.directory}: "
                                  f"{_cause(error)}") from error
        if step is None:
            return
        self.verify(step)
        self._prune()

    def verify(self, step: int) -> None:
        """CheckpointError unless checkpoint ``step`` is committed and its metadata reads back."""
        self._manager.reload()
        path = os.path.join(self.directory, str(step))
        if step not in self._manager.all_steps() or not os.path.isfile(os.path.join(path, "state", "_METADATA")):
            raise CheckpointError(f"checkpoint step {step} in {self.directory} was not committed")
        try:
            meta = self.restore_meta(step)
        except Exception as error:
            raise CheckpointError(f"checkpoint step {step}: metadata does not read back: {_cause(error)}") from error
        if "data_state" not in meta:
            raise CheckpointError(f"checkpoint step {step}: metadata lacks data_state")

    def _is_healthy(self, step: int) -> bool:
        if step not in self._healthy:
            try:
                self._healthy[step] = bool(self.restore_meta(step).get("healthy", True))
            except Exception:  # unreadable metadata: not a checkpoint worth keeping
                self._healthy[step] = False
        return self._healthy[step]

    def mark_unhealthy(self, step: int) -> None:
        """Treat checkpoint ``step`` (if any) as unhealthy for rotation (its policy collapsed)."""
        self._healthy[step] = False

    def newest_healthy(self) -> int | None:
        """The newest written checkpoint not marked unhealthy, or None."""
        healthy = [s for s in self.all_steps() if self._is_healthy(s)]
        return healthy[-1] if healthy else None

    def quarantine_unhealthy(self) -> int | None:
        """Finish pending saves, move every checkpoint newer than the newest healthy one to
        ``RUN_DIR/checkpoints_unhealthy/`` (so a resume starts from the healthy one) and return
        the newest healthy step (None when there is none)."""
        self.finish()
        keep = self.newest_healthy()
        for step in self.all_steps():
            if keep is None or step > keep:
                self._move_aside(step, UNHEALTHY_DIR)
        return keep

    def _prune(self) -> None:
        steps = self.all_steps()
        keep = set(steps[-self.keep:])
        healthy = [s for s in steps if self._is_healthy(s)]
        if healthy:
            keep.add(healthy[-1])
        for step in steps:
            if step not in keep:
                self._manager.delete(step)
                self._healthy.pop(step, None)

    def restore(self, step: int, template: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """Checkpoint ``step`` restored into the shapes, dtypes and shardings of ``template``."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        restored = self._manager.restore(step, args=args)
        return restored["state"], dict(restored["meta"])

    def restore_sampler_params(self, step: int, template):
        """The ``sampler`` item of checkpoint ``step`` in the shapes, dtypes and shardings of
        ``template`` (a params pytree); CheckpointError when it does not restore."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(sampler=ocp.args.StandardRestore(abstract)))
        except Exception as error:
            raise CheckpointError(f"checkpoint step {step}: sampler params do not restore: {_cause(error)}") from error
        return restored["sampler"]

    def restore_latest(self, template: TrainState, say: Callable[[str], None]
                       ) -> tuple[int, TrainState, dict[str, Any]] | None:
        """The newest checkpoint that restores, as (step, state, meta); None when none exists.

        A checkpoint that fails to restore is moved to ``RUN_DIR/checkpoints_corrupt/<step>``
        and reported through ``say`` (one line); the previous one is tried next.
        Raises CheckpointError when checkpoints exist but none restores.
        """
        steps = self.all_steps()
        for step in reversed(steps):
            try:
                state, meta = self.restore(step, template)
                if "data_state" not in meta:
                    raise KeyError("meta has no data_state")
                return step, state, meta
            except Exception as error:
                moved = self._move_aside(step, CORRUPT_DIR)
                say(f"checkpoint step {step} is unreadable ({_cause(error)}); moved to {moved}, "
                    "trying the previous one")
        if steps:
            raise CheckpointError(f"no checkpoint in {self.directory} restores (tried steps {steps})")
        return None

    def _move_aside(self, step: int, folder: str) -> str:
        target = os.path.join(os.path.dirname(self.directory), folder, f"{step}-{int(time.time())}")
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), target)
        self._manager.reload()
        self._healthy.pop(step, None)
        return target

    def restore_meta(self, step: int) -> dict[str, Any]:
        """Only the JSON sidecar of checkpoint ``step``."""
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def wait(self) -> None:
        """Block until every started save is on disk and verified."""
        self.finish()

    def close(self) -> None:
        """Finish (and verify) pending saves and release the manager."""
        try:
            self.finish()
        finally:
            self._manager.close()
