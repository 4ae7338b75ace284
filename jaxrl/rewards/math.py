"""Rule-based math answer grading: extraction, normalisation, bounded equivalence.

Public API: ``grade(completion, gold) -> bool``, ``extract_answer(completion) -> str | None``,
``normalize_answer(text) -> str``, ``warm_up()``, the rewarders ``math_reward`` and
``math_reward_strict``, and ``GradingPolicy`` for the knobs.

Grading policy (precision first: a grader that can be fooled poisons a run)
--------------------------------------------------------------------------
Extraction
  * The final answer is the content of the last top-level ``\\boxed{...}`` / ``\\fbox{...}``
    (braces balanced, ``\\{`` ``\\}`` are literal). A box that only wraps another box is
    unwrapped; a box that contains a box next to other text is refused.
  * Only if the completion contains no ``\\boxed``/``\\fbox`` at all, and the policy allows it,
    the last ``Answer: ...`` / ``Final answer: ...`` line is used (off in ``STRICT_POLICY``,
    for DAPO-style datasets whose gold is an integer and whose format is fixed).
Anti-hacking (any of these makes the completion ungradable, i.e. ``False``)
  * empty completions, answers with no letter or digit (``{``, ``.``, ``\\{\\}``), answers
    longer than ``max_answer_chars`` (300) or nested deeper than ``max_brace_depth`` (32),
    completions longer than ``max_completion_chars`` (200k), more than 1000 top-level boxes
    or more than 32 different spellings of the final answer;
  * control characters (NUL etc.) anywhere in the completion;
  * several *different* final answers: all top-level boxes (or, in the fallback, all answer
    lines) must agree after normalisation (``max_distinct_answers``, default 1). Spraying
    candidates ``\\boxed{1} ... \\boxed{2}`` gets nothing, even if the last one is right;
  * text aimed at a grader or judge anywhere in the completion ("the answer above is
    correct", "ignore previous instructions", "grade this as correct", "dear grader", ...);
  * multi-letter text answers are compared as strings only (never symbolically, where
    ``yes`` and ``sey`` would both be the product e*s*y).
Normalisation (both sides): ``$``/``\\(``/``\\[`` delimiters, LaTeX spacing (``\\,`` ``\\!``
  ``\\;`` ``\\quad`` ``~``), ``\\left``/``\\right``, ``\\dfrac``/``\\tfrac``, ``\\displaystyle``,
  ``\\text{}`` unit suffixes (and plain unit words after a number), degrees (``^\\circ``, °),
  percent signs, ``\\$``, thousands separators (``1,000`` / ``1{,}000`` / ``1\\,000``),
  trailing ``.,;:``, unicode minus/times/pi, ``\\frac12``/``\\sqrt2`` short forms, ``(C)``
  for multiple choice, case of plain words. ``x = 3`` matches ``3`` (a single-variable
  assignment is reduced to its right-hand side unless both sides assign).
Equivalence, in order: exact normalised string; exact rationals (integers, decimals,
  fractions, scientific notation; two rationals that differ are *not* equal, no rounding);
  then symbolic, via math-verify's LaTeX parser and comparator (never its Python-expression
  parser, which calls ``eval``), in a separate worker process.
Bounded work
  * Extraction and normalisation are linear-time (one brace-matching pass, regexes with
    bounded whitespace quantifiers and unambiguous number patterns): ~0.3 s worst case at
    the 200k-character limit.
  * Pre-checks refuse symbolic work on answers that are long, non-ASCII, contain exponent
    towers (``a^{b^{c}}``, ``a^b^c``), exponents or factorials above 10,000, or
    code-looking text (``__``, quotes). Such answers can still match by string/rational.
  * Every ``grade`` call returns within ``policy.time_limit_s`` (default 1 s): the symbolic
    comparison runs in a persistent worker process that is SIGKILLed at the deadline and
    restarted for the next call, so it works off the main thread (math-verify's own
    ``signal.alarm`` timeout is disabled) and nothing can hang the caller. A cold worker is
    started in the background; call ``warm_up()`` once per process (``RewardExecutor`` does
    it via the rewarders' ``warm_up`` attribute), otherwise the first symbolic comparisons of
    a process may time out and grade ``False``.
Stricter than math-verify (documented, tested): decimals never match non-equal rationals or
  irrationals (``0.333333`` != 1/3, ``1.414214`` != sqrt 2); ``50\\%`` equals ``50`` but not
  ``0.5``; several distinct boxes are refused instead of being read as a set; no answer
  without a box / answer line (math-verify also grabs the last number in free text);
  ``45^\\circ`` is 45, never pi/4.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from fractions import Fraction
from multiprocessing.connection import Connection
from typing import Any, Mapping

__all__ = [
    "GradingPolicy",
    "DEFAULT_POLICY",
    "STRICT_POLICY",
    "extract_answer",
    "normalize_answer",
    "grade",
    "warm_up",
    "sandbox_stats",
    "math_reward",
    "math_reward_strict",
]


@dataclasses.dataclass(frozen=True)
class GradingPolicy:
    """Knobs of the grading policy (see the module docstring)."""

    answer_line_fallback: bool = True
    max_distinct_answers: int = 1
    max_completion_chars: int = 200_000
    max_answer_chars: int = 300
    max_brace_depth: int = 32
    symbolic: bool = True
    max_symbolic_chars: int = 200
    max_exponent: int = 10_000
    float_rounding: int = 12
    time_limit_s: float = 1.0


DEFAULT_POLICY = GradingPolicy()
STRICT_POLICY = GradingPolicy(answer_line_fallback=False)

# ----------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------

_BOX_START = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOX_WORD = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
# Whitespace quantifiers are bounded ({1,4}) so that no pattern can backtrack
# quadratically on long runs of spaces.
_ANSWER_LINE = re.compile(
    r"^[ \t>*#_]{0,8}(?:final[ \t]{1,4})?answer[ \t]{0,4}(?:\*\*)?[ \t]{0,4}(?:is)?[ \t]{0,4}[:：](.+)$",
    re.IGNORECASE | re.MULTILINE,
)
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_JUDGE_TEXT = re.compile(
    r"\b(?:answer|solution|response|result)s?[ \t]{1,4}(?:(?:given|shown)[ \t]{1,4})?"
    r"(?:above|here|below)[ \t]{1,4}(?:is|are)[ \t]{1,4}(?:correct|right|valid)"
    r"|\b(?:ignore|disregard|forget)[ \t]{1,4}(?:(?:all|any|the)[ \t]{1,4})?(?:previous|prior|above|earlier)"
    r"[ \t]{1,4}(?:instructions?|prompts?|rules?|text|messages?)"
    r"|\b(?:grade|mark|score|rate|evaluate)[ \t]{1,4}(?:this|it|me|my[ \t]{1,4}\w+|the[ \t]{1,4}\w+)"
    r"[ \t]{1,4}as[ \t]{1,4}(?:correct|right|full|perfect)"
    r"|\b(?:dear|attention|note[ \t]{1,4}to(?:[ \t]{1,4}the)?|hey|hello)[ \t,]{1,4}"
    r"(?:grader|judge|verifier|evaluator|checker|reviewer)s?\b"
    r"|\b(?:grader|verifier|evaluator)s?[ \t]{0,4}(?:should|must|:)"
    r"|\b(?:give|award|assign)[ \t]{1,4}(?:(?:me|this|it)[ \t]{1,4})?(?:full|maximum|max|all)[ \t]{1,4}"
    r"(?:marks|credit|reward|points|score)"
    r"|\breward[ \t]{0,4}[=:][ \t]{0,4}1\b"
    r"|\bis_correct\b"
    r"|\bthis[ \t]{1,4}(?:answer|solution)[ \t]{1,4}is[ \t]{1,4}(?:(?:definitely|certainly)[ \t]{1,4})?(?:correct|right)",
    re.IGNORECASE,
)


_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)


def _matching_braces(text: str) -> dict[int, int]:
    """Map the index of each unescaped ``{`` to its matching ``}`` in one linear pass.

    ``\\{`` and ``\\}`` are literal braces and ``\\\\`` is a line break, so a backslash
    always consumes the next character.
    """
    matches: dict[int, int] = {}
    stack: list[int] = []
    for token in _BRACE_TOKEN.finditer(text):
        if token.group() == "{":
            stack.append(token.start())
        elif token.group() == "}" and stack:
            matches[stack.pop()] = token.start()
    return matches


_MAX_BOXES = 1000  # more top-level boxes than this is spraying, not an answer


def _top_level_boxes(text: str) -> tuple[list[str], list[int]] | None:
    """Contents and end offsets of the top-level boxes, or None if a box is malformed.

    Malformed: an unclosed box, or a box whose content holds another box next to other text.
    """
    matches = _matching_braces(text)
    contents: list[str] = []
    ends: list[int] = []
    covered_until = -1
    for found in _BOX_START.finditer(text):
        if found.start() < covered_until:
            continue  # nested inside the previous top-level box
        if len(contents) == _MAX_BOXES:
            return None
        open_brace = found.end() - 1
        close_brace = matches.get(open_brace)
        if close_brace is None:
            return None
        content = _unwrap_boxes(text[open_brace + 1 : close_brace].strip())
        if content is None:
            return None
        contents.append(content)
        ends.append(close_brace + 1)
        covered_until = close_brace
    return contents, ends


def _unwrap_boxes(content: str) -> str | None:
    """Strip boxes that wrap the whole content; None if a box sits next to other text."""
    while _BOX_WORD.search(content):
        inner = _BOX_START.match(content)
        if inner is None:
            return None
        matches = _matching_braces(content)
        close_brace = matches.get(inner.end() - 1)
        if close_brace != len(content) - 1:
            return None
        content = content[inner.end() : close_brace].strip()
    return content


def _answer_lines(text: str) -> list[str]:
    """Contents of all ``Answer: ...`` lines, in order."""
    return [m.group(1).strip().strip("*").strip() for m in _ANSWER_LINE.finditer(text)]


def _has_letter_or_digit(answer: str) -> bool:
    return any(ch.isalnum() for ch in answer)


def _brace_depth(text: str) -> int:
    depth = deepest = 0
    for ch in text:
        if ch == "{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == "}":
            depth -= 1
    return deepest


def _is_plausible_answer(answer: str, policy: GradingPolicy) -> bool:
    return (
        len(answer) <= policy.max_answer_chars
        and _has_letter_or_digit(answer)
        and _brace_depth(answer) <= policy.max_brace_depth
    )


_MAX_SPELLINGS = 32  # more differently written final answers than this is spraying


def _candidate_answers(completion: str, policy: GradingPolicy) -> list[str] | None:
    """All final-answer candidates of a completion (last = the answer), or None if refused."""
    if not completion or len(completion) > policy.max_completion_chars:
        return None
    if _CONTROL_CHARS.search(completion) or _JUDGE_TEXT.search(completion):
        return None
    if _BOX_WORD.search(completion):
        boxes = _top_level_boxes(completion)
        if boxes is None:
            return None
        candidates = boxes[0]
    elif policy.answer_line_fallback:
        candidates = _answer_lines(completion)
    else:
        candidates = []
    if not candidates:
        return None
    spellings = set(candidates)
    if len(spellings) > _MAX_SPELLINGS:
        return None
    if not all(_is_plausible_answer(c, policy) for c in spellings):
        return None
    distinct = {_comparison_key(normalize_answer(c)) for c in spellings}
    if len(distinct) > policy.max_distinct_answers:
        return None
    return candidates


def extract_answer(completion: str, policy: GradingPolicy = DEFAULT_POLICY) -> str | None:
    """The final answer of a completion (raw text inside the last box / answer line).

    Returns None when there is no answer or the completion is refused by the
    anti-hacking rules (see the module docstring).
    """
    candidates = _candidate_answers(completion, policy)
    return None if candidates is None else candidates[-1]


# ----------------------------------------------------------------------------------------
# Normalisation
# ----------------------------------------------------------------------------------------

_UNIT_WORDS = (
    "units|unit|square units|sq units|cubic units|degrees|degree|deg|radians|rad|"
    "cm|mm|km|m|meters|metres|meter|metre|inches|inch|in|feet|foot|ft|yards|yd|miles|mile|mi|"
    "cm\\^2|m\\^2|cm\\^3|m\\^3|kg|g|grams|gram|mg|pounds|lbs|lb|ounces|oz|liters|litres|l|ml|"
    "seconds|second|sec|s|minutes|minute|min|hours|hour|hrs|hr|h|days|day|weeks|years|"
    "dollars|dollar|cents|cent|mph|km/h|people|students|ways|times|percent"
)
_TEXT_UNIT_SUFFIX = re.compile(
    r"^(?P<value>.*?[0-9}a-zA-Z)])\s*\\(?:text|mbox|mathrm|textrm|textnormal)\s*\{\s*(?P<unit>[a-zA-Z .^/0-9]*)\}"
    r"(?:\^\{?\d\}?)?$"
)
_PLAIN_UNIT_SUFFIX = re.compile(
    r"^(?P<value>[-+]?[0-9.,/]*[0-9])\s+(?:" + _UNIT_WORDS + r")\.?$", re.IGNORECASE
)
_TEXT_COMMAND = re.compile(r"\\(?:text|mbox|mathrm|textrm|textnormal|textbf|textit|mathbf)\s*\{([^{}]*)\}")
_SPACING = re.compile(r"\\(?:[,:;! ]|quad|qquad|enspace|thinspace|medspace)|~")
_LEFT_RIGHT = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?:l|r)?(?![a-zA-Z])")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\degree(?![a-zA-Z])|°")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_SHORT_FRAC = re.compile(r"\\frac(\d)(\d)")
_SHORT_FRAC_DEN = re.compile(r"\\frac(\{[^{}]*\})(\d)")
_SHORT_SQRT = re.compile(r"\\sqrt(\d)")
_CHOICE = re.compile(r"\(([A-Ea-e])\)")
_WORDS = re.compile(r"[A-Za-z][A-Za-z ]*[A-Za-z]")
_UNICODE = {
    "−": "-", "–": "-", "×": "\\times ", "·": "\\cdot ", "π": "\\pi ", "√": "\\sqrt",
    "∞": "\\infty ", "≤": "\\le ", "≥": "\\ge ", "≠": "\\ne ", "\u00a0": " ", "\u2009": " ",
    "\u202f": " ", "\u200b": "",
}


def _strip_outer_braces(s: str) -> str:
    """``{{5}}`` -> ``5`` (one brace-matching pass)."""
    matches = _matching_braces(s)
    start, end = 0, len(s) - 1
    while start < end and s[start] == "{" and matches.get(start) == end:
        start, end = start + 1, end - 1
    return s[start : end + 1]


def normalize_answer(text: str) -> str:
    """Canonical string form of an answer (see the module docstring for the rules)."""
    s = text.strip()
    for src, dst in _UNICODE.items():
        s = s.replace(src, dst)
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\[()\[\]]", "", s)
    unwrapped = _unwrap_boxes(s)
    s = unwrapped if unwrapped is not None else s
    s = _LEFT_RIGHT.sub("", s)
    s = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", s)
    s = re.sub(r"\\displaystyle(?![a-zA-Z])", "", s)
    s = s.replace("{,}", ",")
    s = _SPACING.sub(" ", s)
    s = _DEGREES.sub("", s)
    s = s.replace("\\%", "").replace("%", "")
    s = s.strip()
    for _ in range(3):  # "5\text{ m}\text{.}" style repeats; bounded
        suffix = _TEXT_UNIT_SUFFIX.match(s)
        if suffix is None:
            break
        s = suffix.group("value").strip()
    whole_text = re.fullmatch(r"\\(?:text|mbox|textrm|textnormal|textbf)\s*\{([^{}]*)\}", s)
    if whole_text:
        s = whole_text.group(1).strip()
    s = _TEXT_COMMAND.sub(lambda m: m.group(1), s)
    plain_unit = _PLAIN_UNIT_SUFFIX.match(s)
    if plain_unit:
        s = plain_unit.group("value")
    s = s.rstrip(" .,;:").strip()
    if _WORDS.fullmatch(s) and " " in s:
        s = s.lower()
    s = _strip_outer_braces("".join(s.split()))
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    s = _SHORT_FRAC.sub(r"\\frac{\1}{\2}", s)
    s = _SHORT_FRAC_DEN.sub(r"\\frac\1{\2}", s)
    s = _SHORT_SQRT.sub(r"\\sqrt{\1}", s)
    choice = _CHOICE.fullmatch(s)
    if choice:
        s = choice.group(1).upper()
    if s.startswith("+"):
        s = s[1:]
    if len(s) >= 2 and s.isalpha():
        s = s.lower()
    return s


_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"  # unambiguous: no quadratic backtracking
_DECIMAL = re.compile(rf"({_NUMBER})(?:[eE]([-+]?\d+))?")
_SLASH_FRACTION = re.compile(rf"({_NUMBER})/({_NUMBER})")
_LATEX_FRACTION = re.compile(rf"([-+]?)\\frac\{{({_NUMBER})\}}\{{({_NUMBER})\}}")
_TIMES_POWER = re.compile(rf"({_NUMBER})(?:\\times|\\cdot|\*)10\^(?:\{{([-+]?\d+)\}}|(\d))")
_MAX_DIGITS = 1000


def _decimal(text: str, exponent: str | None = None) -> Fraction | None:
    if len(text) > _MAX_DIGITS:
        return None
    value = Fraction(text)
    if exponent is not None:
        power = int(exponent)
        if abs(power) > _MAX_DIGITS:
            return None
        value *= Fraction(10) ** power
    return value


def _as_rational(s: str) -> Fraction | None:
    """Exact value of a plain number / fraction / scientific-notation string, else None."""
    if m := _DECIMAL.fullmatch(s):
        return _decimal(m.group(1), m.group(2))
    if m := _SLASH_FRACTION.fullmatch(s):
        numerator, denominator = _decimal(m.group(1)), _decimal(m.group(2))
        if numerator is None or not denominator:
            return None
        return numerator / denominator
    if m := _LATEX_FRACTION.fullmatch(s):
        numerator, denominator = _decimal(m.group(2)), _decimal(m.group(3))
        if numerator is None or not denominator:
            return None
        return (-1 if m.group(1) == "-" else 1) * numerator / denominator
    if m := _TIMES_POWER.fullmatch(s):
        return _decimal(m.group(1), m.group(2) or m.group(3))
    return None


_ASSIGNMENT = re.compile(r"([a-zA-Z](?:_\{?[a-zA-Z0-9]+\}?)?)=([^=<>]+)")


def _split_assignment(s: str) -> tuple[str | None, str]:
    """``x=3`` -> ("x", "3"); anything else -> (None, s)."""
    m = _ASSIGNMENT.fullmatch(s)
    return (m.group(1), m.group(2)) if m else (None, s)


def _comparison_key(normalized: str) -> str:
    """Key under which two answers of one completion count as the same answer."""
    _, value = _split_assignment(normalized)
    rational = _as_rational(value)
    return str(rational) if rational is not None else value


def _align_assignments(pred: str, gold: str) -> tuple[str, str]:
    """Reduce ``x=3`` to ``3`` unless both sides assign (then variables must match)."""
    pred_var, pred_value = _split_assignment(pred)
    gold_var, gold_value = _split_assignment(gold)
    if pred_var is not None and gold_var is not None:
        return pred, gold
    return pred_value, gold_value


# ----------------------------------------------------------------------------------------
# Symbolic pre-checks
# ----------------------------------------------------------------------------------------

_CODE_LIKE = re.compile(r"__|[\"'`;@#]|\bimport\b|\blambda\b|\\(?:input|include|def|newcommand|catcode)")
_BIG_FACTORIAL = re.compile(r"(\d+)\s*!")


def _symbolic_refusal(s: str, policy: GradingPolicy) -> str | None:
    """Why ``s`` must not reach the symbolic parser, or None if it is safe to try."""
    if len(s) > policy.max_symbolic_chars:
        return "too long"
    if not s.isascii() or not s.isprintable():
        return "non-ascii"
    if _CODE_LIKE.search(s):
        return "code-like"
    for m in _BIG_FACTORIAL.finditer(s):
        if len(m.group(1)) > 6 or int(m.group(1)) > policy.max_exponent:
            return "factorial too large"
    matches = _matching_braces(s)
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


def _is_text_answer(s: str) -> bool:
    """Multi-letter plain words: compared as strings only."""
    return len(s) >= 2 and s.isalpha()


# ----------------------------------------------------------------------------------------
# Symbolic comparison in a killable worker process
# ----------------------------------------------------------------------------------------
#
# Process layout: the grading process starts one "zygote" (``python -c ...``, not a fork of
# the possibly huge, multi-threaded caller, and not multiprocessing, which would re-import
# the caller's ``__main__``). The zygote imports sympy/math-verify once, then forks a
# worker that does the comparisons. The zygote waits for each answer with the per-call
# budget and SIGKILLs + re-forks the worker on a timeout (a fork of a warm zygote takes a
# few ms). The caller additionally waits with its own hard deadline and kills the zygote
# if it ever fails to answer. Pipes close when a parent dies, so both children exit then.

logger = logging.getLogger(__name__)
_ZYGOTE_START_TIMEOUT_S = 120.0
_KILL_MARGIN_S = 0.1
_WORKER_MEMORY_BYTES = 4 << 30
_WORKER_CPU_SECONDS_PER_CALL = 10


class SymbolicSandboxError(RuntimeError):
    """The symbolic sandbox could not be started."""


def _parse_latex_answer(s: str) -> list:
    """math-verify LaTeX parse of one normalised answer (no Python-expression parser)."""
    from math_verify import LatexExtractionConfig, parse

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
    from math_verify import verify

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


def _worker_loop(requests: Connection, replies: Connection) -> None:
    """Forked worker: answer (gold, pred, float_rounding) requests until EOF."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (_WORKER_MEMORY_BYTES, _WORKER_MEMORY_BYTES))
    while True:
        try:
            gold, pred, float_rounding = requests.recv()
        except (EOFError, OSError):
            return
        # Orphan guard: a CPU-time ceiling per call, in case nobody is left to kill us.
        usage = resource.getrusage(resource.RUSAGE_SELF)
        ceiling = int(usage.ru_utime + usage.ru_stime) + _WORKER_CPU_SECONDS_PER_CALL
        resource.setrlimit(resource.RLIMIT_CPU, (ceiling, resource.RLIM_INFINITY))
        try:
            replies.send(("ok", _symbolic_equal(gold, pred, float_rounding)))
        except Exception as error:  # reported upwards; the caller grades False
            replies.send(("error", f"{type(error).__name__}: {str(error)[:200]}"))


