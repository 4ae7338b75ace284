"""Rewarder protocol, weighted combination, and a time-bounded process-pool executor.

A rewarder is a plain, module-level function ``(prompt, completion, example) -> float``;
``example`` is the dataset row (a mapping: gold answer and any extra fields). It may carry a
``warm_up`` attribute, a no-argument callable that every executor worker (and the inline
executor) calls once before scoring, e.g. to start the math grader's symbolic sandbox.

``RewardExecutor`` scores a batch with several weighted rewarders. Every (rewarder, sample)
call is bounded by ``timeout_s``; a call that raises, hangs or returns a non-finite value
gets ``failure_reward`` as its component value and is counted in the metrics together with
the first error message; the run continues. Results are in input order whatever the
completion order of the workers.

Process layout (worker mode, ``num_workers > 0``, the default for runs): the trainer spawns
one dispatcher, a fresh ``python`` started by ``jaxrl.rewards.sandbox.spawn`` (not a fork of
the trainer, which holds accelerator state and threads; not ``multiprocessing``, which
re-imports the caller's ``__main__``). The dispatcher unpickles the rewarders (so they must be
importable module-level functions, or ``functools.partial`` of one, not defined in
``__main__``) and forks ``num_workers`` workers from itself (a few ms each); each worker runs
the warm-ups, and workers are reused across batches. A batch travels to the dispatcher in one
message and comes back in one. A call that hangs is SIGKILLed with its worker at its deadline;
a worker busy for more than ``stall_seconds(timeout_s)`` no longer counts towards the pool
size, so a spare is forked for the calls still waiting (at most ``MAX_SPARE_WORKERS``): a
batch in which every call hangs costs about one timeout, not one per row. A worker that
crashes (segfault, ``os._exit``, memory cap) costs only its current call. The dispatcher and
its workers ignore SIGINT/SIGTERM (the trainer finishes its step) and die with the trainer.

A rewarder must return a real number (bool/int/float, NumPy scalars included); anything
else, and a call to ``sys.exit``, is a counted failure. The first error of each rewarder is
reported once (``say``, stderr by default), and a warning line for every batch in which more
than half the calls failed. Each worker's address space is capped (``memory_bytes``, default
``DEFAULT_WORKER_MEMORY_BYTES``), so a runaway rewarder fails with ``MemoryError``.

With ``num_workers=0`` (the debugging mode: no crash isolation from native crashes) the
rewarders run inline in the calling thread. There, the timeout is
enforced with ``SIGALRM`` when called from the main thread (it interrupts Python code, not a
single long call inside a C extension); off the main thread it cannot be enforced, which the
metric ``reward/timeouts_enforced`` (0.0) reports.
"""

from __future__ import annotations

import functools
import math
import os
import pickle
import signal
import sys
import threading
import time
import weakref
from multiprocessing.connection import Connection
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from jaxrl.rewards import sandbox
from jaxrl.rewards.sandbox import describe

Rewarder = Callable[[str, str, Mapping[str, Any]], float]  # (prompt, completion, example) -> reward

__all__ = ["Rewarder", "weighted_sum", "call_rewarder", "RewardExecutor", "RewarderTimeout"]

_WORKER_START_TIMEOUT_S = 180.0
# Spare workers forked beyond ``num_workers`` for calls stalled past ``stall_seconds``: with
# every call hanging, a batch costs about ceil(calls / (num_workers + this)) timeouts.
MAX_SPARE_WORKERS = 64


# Address-space cap of a reward worker (bytes): a runaway rewarder fails with MemoryError
# instead of taking the machine's memory.
DEFAULT_WORKER_MEMORY_BYTES = 8 * 2**30


def _to_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class RewarderTimeout(Exception):
    """A rewarder call ran past its time limit."""


