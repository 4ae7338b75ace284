"""The process sandbox: spawned and forked children, per-call deadlines, crash isolation."""

import os

from jaxrl.rewards import sandbox


def _handle(request):
    kind, value = request
    if kind == "echo":
        return value
    if kind == "raise":
        raise ValueError(value)
    if kind == "hang":
        while True:
            pass
    if kind == "die":
        os._exit(3)
    if kind == "allocate":
        return len(bytearray(value))
    return os.getpid()


def _serve(requests, replies):
    sandbox.serve(requests, replies, _handle)


def test_spawned_child_serves_until_closed():
    child = sandbox.spawn(__name__, "_serve")
    try:
        assert child.ask(("echo", [1, "x"]), 60.0) == ("ok", [1, "x"])
        assert child.ask(("raise", "bad input"), 5.0) == ("error", "ValueError: bad input")
        assert child.ask(("pid", None), 5.0) == ("ok", child.pid) and child.pid != os.getpid()
    finally:
        child.kill()
    assert child.process.poll() is not None


def test_respawning_child_survives_hangs_and_crashes():
    worker = sandbox.Respawning(_serve, memory_bytes=1 << 30)
    try:
        first = worker.child.pid
        assert worker.call(("echo", 1), 5.0) == ("ok", 1)
        worker.recover()  # nothing failed: same child
        assert worker.child.pid == first
        assert worker.call(("hang", None), 0.2) == ("timeout", None)
        worker.recover()
        assert worker.child.pid != first
        assert worker.call(("die", None), 5.0) == ("error", "worker died: EOFError")
        worker.recover()
        assert worker.call(("allocate", 2 << 30), 5.0)[0] == "error"  # over the 1 GiB cap
        assert worker.call(("echo", 2), 5.0) == ("ok", 2)
    finally:
        worker.close()
