"""One process sandbox for reward code: child processes, pipes, per-call deadlines, kills.

A child talks to its parent over two pipes wrapped as ``Connection`` objects: ``requests``
(parent -> child) and ``replies`` (child -> parent). A child whose parent dies sees its
request pipe close and exits, so no child outlives the process that started it for long.

* ``spawn(module, function)`` starts a fresh ``python -c`` process: not a fork of the
  caller (which may hold accelerator state and threads) and not ``multiprocessing`` (which
  re-imports the caller's ``__main__``). The child imports ``module`` (this ``jaxrl`` is put
  first on its ``PYTHONPATH``) and runs ``function(requests, replies)``.
* ``fork(target, memory_bytes=...)`` forks the current process, which should be small,
  single-threaded and warm (e.g. a spawned child that has imported its heavy libraries); the
  child caps its address space, runs ``target(requests, replies)`` and ``_exit``s.
* ``serve`` is the child side of a request loop: each request is answered with
  ``("ok", result)`` or ``("error", "Type: message")``, so a failing call never ends the
  child; an optional CPU-time ceiling per request ends a child that nobody is left to kill.
* ``Child.ask`` is the parent side of one call with a time limit; ``Respawning`` keeps a
  forked child that is SIGKILLed and re-forked after any call that misses its time limit or
  crashes the child (crash isolation: the caller only ever sees a reply tuple).
* ``ElasticPool`` runs a batch of requests on forked children with a deadline per call. A
  child busy past ``stall_s`` stops counting towards the pool size, so a spare is forked for
  the requests still waiting: k hanging calls cost about one timeout, not k / size of them.
"""

from __future__ import annotations

import ctypes
import importlib
import math
import os
import resource
import signal
import subprocess
import sys
import time
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Sequence

__all__ = ["Child", "ElasticPool", "Respawning", "describe", "fork", "serve", "spawn"]

_MAX_ERROR_CHARS = 300
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ChildMain = Callable[[Connection, Connection], None]


def describe(error: BaseException) -> str:
    """``"Type: message"`` of an exception, cut to at most 300 characters."""
    return f"{type(error).__name__}: {error}"[:_MAX_ERROR_CHARS]


class Child:
    """A child process and the parent's ends of its pipes.

    Attributes: ``pid``; ``requests`` (send end) and ``replies`` (receive end);
    ``process``, the ``subprocess.Popen`` of a spawned child (None for a forked one).
    """

    def __init__(
        self, pid: int, requests: Connection, replies: Connection, process: subprocess.Popen | None = None
    ) -> None:
        self.pid = pid
        self.requests = requests
        self.replies = replies
        self.process = process

    def ask(self, request: Any, timeout_s: float) -> Any:
        """Send one request and return the child's reply, waiting at most ``timeout_s`` seconds.

        Raises TimeoutError when no reply came in time and EOFError or OSError when the child
        died; the child is then left as it is (``kill`` it).
        """
        self.requests.send(request)
        if not self.replies.poll(max(0.0, timeout_s)):
            raise TimeoutError(f"no reply within {timeout_s} s")
        return self.replies.recv()

    def kill(self) -> None:
        """SIGKILL the child if it still runs, reap it and close both pipes."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()
        else:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(self.pid, 0)
        self.requests.close()
        self.replies.close()


def spawn(module: str, function: str) -> Child:
    """Start a fresh ``python`` that runs ``module.function(requests, replies)``.

    Returns at once; the child imports ``module`` in the background, so a start-up
    handshake, if any, is the caller's protocol.
    """
    to_child_read, to_child_write = os.pipe()
    from_child_read, from_child_write = os.pipe()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
    code = (
        "import jaxrl.rewards.sandbox as s; "
        f"s._spawned_main({module!r}, {function!r}, {to_child_read}, {from_child_write})"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code],
        pass_fds=(to_child_read, from_child_write),
        stdin=subprocess.DEVNULL,
        env=env,
        close_fds=True,
    )
    os.close(to_child_read)
    os.close(from_child_write)
    return Child(
        process.pid, Connection(to_child_write, readable=False), Connection(from_child_read, writable=False), process
    )


def _spawned_main(module: str, function: str, read_fd: int, write_fd: int) -> None:
    """Entry point of a spawned child (see ``spawn``)."""
    main = getattr(importlib.import_module(module), function)
    main(Connection(read_fd, writable=False), Connection(write_fd, readable=False))


def _die_with_parent(parent: int) -> None:
    """Linux: have the kernel SIGKILL this process when its parent exits (``PR_SET_PDEATHSIG``),
    so a hung child never outlives a killed parent; elsewhere a child ends at its next read of
    the closed request pipe."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(0)


