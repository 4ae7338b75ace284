"""The held-out before/after report: the starting checkpoint and the trained params evaluated
on the same problems with the same sampling key (printed at the end of ``jaxrl train``)."""

from __future__ import annotations

import jax
import numpy as np

from jaxrl import wiring
from jaxrl.eval.evaluate import evaluate_records, load_eval_records
from jaxrl.models import model_params


def heldout_metrics(params, model_cfg, tokenizer, cfg, *, seed: int, records=None, mesh=None) -> dict[str, float]:
    """Greedy accuracy, pass@k, avg@k and mean greedy response length on the eval split.

    The response length counts the tokens of the decoded greedy completion (no <eos>).
    """
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
        "k": summary["k"],
        "mean_response_length": float(np.mean(lengths)),
        "num_problems": summary["num_problems"],
    }


def initial_policy(cfg, mesh=None):
    """(params, model_cfg, tokenizer) of the config's starting checkpoint, on ``mesh``."""
    policy = wiring.load_policy(cfg, mesh)
    return model_params(policy.model), policy.model_cfg, policy.tokenizer


def format_before_after(before: dict, after: dict) -> str:
    """A two-row table of held-out metrics before and after training."""
    k = before["k"]
    lines = [
        f"held-out ({before['num_problems']} problems) | greedy acc | pass@{k} | mean response length",
        f"before training           | {before['greedy_accuracy']:10.3f} | {before['pass_at_k']:6.3f} | "
        f"{before['mean_response_length']:8.1f}",
        f"after training            | {after['greedy_accuracy']:10.3f} | {after['pass_at_k']:6.3f} | "
        f"{after['mean_response_length']:8.1f}",
    ]
    return "\n".join(lines)


def heldout_before_after(cfg, params_after, *, seed: int | None = None, mesh=None) -> tuple[dict, dict, str]:
    """Evaluates the config's starting checkpoint and ``params_after`` on the same held-out
    problems with the same sampling key; returns (before, after, table text)."""
    seed = cfg.run.seed if seed is None else seed
    params_before, model_cfg, tokenizer = initial_policy(cfg, mesh)
    records = load_eval_records(cfg, tokenizer)
    before = heldout_metrics(params_before, model_cfg, tokenizer, cfg, seed=seed, records=records, mesh=mesh)
    after = heldout_metrics(params_after, model_cfg, tokenizer, cfg, seed=seed, records=records, mesh=mesh)
    return before, after, format_before_after(before, after)