def _fork_worker() -> tuple[int, Connection, Connection]:
    """Fork a warm worker from the zygote; returns (pid, request end, reply end)."""
    request_read, request_write = os.pipe()
    reply_read, reply_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(request_write)
            os.close(reply_read)
            _worker_loop(Connection(request_read, writable=False), Connection(reply_write, readable=False))
        finally:
            os._exit(0)
    os.close(request_read)
    os.close(reply_write)
    return pid, Connection(request_write, readable=False), Connection(reply_read, writable=False)


def _kill_worker(pid: int, requests: Connection, replies: Connection) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)
    requests.close()
    replies.close()


def _zygote_main(read_fd: int, write_fd: int) -> None:
    """Entry point of the zygote process (see the comment above)."""
    requests = Connection(read_fd, writable=False)
    replies = Connection(write_fd, readable=False)
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    _symbolic_equal("\\frac{\\sqrt{2}}{2}", "2^{-1/2}", 6)  # import + first-call cost, once
    worker = _fork_worker()
    replies.send(("ready", os.getpid()))
    while True:
        try:
            gold, pred, float_rounding, budget_s = requests.recv()
        except (EOFError, OSError):
            break
        if worker is None:
            worker = _fork_worker()
        pid, worker_requests, worker_replies = worker
        try:
            worker_requests.send((gold, pred, float_rounding))
            answered = worker_replies.poll(max(0.0, budget_s))
            reply = worker_replies.recv() if answered else ("timeout", None)
        except (EOFError, OSError) as error:  # the worker died (e.g. out of memory)
            answered, reply = False, ("error", f"worker died: {type(error).__name__}")
        replies.send(reply)
        if not answered:
            _kill_worker(*worker)
            worker = _fork_worker()  # after replying: off the caller's critical path
    if worker is not None:
        _kill_worker(*worker)


