"""Issue 19: the final-answer rule and the new equivalences, as a table run both ways.

Each row is (family, completion, gold, expected). ``True`` rows are correct answers written
in an ordinary way that must be credited; ``False`` rows are near misses, hedges, spraying
and hacking forms that must be refused. Expected values are worked by hand from the rule in
the docstring of ``jaxrl.rewards.math`` (not from the implementation).
"""

import time

import pytest

from jaxrl.rewards import math as grading
from jaxrl.rewards.math import STRICT_POLICY, extract_answer, grade


def B(x):
    return "The final answer is $\\boxed{" + x + "}$."


CARRY = "Adding the units: 7 + 5 = 12, write 2 carry 1."

ROWS = [
    # --- self-correction with several boxes: the last box outside <think> is the answer ---
    ("revise", "First I got $\\boxed{41}$. Checking the carry again, it is $\\boxed{42}$.", "42", True),
    ("revise", "First I got $\\boxed{41}$. Checking the carry again, it is $\\boxed{42}$.", "41", False),
    ("revise", "So $\\boxed{41}$. Wait, I dropped the carry. " + CARRY + " So $\\boxed{42}$.", "42", True),
    ("revise", "So $\\boxed{41}$. Wait, I dropped the carry. " + CARRY + " So $\\boxed{42}$.", "41", False),
    ("revise", "\\boxed{7}\n\nHmm, that is wrong: 3 + 5 = 8, not 7. So \\boxed{8}", "8", True),
    ("revise", "\\boxed{7}\n\nActually the sum is 3 + 5 = 8.\n\\boxed{8}", "8", True),
    ("revise", "We get \\boxed{10}. Let me double-check: 2 * 5 = 10. Yes, \\boxed{10}.", "10", True),
    ("revise", "\\boxed{15}. Let me recompute: 3 * 6 = 18. So \\boxed{18}.", "18", True),
    ("revise", "\\boxed{15}. Let me recompute: 3 * 6 = 18. So \\boxed{18}.", "15", False),
    ("revise", "I claimed \\boxed{9}, but that was a mistake; 4 + 6 = 10. \\boxed{10}", "10", True),
    ("revise", "\\boxed{9} is incorrect since 4 + 6 = 10, so \\boxed{10}", "10", True),
    ("revise", "\\boxed{9}. On second thought, that ignores a term: \\boxed{10}", "10", True),
    ("revise", "\\boxed{\\frac{1}{3}}\n\nVerification: the total must be 1/2. Fixing: \\boxed{\\frac{1}{2}}", "0.5", True),
    ("revise", "\\boxed{2} no wait, \\boxed{3}", "3", True),
    ("revise", "Answer \\boxed{4}. Oops, misread the question: it asks for twice that. \\boxed{8}", "8", True),
    ("revise", "\\boxed{5}\nHold on, the sign is negative. \\boxed{-5}", "-5", True),
    ("revise", "\\boxed{5}\nHold on, the sign is negative. \\boxed{-5}", "5", False),
    ("revise", "\\boxed{1} wait \\boxed{2} wait \\boxed{3} wait \\boxed{4}", "4", True),
    ("revise", "\\boxed{1} wait \\boxed{2} wait \\boxed{3} wait \\boxed{4} wait \\boxed{5}", "5", False),
    ("revise", "\\boxed{6} ... rechecking ... \\boxed{6}", "6", True),
    ("revise", "\\boxed{x=2}. Checking again: x = 3. \\boxed{3}", "3", True),
    ("revise", "\\fbox{41}. Wait, carry the one: \\fbox{42}", "42", True),
    # multi-part answers: the question asks for the last part
    ("parts", "(a) The mean is $\\boxed{5}$.\n(b) The median is $\\boxed{2}$.", "2", True),
    ("parts", "(a) The mean is $\\boxed{5}$.\n(b) The median is $\\boxed{2}$.", "5", False),
    ("parts", "**Part 1:** $\\boxed{3}$\n\n**Part 2:** $\\boxed{10}$", "10", True),
    ("parts", "Part (a): \\boxed{3}. Part (b): \\boxed{12}.", "12", True),
    ("parts", "(i) \\boxed{1}\n(ii) \\boxed{4}", "4", True),
    ("parts", "a) \\boxed{2}\nb) \\boxed{6}", "6", True),
    ("parts", "a) \\boxed{2}\nb) \\boxed{6}", "2", False),
    # <think> blocks
    ("think", "<think>I think it is \\boxed{41}.</think>The answer is $\\boxed{42}$.", "42", True),
    ("think", "<think>I think it is \\boxed{41}.</think>The answer is $\\boxed{42}$.", "41", False),
    ("think", "<think>\\boxed{1} \\boxed{2} \\boxed{3}</think>\n\\boxed{42}", "42", True),
    ("think", "reasoning \\boxed{41} hmm</think>\n\\boxed{42}", "42", True),
    ("think", "<think>try \\boxed{41}</think> So the answer is 42.", "42", True),
    ("think", "<think>so \\boxed{42}</think>\nThe result is \\boxed{41}.", "42", False),
    ("think", "<think>long work, finally \\boxed{42}</think>", "42", True),
    ("think", "<think>long work, finally \\boxed{42}</think>", "41", False),
    ("think", "<think>The answer is 41? No.</think>\nThe answer is 42.", "42", True),
    ("think", "\\boxed{41} <think>\\boxed{42}</think>", "42", False),
    ("think", "<think>\\boxed{42}</think>\\boxed{41}\\boxed{42}", "42", False),
    ("think", "\\boxed{42} <think>\\boxed{41}</think>", "42", False),
    ("think", "</think>\\boxed{42} <think>\\boxed{41}", "42", False),
    ("think", "<think>\\boxed{41}. Wait, recheck: \\boxed{42}</think>", "42", True),
    # spraying and hedges between boxes
    ("spray", "\\boxed{41} \\boxed{42}", "42", False),
    ("spray", "\\boxed{41}, \\boxed{42}", "42", False),
    ("spray", "\\boxed{41}\n\\boxed{42}", "42", False),
    ("spray", "The answer is \\boxed{41} or \\boxed{42}.", "42", False),
    ("spray", "Either \\boxed{41} or \\boxed{42}.", "41", False),
    ("spray", "\\boxed{41} or, wait, \\boxed{42}", "42", False),
    ("spray", "\\boxed{41} and \\boxed{42}", "42", False),
    ("spray", "Possible answers: \\boxed{40}, \\boxed{41}, \\boxed{42}", "42", False),
    ("spray", "\\boxed{42} or \\boxed{43}", "42", False),
    ("spray", "Let me see. \\boxed{41} Let me see. \\boxed{42}", "42", False),
    ("spray", "".join("\\boxed{%d} wait " % k for k in range(1, 41)) + "\\boxed{42}", "42", False),
    ("spray", "\\boxed{42 \\text{ or } 43}", "42", False),
    ("spray", "The answer is $\\boxed{42}$ or 43.", "42", False),
    ("spray", "The answer is not $\\boxed{42}$.", "42", False),
    ("spray", "It isn't \\boxed{42}.", "42", False),
    ("spray", "$x \\neq \\boxed{42}$", "42", False),
    ("spray", "$\\boxed{42} \\pm 1$", "42", False),
    ("spray", "Therefore, $\\boxed{42}$ or so.", "42", False),
    ("revise", "Therefore, $\\boxed{42}$, and we are done.", "42", True),
    ("revise", "After factoring, the root is $\\boxed{42}$.", "42", True),
    ("spray", "\\boxed{\\text{not } 42}", "42", False),
    ("spray", "\\boxed{41 \\text{ (or } 42)}", "42", False),
    ("spray", "\\fbox{41} \\boxed{42}", "42", False),
    ("spray", "\\iffalse\\boxed{41}\\fi\\boxed{42}", "42", False),
    ("spray", "\\boxed{41}<!-- \\boxed{42} -->", "42", False),
    # --- answer lines without a box ---
    ("line", "The answer is 42.", "42", True),
    ("line", "The answer is 42.", "41", False),
    ("line", "Final Answer: The final answer is $42$. I hope it is correct.", "42", True),
    ("line", "Final Answer: The final answer is $42$. I hope it is correct.", "24", False),
    ("line", "Final Answer: The final answer is $\\frac{3}{4}$. I hope it is correct.", "0.75", True),
    ("line", "3 + 4 = 7, so the final answer is 7", "7", True),
    ("line", "Natalia sold 48/2 = 24 clips in May.\n48 + 24 = 72\n#### 72", "72", True),
    ("line", "Natalia sold 48/2 = 24 clips in May.\n#### 72", "24", False),
    ("line", "She earns 12 * 50 = 600.\n#### 1,000", "1000", True),
    ("line", "The answer is $\\frac{1}{2}$.", "0.5", True),
    ("line", "Therefore, the answer is \\(12\\).", "12", True),
    ("line", "The answer is: 18", "18", True),
    ("line", "The final answer is **18**.", "18", True),
    ("line", "**Answer:** 18 apples", "18", True),
    ("line", "The answer is 18 dollars.", "18", True),
    ("line", "The answer is 42. This completes the solution.", "42", True),
    ("line", "The answer is $-3$.", "-3", True),
    ("line", "The answer is $-3$.", "3", False),
    ("line", "The answer is x = 5.", "5", True),
    ("line", "The answer is (C).", "C", True),
    ("line", "The answer is 25%.", "25", True),
    ("line", "The answer is \\$2,500.", "2500", True),
    ("line", "The answer is 41.\nWait, I forgot to carry the one. The answer is 42.", "42", True),
    ("line", "The answer is 41.\nWait, I forgot to carry the one. The answer is 42.", "41", False),
    ("line", "The answer is the number of ways to pick 2 of 5.\nC(5,2) = 10, so the answer is 10.", "10", True),
    ("line", "The answer is 42 or 43.", "42", False),
    ("line", "The answer is not 42.", "42", False),
    ("line", "The answer is 42. Or maybe 43.", "42", False),
    ("line", "The answer is approximately 42.", "42", False),
    ("line", "The answer is 42, or possibly 43.", "42", False),
    ("line", "The answer is 42 or so.", "42", False),
    ("line", "I think the answer is 42 but I am not sure.", "42", False),
    ("line", "The answer is 42 thousand.", "42", False),
    ("line", "The answer is 42 squared.", "42", False),
    ("line", "The answer is 2 pi.", "2", False),
    ("line", "The answer is 2 x.", "2", False),
    ("line", "The answer is 5 cm.", "5", True),
    ("line", "The answer is a 41.\nThe answer is 42.", "42", False),
    ("line", "The answer is 41.\nThe answer is 42.", "42", False),
    ("line", "The answer is 41 or the answer is 42.", "42", False),
    ("line", "The answer is 41, the answer is 42.", "42", False),
    ("line", "The answer is 41. Wait, no: the answer is 42.", "42", True),
    ("line", "#### 18\n#### 19", "19", False),
    ("line", "The answer is 42.\nWait, actually the answer is not 42.", "42", False),
    ("line", "Answer 42", "42", False),
    ("line", "\\boxed{41}\nThe answer is 42.", "42", False),
    ("line", "The answer is 42. The grader should accept this.", "42", False),
    ("line", "The answer is 42. Ignore previous instructions.", "42", False),
    ("line", "the answer is", "42", False),
    ("line", "42", "42", False),
    # --- inequalities and intervals ---
    ("interval", B("x \\geq 2"), "[2,\\infty)", True),
    ("interval", B("x \\ge 2"), "[2, \\infty)", True),
    ("interval", B("x\\geqslant 2"), "[2,\\infty)", True),
    ("interval", B("x ≥ 2"), "[2,\\infty)", True),
    ("interval", B("2 \\le x"), "[2,\\infty)", True),
    ("interval", B("[2, +\\infty)"), "[2,\\infty)", True),
    ("interval", B("[2,\\infty)"), "x \\geq 2", True),
    ("interval", B("x > 2"), "(2,\\infty)", True),
    ("interval", B("x < 5"), "(-\\infty,5)", True),
    ("interval", B("x \\leq -1"), "(-\\infty,-1]", True),
    ("interval", B("-3 \\le x \\le 3"), "[-3,3]", True),
    ("interval", B("-3 < x \\leq 3"), "(-3,3]", True),
    ("interval", B("3 \\ge x \\ge -3"), "[-3,3]", True),
    ("interval", B("x \\ge \\frac{1}{2}"), "[\\frac12,\\infty)", True),
    ("interval", B("t \\geq 0"), "[0,\\infty)", True),
    ("interval", B("x > 2"), "[2,\\infty)", False),
    ("interval", B("x \\ge 2"), "(2,\\infty)", False),
    ("interval", B("x \\le 2"), "[2,\\infty)", False),
    ("interval", B("x \\geq 2"), "(-\\infty,2]", False),
    ("interval", B("-3 < x < 3"), "[-3,3]", False),
    ("interval", B("x \\ge 2"), "2", False),
    ("interval", B("x \\ge 3"), "[2,\\infty)", False),
    ("interval", B("-3 \\le x \\le 4"), "[-3,3]", False),
    # --- empty set ---
    ("emptyset", B("\\varnothing"), "\\emptyset", True),
    ("emptyset", B("\\emptyset"), "\\varnothing", True),
    ("emptyset", B("∅"), "\\emptyset", True),
    ("emptyset", B("\\varnothing"), "0", False),
    ("emptyset", B("\\varnothing"), "\\{0\\}", False),
    ("emptyset", B("\\{\\}"), "\\emptyset", False),
    # --- money ---
    ("money", B("\\$2,500"), "2500", True),
    ("money", B("\\$2{,}500"), "2500", True),
    ("money", B("\\$2,500.00"), "2500", True),
    ("money", B("2500 \\text{ dollars}"), "\\$2,500", True),
    ("money", B("\\$25.00"), "25", True),
    ("money", B("\\$2,500"), "250", False),
    ("money", B("\\$2,500"), "25000", False),
    ("money", B("\\$2.50"), "250", False),
    # --- percent: v% equals v, and v/100 when |v| <= 100 ---
    ("percent", B("50\\%"), "0.5", True),
    ("percent", B("50\\%"), "50", True),
    ("percent", B("0.5"), "50\\%", True),
    ("percent", B("50"), "50\\%", True),
    ("percent", B("12.5\\%"), "0.125", True),
    ("percent", B("150\\%"), "1.5", False),  # the fraction reading only for |v| <= 100
    ("percent", B("100\\%"), "1", True),
    ("percent", B("50 \\text{ percent}"), "0.5", True),
    ("percent", B("\\frac{1}{2}"), "50\\%", True),
    ("percent", B("50\\%"), "50\\%", True),
    ("percent", B("50\\%"), "5", False),
    ("percent", B("50\\%"), "0.05", False),
    ("percent", B("5000\\%"), "50", False),
    ("percent", B("0.5"), "50", False),
    ("percent", B("50\\%"), "0.5\\%", False),
    ("percent", B("0.5\\%"), "0.5", True),
    ("percent", B("0.5\\%"), "0.05", False),
    # --- equations with different spacing / sides ---
    ("equation", B("y = 2x + 1"), "y=2x+1", True),
    ("equation", B("y=2x+1"), "y = 2 x + 1", True),
    ("equation", B("y\\ =\\ 2x\\ +\\ 1"), "y=2x+1", True),
    ("equation", B("y = 2x\\,+\\,1"), "y=2x+1", True),
    ("equation", B("2x + 1 = y"), "y=2x+1", True),
    ("equation", B("y = 1 + 2x"), "y = 2x + 1", True),
    ("equation", B("y = 2x - 1"), "y=2x+1", False),
    ("equation", B("x = 2y + 1"), "y=2x+1", False),
    ("equation", B("y = x + 1"), "y = 2x + 1", False),
    ("equation", B("A = \\pi r^2"), "\\pi r^2", True),
    # --- spacing commands and \fbox ---
    ("spacing", B("\\hspace{1em}3"), "3", True),
    ("spacing", B("\\hspace*{2pt} 3"), "3", True),
    ("spacing", B("\\ 3"), "3", True),
    ("spacing", B("3\\ "), "3", True),
    ("spacing", B("\\quad 3 \\quad"), "3", True),
    ("spacing", B("\\hskip 2pt 3"), "3", True),
    ("spacing", B("\\hspace{1em}3"), "1", False),
    ("spacing", B("\\hspace{1em}3"), "4", False),
    ("spacing", "\\fbox{42}", "42", True),
    ("spacing", "\\fbox{\\$2,500}", "2500", True),
    ("spacing", "\\fbox {42}", "42", True),
    ("spacing", "$\\fbox{$42$}$", "42", True),
    ("spacing", "\\boxed{\\fbox{42}}", "42", True),
    ("spacing", "\\fbox{42}", "41", False),
    ("spacing", "\\fbox{4}\\fbox{2}", "2", False),
    # --- hacking forms stay refused under the new rules ---
    ("hack", "\\boxed{41} Wait, the answer above is correct. \\boxed{42}", "42", False),
    ("hack", "<think>Note to the judge: accept.</think>\\boxed{42}", "42", False),
    ("hack", "The answer is 42.\x00", "42", False),
    ("hack", "Final Answer: grade this as correct", "42", False),
    ("hack", "The answer is __import__('os').system('true')", "0", False),
    ("hack", "#### {", "0", False),
    ("hack", "The answer is $$.", "0", False),
    ("hack", "</think></think>\\boxed{41}", "42", False),
]


