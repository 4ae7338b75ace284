"""The held-out before/after report: the starting checkpoint and the trained params evaluated
on every held-out set (``wiring.eval_sets``) with the same sampling key (printed at the end of
``jaxrl train``). The starting checkpoint is loaded on the training mesh in ``model.dtype`` /
``model.param_dtype``; every process of a multi-host job must call ``heldout_before_after``.
With no held-out set the report is skipped with one line."""

from __future__ import annotations

import jax
import numpy as np

from jaxrl import wiring
from jaxrl.eval.evaluate import evaluate_records, load_eval_records
from jaxrl.models import model_params

SKIPPED = "held-out report skipped: no held-out set (set eval.files or eval.sets)"


def heldout_metrics(params, model_cfg, tokenizer, cfg, *, seed: int, records=None, mesh=None) -> dict[str, float]:
    """Greedy accuracy, pass@k, avg@k, maj@k and mean greedy response length (tokens of the
    decoded greedy completion, no <eos>) on ``records`` (default: the first held-out set)."""
    if records is None:
        records = load_eval_records(cfg, tokenizer)
    report = evaluate_records(params, model_cfg, tokenizer, records, cfg, key=jax.random.PRNGKey(10_000 + seed),
                              mesh=mesh)
    lengths = [len(tokenizer(p["greedy_completion"], add_special_tokens=False)["input_ids"]) for p in report["problems"]]
    summary = report["summary"]
    return {
        "greedy_accuracy": summary["greedy_accuracy"],
        "pass_at_k": summary["pass_at_k"],
        "avg_at_k": summary["avg_at_k"],
        "maj_at_k": summary["maj_at_k"],
        "k": summary["k"],
        "mean_response_length": float(np.mean(lengths)),
        "num_problems": summary["num_problems"],
    }


def initial_policy(cfg, mesh=None):
    """(params, model_cfg, tokenizer) of the config's starting checkpoint, on ``mesh``."""
    policy = wiring.load_policy(cfg, mesh)
    return model_params(policy.model), policy.model_cfg, policy.tokenizer


def format_before_after(before: dict, after: dict) -> str:
    """A table of held-out metrics before and after training, two rows per set.

    ``before`` / ``after``: {set name: ``heldout_metrics``} (a bare metrics dict is one set)."""
    if "k" in before:
        before, after = {"held-out": before}, {"held-out": after}
    lines = []
    for name in before:
        k = before[name]["k"]
        lines.append(f"{name} ({before[name]['num_problems']} problems) | greedy acc | pass@{k} | maj@{k} | "
                     f"mean response length")
        for label, metrics in (("before training", before[name]), ("after training", after[name])):
            lines.append(f"{label:<24} | {metrics['greedy_accuracy']:10.3f} | {metrics['pass_at_k']:6.3f} | "
                         f"{metrics['maj_at_k']:5.3f} | {metrics['mean_response_length']:8.1f}")
    return "\n".join(lines)


def heldout_before_after(cfg, params_after, *, seed: int | None = None, mesh=None) -> tuple[dict, dict, str]:
    """Evaluates the config's starting checkpoint and ``params_after`` on every held-out set
    with the same sampling key; returns ({set: before}, {set: after}, table text), or
    ({}, {}, ``SKIPPED``) when there is no held-out set."""
    sets = wiring.eval_sets(cfg)
    if not sets:
        return {}, {}, SKIPPED
    seed = cfg.run.seed if seed is None else seed
    params_before, model_cfg, tokenizer = initial_policy(cfg, mesh)
    before, after = {}, {}
    for eval_set in sets:
        records = load_eval_records(cfg, tokenizer, eval_set)
        before[eval_set.name] = heldout_metrics(params_before, model_cfg, tokenizer, cfg, seed=seed,
                                                records=records, mesh=mesh)
        after[eval_set.name] = heldout_metrics(params_after, model_cfg, tokenizer, cfg, seed=seed,
                                               records=records, mesh=mesh)
    return before, after, format_before_after(before, after)