class _Zygote:
    """Handle on a running zygote process."""

    def __init__(self) -> None:
        to_zygote_read, to_zygote_write = os.pipe()
        from_zygote_read, from_zygote_write = os.pipe()
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        code = (
            "import sys, jaxrl.rewards.math as m; "
            f"m._zygote_main({to_zygote_read}, {from_zygote_write})"
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", code],
            pass_fds=(to_zygote_read, from_zygote_write),
            stdin=subprocess.DEVNULL,
            env=env,
            close_fds=True,
        )
        os.close(to_zygote_read)
        os.close(from_zygote_write)
        self.requests = Connection(to_zygote_write, readable=False)
        self.replies = Connection(from_zygote_read, writable=False)
        if not self.replies.poll(_ZYGOTE_START_TIMEOUT_S):
            self.kill()
            raise SymbolicSandboxError("symbolic zygote did not become ready")
        try:
            status, _ = self.replies.recv()
        except EOFError:
            self.kill()
            raise SymbolicSandboxError("symbolic zygote exited during start-up") from None
        if status != "ready":
            self.kill()
            raise SymbolicSandboxError(f"unexpected zygote hello {status!r}")

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self.requests.close()
        self.replies.close()


class _SymbolicSandbox:
    """Thread-safe client of the zygote with hard per-call deadlines.

    Calls are serialised (one worker); a call that cannot get its turn before its deadline
    grades False. For parallel grading use several processes (``RewardExecutor``).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready = threading.Condition()
        self._zygote: _Zygote | None = None
        self._starting = False
        self._start_error: BaseException | None = None
        self.stats = {"calls": 0, "timeouts": 0, "worker_errors": 0, "zygote_restarts": 0}

    def _start(self) -> None:
        try:
            zygote, error = _Zygote(), None
        except BaseException as start_error:  # surfaced to callers by _wait_ready
            zygote, error = None, start_error
        with self._ready:
            self._zygote, self._start_error, self._starting = zygote, error, False
            self._ready.notify_all()

    def _wait_ready(self, deadline: float) -> _Zygote | None:
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

    def _discard(self, zygote: _Zygote) -> None:
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
            zygote.requests.send((gold, pred, float_rounding, budget))
            if not zygote.replies.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError("zygote did not answer")
            status, result = zygote.replies.recv()
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
    """Start this process's symbolic sandbox and wait until it is ready."""
    _SANDBOX.warm_up(timeout_s)