def fork(main: ChildMain, *, memory_bytes: int | None = None, close_fds: Sequence[int] = (),
         die_with_parent: bool = False) -> Child:
    """Fork this process; the child closes ``close_fds`` (the parent's other pipes, so that
    their EOFs still reach their owners), optionally dies with its parent (Linux), limits its
    address space to ``memory_bytes`` (bytes, if given), runs ``main(requests, replies)`` and
    exits with ``os._exit`` whatever happens."""
    request_read, request_write = os.pipe()
    reply_read, reply_write = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(request_write)
            os.close(reply_read)
            for fd in close_fds:
                try:
                    os.close(fd)
                except OSError:  # already closed: nothing to release
                    pass
            if die_with_parent:
                _die_with_parent(parent)
            if memory_bytes is not None:
                resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
            main(Connection(request_read, writable=False), Connection(reply_write, readable=False))
        finally:
            os._exit(0)
    os.close(request_read)
    os.close(reply_write)
    return Child(pid, Connection(request_write, readable=False), Connection(reply_read, writable=False))


def serve(
    requests: Connection,
    replies: Connection,
    handle: Callable[[Any], Any],
    *,
    cpu_seconds_per_call: int | None = None,
) -> None:
    """Child side: reply ``("ok", handle(request))`` or ``("error", describe(error))`` to each
    request until the parent closes the pipe.

    With ``cpu_seconds_per_call`` (seconds of CPU time) the process's CPU-time limit is set
    that far above its current usage before each call, so an orphaned child stuck in a call
    is ended by the kernel.
    """
    while True:
        try:
            request = requests.recv()
        except (EOFError, OSError):
            return
        if cpu_seconds_per_call is not None:
            usage = resource.getrusage(resource.RUSAGE_SELF)
            ceiling = int(usage.ru_utime + usage.ru_stime) + cpu_seconds_per_call
            resource.setrlimit(resource.RLIMIT_CPU, (ceiling, resource.RLIM_INFINITY))
        try:
            replies.send(("ok", handle(request)))
        except Exception as error:  # a failing call must not end the child
            replies.send(("error", describe(error)))


class Respawning:
    """A forked child (``fork(main, memory_bytes=...)``) that is replaced after a failed call.

    ``call`` never raises for a child that hangs or dies: it returns ``("timeout", None)`` or
    ``("error", "worker died: ...")``. ``recover`` then kills and re-forks the child; it is
    separate so that the caller can pass the reply on first (a fork takes a few ms).
    """

    def __init__(self, main: ChildMain, *, memory_bytes: int | None = None) -> None:
        self._main = main
        self._memory_bytes = memory_bytes
        self._failed = False
        self.child = fork(main, memory_bytes=memory_bytes)

    def call(self, request: Any, timeout_s: float) -> Any:
        """The child's reply to ``request`` within ``timeout_s`` seconds, else a failure tuple."""
        try:
            return self.child.ask(request, timeout_s)
        except TimeoutError:
            self._failed = True
            return ("timeout", None)
        except (EOFError, OSError) as error:  # the child died (e.g. out of memory)
            self._failed = True
            return ("error", f"worker died: {type(error).__name__}")

    def recover(self) -> None:
        """Kill and re-fork the child if the last ``call`` failed."""
        if self._failed:
            self.child.kill()
            self.child = fork(self._main, memory_bytes=self._memory_bytes)
            self._failed = False

    def close(self) -> None:
        """Kill the child."""
        self.child.kill()


class _PoolWorker:
    """One forked child of an ``ElasticPool`` and its current request."""

    def __init__(self, child: Child) -> None:
        self.child = child
        self.forked_at = time.monotonic()
        self.ready = False
        self.task: int | None = None
        self.started = self.deadline = math.inf


