"""Math grading policy knobs and final-answer extraction with the anti-hacking refusals.

The policy is described in the docstring of ``jaxrl.rewards.math``. Extraction is
linear-time in the completion and never evaluates its text.
"""

from __future__ import annotations

import dataclasses
import re

from jaxrl.rewards.math_normalize import BOX_WORD, comparison_key, normalize_answer, top_level_boxes

__all__ = ["GradingPolicy", "DEFAULT_POLICY", "STRICT_POLICY", "extract_answer", "gold_answer"]


@dataclasses.dataclass(frozen=True)
class GradingPolicy:
    """Knobs of the grading policy (docstring of ``jaxrl.rewards.math``); lengths in
    characters, ``time_limit_s`` in seconds per ``grade`` call."""

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
    if BOX_WORD.search(completion):
        boxes = top_level_boxes(completion)
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
    distinct = {comparison_key(normalize_answer(c)) for c in spellings}
    if len(distinct) > policy.max_distinct_answers:
        return None
    return candidates


def extract_answer(completion: str, policy: GradingPolicy = DEFAULT_POLICY) -> str | None:
    """The final answer of a completion (raw text inside the last box / answer line).

    Returns None when there is no answer or the completion is refused by the
    anti-hacking rules (see the docstring of ``jaxrl.rewards.math``).
    """
    candidates = _candidate_answers(completion, policy)
    return None if candidates is None else candidates[-1]


def gold_answer(gold: str) -> str:
    """The gold answer of a dataset gold string: its last box if it has one, else all of it."""
    if BOX_WORD.search(gold):
        boxes = top_level_boxes(gold)
        if boxes and boxes[0]:
            return boxes[0][-1]
    return gold