def sandbox_stats() -> dict[str, int]:
    """Counters of this process's symbolic sandbox (calls, timeouts, errors, restarts)."""
    return dict(_SANDBOX.stats)


# ----------------------------------------------------------------------------------------
# Grading
# ----------------------------------------------------------------------------------------


def _gold_answer(gold: str) -> str:
    """The gold answer: the last box if the gold string has one, else the whole string."""
    if _BOX_WORD.search(gold):
        boxes = _top_level_boxes(gold)
        if boxes and boxes[0]:
            return boxes[0][-1]
    return gold


def answers_equivalent(
    pred: str, gold: str, policy: GradingPolicy = DEFAULT_POLICY, deadline: float | None = None
) -> bool:
    """Whether two answer strings (not completions) are equivalent under the policy."""
    if deadline is None:
        deadline = time.monotonic() + policy.time_limit_s
    pred_norm, gold_norm = normalize_answer(pred), normalize_answer(gold)
    if not pred_norm or not gold_norm:
        return False
    if pred_norm == gold_norm:
        return True
    pred_norm, gold_norm = _align_assignments(pred_norm, gold_norm)
    if pred_norm == gold_norm:
        return True
    pred_rational, gold_rational = _as_rational(pred_norm), _as_rational(gold_norm)
    if pred_rational is not None and gold_rational is not None:
        return pred_rational == gold_rational
    if not policy.symbolic or _is_text_answer(pred_norm) or _is_text_answer(gold_norm):
        return False
    if _symbolic_refusal(pred_norm, policy) or _symbolic_refusal(gold_norm, policy):
        return False
    return _SANDBOX.equal(gold_norm, pred_norm, policy.float_rounding, deadline - _KILL_MARGIN_S)


