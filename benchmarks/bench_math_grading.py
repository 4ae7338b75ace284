"""Worst-case wall time of one math ``grade`` call, over the grading tables and the
pathological probes of the tests (default policy: 1 s symbolic budget).

Usage: python benchmarks/bench_math_grading.py [--repeats 2]
Prints, per group, the number of calls, the agreement with the expected verdicts and the
slowest call in seconds (the maximum over repeats). The sandbox is warmed up first.
"""

from __future__ import annotations

import argparse
import time

from jaxrl.rewards import math as grading
from tests.test_rewards_math import CASES, PATHOLOGICAL
from tests.test_rewards_math_table import ROWS, SLOW_PROBES


def run(rows: list[tuple[str, str, bool | None]], repeats: int) -> tuple[int, int, float]:
    """(calls, verdicts that match the expected one, slowest call in seconds)."""
    agree, slowest = 0, 0.0
    for completion, gold, expected in rows:
        for _ in range(repeats):
            started = time.monotonic()
            verdict = grading.grade(completion, gold)
            slowest = max(slowest, time.monotonic() - started)
        agree += expected is None or verdict is expected
    return len(rows), agree, slowest


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    grading.warm_up()
    groups = {
        "old table (test_rewards_math.CASES)": [(c, g, e) for _, c, g, e in CASES],
        "issue-19 table (test_rewards_math_table.ROWS)": [(c, g, e) for _, c, g, e in ROWS],
        "old pathological probes": [(c, g, False) for c, g in PATHOLOGICAL],
        "issue-19 probes (verdict not checked)": [(c, g, None) for c, g in SLOW_PROBES],
    }
    print("| group | calls | agree | slowest s |\n|---|---:|---:|---:|")
    for name, rows in groups.items():
        calls, agree, slowest = run(rows, args.repeats)
        print(f"| {name} | {calls} | {agree} | {slowest:.3f} |")


if __name__ == "__main__":
    main()
