"""Math grading policy knobs and final-answer extraction with the anti-hacking refusals.

The policy is described in the docstring of ``jaxrl.rewards.math``. Extraction is
linear-time in the completion and never evaluates its text.
"""

from __future__ import annotations

import dataclasses
import re

from jaxrl.rewards.math_normalize import BOX_WORD, comparison_key, normalize_answer, top_level_box_spans, top_level_boxes

__all__ = ["GradingPolicy", "DEFAULT_POLICY", "STRICT_POLICY", "extract_answer", "gold_answer", "answer_regions"]


@dataclasses.dataclass(frozen=True)
class GradingPolicy:
    """Knobs of the grading policy (docstring of ``jaxrl.rewards.math``); lengths in
    characters, ``time_limit_s`` in seconds per ``grade`` call."""

    answer_line_fallback: bool = True
    max_distinct_answers: int = 1
    max_revisions: int = 3
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

_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"


def answer_regions(text: str) -> tuple[str, ...]:
    """Where the final answer is looked for, in order: the text after the last closed
    ``<think>...</think>`` block (a ``</think>`` with no opener closes a block that starts at
    the beginning), then the whole text. A ``<think>`` left open at the end, or no block at
    all, leaves only the whole text. Two ``str.rfind`` calls: linear."""
    closed = text.rfind(_THINK_CLOSE)
    if closed == -1 or text.rfind(_THINK_OPEN) > closed:
        return (text,)
    return text[closed + len(_THINK_CLOSE) :], text


# Answer lines. Per line, the content after the LAST marker is the candidate ("Final Answer:
# The final answer is $42$" gives "$42$").
_ANSWER_MARK = re.compile(
    r"^[ \t>*#_]{0,8}(?:final[ \t]{1,4})?answer[ \t]{0,4}(?:\*\*)?[ \t]{0,4}(?:is)?[ \t]{0,4}[:：]"
    r"|\banswer[ \t]{1,4}(?:\*\*[ \t]{0,4})?is\b[ \t]{0,4}(?:\*\*)?[ \t]{0,4}[:：]?"
    r"|^[ \t]{0,8}####",
    re.IGNORECASE | re.MULTILINE,
)
_MINERVA_TAIL = re.compile(r"[ \t]{0,4}I[ \t]{1,4}hope[ \t]{1,4}it[ \t]{1,4}is[ \t]{1,4}correct[ \t]{0,4}\.?[ \t]{0,4}$")
_MATH_SPAN = re.compile(r"\$\$?[^$]+\$\$?|\\\(.+?\\\)|\\\[.+?\\\]")
_SENTENCE_END = re.compile(r"\.(?=[ \t]|$)")
_HEDGE_WORDS = re.compile(
    r"\b(?:or|and|not|no|maybe|perhaps|possibly|probably|likely|approx\w{0,8}|about|around|roughly|"
    r"nearly|almost|least|most|more|less|than|plus|minus|either|to|between|if|unless|guess|"
    r"times|over|under|percent|hundreds?|thousands?|millions?|billions?|trillions?|dozens?|half|"
    r"halves|quarters?|thirds?|squared|cubed|factorial|wrong|incorrect|"
    r"pi|sqrt|roots?|log|ln|sin|cos|tan|exp|mod|choose|power|divided|i|e)\b",
    re.IGNORECASE,
)
_NUMBER_THEN_WORDS = re.compile(r"([-+]?(?:\\\$|\$)?[0-9][0-9.,]{0,40})[ \t]{1,4}([A-Za-z]{3}[A-Za-z '-]{0,40})")
# A description rather than an answer ("the answer is the sum of ..."): ignored unless last.
_DESCRIPTION = re.compile(
    r"(?:the|a|an|that|this|to|how|what|which|when|where|why|found|given|obtained|in|at|by|from|"
    r"simply|just|clearly|then|now)[ \t]{1,4}[A-Za-z]",
    re.IGNORECASE,
)


