"""Math answers as strings: LaTeX brace matching, boxes, normalisation, exact rationals.

Everything here is linear-time in the input (one brace-matching pass, regexes with bounded
whitespace quantifiers and unambiguous number patterns) and never evaluates the text. The
rules are listed in the docstring of ``jaxrl.rewards.math``.
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = [
    "BOX_WORD",
    "align_assignments",
    "as_rational",
    "comparison_key",
    "has_percent",
    "matching_braces",
    "normalize_answer",
    "percent_readings",
    "top_level_box_spans",
    "top_level_boxes",
    "unwrap_boxes",
]

# ----------------------------------------------------------------------------------------
# Braces and boxes
# ----------------------------------------------------------------------------------------

_BOX_START = re.compile(r"\\(?:boxed|fbox)\s*\{")
BOX_WORD = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")  # any box command in a text

_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)


def matching_braces(text: str) -> dict[int, int]:
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


def top_level_boxes(text: str) -> tuple[list[str], list[int]] | None:
    """Contents (stripped, inner wrapping boxes removed) and end offsets (index just past the
    closing brace) of the top-level boxes, in order; None if a box is malformed.

    Malformed: an unclosed box, or a box whose content holds another box next to other text.
    """
    spans = top_level_box_spans(text)
    return None if spans is None else (spans[0], spans[2])


def top_level_box_spans(text: str) -> tuple[list[str], list[int], list[int]] | None:
    """As ``top_level_boxes`` plus the start offsets (index of the backslash of each box):
    (contents, starts, ends), or None if a box is malformed."""
    matches = matching_braces(text)
    contents: list[str] = []
    starts: list[int] = []
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
        content = unwrap_boxes(text[open_brace + 1 : close_brace].strip())
        if content is None:
            return None
        contents.append(content)
        starts.append(found.start())
        ends.append(close_brace + 1)
        covered_until = close_brace
    return contents, starts, ends


def unwrap_boxes(content: str) -> str | None:
    """``content`` without the boxes that wrap all of it; None if a box sits next to other text."""
    while BOX_WORD.search(content):
        inner = _BOX_START.match(content)
        if inner is None:
            return None
        matches = matching_braces(content)
        close_brace = matches.get(inner.end() - 1)
        if close_brace != len(content) - 1:
            return None
        content = content[inner.end() : close_brace].strip()
    return content


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
_SPACING = re.compile(
    r"\\(?:[,:;! ]|quad|qquad|enspace|thinspace|medspace)|~"
    r"|\\[hv]space\*?\s?\{[^{}]{0,20}\}"
    r"|\\(?:hskip|kern|mkern|mskip)\s?-?[0-9.]{1,8}\s?(?:em|ex|pt|mu|cm|mm|in)"
)
_EMPTY_SET = re.compile(r"\\(?:varnothing|emptyset|O)(?![a-zA-Z])|∅")
# Whitespace goes, except one space that keeps a command apart from a letter (``\le x``).
_WHITESPACE = re.compile(r"(\\[a-zA-Z]+)\s+(?=[a-zA-Z])|\s+")
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
    matches = matching_braces(s)
    start, end = 0, len(s) - 1
    while start < end and s[start] == "{" and matches.get(start) == end:
        start, end = start + 1, end - 1
    return s[start : end + 1]


def normalize_answer(text: str) -> str:
    """Canonical string form of an answer (rules: the docstring of ``jaxrl.rewards.math``)."""
    s = re.sub(r"(?<!\\)\\$", "", text.strip())  # "3\ " stripped to "3\": the space command
    for src, dst in _UNICODE.items():
        s = s.replace(src, dst)
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\[()\[\]]", "", s)
    unwrapped = unwrap_boxes(s)
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
    s = _WHITESPACE.sub(lambda m: m.group(1) + " " if m.group(1) else "", s)
    s = _strip_outer_braces(_EMPTY_SET.sub(r"\\emptyset", s))
    s = re.sub(r"(^|[(\[,])\+\\infty", r"\1\\infty", s)
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
    return _inequality_as_interval(s)


_RELATION = re.compile(r"(\\(?:leqslant|leq|le|lt|geqslant|geq|ge|gt)(?![a-zA-Z]) ?|<=|>=|<|>)")
_VARIABLE = re.compile(r"[a-zA-Z](?:_\{?[a-zA-Z0-9]{1,8}\}?)?")


def _relation_kind(op: str) -> tuple[str, bool]:
    """(direction "<" or ">", inclusive) of a relation token such as ``\\leq`` or ``>``."""
    op = op.strip()
    less = op.startswith(("<", "\\l"))
    inclusive = op in ("<=", ">=") or op.startswith(("\\le", "\\ge"))
    return ("<" if less else ">"), inclusive


def _inequality_as_interval(s: str) -> str:
    """A normalised one-variable inequality as an interval, else ``s`` unchanged:
    ``x\\ge2`` -> ``[2,\\infty)``, ``2<x`` -> ``(2,\\infty)``, ``-3\\le x\\le3`` -> ``[-3,3]``."""
    parts = _RELATION.split(s)
    if len(parts) == 3:
        left, (direction, inclusive), right = parts[0], _relation_kind(parts[1]), parts[2]
        if _VARIABLE.fullmatch(left) and right and not _VARIABLE.fullmatch(right):
            bound = right
        elif _VARIABLE.fullmatch(right) and left and not _VARIABLE.fullmatch(left):
            bound, direction = left, (">" if direction == "<" else "<")
        else:
            return s
        if direction == "<":
            return "(-\\infty," + bound + ("]" if inclusive else ")")
        return ("[" if inclusive else "(") + bound + ",\\infty)"
    if len(parts) == 5 and _VARIABLE.fullmatch(parts[2]) and parts[0] and parts[4]:
        (first, first_inclusive), (second, second_inclusive) = map(_relation_kind, (parts[1], parts[3]))
        if first != second or _VARIABLE.fullmatch(parts[0]) or _VARIABLE.fullmatch(parts[4]):
            return s
        low, high = (parts[0], parts[4]) if first == "<" else (parts[4], parts[0])
        low_inclusive, high_inclusive = (
            (first_inclusive, second_inclusive) if first == "<" else (second_inclusive, first_inclusive)
        )
        return ("[" if low_inclusive else "(") + low + "," + high + ("]" if high_inclusive else ")")
    return s


# ----------------------------------------------------------------------------------------
# Exact numbers and assignments
# ----------------------------------------------------------------------------------------

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


def as_rational(s: str) -> Fraction | None:
    """Exact value of a normalised plain number / fraction / scientific-notation string, else None.

    Numbers longer than 1000 digits or powers of ten beyond 1000 give None.
    """
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
_REVERSED_ASSIGNMENT = re.compile(r"([^=<>]+)=([a-zA-Z](?:_\{?[a-zA-Z0-9]+\}?)?)")


def _split_assignment(s: str) -> tuple[str | None, str]:
    """``x=3`` (or ``3=x``) -> ("x", "3"); anything else -> (None, s)."""
    m = _ASSIGNMENT.fullmatch(s)
    if m:
        return m.group(1), m.group(2)
    m = _REVERSED_ASSIGNMENT.fullmatch(s)
    return (m.group(2), m.group(1)) if m else (None, s)


def comparison_key(normalized: str) -> str:
    """Key of a normalised answer under which two answers of one completion count as the same
    answer (``x=0.5`` and ``1/2`` share the key ``1/2``)."""
    _, value = _split_assignment(normalized)
    rational = as_rational(value)
    return str(rational) if rational is not None else value


def align_assignments(pred: str, gold: str) -> tuple[str, str]:
    """(pred, gold) normalised answers with ``x=3`` reduced to ``3``, unless both sides assign
    (then both are returned as ``var=value`` and the variables must match too)."""
    pred_var, pred_value = _split_assignment(pred)
    gold_var, gold_value = _split_assignment(gold)
    if pred_var is not None and gold_var is not None:
        return f"{pred_var}={pred_value}", f"{gold_var}={gold_value}"
    return pred_value, gold_value


_PERCENT = re.compile(r"%|\bper[ \t]?cent\b", re.IGNORECASE)
_MAX_PERCENT_AS_FRACTION = 100


def has_percent(text: str) -> bool:
    """Whether a raw answer carries a percent sign (``%``, ``\\%``) or the word percent."""
    return _PERCENT.search(text) is not None


def percent_readings(value: Fraction) -> tuple[Fraction, ...]:
    """The values an answer written ``value%`` may stand for: ``value`` itself (50% read as the
    percentage 50) and, when |value| <= 100, ``value / 100`` (50% read as the number 0.5)."""
    if abs(value) <= _MAX_PERCENT_AS_FRACTION:
        return value, value / 100
    return (value,)

