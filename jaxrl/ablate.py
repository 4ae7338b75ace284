"""Same-budget ablation of the forking-token mask.

    jaxrl ablate --config configs/default.py --arms full,top20,bottom80 --seeds 3

Each arm trains the config's policy from the same checkpoint with the same steps, prompts
and samples per step; only ``rl.loss.token_mask`` / ``rl.loss.entropy_rho`` differ:

* ``full``: every response token gets its policy-gradient term (``token_mask="all"``);
* ``topNN``: only the top NN% highest-entropy ("forking") tokens (``token_mask="top"``,
  ρ = NN/100), the paper's method;
* ``bottomNN``: only the NN% lowest-entropy tokens, i.e. the complement of ``top(100-NN)``
  (``token_mask="bottom"``, ρ = 1 − NN/100).

Before training and after it, every run is evaluated on one fixed held-out set (written
once to OUT/heldout.jsonl from the ``heldout`` split, seed 0, ``eval.max_examples``
problems), so seeds and arms are compared on the same problems: greedy accuracy, pass@k
(k = ``eval.num_samples`` at ``eval.temperature``) and mean greedy response length.
Prints a per-run table and a mean ± std table per arm; writes OUT/ablation.json and
OUT/ablation.png. Anything after the known flags is a config override
(``--config.train.num_steps=40``), applied to every arm.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from typing import Any, Sequence

import jax
import matplotlib
import numpy as np

from jaxrl.config import load_config
from jaxrl.data import synthetic
from jaxrl.eval.evaluate import load_eval_records
from jaxrl.eval.report import heldout_metrics, initial_policy
from jaxrl.train.loop import train

matplotlib.use("Agg")  # before pyplot: plots are written to files, never shown
import matplotlib.pyplot as plt  # noqa: E402

DEFAULT_ARMS = "full,top20,bottom80"
_ARM_RE = re.compile(r"^(full|top|bottom)(\d{1,3})?$")


def arm_mask(arm: str) -> tuple[str, float]:
    """(token_mask, entropy_rho) of an arm name: full | topNN | bottomNN (NN in 1..99)."""
    match = _ARM_RE.match(arm)
    if not match or (match.group(1) == "full") != (match.group(2) is None):
        raise ValueError(f"unknown arm {arm!r}; expected full, topNN or bottomNN (e.g. top20, bottom80)")
    kind, percent = match.group(1), match.group(2)
    if kind == "full":
        return "all", 1.0
    percent = int(percent)
    if not 1 <= percent <= 99:
        raise ValueError(f"arm {arm!r}: the percentage must be in 1..99")
    return ("top", percent / 100) if kind == "top" else ("bottom", (100 - percent) / 100)


def write_fixed_heldout(cfg, path: str) -> str:
    """Writes the eval problems every arm and seed is measured on: the first
    ``eval.max_examples`` *distinct* problems of the heldout split's seed-0 stream (small
    difficulties repeat problems often, and a repeated problem would count twice)."""
    rows = synthetic.generate_problems(cfg.eval.max_examples, 0, "heldout", cfg.data.synthetic_difficulty,
                                       distinct=True)
    synthetic.write_jsonl(path, rows)
    return path


def run_arm(config_path: str, overrides: Sequence[str], arm: str, seed: int, out_dir: str, heldout_path: str,
            before_cache: dict) -> dict[str, Any]:
    """Trains one (arm, seed) from scratch in OUT/<arm>-seed<seed>; returns its measurements."""
    cfg = load_config(config_path, list(overrides))
    token_mask, rho = arm_mask(arm)
    cfg.rl.loss.token_mask = token_mask
    cfg.rl.loss.entropy_rho = rho
    cfg.run.seed = seed
    cfg.run.root = out_dir
    cfg.run.name = f"{arm}-seed{seed}"
    cfg.eval.files = (heldout_path,)
    cfg.checkpoint.resume = "off"
    run_dir = os.path.join(out_dir, cfg.run.name)
    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)  # a previous ablation's run of this arm; results are rewritten

    params_before, model_cfg, tokenizer = initial_policy(cfg)
    records = load_eval_records(cfg, tokenizer)
    if seed not in before_cache:
        before_cache[seed] = heldout_metrics(params_before, model_cfg, tokenizer, cfg, seed=seed, records=records)
    started = time.monotonic()
    result = train(cfg)
    train_seconds = time.monotonic() - started
    if result.stop_reason != "completed":
        raise SystemExit(f"ablation stopped: run {cfg.run.name} ended with {result.stop_reason!r}")
    after = heldout_metrics(result.state.params, model_cfg, tokenizer, cfg, seed=seed, records=records)
    rewards = [m.get("reward/mean") for m in result.metrics if isinstance(m.get("reward/mean"), (int, float))]
    return {
        "arm": arm, "seed": seed, "token_mask": token_mask, "entropy_rho": rho,
        "steps": int(result.state.step), "train_seconds": train_seconds, "run_dir": result.run_dir,
        "before": before_cache[seed], "after": after, "train_reward_curve": rewards,
    }


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = np.asarray(values, float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def summarize(results: list[dict], arms: Sequence[str]) -> list[dict]:
    """Per arm: mean and sample std over seeds of before/after/gain metrics."""
    rows = []
    for arm in arms:
        runs = [r for r in results if r["arm"] == arm]
        row = {"arm": arm, "seeds": len(runs)}
        for name, values in (
            ("greedy_before", [r["before"]["greedy_accuracy"] for r in runs]),
            ("greedy_after", [r["after"]["greedy_accuracy"] for r in runs]),
            ("greedy_gain", [r["after"]["greedy_accuracy"] - r["before"]["greedy_accuracy"] for r in runs]),
            ("pass_after", [r["after"]["pass_at_k"] for r in runs]),
            ("length_after", [r["after"]["mean_response_length"] for r in runs]),
            ("train_seconds", [r["train_seconds"] for r in runs]),
        ):
            row[name] = _mean_std(values)
        rows.append(row)
    return rows


def format_summary(rows: list[dict], k: int) -> str:
    """Markdown table: mean ± std over seeds per arm."""
    def cell(pair, digits=3):
        return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"

    lines = [
        f"| arm | seeds | greedy acc before | greedy acc after | gain (points) | pass@{k} after | mean length after | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        gain = (100 * row["greedy_gain"][0], 100 * row["greedy_gain"][1])
        lines.append(
            f"| {row['arm']} | {row['seeds']} | {cell(row['greedy_before'])} | {cell(row['greedy_after'])} | "
            f"{gain[0]:+.1f} ± {gain[1]:.1f} | {cell(row['pass_after'])} | {cell(row['length_after'], 1)} | "
            f"{row['train_seconds'][0]:.0f} |"
        )
    return "\n".join(lines)


def plot_ablation(results: list[dict], rows: list[dict], path: str, k: int) -> str:
    """Bars (mean ± std, seeds as dots) of held-out greedy accuracy and pass@k, and the
    seed-averaged training reward per arm."""
    arms = [row["arm"] for row in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, metric, title in ((axes[0], "greedy_accuracy", "held-out greedy accuracy"),
                              (axes[1], "pass_at_k", f"held-out pass@{k}")):
        before = np.mean([r["before"][metric] for r in results])
        x = np.arange(len(arms))
        means = [np.mean([r["after"][metric] for r in results if r["arm"] == a]) for a in arms]
        stds = [np.std([r["after"][metric] for r in results if r["arm"] == a], ddof=1)
                if sum(r["arm"] == a for r in results) > 1 else 0.0 for a in arms]
        ax.bar(x, means, yerr=stds, capsize=5, color="tab:blue", alpha=0.6, label="after (mean ± std)")
        for i, arm in enumerate(arms):
            values = [r["after"][metric] for r in results if r["arm"] == arm]
            ax.scatter(np.full(len(values), i), values, color="black", s=12, zorder=3)
        ax.axhline(before, color="tab:red", linestyle="--", label="before training")
        ax.set_xticks(x, arms)
        ax.set_ylim(0, 1)
        ax.set_title(title)
        ax.legend(fontsize=7)
    for arm in arms:
        curves = [r["train_reward_curve"] for r in results if r["arm"] == arm and r["train_reward_curve"]]
        if curves:
            length = min(len(c) for c in curves)
            axes[2].plot(np.arange(1, length + 1), np.mean([c[:length] for c in curves], axis=0), label=arm)
    axes[2].set_xlabel("RL step")
    axes[2].set_title("training reward (mean over seeds)")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _enable_compilation_cache(path: str) -> None:
    """Arms and seeds compile the same update functions; reuse them across runs."""
    if not getattr(jax.config, "jax_compilation_cache_dir", None):
        path = os.path.abspath(path)
        os.makedirs(path, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", path)


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="jaxrl ablate", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/default.py")
    parser.add_argument("--arms", default=DEFAULT_ARMS, help="comma-separated: full, topNN, bottomNN")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per arm")
    parser.add_argument("--out", default="runs/ablate", help="output directory")
    return parser.parse_known_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """Runs every arm × seed, prints the tables, writes OUT/ablation.json and OUT/ablation.png."""
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    for arm in arms:
        arm_mask(arm)
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    base = load_config(args.config, list(overrides))
    os.makedirs(args.out, exist_ok=True)
    _enable_compilation_cache(os.path.join(args.out, ".jax_cache"))
    heldout_path = write_fixed_heldout(base, os.path.join(args.out, "heldout.jsonl"))
    results, before_cache = [], {}
    for seed in range(args.seeds):
        for arm in arms:
            print(f"[ablate] arm {arm} seed {seed} ...", flush=True)
            run = run_arm(args.config, overrides, arm, seed, args.out, heldout_path, before_cache)
            results.append(run)
            print(f"[ablate] arm {arm} seed {seed}: greedy {run['before']['greedy_accuracy']:.3f} -> "
                  f"{run['after']['greedy_accuracy']:.3f}, pass@{run['after']['k']} {run['after']['pass_at_k']:.3f}, "
                  f"{run['train_seconds']:.0f}s", flush=True)
    k = results[0]["after"]["k"]
    rows = summarize(results, arms)
    table = format_summary(rows, k)
    print(table)
    summary = {"config": args.config, "overrides": list(overrides), "arms": arms, "seeds": args.seeds,
               "table": table, "per_arm": rows, "runs": results}
    with open(os.path.join(args.out, "ablation.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    print(f"wrote {plot_ablation(results, rows, os.path.join(args.out, 'ablation.png'), k)} and "
          f"{os.path.join(args.out, 'ablation.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
