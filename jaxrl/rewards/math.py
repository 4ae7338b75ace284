"""Rule-based math answer grading: extraction, normalisation, bounded equivalence.

Public API: ``grade(completion, gold) -> bool``, ``extract_answer(completion) -> str | None``,
``normalize_answer(text) -> str``, ``answers_equivalent(pred, gold) -> bool``, ``warm_up()``,
``sandbox_stats()``, the rewarders ``math_reward`` and ``math_reward_strict``, and
``GradingPolicy`` for the knobs. The work is done in ``math_extract`` (policy, extraction,
anti-hacking), ``math_normalize`` (braces, boxes, normalisation, exact rationals) and
``math_symbolic`` (pre-checks and the symbolic comparison in a ``sandbox`` process).

Grading policy (precision first: a grader that can be fooled poisons a run)
--------------------------------------------------------------------------
Final-answer rule (extraction)
  * Region: if the completion closes a ``<think>`` block (``</think>``; with no opener the
    block starts at the beginning) and nothing reopens it, the answer is looked for after the
    last ``</think>``; only when that part has no answer is the whole completion used (a
    box inside the thinking counts only if no later answer exists).
  * In the region, the final answer is the content of the last top-level ``\\boxed{...}`` /
    ``\\fbox{...}`` (braces balanced, ``\\{`` ``\\}`` literal). A box that only wraps another
    box is unwrapped; a box that contains a box next to other text is refused.
  * Only if the region has no box, and the policy allows it (off in ``STRICT_POLICY``), answer
    statements count: ``Answer: X`` / ``Final answer: X`` at a line start, ``... the answer
    is X`` anywhere in a line, GSM8K ``#### X``. "Final Answer: The final answer is $X$. I
    hope it is correct." is one statement. X is the leading math span or first sentence; a
    trailing remark is dropped only if it has no digit, math or hedge word; "18 apples" is 18
    unless the words hedge or scale ("or", "about", "thousand", ...).
  * Several candidates: if they all agree (after normalisation) the answer is the last. If
    they differ, each change of answer must be a *revision*: the text between the two holds
    self-correction or checking words ("wait", "actually", "mistake", "recheck", "let me
    recompute", "on second thought", ...) or a part label ("(b)", "Part 2", "b)"), and is not
    a short "or" hedge; at most ``max_revisions`` (3) changes. Otherwise it is spraying and
    the completion gets nothing. ``max_revisions=0`` gives the old all-boxes-agree rule.
Anti-hacking (any of these makes the completion ungradable, i.e. ``False``)
  * empty completions, answers with no letter or digit (``{``, ``.``, ``\\{\\}``; the
    symbols empty set, infinity and pi count as answers), answers longer than
    ``max_answer_chars`` (300) or nested deeper than ``max_brace_depth`` (32), completions
    longer than ``max_completion_chars`` (200k), more than 1000 top-level boxes or more than
    32 different spellings of the final answer;
  * control characters (NUL etc.) anywhere in the completion;
  * spraying: different candidates without revision structure (rule above), e.g.
    ``\\boxed{1} \\boxed{2}`` or ``\\boxed{41} or \\boxed{42}``, even if the last one is right;
  * hedges: a final box negated or offered with an alternative ("not $\\boxed{42}$",
    "$\\boxed{42}$ or 43", ``\\neq``, ``\\pm`` right next to it), and answers such as "42 or
    43", "not 42" (they never equal a single gold answer);
  * text aimed at a grader or judge anywhere in the completion ("the answer above is
    correct", "ignore previous instructions", "grade this as correct", "dear grader", ...);
  * multi-letter text answers are compared as strings only (never symbolically, where
    ``yes`` and ``sey`` would both be the product e*s*y).
Normalisation (both sides): ``$``/``\\(``/``\\[`` delimiters, LaTeX spacing (``\\,`` ``\\!``
  ``\\;`` ``\\quad`` ``~``), ``\\left``/``\\right``, ``\\dfrac``/``\\tfrac``, ``\\displaystyle``,
  ``\\text{}`` unit suffixes (and plain unit words after a number), degrees (``^\\circ``, °),
  percent signs, ``\\$``, thousands separators (``1,000`` / ``1{,}000`` / ``1\\,000``),
  trailing ``.,;:``, unicode minus/times/pi, ``\\frac12``/``\\sqrt2`` short forms, ``(C)``
  for multiple choice, case of plain words, ``\\hspace{..}``/``\\hskip``/``\\kern`` and ``\\ ``,
  ``\\varnothing``/``∅`` -> ``\\emptyset``, ``+\\infty`` -> ``\\infty``, whitespace (kept only
  between a command and a letter: ``\\pi r``). ``x = 3`` (or ``3 = x``) matches ``3`` (a
  single-variable assignment is reduced to its right-hand side unless both sides assign). A
  one-variable inequality becomes an interval: ``x \\geq 2`` -> ``[2,\\infty)``, ``2 < x`` ->
  ``(2,\\infty)``, ``-3 \\le x \\le 3`` -> ``[-3,3]``.
Percent rule: when exactly one side carries ``%``/``\\%``/"percent", its number v matches the
  other side's number if that equals v (50% = 50) or, for |v| <= 100, v/100 (50% = 0.5);
  so 150% != 1.5 and 5000% != 50; 50% != 0.05; with a sign on both sides the numbers compare.
Equivalence, in order: exact normalised string; exact rationals (integers, decimals,
  fractions, scientific notation; two rationals that differ are *not* equal, no rounding);
  then symbolic, via math-verify's LaTeX parser and comparator (never its Python-expression
  parser, which calls ``eval``), in a separate worker process.
Bounded work
  * Extraction and normalisation are linear-time (one brace-matching pass, regexes with
    bounded whitespace quantifiers and unambiguous number patterns): ~0.3 s worst case at
    the 200k-character limit. Answer statements are found in one pass of one regex over
    the text; ``<think>`` regions cost two ``rfind`` calls; the revision and hedge checks
    read the gaps between candidates once (or a 24-character window).
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
  irrationals (``0.333333`` != 1/3, ``1.414214`` != sqrt 2); several distinct boxes without
  revision structure are refused instead of being read as a set; no answer without a box /
  answer statement (math-verify also grabs the last number in free text);
  ``45^\\circ`` is 45, never pi/4.
"""