def _answer_line_content(raw: str) -> str:
    """The answer stated after an answer marker: a leading math span or first sentence, with a
    trailing remark dropped only if it holds no digit, math or hedge word; a number followed by
    plain words (no hedge) is reduced to the number ("18 apples" -> "18")."""
    s = _MINERVA_TAIL.sub("", raw.strip().strip("*").strip())
    span = _MATH_SPAN.match(s)
    if span:
        answer, rest = span.group(0), s[span.end() :]
    else:
        end = _SENTENCE_END.search(s)
        answer, rest = (s[: end.start()], s[end.end() :]) if end else (s, "")
    rest = rest.strip(" \t.,;:!*")
    if rest and (any(ch.isdigit() for ch in rest) or "$" in rest or "\\" in rest or _HEDGE_WORDS.search(rest)):
        return s
    answer = answer.strip().strip("*").strip()
    words = _NUMBER_THEN_WORDS.fullmatch(answer)
    if words and not _HEDGE_WORDS.search(words.group(2)):
        answer = words.group(1).rstrip(".,")
    return answer


_LEAD_IN = re.compile(r"[\s*,:]*(?:(?:the|final|so|thus|hence|therefore)[\s*,:]+)*", re.IGNORECASE)


def _answer_lines(text: str) -> list[tuple[str, int, int]]:
    """(content, start, gap_start) of every answer statement (``Answer: ...``, ``The answer is
    ...``, ``#### ...``) in order: offsets in ``text`` of the marker and of its content (a
    remark after the answer belongs to the gap before the next statement). A marker whose text up to the next marker on
    its line is only a lead-in ("Final Answer: The final answer is $42$") is merged into it;
    two statements on one line are two candidates."""
    found: list[tuple[str, int, int]] = []
    contents: dict[str, str] = {}  # a repeated statement is read once
    marks = list(_ANSWER_MARK.finditer(text))
    line_end = -1
    for mark, after in zip(marks, marks[1:] + [None]):
        if mark.start() > line_end:
            line_end = text.find("\n", mark.start())
            line_end = len(text) if line_end == -1 else line_end
        stop = line_end if after is None or after.start() > line_end else after.start()
        if stop < line_end and _LEAD_IN.fullmatch(text, mark.end(), stop):
            continue
        raw = text[mark.end() : stop]
        if raw not in contents:
            contents[raw] = _answer_line_content(raw)
        if contents[raw]:
            found.append((contents[raw], mark.start(), mark.end()))
    return found


# Structure that makes a later, different answer a revision of an earlier one: words of
# self-correction or checking, or a part label ("(b)", "Part 2") starting the next part.
_REVISION = re.compile(
    r"\b(?:wait|actually|hmm+|oops|correction|mistakes?|errors?|wrong|incorrect(?:ly)?|"
    r"re-?(?:check|examin|calculat|comput|evaluat|consider|do|doing|did|think|visit|count|read|try|"
    r"trying|verif|work)\w{0,6}|double[- ]check\w{0,3}|check\w{0,3}[ \t]{1,4}(?:again|this|that|my|the|it)|"
    r"verif\w{0,8}|again|on[ \t]{1,4}second[ \t]{1,4}thought|hold[ \t]{1,4}on|miscalculat\w{0,5}|"
    r"miscount\w{0,4}|misread\w{0,4}|instead|fix\w{0,3}|revis\w{0,5}|not[ \t]{1,4}(?:right|correct|quite)|"
    r"should[ \t]{1,4}(?:be|have[ \t]{1,4}been))\b"
    r"|\bpart[ \t]{0,4}(?:\(?[a-h]\)?|\d{1,2}|[ivx]{1,4})(?![a-zA-Z0-9])"
    r"|(?:^|(?<=\s))\*{0,2}\((?:[a-h]|i{1,3}|iv|vi{0,3})\)(?=[\s.:*])"
    r"|^[ \t*#]{0,8}[a-h]\)(?=\s)",
    re.IGNORECASE | re.MULTILINE,
)
# A short gap joined by "or" is a hedge between two answers, whatever else it says.
_HEDGE_GAP = re.compile(r"\b(?:or|either|alternatively)\b", re.IGNORECASE)
_HEDGE_GAP_CHARS = 60


_SYMBOL_ANSWERS = frozenset("∅∞π")  # one-symbol answers that are not letters or digits


def _has_letter_or_digit(answer: str) -> bool:
    return any(ch.isalnum() or ch in _SYMBOL_ANSWERS for ch in answer)


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