def grade(completion: str, gold: str, policy: GradingPolicy = DEFAULT_POLICY) -> bool:
    """True iff the completion's final answer is equivalent to ``gold``.

    Returns within ``policy.time_limit_s`` on any input and never executes completion text.
    """
    deadline = time.monotonic() + policy.time_limit_s
    if not isinstance(completion, str) or not isinstance(gold, str):
        raise TypeError("grade expects str completion and str gold")
    answer = extract_answer(completion, policy)
    if answer is None:
        return False
    return answers_equivalent(answer, _gold_answer(gold), policy, deadline)


def _gold_of(example: Mapping[str, Any]) -> str:
    if "answer" not in example:
        raise KeyError("math rewarder needs the gold answer in example['answer']")
    return str(example["answer"])


def math_reward(prompt: str, completion: str, example: Mapping[str, Any]) -> float:
    """Rewarder: 1.0 if ``grade(completion, example['answer'])`` else 0.0."""
    return 1.0 if grade(completion, _gold_of(example), DEFAULT_POLICY) else 0.0


def math_reward_strict(prompt: str, completion: str, example: Mapping[str, Any]) -> float:
    """Rewarder for strict (DAPO-style) datasets: boxed answers only, no answer-line fallback."""
    return 1.0 if grade(completion, _gold_of(example), STRICT_POLICY) else 0.0


math_reward.warm_up = warm_up
math_reward_strict.warm_up = warm_up