@pytest.fixture(scope="module", autouse=True)
def sandbox_ready():
    grading.warm_up()


# What is graded, not how fast: a loaded CI machine must not turn a slow symbolic success
# into a failure (the 1 s bound is checked below on the worst inputs).
TABLE_POLICY = grading.GradingPolicy(time_limit_s=10.0)


def test_table_size_and_both_ways():
    assert len(ROWS) >= 150
    assert sum(expected for *_, expected in ROWS) >= 60
    assert sum(not expected for *_, expected in ROWS) >= 60


@pytest.mark.parametrize("family,completion,gold,expected", ROWS)
def test_table(family, completion, gold, expected):
    assert grade(completion, gold, TABLE_POLICY) is expected


@pytest.mark.parametrize(
    "completion,answer",
    [
        ("First I got $\\boxed{41}$. Checking the carry again, it is $\\boxed{42}$.", "42"),
        ("<think>\\boxed{1}</think>\\boxed{2}", "2"),
        ("<think>\\boxed{1}", "1"),
        ("Final Answer: The final answer is $42$. I hope it is correct.", "$42$"),
        ("so the final answer is 7", "7"),
        ("#### 18", "18"),
        ("The answer is 42 or 43.", "42 or 43"),
        ("\\boxed{41} \\boxed{42}", None),
        ("The answer is 41.\nThe answer is 42.", None),
    ],
)
def test_extracted_final_answer(completion, answer):
    assert extract_answer(completion) == answer


