"""Multi-process failure detection: when one process dies or raises, the others stop with one line.

Without it, a process that dies leaves the others blocked in a collective: NCCL waits for
ever, and jax's coordination service only aborts them after its heartbeat timeout, with a
message that names no process. The watchdog works through the ``jax.distributed`` key-value
store (held by process 0's coordination service):

* every process writes ``jaxrl/watchdog/beat/<i>`` = "<count>:<step>" every ``interval_s``
  from a daemon thread (so a long compile or collective in the main thread does not stop it);
* a process that raises inside ``guard()`` writes ``jaxrl/watchdog/failed/<i>`` = one line;
* each thread reads both directories every ``interval_s``. A failure report, a peer whose
  count has not changed for ``timeout_s`` (killed, crashed or hung), or a store that cannot
  be reached for ``timeout_s`` (process 0, which holds it, is gone) makes it print one line
  naming the failed process and end its own process with ``PEER_FAILED_EXIT`` at once
  (``os._exit``: atexit handlers would wait for the dead peer at jax's shutdown barrier).

Checkpoints are not touched: orbax commits a step atomically, so the last complete
checkpoint stays valid and a restart resumes from it.

Use (``train/loop.py`` / ``cli.py``)::

    watchdog = start_watchdog(timeout_s=30)       # every process, after jax.distributed
    try:
        with watchdog.guard():                    # an exception is reported to the others
            while ...:
                watchdog.check(step)              # raises PeerFailure if one was seen
                ...
    except PeerFailure:
        watchdog.exit(PEER_FAILED_EXIT)           # skips jax's shutdown barrier
    except Exception:
        ...print one line...
        watchdog.exit(1)                          # waits until the peers have stopped
    watchdog.stop()                               # finished: peers stop watching this one
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Any, Callable, Iterator, TextIO

import jax
from jax._src import distributed as jax_distributed  # the coordination-service client; no public accessor

KEY = "jaxrl/watchdog"
PEER_FAILED_EXIT = 4  # exit status of a process stopped because another one failed


class PeerFailure(RuntimeError):
    """Another process of the run failed; the message names it."""


def _distributed_client() -> Any | None:
    return getattr(jax_distributed.global_state, "client", None)


class Watchdog:
    """Heartbeats and failure reports of one process; see the module docstring.

    client: the ``jax.distributed`` client, or None (single process: every method is a no-op).
    timeout_s: seconds without a heartbeat after which a peer counts as dead (also how long
    the key-value store may be unreachable). interval_s: seconds between heartbeats/reads.
    exit_fn: called with ``PEER_FAILED_EXIT`` after the line is printed (tests replace it).
    """

    def __init__(self, client: Any | None, process_index: int, process_count: int, *,
                 timeout_s: float = 30.0, interval_s: float = 2.0,
                 exit_fn: Callable[[int], Any] = os._exit, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if timeout_s <= interval_s:
            raise ValueError(f"watchdog timeout_s ({timeout_s}) must exceed interval_s ({interval_s})")
        self.client = client if process_count > 1 else None
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.timeout_s, self.interval_s = float(timeout_s), float(interval_s)
        self.failure: str | None = None  # a peer's failure, once seen
        self.reported: str | None = None  # this process's own failure, once reported
        self.step = -1
        self._exit_fn, self._stream, self._clock = exit_fn, stream, clock
        self._beats = 0
        self._seen: dict[int, tuple[str | None, float]] = {}
        self._last_contact = clock()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def active(self) -> bool:
        """Whether there are other processes to watch."""
        return self.client is not None

    def start(self, startup_timeout_s: float = 300.0) -> "Watchdog":
        """Write the first heartbeat, wait until every process has, then start the thread."""
        if not self.active:
            return self
        self._beat()
        self.client.wait_at_barrier(f"{KEY}/start", int(startup_timeout_s * 1000))
        now = self._clock()
        self._last_contact = now
        self._seen = {p: (None, now) for p in range(self.process_count) if p != self.process_index}
        self._thread = threading.Thread(target=self._run, name="jaxrl-watchdog", daemon=True)
        self._thread.start()
        return self

    def check(self, step: int | None = None) -> None:
        """Record the current step (sent with the heartbeats); raise PeerFailure if one was seen."""
        if step is not None:
            self.step = int(step)
        if self.failure is not None:
            raise PeerFailure(self.failure)

    def report_failure(self, message: str) -> None:
        """Tell the other processes that this one failed (first line of ``message``)."""
        if not self.active:
            return
        line = (message.strip().splitlines() or ["(no message)"])[0][:500]
        self.reported = line
        try:
            self.client.key_value_set(f"{KEY}/failed/{self.process_index}", line, allow_overwrite=True)
        except Exception as err:  # the original error matters more; say why the report failed
            self._print(f"could not report this process's failure to the others: {err}")

    @contextlib.contextmanager
    def guard(self) -> Iterator["Watchdog"]:
        """Run a block; an exception in it is reported to the other processes, then re-raised.

        If a peer had already reported a failure (this exception is then most likely a
        collective broken by it), PeerFailure naming that peer is raised instead.
        """
        try:
            yield self
        except PeerFailure:
            raise
        except BaseException as err:
            if isinstance(err, SystemExit) and err.code in (0, None):
                raise
            peer = None
            if self.active:
                with contextlib.suppress(Exception):  # an unreachable store: report as usual
                    peer = self._peer_report()
            if peer is not None:
                self._fail(peer)
                raise PeerFailure(peer) from err
            self.report_failure(f"{type(err).__name__}: {err}")
            raise

    def stop(self, done: bool = True) -> None:
        """Stop the thread; with ``done`` the peers stop watching this process (it finished)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval_s + 5)
        if done and self.active:
            with contextlib.suppress(Exception):  # finishing never fails because a peer is gone
                self.client.key_value_set(f"{KEY}/done/{self.process_index}", "1", allow_overwrite=True)

    def exit(self, code: int) -> None:
        """End the process with ``code`` (``sys.exit`` when there was no multi-process failure).

        After a failure it skips atexit (jax's shutdown barrier would wait its heartbeat timeout
        for the stopped peers). After this process's own reported failure it first waits, up to
        ``timeout_s + 2 * interval_s``, until every peer has stopped or finished; if a peer is
        found dead meanwhile (the error was a collective broken by it), the watchdog thread
        names it and ends the process with ``PEER_FAILED_EXIT`` instead.
        """
        if self.failure is None and self.reported is None:
            raise SystemExit(code)
        deadline = self._clock() + self.timeout_s + 2 * self.interval_s
        while self.failure is None and self.reported is not None and self._clock() < deadline:
            with contextlib.suppress(Exception):  # an unreachable store: the thread will say so
                finished = self._finished()
                if all(p in finished for p in range(self.process_count) if p != self.process_index):
                    break
            time.sleep(self.interval_s / 2)
        if self.reported is not None:
            with contextlib.suppress(Exception):  # lets process 0 (the store) exit after this one
                self.client.key_value_set(f"{KEY}/exiting/{self.process_index}", "1", allow_overwrite=True)
        sys.stdout.flush()
        sys.stderr.flush()
        self._exit_fn(code)

    # ------------------------------------------------------------------ internals
    def _beat(self) -> None:
        self._beats += 1
        self.client.key_value_set(f"{KEY}/beat/{self.process_index}", f"{self._beats}:{self.step}",
                                  allow_overwrite=True)

    def _finished(self) -> dict[int, str]:
        done = _by_process(self.client.key_value_dir_get(f"{KEY}/done/"))
        done.update(_by_process(self.client.key_value_dir_get(f"{KEY}/stopped/")))
        return done

    def _peer_report(self, finished: dict[int, str] | None = None) -> str | None:
        finished = self._finished() if finished is None else finished
        reports = _by_process(self.client.key_value_dir_get(f"{KEY}/failed/"))
        for process, message in sorted(reports.items()):
            if process != self.process_index and process not in finished:
                return f"process {process} of {self.process_count} failed: {message}"
        return None

    def poll(self) -> str | None:
        """One round: heartbeat, then read reports and heartbeats; the failure line or None."""
        now = self._clock()
        try:
            self._beat()
            finished = self._finished()
            report = self._peer_report(finished)
            beats = _by_process(self.client.key_value_dir_get(f"{KEY}/beat/"))
        except Exception as err:
            if now - self._last_contact > self.timeout_s:
                first = (str(err).splitlines() or [repr(err)])[0]
                return (f"process 0 of {self.process_count} (the coordinator) has not answered for "
                        f"{now - self._last_contact:.0f} s: {first}")
            return None
        self._last_contact = now
        if report is not None:
            return report
        for process, (previous, since) in sorted(self._seen.items()):
            value = beats.get(process)
            if process in finished:
                continue
            if value != previous:
                self._seen[process] = (value, now)
            elif now - since > self.timeout_s:
                last_step = value.split(":", 1)[1] if value else "none"
                return (f"process {process} of {self.process_count} sent no heartbeat for "
                        f"{now - since:.0f} s (last at step {last_step}): killed, crashed or hung")
        return None

    def _fail(self, line: str) -> None:
        """Record a peer's failure (once): print the line, tell the others this process stops."""
        with self._lock:
            if self.failure is not None:
                return
            self.failure = line
        self._print(f"{line}; stopping process {self.process_index}")
        with contextlib.suppress(Exception):  # so the failed process does not wait for this one
            self.client.key_value_set(f"{KEY}/stopped/{self.process_index}", line, allow_overwrite=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            line = self.poll()
            if line is not None and not self._stop.is_set():
                self._fail(line)
                if self.process_index == 0:
                    self._await_reporters()
                sys.stdout.flush()
                self._exit_fn(PEER_FAILED_EXIT)
                return

    def _await_reporters(self) -> None:
        """Process 0 holds the store: give processes that reported a failure up to
        ``2 * interval_s + 1`` s to exit first (jax aborts a process whose store vanishes)."""
        deadline = self._clock() + 2 * self.interval_s + 1
        with contextlib.suppress(Exception):
            while self._clock() < deadline:
                reporters = _by_process(self.client.key_value_dir_get(f"{KEY}/failed/"))
                exiting = _by_process(self.client.key_value_dir_get(f"{KEY}/exiting/"))
                if all(p in exiting for p in reporters if p != self.process_index):
                    return
                time.sleep(self.interval_s / 4)

    def _print(self, text: str) -> None:
        print(f"jaxrl: {text}", file=self._stream or sys.stderr, flush=True)


def _by_process(entries: Any) -> dict[int, str]:
    """``key_value_dir_get`` rows ``(".../<i>", value)`` -> {i: value}."""
    out = {}
    for key, value in entries:
        tail = str(key).rstrip("/").rsplit("/", 1)[-1]
        if tail.isdigit():
            out[int(tail)] = value
    return out


def start_watchdog(timeout_s: float = 30.0, interval_s: float = 2.0,
                   startup_timeout_s: float = 300.0, **kwargs: Any) -> Watchdog:
    """A started ``Watchdog`` for this process (inactive when ``jax.distributed`` is not running).

    Call it on every process at the same point (it waits at a barrier for all of them, up to
    ``startup_timeout_s``). A peer failure ends this process within about
    ``timeout_s + interval_s`` seconds of the failure (a reported one within ``interval_s``).
    """
    client = _distributed_client()
    watchdog = Watchdog(client, jax.process_index() if client else 0,
                        jax.process_count() if client else 1,
                        timeout_s=timeout_s, interval_s=interval_s, **kwargs)
    return watchdog.start(startup_timeout_s)
