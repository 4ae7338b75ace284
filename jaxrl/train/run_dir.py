"""The run directory's life cycle around the loop: starting fresh or resuming, and stopping on signals.

``checkpoint.resume='off'`` moves an old run aside (nothing is deleted); a resume under a
changed config is refused unless the changed keys are allowed (and then recorded); a start-up
that fails removes the run directory it created; SIGTERM/SIGINT become a flag the loop checks
between steps.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from typing import Sequence

import jax
import ml_collections

from jaxrl.config import ConfigError, config_changes


def note(text: str) -> None:
    """A start-up line for the user (process 0, stderr), before the logger exists."""
    if jax.process_index() == 0:
        print(text, file=sys.stderr, flush=True)


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag checked between steps (restores handlers on exit)."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def has_checkpoints(run_dir: str) -> bool:
    """True when RUN_DIR/checkpoints holds at least one step directory."""
    directory = os.path.join(run_dir, "checkpoints")
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def move_old_run_aside(run_dir: str) -> None:
    """checkpoint.resume='off': a previous run in ``run_dir`` is renamed to ``<run_dir>.old-<time>``
    so that it can never be resumed by accident (nothing is deleted)."""
    if not os.path.isdir(run_dir) or not os.listdir(run_dir) or jax.process_index() != 0:
        return
    aside = f"{run_dir}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    suffix = 0
    while os.path.exists(aside + (f"-{suffix}" if suffix else "")):
        suffix += 1
    aside += f"-{suffix}" if suffix else ""
    os.rename(run_dir, aside)
    note(f"checkpoint.resume='off': moved the previous run to {aside}")


def check_resume_config(cfg: ml_collections.ConfigDict, run_dir: str, allow: Sequence[str]) -> None:
    """Refuse to resume ``run_dir`` under a config that changes the experiment, unless every
    changed key is in ``allow``; allowed changes are appended to RUN_DIR/config_history.jsonl."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as handle:
            stored = json.load(handle)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path}: stored config unreadable ({error}); resume refused (use --no-resume)") from None
    changes = config_changes(stored, cfg)
    refused = [key for key in changes if key not in allow]
    if refused:
        detail = "; ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in refused)
        raise ConfigError(f"resuming {run_dir} with a changed config ({detail}); pass --allow-config-change "
                          f"{','.join(refused)} to accept, or start a new run.name / --no-resume")
    if changes and jax.process_index() == 0:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "changes": {k: {"old": old, "new": new} for k, (old, new) in changes.items()}}
        with open(os.path.join(run_dir, "config_history.jsonl"), "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        note(f"resuming with config changes: {', '.join(changes)} (recorded in config_history.jsonl)")


def remove_new_run_dir(run_dir: str, existed: bool) -> None:
    """A start-up that failed leaves no run directory behind that it created itself."""
    if not existed and jax.process_index() == 0:
        shutil.rmtree(run_dir, ignore_errors=True)
