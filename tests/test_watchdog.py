"""jaxrl.sharding.watchdog: a failed process is named and the others stop (fake store + 2 real processes)."""

import io
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from jaxrl.sharding.watchdog import KEY, PEER_FAILED_EXIT, PeerFailure, Watchdog

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "watchdog_script.py")


class FakeStore:
    """The key-value part of a jax.distributed client, in memory; ``down`` makes every call fail."""

    def __init__(self):
        self.data, self.down = {}, False

    def _alive(self):
        if self.down:
            raise RuntimeError("UNAVAILABLE: failed to connect to the coordination service")

    def key_value_set(self, key, value, allow_overwrite=False):
        self._alive()
        self.data[key] = value

    def key_value_dir_get(self, prefix):
        self._alive()
        return [(k, v) for k, v in self.data.items() if k.startswith(prefix)]

    def wait_at_barrier(self, barrier_id, timeout_in_ms, process_ids=None):
        self._alive()


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _watchdog(store, clock, index=0, count=3, **kwargs):
    exits = []
    dog = Watchdog(store, index, count, timeout_s=10, interval_s=1, exit_fn=exits.append,
                   stream=io.StringIO(), clock=clock, **kwargs)
    dog.start()
    dog._stop.set()  # drive poll() by hand: no thread in the unit tests
    return dog, exits


def test_single_process_watchdog_is_a_noop():
    dog = Watchdog(None, 0, 1)
    assert not dog.active and dog.start() is dog
    dog.check(3)
    with pytest.raises(ValueError, match="boom"), dog.guard():
        raise ValueError("boom")
    assert dog.reported is None  # nobody to tell
    with pytest.raises(SystemExit):
        dog.exit(2)


def test_a_silent_peer_is_named_after_the_timeout_and_not_before():
    store, clock = FakeStore(), Clock()
    dog, _ = _watchdog(store, clock)
    for step in range(3):  # peers 1 and 2 beat; then peer 2 goes silent at t = 102
        clock.now += 1
        store.key_value_set(f"{KEY}/beat/1", f"{step}:{step}")
        store.key_value_set(f"{KEY}/beat/2", f"{step}:{step}")
        assert dog.poll() is None
    for _ in range(10):  # t = 103 .. 112: peer 2 silent for 10 s = timeout, not more
        clock.now += 1
        store.key_value_set(f"{KEY}/beat/1", f"{clock.now}:5")
        assert dog.poll() is None
    clock.now += 1  # 11 s > 10 s
    store.key_value_set(f"{KEY}/beat/1", f"{clock.now}:5")
    assert dog.poll() == ("process 2 of 3 sent no heartbeat for 11 s (last at step 2): "
                          "killed, crashed or hung")
    # this process's own heartbeat carries the step recorded by check()
    dog.check(7)
    dog.poll()
    assert store.data[f"{KEY}/beat/0"].endswith(":7")


def test_a_finished_peer_is_not_watched_and_a_reported_failure_is_named_at_once():
    store, clock = FakeStore(), Clock()
    dog, _ = _watchdog(store, clock)
    store.key_value_set(f"{KEY}/done/2", "1")
    clock.now += 50
    store.key_value_set(f"{KEY}/beat/1", "9:4")
    assert dog.poll() is None  # peer 2 finished; peer 1 beat
    store.key_value_set(f"{KEY}/failed/1", "RuntimeError: boom at step 4")
    assert dog.poll() == "process 1 of 3 failed: RuntimeError: boom at step 4"


def test_an_unreachable_store_names_the_coordinator():
    store, clock = FakeStore(), Clock()
    dog, _ = _watchdog(store, clock, index=1, count=2)
    store.down = True
    clock.now += 10
    assert dog.poll() is None  # not longer than the timeout
    clock.now += 1
    line = dog.poll()
    assert line.startswith("process 0 of 2 (the coordinator) has not answered for 11 s: UNAVAILABLE")


def test_guard_reports_its_own_failure_or_names_the_peer_that_failed_first():
    store, clock = FakeStore(), Clock()
    dog, _ = _watchdog(store, clock, index=1, count=2)
    with pytest.raises(ZeroDivisionError), dog.guard():
        raise ZeroDivisionError("division by zero\nsecond line")
    assert store.data[f"{KEY}/failed/1"] == "ZeroDivisionError: division by zero"
    assert dog.reported == "ZeroDivisionError: division by zero"

    other, _ = _watchdog(store, clock, index=0, count=2)  # process 0 sees process 1's report
    with pytest.raises(PeerFailure, match="process 1 of 2 failed: ZeroDivisionError"), other.guard():
        raise ValueError("Gloo AllGather failed: Connection reset by peer")
    assert f"{KEY}/failed/0" not in store.data  # the broken collective is not reported as a failure
    assert store.data[f"{KEY}/stopped/0"].startswith("process 1 of 2 failed")
    with pytest.raises(PeerFailure):
        other.check()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(run_dir, mode, steps):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    port = _free_port()
    return [subprocess.Popen([sys.executable, SCRIPT, str(port), str(i), mode, str(run_dir), str(steps)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(2)]


def _finish(procs, timeout):
    try:
        return [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.mark.slow
def test_killed_process_is_named_within_60_s_and_a_restart_resumes(tmp_path):
    procs = _start(tmp_path, "run", 8)
    lines = []
    try:
        for line in procs[1].stdout:  # wait until process 1 has saved step 3, then kill it
            lines.append(line)
            if "process 1 step 3 saved" in line:
                break
        os.kill(procs[1].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        out0 = procs[0].communicate(timeout=90)[0]
        waited = time.monotonic() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert "process 1 step 3 saved" in "".join(lines), "".join(lines)[-3000:]
    assert procs[0].returncode == PEER_FAILED_EXIT, out0[-3000:]
    assert waited < 60, waited
    named = [line for line in out0.splitlines() if line.startswith("jaxrl: process 1 of 2")]
    assert named and "stopping process 0" in named[0], out0[-3000:]

    # the newest complete checkpoint is intact: a fresh pair resumes from it and ends where an
    # uninterrupted run ends (every element 1 + 1 + 2 + ... + 8 = 37)
    outputs = _finish(_start(tmp_path, "run", 8), timeout=240)
    for i, text in enumerate(outputs):
        resumed = re.search(rf"process {i} resumed from step (\d+)", text)
        assert resumed and int(resumed.group(1)) >= 3, text[-3000:]
        final = re.search(rf"process {i} final (.*)", text)
        assert final and set(sum(eval(final.group(1)), [])) == {37.0}, text[-3000:]


@pytest.mark.slow
def test_a_process_that_raises_stops_the_other_with_its_message(tmp_path):
    started = time.monotonic()
    procs = _start(tmp_path, "raise", 6)
    out0, out1 = _finish(procs, timeout=120)
    assert time.monotonic() - started < 90
    assert procs[1].returncode == 1, out1[-3000:]  # the failed process exits non-zero
    assert "process 1 error: RuntimeError: boom at step 2" in out1
    assert procs[0].returncode == PEER_FAILED_EXIT, out0[-3000:]
    assert "jaxrl: process 1 of 2 failed: RuntimeError: boom at step 2; stopping process 0" in out0
