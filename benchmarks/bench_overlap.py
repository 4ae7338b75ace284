"""Overlapped (one-step off-policy) RL vs on-policy RL on the embedded default.

Usage: python benchmarks/bench_overlap.py [--config configs/default.py] [--seeds 3]
           [--out runs/bench_overlap] [--modes 0,1] [--config.KEY=VALUE ...]

For each seed, trains ``configs/default.py`` from scratch twice, with
``rl.rollout_staleness=0`` and ``=1`` (the order alternates between seeds so that machine
drift does not favour one mode), each measured before and after on the same fixed held-out
set as ``jaxrl ablate`` (greedy accuracy, pass@k). Speed: steps per second over steps 2..N
(``time/step`` from metrics.jsonl, so the first step's compilation is left out) and over the
whole ``train`` call. Prints one row per run and a mean ± std summary per mode, with the
staleness-1 / staleness-0 ratio of steps per second; writes OUT/overlap.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import numpy as np

from jaxrl.ablate import _enable_compilation_cache, run_arm, write_fixed_heldout
from jaxrl.config import load_config

ARM = "top20"  # configs/default.py's own token mask: ablate's arm names carry the mask


def steps_per_second(run_dir: str) -> float:
    """Steps per second over steps 2..N of a run (its metrics.jsonl ``time/step``)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        times = [json.loads(line)["time/step"] for line in handle]
    return (len(times) - 1) / sum(times[1:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/default.py")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="runs/bench_overlap")
    parser.add_argument("--modes", default="0,1", help="rl.rollout_staleness values to run (comma-separated)")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    overrides = ["--config.eval.every_steps=0", "--config.logging.progress_bar=False", *overrides]
    os.makedirs(args.out, exist_ok=True)
    _enable_compilation_cache(os.path.join(args.out, ".jax_cache"))
    heldout = write_fixed_heldout(load_config(args.config, overrides), os.path.join(args.out, "heldout.jsonl"))
    modes = [int(m) for m in args.modes.split(",")]
    runs, before = [], {}
    for seed in range(args.seeds):
        for staleness in (modes if seed % 2 == 0 else modes[::-1]):
            out = os.path.join(args.out, f"staleness{staleness}")
            run = run_arm(args.config, [*overrides, f"--config.rl.rollout_staleness={staleness}"], ARM, seed, out,
                          heldout, before)
            row = {"staleness": staleness, "seed": seed, "steps": run["steps"],
                   "train_seconds": run["train_seconds"], "steps_per_s": steps_per_second(run["run_dir"]),
                   "greedy_before": run["before"]["greedy_accuracy"], "greedy_after": run["after"]["greedy_accuracy"],
                   "pass_after": run["after"]["pass_at_k"]}
            row["gain_points"] = 100 * (row["greedy_after"] - row["greedy_before"])
            runs.append(row)
            print(f"staleness {staleness} seed {seed}: {row['steps_per_s']:.3f} steps/s (steps 2..N), "
                  f"{row['train_seconds']:.1f} s in train, greedy {row['greedy_before']:.3f} -> "
                  f"{row['greedy_after']:.3f}", flush=True)
    print("\n| staleness | seeds | steps/s (2..N) | train s | greedy after | gain (points) | pass@k after |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    summary = {}
    for staleness in modes:
        mine = [r for r in runs if r["staleness"] == staleness]
        stats = {key: (float(np.mean([r[key] for r in mine])),
                       float(np.std([r[key] for r in mine], ddof=1)) if len(mine) > 1 else 0.0)
                 for key in ("steps_per_s", "train_seconds", "greedy_after", "gain_points", "pass_after")}
        summary[staleness] = stats
        cells = " | ".join(f"{m:.3f} ± {s:.3f}" if key != "gain_points" else f"{m:+.1f} ± {s:.1f}"
                           for key, (m, s) in stats.items())
        print(f"| {staleness} | {len(mine)} | {cells} |")
    ratios = [r1["steps_per_s"] / r0["steps_per_s"] for r0, r1 in
              zip(*[[r for r in runs if r["staleness"] == s] for s in (0, 1)])]
    if ratios:
        print(f"\nsteps/s ratio staleness 1 / 0 per seed: {', '.join(f'{x:.3f}' for x in ratios)}; "
              f"median {statistics.median(ratios):.3f}")
    with open(os.path.join(args.out, "overlap.json"), "w") as handle:
        json.dump({"runs": runs, "summary": summary, "ratios": ratios, "overrides": overrides}, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
