"""Issue 18: what a hanging rewarder costs per batch, inline vs. worker processes.

Each row is one batch of ``--rows`` rows whose rewarder hangs on every row (sleeping, or
spinning on the CPU), ``--timeout`` s per call. Also: the worker pool's start-up (until the
dispatcher and its workers are ready) and a 512-row batch of a cheap rewarder (overhead of
shipping a batch to the workers and back).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_reward_hangs.py
"""

from __future__ import annotations

import argparse
import time

from jaxrl.rewards.base import RewardExecutor
from tests.test_rewards_base import hanging_reward, length_reward, sleeping_reward


def seconds(executor: RewardExecutor, rows: int, completion: str) -> float:
    """Wall-clock seconds of one ``score`` call on ``rows`` identical rows."""
    started = time.monotonic()
    executor.score(["p"] * rows, [completion] * rows, [{}] * rows)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=1.0)
    args = parser.parse_args()
    print("| mode | hang | start-up s | hung batch s | timeouts | 512 cheap rows s |")
    print("|---|---|---:|---:|---:|---:|")
    for workers in (0, 2, 4):
        for name, rewarder in (("sleep", sleeping_reward), ("spin", hanging_reward)):
            started = time.monotonic()
            with RewardExecutor({"r": (rewarder, 1.0), "len": (length_reward, 0.0)}, num_workers=workers,
                                timeout_s=args.timeout, say=lambda text: None) as executor:
                executor.score(["p"], ["x"], [{}])
                start_up = time.monotonic() - started
                hung = seconds(executor, args.rows, "hang")
                cheap = seconds(executor, 512, "x")
            mode = "inline" if workers == 0 else f"{workers} workers"
            print(f"| {mode} | {name} | {start_up:.2f} | {hung:.2f} | {args.rows} | {cheap:.3f} |")


if __name__ == "__main__":
    main()
