"""Symbolic equivalence of two normalised math answers, bounded in time, in a sandbox.

``symbolic_refusal`` keeps answers away from the symbolic parser when they could make it
work hard (see the docstring of ``jaxrl.rewards.math``); ``equal_in_sandbox`` compares two
answers with math-verify's LaTeX parser and comparator (never its Python-expression parser,
which calls ``eval``) in a killable child process and returns by its deadline whatever
happens there.

Process layout (built on ``jaxrl.rewards.sandbox``): the grading process spawns one
"zygote" (a fresh ``python``, not a fork of the possibly huge, multi-threaded caller). The
zygote imports sympy/math-verify once, then forks a worker that does the comparisons under
a 4 GiB address-space cap and a 10 s CPU-time ceiling per call. The zygote waits for each
answer with the per-call budget and SIGKILLs + re-forks the worker on a timeout or crash (a
fork of a warm zygote takes a few ms). The caller additionally waits with its own hard
deadline and kills the zygote if it ever fails to answer. Pipes close when a parent dies,
so both children exit then.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import re
import threading
import time
from multiprocessing.connection import Connection

from jaxrl.rewards import sandbox
from jaxrl.rewards.math_extract import GradingPolicy
from jaxrl.rewards.math_normalize import matching_braces

__all__ = [
    "SymbolicSandboxError",
    "equal_in_sandbox",
    "is_text_answer",
    "sandbox_stats",
    "symbolic_refusal",
    "warm_up",
]

# ----------------------------------------------------------------------------------------
# Symbolic pre-checks
# ----------------------------------------------------------------------------------------

_CODE_LIKE = re.compile(r"__|[\"'`;@#]|\bimport\b|\blambda\b|\\(?:input|include|def|newcommand|catcode)")
_BIG_FACTORIAL = re.compile(r"(\d+)\s*!")


def symbolic_refusal(s: str, policy: GradingPolicy) -> str | None:
    """Why the normalised answer ``s`` must not reach the symbolic parser (a short reason),
    or None if it is safe to try."""
    if len(s) > policy.max_symbolic_chars:
        return "too long"
    if not s.isascii() or not s.isprintable():
        return "non-ascii"
    if _CODE_LIKE.search(s):
        return "code-like"
    for m in _BIG_FACTORIAL.finditer(s):
        if len(m.group(1)) > 6 or int(m.group(1)) > policy.max_exponent:
            return "factorial too large"
    matches = matching_braces(s)
    for i, ch in enumerate(s):
        if ch != "^":
            continue
        if i + 1 >= len(s):
            return "dangling exponent"
        if s[i + 1] == "{":
            close_brace = matches.get(i + 1)
            if close_brace is None:
                return "unbalanced exponent"
            exponent, after = s[i + 2 : close_brace], close_brace + 1
        else:
            token = re.match(r"\\[a-zA-Z]+|.", s[i + 1 :])
            exponent, after = token.group(0), i + 1 + len(token.group(0))
        if "^" in exponent or (after < len(s) and s[after] == "^"):
            return "exponent tower"
        for number in re.findall(r"\d+(?:\.\d+)?", exponent):
            if len(number) > 6 or float(number) > policy.max_exponent:
                return "exponent too large"
    return None


def is_text_answer(s: str) -> bool:
    """Whether a normalised answer is multi-letter plain words (compared as strings only)."""
    return len(s) >= 2 and s.isalpha()


# ----------------------------------------------------------------------------------------
# Symbolic comparison in a killable worker process
# ----------------------------------------------------------------------------------------

logger = logging.getLogger(__name__)
_ZYGOTE_START_TIMEOUT_S = 120.0
_KILL_MARGIN_S = 0.1
_WORKER_MEMORY_BYTES = 4 << 30
_WORKER_CPU_SECONDS_PER_CALL = 10


class SymbolicSandboxError(RuntimeError):
    """The symbolic sandbox could not be started."""


def _parse_latex_answer(s: str) -> list:
    """math-verify LaTeX parse of one normalised answer (no Python-expression parser)."""
    from math_verify import LatexExtractionConfig, parse  # heavy: loaded by the sandbox only

    return parse(
        "\\boxed{" + s + "}",
        extraction_config=[LatexExtractionConfig(boxed_match_priority=0)],
        fallback_mode="no_fallback",
        extraction_mode="first_match",
        parsing_timeout=None,
    )


@functools.lru_cache(maxsize=4096)
def _parsed_cached(s: str) -> tuple:
    return tuple(x for x in _parse_latex_answer(s) if not isinstance(x, str))


def _symbolic_equal(gold: str, pred: str, float_rounding: int) -> bool:
    """math-verify comparison of two normalised answers (runs inside the worker)."""
    from math_verify import verify  # heavy: loaded by the sandbox only

    parsed_gold, parsed_pred = _parsed_cached(gold), _parsed_cached(pred)
    if not parsed_gold or not parsed_pred:
        return False
    return bool(
        verify(
            list(parsed_gold),
            list(parsed_pred),
            float_rounding=float_rounding,
            strict=True,
            timeout_seconds=None,
        )
    )


def _worker_main(requests: Connection, replies: Connection) -> None:
    """Forked worker: answer (gold, pred, float_rounding) requests until EOF."""
    sandbox.serve(
        requests,
        replies,
        lambda request: _symbolic_equal(*request),
        cpu_seconds_per_call=_WORKER_CPU_SECONDS_PER_CALL,
    )


def _zygote_main(requests: Connection, replies: Connection) -> None:
    """Entry point of the zygote process (see the module docstring)."""
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    _symbolic_equal("\\frac{\\sqrt{2}}{2}", "2^{-1/2}", 6)  # import + first-call cost, once
    worker = sandbox.Respawning(_worker_main, memory_bytes=_WORKER_MEMORY_BYTES)
    replies.send(("ready", os.getpid()))
    while True:
        try:
            gold, pred, float_rounding, budget_s = requests.recv()
        except (EOFError, OSError):
            break
        replies.send(worker.call((gold, pred, float_rounding), budget_s))
        worker.recover()  # after replying: off the caller's critical path
    worker.close()


def _start_zygote() -> sandbox.Child:
    """Spawn a zygote and wait until it has imported math-verify and forked its worker."""
    zygote = sandbox.spawn(__name__, "_zygote_main")
    if not zygote.replies.poll(_ZYGOTE_START_TIMEOUT_S):
        zygote.kill()
        raise SymbolicSandboxError("symbolic zygote did not become ready")
    try:
        status, _ = zygote.replies.recv()
    except EOFError:
        zygote.kill()
        raise SymbolicSandboxError("symbolic zygote exited during start-up") from None
    if status != "ready":
        zygote.kill()
        raise SymbolicSandboxError(f"unexpected zygote hello {status!r}")
    return zygote


class _SymbolicSandbox:
    """Thread-safe client of the zygote with hard per-call deadlines.

    Calls are serialised (one worker); a call that cannot get its turn before its deadline
    grades False. For parallel grading use several processes (``RewardExecutor``).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready = threading.Condition()
        self._zygote: sandbox.Child | None = None
        self._starting = False
        self._start_error: BaseException | None = None
        self.stats = {"calls": 0, "timeouts": 0, "worker_errors": 0, "zygote_restarts": 0}

    def _start(self) -> None:
        try:
            zygote, error = _start_zygote(), None
        except BaseException as start_error:  # surfaced to callers by _wait_ready
            zygote, error = None, start_error
        with self._ready:
            self._zygote, self._start_error, self._starting = zygote, error, False
            self._ready.notify_all()

    def _wait_ready(self, deadline: float) -> sandbox.Child | None:
        with self._ready:
            while self._zygote is None:
                if self._start_error is not None:
                    error, self._start_error = self._start_error, None
                    raise SymbolicSandboxError(f"cannot start symbolic sandbox: {error!r}")
                if not self._starting:
                    self._starting = True
                    threading.Thread(target=self._start, daemon=True, name="jaxrl-sandbox").start()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._ready.wait(remaining)
            return self._zygote

    def _discard(self, zygote: sandbox.Child) -> None:
        with self._ready:
            if self._zygote is zygote:
                self._zygote = None
        zygote.kill()
        self.stats["zygote_restarts"] += 1

    def warm_up(self, timeout_s: float) -> None:
        if self._wait_ready(time.monotonic() + timeout_s) is None:
            raise SymbolicSandboxError(f"symbolic sandbox not ready after {timeout_s} s")

    def equal(self, gold: str, pred: str, float_rounding: int, deadline: float) -> bool:
        """Symbolic equality; False if it cannot be decided before ``deadline``."""
        self.stats["calls"] += 1
        zygote = self._wait_ready(deadline)
        if zygote is None or not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            self.stats["timeouts"] += 1
            return False
        try:
            # The zygote gets a slightly shorter budget so that it answers before we give up.
            budget = deadline - time.monotonic() - _KILL_MARGIN_S / 2
            status, result = zygote.ask((gold, pred, float_rounding, budget), deadline - time.monotonic())
        except (EOFError, OSError, TimeoutError):
            self.stats["worker_errors"] += 1
            self._discard(zygote)
            return False
        finally:
            self._lock.release()
        if status == "timeout":
            self.stats["timeouts"] += 1
        elif status == "error":
            self.stats["worker_errors"] += 1
            logger.debug("symbolic comparison failed: %s", result)
        return status == "ok" and bool(result)

    def close(self) -> None:
        with self._ready:
            zygote, self._zygote = self._zygote, None
        if zygote is not None:
            zygote.kill()


_SANDBOX = _SymbolicSandbox()
atexit.register(_SANDBOX.close)


def warm_up(timeout_s: float = _ZYGOTE_START_TIMEOUT_S) -> None:
    """Start this process's symbolic sandbox and wait until it is ready (at most ``timeout_s``
    seconds, else SymbolicSandboxError)."""
    _SANDBOX.warm_up(timeout_s)


def sandbox_stats() -> dict[str, int]:
    """Counters of this process's symbolic sandbox (calls, timeouts, errors, restarts)."""
    return dict(_SANDBOX.stats)


def equal_in_sandbox(gold: str, pred: str, float_rounding: int, deadline: float) -> bool:
    """Symbolic equality of two normalised answers; False if it is not decided by ``deadline``
    (a ``time.monotonic()`` time in seconds) or the comparison fails."""
    return _SANDBOX.equal(gold, pred, float_rounding, deadline - _KILL_MARGIN_S)