def weighted_sum(components: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """Total reward float32 [N]: sum over names of ``weights[name] * components[name]``.

    ``components`` maps each name to an array [N] (one value per sample); ``weights`` has the
    same names. Summed in float64, returned as float32.
    """
    if set(components) != set(weights):
        raise ValueError(f"components {sorted(components)} != weights {sorted(weights)}")
    arrays = [np.asarray(components[name], np.float64) * float(weights[name]) for name in sorted(components)]
    if not arrays:
        raise ValueError("weighted_sum needs at least one component")
    return np.sum(arrays, axis=0).astype(np.float32)


# What a rewarder may return: a real number (Python or NumPy bool/int/float), nothing else.
REAL_TYPES = (bool, int, float, np.bool_, np.integer, np.floating)


def call_rewarder(fn: Rewarder, prompt: str, completion: str, example: Mapping[str, Any]) -> float:
    """``fn(prompt, completion, example)`` as a float.

    TypeError unless it returned a real number (bool/int/float, NumPy scalars included; a
    string such as ``"1.0"`` is refused); ValueError if it is not finite; RuntimeError if
    the rewarder called ``sys.exit`` (so it is a counted failure, never the end of the run).
    """
    try:
        value = fn(prompt, completion, example)
    except SystemExit as error:
        raise RuntimeError(f"rewarder called sys.exit({error.code!r})") from None
    if not isinstance(value, REAL_TYPES):
        raise TypeError(f"reward must be a real number (bool/int/float), got {type(value).__name__} {value!r:.40}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"non-finite reward {value!r}")
    return value


def _run_warm_ups(rewarders: Mapping[str, Rewarder]) -> None:
    hooks = {id(h): h for h in (getattr(fn, "warm_up", None) for fn in rewarders.values()) if h}
    for hook in hooks.values():
        hook()


def _handle(rewarders: Mapping[str, Rewarder], task: tuple[str, str, str, Mapping[str, Any]]) -> float:
    name, prompt, completion, example = task
    return call_rewarder(rewarders[name], prompt, completion, example)


def _dispatcher_main(requests: Connection, replies: Connection) -> None:
    """Entry point of the reward dispatcher (a spawned process): init message (sys.path,
    pickled rewarders, pool size, memory cap in bytes or None, timeout in s), then one batch of
    tasks per request, answered with ``("done", [(status, value), ...])`` in task order."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's: it finishes the step
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the dispatcher ends when its pipe closes
    parent_sys_path, payload, num_workers, memory_bytes, timeout_s = requests.recv()
    sys.path[:0] = [p for p in parent_sys_path if p not in sys.path]
    try:
        rewarders = pickle.loads(payload)
        pool = sandbox.ElasticPool(
            functools.partial(_handle, rewarders), functools.partial(_run_warm_ups, rewarders), num_workers,
            stall_s=stall_seconds(timeout_s), max_extra=MAX_SPARE_WORKERS, memory_bytes=memory_bytes,
            close_fds=(requests.fileno(), replies.fileno()), start_timeout_s=_WORKER_START_TIMEOUT_S)
        pool.wait_ready()
    except BaseException as error:  # reported to the trainer, which raises
        replies.send(("init_error", describe(error)))
        return
    replies.send(("ready", os.getpid()))
    while True:
        try:
            tasks = requests.recv()
        except (EOFError, OSError):
            break
        try:
            replies.send(("done", pool.run(tasks, timeout_s), pool.forks))
        except Exception as error:  # e.g. a replacement worker whose warm-up failed
            replies.send(("error", describe(error), pool.forks))
    pool.close()


def stall_seconds(timeout_s: float) -> float:
    """Seconds after which a busy reward worker counts as stalled and a spare takes its place:
    a tenth of the per-call timeout, at most 1 s."""
    return min(0.1 * timeout_s, 1.0)


class _Dispatcher:
    """Trainer side of the spawned dispatcher process that owns the forked reward workers."""

    def __init__(self, payload: bytes, num_workers: int, memory_bytes: int | None, timeout_s: float) -> None:
        self.child = sandbox.spawn(__name__, "_dispatcher_main")
        self.child.requests.send(([p for p in sys.path if p], payload, num_workers, memory_bytes, timeout_s))
        self.ready = False
        self.forks = 0

    def _wait_ready(self) -> None:
        if not self.child.replies.poll(_WORKER_START_TIMEOUT_S):
            raise RuntimeError(f"reward workers not ready after {_WORKER_START_TIMEOUT_S} s")
        try:
            message = self.child.replies.recv()
        except (EOFError, OSError):
            raise RuntimeError("reward dispatcher exited during start-up") from None
        if message[0] == "init_error":
            raise RuntimeError(f"reward worker failed to initialise: {message[1]}")
        self.ready = True

    def run(self, tasks: list[tuple[str, str, str, Mapping[str, Any]]]) -> list[tuple[str, Any]]:
        """(status, value) per task, in order (see ``sandbox.ElasticPool.run``)."""
        if not self.ready:
            self._wait_ready()
        self.child.requests.send(tasks)
        try:
            message = self.child.replies.recv()
        except (EOFError, OSError):
            raise RuntimeError("reward dispatcher process died") from None
        self.forks = message[2]
        if message[0] != "done":
            raise RuntimeError(f"reward workers failed: {message[1]}")
        return message[1]


def _shutdown(dispatchers: list[_Dispatcher]) -> None:
    for dispatcher in dispatchers:
        dispatcher.child.kill()  # its workers die with it (PR_SET_PDEATHSIG, or at EOF)
    dispatchers.clear()


class _AlarmTimeout:
    """Context manager raising RewarderTimeout after ``seconds`` (main thread only)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __enter__(self) -> None:
        def on_alarm(signum, frame):
            raise RewarderTimeout(f"rewarder ran past {self.seconds} s")

        self.previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self.previous)


class RewardExecutor:
    """Scores batches with weighted rewarders in a process pool with per-call timeouts.

    Args:
      rewarders: name -> (rewarder, weight).
      num_workers: worker processes (more are forked while calls stall); 0 runs inline in the
        calling thread (debugging; see the module doc).
      timeout_s: limit for one rewarder call on one sample.
      failure_reward: component value given to a call that fails, hangs or is non-finite.
      memory_bytes: address-space cap of each worker process (bytes; None = no cap).
      say: where one-line reports go (default: stderr): the first error of each rewarder,
        once per executor, and a warning for a batch where more than half the calls failed.
    """

    def __init__(
        self,
        rewarders: Mapping[str, tuple[Rewarder, float]],
        num_workers: int = 0,
        timeout_s: float = 5.0,
        failure_reward: float = 0.0,
        memory_bytes: int | None = DEFAULT_WORKER_MEMORY_BYTES,
        say: Callable[[str], None] | None = None,
    ) -> None:
        if not rewarders:
            raise ValueError("RewardExecutor needs at least one rewarder")
        if num_workers < 0 or timeout_s <= 0 or not math.isfinite(failure_reward):
            raise ValueError(
                f"need num_workers >= 0, timeout_s > 0, finite failure_reward; got "
                f"{num_workers}, {timeout_s}, {failure_reward}"
            )
        self.names = list(rewarders)
        self.functions = {name: fn for name, (fn, _) in rewarders.items()}
        self.weights = {name: float(weight) for name, (_, weight) in rewarders.items()}
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.failure_reward = float(failure_reward)
        self._dispatchers: list[_Dispatcher] = []  # at most one; a list so the finalizer sees a swap
        self._lock = threading.Lock()
        self._warmed_inline = False
        self.memory_bytes = memory_bytes
        self._say = say or _to_stderr
        self._reported: set[str] = set()
        if num_workers > 0:
            self._payload = self._pickle_rewarders()
            self._dispatchers.append(self._start_dispatcher())
        self._finalizer = weakref.finalize(self, _shutdown, self._dispatchers)

    def _start_dispatcher(self) -> _Dispatcher:
        return _Dispatcher(self._payload, self.num_workers, self.memory_bytes, self.timeout_s)

    @property
    def worker_forks(self) -> int:
        """Reward worker processes forked so far (initial pool, spares for stalled calls and
        replacements of killed ones); 0 inline."""
        return self._dispatchers[0].forks if self._dispatchers else 0

    def _pickle_rewarders(self) -> bytes:
        for name, fn in self.functions.items():
            target = getattr(fn, "func", fn)  # functools.partial
            if getattr(target, "__module__", None) == "__main__":
                raise ValueError(f"rewarder {name!r} is defined in __main__; workers cannot import it")
            try:
                pickle.dumps(fn)
            except Exception as error:
                raise TypeError(f"rewarder {name!r} is not picklable: {describe(error)}") from error
        return pickle.dumps(self.functions)

    def close(self) -> None:
        """Stop (SIGKILL) the worker processes; idempotent."""
        self._finalizer()

    def __enter__(self) -> "RewardExecutor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def score(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        examples: Sequence[Mapping[str, Any]],
    ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, float | str]]:
        """Score a batch.

        Returns (total float32 [N], components name -> float32 [N], metrics). Metrics are
        floats under ``reward/...`` plus ``reward/<name>/first_error`` (a str, present only
        when that rewarder failed at least once in this batch).
        """
        if not len(prompts) == len(completions) == len(examples):
            raise ValueError(f"lengths differ: {len(prompts)}, {len(completions)}, {len(examples)}")
        started = time.monotonic()
        tasks = [(name, i) for name in self.names for i in range(len(prompts))]
        with self._lock:
            if self.num_workers == 0:
                outcomes, enforced = self._score_inline(tasks, prompts, completions, examples)
            else:
                batch = [(name, prompts[i], completions[i], examples[i]) for name, i in tasks]
                try:
                    outcomes, enforced = dict(zip(tasks, self._dispatchers[0].run(batch))), True
                except BaseException:
                    # An interrupted dispatcher would answer this batch in the next: replace it.
                    _shutdown(self._dispatchers)
                    self._dispatchers.append(self._start_dispatcher())
                    raise
        components = {name: np.empty(len(prompts), np.float32) for name in self.names}
        metrics: dict[str, float | str] = {}
        for name in self.names:
            failures = timeouts = 0
            for i in range(len(prompts)):
                status, value = outcomes[(name, i)]
                if status == "ok":
                    components[name][i] = value
                    continue
                components[name][i] = self.failure_reward
                failures += 1
                timeouts += status == "timeout"
                metrics.setdefault(f"reward/{name}/first_error", value)
            metrics[f"reward/{name}/mean"] = float(components[name].mean()) if len(prompts) else 0.0
            metrics[f"reward/{name}/failures"] = float(failures)
            metrics[f"reward/{name}/timeouts"] = float(timeouts)
        total = weighted_sum(components, self.weights)
        metrics["reward/mean"] = float(total.mean()) if len(prompts) else 0.0
        metrics["reward/score_seconds"] = time.monotonic() - started
        metrics["reward/timeouts_enforced"] = 1.0 if enforced else 0.0
        self._report(metrics, len(prompts))
        return total, components, metrics

    def _report(self, metrics: Mapping[str, Any], rows: int) -> None:
        """First error of each rewarder (once), and a warning when > half the calls failed."""
        failed = 0
        for name in self.names:
            failures = int(metrics[f"reward/{name}/failures"])
            failed += failures
            if failures and name not in self._reported:
                self._reported.add(name)
                self._say(f"rewarder {name!r}: {failures}/{rows} calls failed in this batch; first error: "
                          f"{metrics[f'reward/{name}/first_error']}")
        calls = rows * len(self.names)
        if calls and failed * 2 > calls:
            self._say(f"warning: {failed}/{calls} reward calls failed in this batch (each scored "
                      f"rewards.failure_reward={self.failure_reward})")

    def _score_inline(self, tasks, prompts, completions, examples):
        if not self._warmed_inline:
            _run_warm_ups(self.functions)
            self._warmed_inline = True
        enforced = threading.current_thread() is threading.main_thread()
        outcomes = {}
        for name, i in tasks:
            try:
                if enforced:
                    with _AlarmTimeout(self.timeout_s):
                        value = call_rewarder(self.functions[name], prompts[i], completions[i], examples[i])
                else:
                    value = call_rewarder(self.functions[name], prompts[i], completions[i], examples[i])
                outcomes[(name, i)] = ("ok", value)
            except RewarderTimeout as error:
                outcomes[(name, i)] = ("timeout", describe(error))
            except Exception as error:
                outcomes[(name, i)] = ("error", describe(error))
        return outcomes, enforced