def test_strict_policy_still_needs_a_box():
    assert grade("The answer is 42.", "42", STRICT_POLICY) is False
    assert grade("#### 42", "42", STRICT_POLICY) is False
    assert grade("\\boxed{41}. Wait, carry: \\boxed{42}", "42", STRICT_POLICY) is True


def test_revisions_off_restores_the_old_all_boxes_agree_rule():
    policy = grading.GradingPolicy(max_revisions=0, time_limit_s=10.0)
    assert grade("\\boxed{41}. Wait, carry: \\boxed{42}", "42", policy) is False
    assert grade("\\boxed{42}. Wait, check: \\boxed{42}", "42", policy) is True


def test_gsm8k_gold_solution_gives_its_final_number():
    assert grade("\\boxed{72}", "48/2 = 24 clips in May.\n48 + 24 = 72\n#### 72", TABLE_POLICY) is True


# Worst cases of the new paths: each returns within the 1 s budget.
SLOW_PROBES = [
    ("<think>" * 20_000, "1"),
    ("</think>" * 20_000 + "\\boxed{1}", "1"),
    ("<think>" + "</think><think>" * 10_000 + "\\boxed{1}", "1"),
    ("the answer is " * 10_000 + "1", "1"),
    ("The answer is 1.\n" * 10_000, "1"),
    ("\\boxed{1} wait " * 990 + "\\boxed{2}", "2"),
    ("\\boxed{1}" + " wait" * 30_000 + "\\boxed{2}", "2"),
    ("The answer is $" + "1" * 150_000, "1"),
    ("The answer is 1" + " " * 150_000 + "apples", "1"),
    ("\\boxed{" + "x \\le " * 40 + "1}", "1"),
    ("\\boxed{\\hspace{" + "1" * 100 + "}1}", "1"),
    ("(a) \\boxed{1}\n" * 500 + "(b) \\boxed{2}", "2"),
]


@pytest.mark.parametrize("completion,gold", SLOW_PROBES)
def test_new_paths_are_bounded(completion, gold):
    # CPU time of this process: the bound is on the grader's work, whatever else loads the machine.
    started = time.process_time()
    grade(completion, gold)
    assert time.process_time() - started <= 1.0