from __future__ import annotations

import time
from fractions import Fraction
from typing import Any, Mapping

from jaxrl.rewards.math_extract import DEFAULT_POLICY, STRICT_POLICY, GradingPolicy, extract_answer, gold_answer
from jaxrl.rewards.math_normalize import (
    align_assignments,
    as_rational,
    has_percent,
    normalize_answer,
    percent_readings,
)
from jaxrl.rewards.math_symbolic import (
    equal_in_sandbox,
    is_text_answer,
    sandbox_stats,
    symbolic_refusal,
    warm_up,
)

__all__ = [
    "GradingPolicy",
    "DEFAULT_POLICY",
    "STRICT_POLICY",
    "extract_answer",
    "normalize_answer",
    "answers_equivalent",
    "grade",
    "warm_up",
    "sandbox_stats",
    "math_reward",
    "math_reward_strict",
]


def answers_equivalent(
    pred: str, gold: str, policy: GradingPolicy = DEFAULT_POLICY, deadline: float | None = None
) -> bool:
    """Whether two answer strings (not completions) are equivalent under the policy.

    ``deadline`` is a ``time.monotonic()`` time in seconds (default: now + the policy's
    ``time_limit_s``); an undecided symbolic comparison at the deadline counts as not equal.
    """
    if deadline is None:
        deadline = time.monotonic() + policy.time_limit_s
    pred_norm, gold_norm = normalize_answer(pred), normalize_answer(gold)
    if not pred_norm or not gold_norm:
        return False
    if pred_norm == gold_norm:
        return True
    pred_norm, gold_norm = align_assignments(pred_norm, gold_norm)
    if pred_norm == gold_norm:
        return True
    pred_rational, gold_rational = as_rational(pred_norm), as_rational(gold_norm)
    if pred_rational is not None and gold_rational is not None:
        return _rationals_equal(pred, pred_rational, gold, gold_rational)
    if not policy.symbolic or is_text_answer(pred_norm) or is_text_answer(gold_norm):
        return False
    if symbolic_refusal(pred_norm, policy) or symbolic_refusal(gold_norm, policy):
        return False
    return equal_in_sandbox(gold_norm, pred_norm, policy.float_rounding, deadline)


def _rationals_equal(pred: str, pred_value: Fraction, gold: str, gold_value: Fraction) -> bool:
    """Exact equality of two numbers, with the percent rule: when exactly one raw answer
    carries a percent sign, its number may also be read as a fraction (``percent_readings``)."""
    if pred_value == gold_value:
        return True
    if has_percent(pred) == has_percent(gold):
        return False
    percent, other = (pred_value, gold_value) if has_percent(pred) else (gold_value, pred_value)
    return other in percent_readings(percent)


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
    return answers_equivalent(answer, gold_answer(gold), policy, deadline)


def _gold_of(example: Mapping[str, Any]) -> str:
    """The gold answer: ``example["gold"]`` (what the data layer extracted and normalised,
    ``jaxrl.data.presets.GOLD_KEY``), else ``example["answer"]`` for hand-built examples."""
    for key in ("gold", "answer"):
        if example.get(key) is not None:
            return str(example[key])
    raise KeyError("math rewarder needs the gold answer in example['gold'] (set data.preset / "
                   "data.answer_field so the data layer finds it)")


def math_reward(prompt: str, completion: str, example: Mapping[str, Any]) -> float:
    """Rewarder: 1.0 if ``grade(completion, example['gold'])`` else 0.0 (``prompt`` unused)."""
    return 1.0 if grade(completion, _gold_of(example), DEFAULT_POLICY) else 0.0


def math_reward_strict(prompt: str, completion: str, example: Mapping[str, Any]) -> float:
    """Rewarder for strict (DAPO-style) datasets: as ``math_reward`` but with ``STRICT_POLICY``
    (boxed answers only, no answer-line fallback); 1.0 or 0.0."""
    return 1.0 if grade(completion, _gold_of(example), STRICT_POLICY) else 0.0


math_reward.warm_up = warm_up
math_reward_strict.warm_up = warm_up