class ElasticPool:
    """Forked children that run batches of requests, each call with its own deadline.

    Each child runs ``warm_up()`` once, then answers requests with ``handle(request)`` (as
    ``serve``). ``size`` children are kept. A child busy for more than ``stall_s`` seconds on
    one call no longer counts towards ``size``: while requests wait, spares are forked (at most
    ``max_extra`` beyond ``size``), so hanging calls run concurrently and a batch where every
    call hangs costs about one timeout. A call past its deadline is SIGKILLed with its child;
    a child that dies is replaced. Idle spares are ended after each batch. Call it from a
    small, single-threaded process (the children are forks of it).
    """

    def __init__(self, handle: Callable[[Any], Any], warm_up: Callable[[], None], size: int, *,
                 stall_s: float, max_extra: int = 64, memory_bytes: int | None = None,
                 close_fds: Sequence[int] = (), start_timeout_s: float = 180.0) -> None:
        if size < 1:
            raise ValueError(f"ElasticPool needs size >= 1, got {size}")
        self._handle, self._warm_up = handle, warm_up
        self.size, self.stall_s, self.max_extra = size, float(stall_s), max_extra
        self._memory_bytes, self._close_fds = memory_bytes, tuple(close_fds)
        self.start_timeout_s = start_timeout_s
        self.workers: list[_PoolWorker] = []
        self.forks = 0  # children forked so far (spares and replacements included)
        self._top_up(time.monotonic(), pending=False)

    def _child_main(self, requests: Connection, replies: Connection) -> None:
        try:
            self._warm_up()
        except BaseException as error:  # reported to the pool, which raises
            replies.send(("init_error", describe(error)))
            return
        replies.send(("ready", os.getpid()))
        serve(requests, replies, self._handle)

    def _fork(self) -> None:
        others = [fd for w in self.workers for fd in (w.child.requests.fileno(), w.child.replies.fileno())]
        child = fork(self._child_main, memory_bytes=self._memory_bytes, close_fds=[*self._close_fds, *others],
                     die_with_parent=True)
        self.workers.append(_PoolWorker(child))
        self.forks += 1

    def _top_up(self, now: float, pending: bool) -> None:
        while len(self.workers) < self.size:
            self._fork()
        if not pending:
            return
        progressing = sum(1 for w in self.workers if w.task is None or now - w.started < self.stall_s)
        while progressing < self.size and len(self.workers) < self.size + self.max_extra:
            self._fork()
            progressing += 1

    def _drop(self, worker: _PoolWorker) -> None:
        worker.child.kill()
        self.workers.remove(worker)

    def wait_ready(self) -> None:
        """Block until every child has warmed up (RuntimeError naming the cause otherwise)."""
        self.run([], 1.0, until_ready=True)

    def run(self, requests: Sequence[Any], timeout_s: float, *, until_ready: bool = False) -> list[tuple[str, Any]]:
        """Replies in input order: ``("ok", result)``, ``("error", "Type: message")`` (also for a
        child that died) or ``("timeout", message)`` after ``timeout_s`` seconds of one call.
        Replacement children keep warming up in the background after it returns."""
        pending, replies = deque(range(len(requests))), [None] * len(requests)
        while pending or any(w.task is not None or (until_ready and not w.ready) for w in self.workers):
            now = time.monotonic()
            self._top_up(now, bool(pending))
            for worker in self.workers:
                if worker.ready and worker.task is None and pending:
                    worker.task = pending.popleft()
                    worker.child.requests.send(requests[worker.task])
                    worker.started, worker.deadline = now, now + timeout_s
            busy = [w for w in self.workers if w.task is not None]
            wake = [w.deadline for w in busy]
            wake += [w.forked_at + self.start_timeout_s for w in self.workers if not w.ready]
            if pending:
                wake += [w.started + self.stall_s for w in busy if now - w.started < self.stall_s]
            waiting = [w for w in self.workers if w.task is not None or not w.ready]
            ready = wait([w.child.replies for w in waiting], timeout=max(0.0, min(wake, default=now) - now))
            for worker in [w for w in waiting if w.child.replies in ready]:
                self._receive(worker, replies)
            now = time.monotonic()
            for worker in list(self.workers):
                if worker.task is not None and now > worker.deadline:
                    replies[worker.task] = ("timeout", f"RewarderTimeout: ran past {timeout_s} s")
                    self._drop(worker)
                elif not worker.ready and now - worker.forked_at > self.start_timeout_s:
                    raise RuntimeError(f"pool child not ready after {self.start_timeout_s} s")
        for worker in self.workers[self.size:]:  # idle spares
            worker.child.kill()
        del self.workers[self.size:]
        # A child dropped in the last round (a timeout) is replaced now, so its replacement
        # warms up before the next call instead of during it.
        self._top_up(time.monotonic(), False)
        return replies

    def _receive(self, worker: _PoolWorker, replies: list) -> None:
        try:
            message = worker.child.replies.recv()
        except (EOFError, OSError):
            if not worker.ready:
                raise RuntimeError("pool child exited while warming up") from None
            if worker.task is not None:
                replies[worker.task] = ("error", "WorkerDied: the worker process died (crash or memory cap)")
            self._drop(worker)
            return
        if message[0] == "ready":
            worker.ready = True
        elif message[0] == "init_error":
            raise RuntimeError(f"warm-up failed: {message[1]}")
        else:
            replies[worker.task] = message
            worker.task, worker.started, worker.deadline = None, math.inf, math.inf

    def close(self) -> None:
        """SIGKILL every child."""
        for worker in self.workers:
            worker.child.kill()
        self.workers.clear()