def _region_candidates(region: str, policy: GradingPolicy) -> list[tuple[str, int, int]] | None:
    """(answer, start, gap_start) candidates of one region in order: its boxes if it has any, else
    (policy permitting) its answer lines; [] if none; None if a box is malformed."""
    if BOX_WORD.search(region):
        spans = top_level_box_spans(region)
        if spans is None or (spans[0] and _is_hedged(region, spans[1][-1], spans[2][-1])):
            return None
        return list(zip(*spans))
    if policy.answer_line_fallback:
        lines = _answer_lines(region)
        # Descriptions ("the answer is the sum of ...") are not answers, unless last.
        return [c for c in lines[:-1] if not _DESCRIPTION.match(c[0])] + lines[-1:]
    return []


# A negation or alternative written right next to the final box ("not $\\boxed{42}$",
# "$\\boxed{42}$ or 43"). The windows are a few characters: constant work.
_HEDGE_BEFORE = re.compile(
    r"(?:\b(?:not|nor|never|except|or)|n't|\\neq?|≠)[ \t$\\(\[=:*]{0,6}$", re.IGNORECASE
)
_HEDGE_AFTER = re.compile(r"[ \t$.,\\)\]*]{0,6}(?:(?:or|nor)\b|\\pm|±|\+/-)", re.IGNORECASE)
_HEDGE_WINDOW = 24


def _is_hedged(region: str, start: int, end: int) -> bool:
    """Whether the box at region[start:end] is negated or offered with an alternative."""
    before = region[max(0, start - _HEDGE_WINDOW) : start]
    return bool(_HEDGE_BEFORE.search(before) or _HEDGE_AFTER.match(region, end, end + _HEDGE_WINDOW))


def _is_revision(gap: str) -> bool:
    """Whether the text between two different answers makes the later one a revision."""
    if len(gap) <= _HEDGE_GAP_CHARS and _HEDGE_GAP.search(gap):
        return False
    return _REVISION.search(gap) is not None


def _final_answer(region: str, candidates: list[tuple[str, int, int]], policy: GradingPolicy) -> str | None:
    """The last candidate, or None when the candidates are refused (implausible, too many
    spellings, or different answers not separated by revision structure)."""
    spellings = {c[0] for c in candidates}
    if len(spellings) > _MAX_SPELLINGS:
        return None
    if not all(_is_plausible_answer(c, policy) for c in spellings):
        return None
    keys = {c: comparison_key(normalize_answer(c)) for c in spellings}
    if len(set(keys.values())) <= policy.max_distinct_answers:
        return candidates[-1][0]
    revisions = 0
    for before, after in zip(candidates, candidates[1:]):
        if keys[before[0]] == keys[after[0]]:
            continue
        revisions += 1
        if revisions > policy.max_revisions or not _is_revision(region[before[2] : after[1]]):
            return None
    return candidates[-1][0]


def _candidate_answers(completion: str, policy: GradingPolicy) -> tuple[str, list] | None:
    """(region, candidates) of the region that holds the final answer (outside ``<think>``
    first, else inside), or None if the completion is refused or has no answer."""
    if not completion or len(completion) > policy.max_completion_chars:
        return None
    if _CONTROL_CHARS.search(completion) or _JUDGE_TEXT.search(completion):
        return None
    for region in answer_regions(completion):
        candidates = _region_candidates(region, policy)
        if candidates is None:
            return None
        if candidates:
            return region, candidates
    return None


def extract_answer(completion: str, policy: GradingPolicy = DEFAULT_POLICY) -> str | None:
    """The final answer of a completion (raw text inside the last box / answer line).

    Returns None when there is no answer or the completion is refused by the
    anti-hacking rules (see the docstring of ``jaxrl.rewards.math``).
    """
    found = _candidate_answers(completion, policy)
    return None if found is None else _final_answer(*found, policy)


def gold_answer(gold: str) -> str:
    """The gold answer of a dataset gold string: its last box if it has one, else the text
    after its last ``####`` (GSM8K solutions), else all of it."""
    if BOX_WORD.search(gold):
        boxes = top_level_boxes(gold)
        if boxes and boxes[0]:
            return boxes[0][-1]
    if "####" in gold:
        return gold.rsplit("####", 1)[1].strip()
    return gold
