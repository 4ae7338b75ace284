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
"""

from __future__ import annotations

import importlib
import os
import resource
import signal
import subprocess
import sys
from multiprocessing.connection import Connection
from typing import Any, Callable

__all__ = ["Child", "Respawning", "describe", "fork", "serve", "spawn"]

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


def fork(main: ChildMain, *, memory_bytes: int | None = None) -> Child:
    """Fork this process; the child limits its address space to ``memory_bytes`` (bytes, if
    given), runs ``main(requests, replies)`` and exits with ``os._exit`` whatever happens."""
    request_read, request_write = os.pipe()
    reply_read, reply_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(request_write)
            os.close(reply_read)
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
