"""Evaluation: greedy accuracy, avg@k, pass@k (unbiased estimator) and maj@k on held-out sets.

For each problem the policy is sampled once greedily and k times at the eval temperature /
top-p; a sample is correct when the task's correctness reward is >= the threshold.

* greedy_accuracy: mean over problems of the greedy sample's correctness.
* avg@k: mean over problems of c/k (c correct among k samples).
* pass@j (j = 1, 2, 4, ..., k): mean over problems of 1 − C(k−c, j) / C(k, j).
* maj@k: mean over problems of the correctness of the majority final answer among the k
  samples (``final_answer``: the task's extracted answer, normalised; samples without one do
  not vote; ties go to the answer seen first; no answer at all counts as wrong).

``evaluate_sets`` runs every held-out set of ``wiring.eval_sets`` (each read with its own
preset) on the mesh the params live on; every process of a multi-host job must call it.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from jaxrl import wiring
from jaxrl.data.batching import left_pad_prompts
from jaxrl.data.sources import load_prompt_records, resolve_files
from jaxrl.data.stops import cut_at_stop_strings
from jaxrl.data.tokenizer import decode_completion
from jaxrl.rewards.base import RewardExecutor
from jaxrl.rewards.math import extract_answer, normalize_answer
from jaxrl.rewards.tasks import parse_countdown
from jaxrl.sharding.transfer import host_array


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for n samples with c correct: 1 − C(n−c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # Product form avoids huge binomials: C(n−c,k)/C(n,k) = Π_{i=n−c+1}^{n} (1 − k/i).
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_k_values(k: int) -> list[int]:
    """1, 2, 4, ... up to k, and k itself."""
    values = [1 << i for i in range(int(math.log2(k)) + 1)]
    return sorted(set(values + [k]))


def final_answer(task: str, completion: str) -> str | None:
    """The answer a completion votes for in maj@k: the boxed / answer-line answer (normalised)
    for math tasks, the stated answer for countdown, else the stripped text; None = no vote."""
    if task.startswith("math"):
        answer = extract_answer(completion)
        return None if answer is None else normalize_answer(answer)
    if task.startswith("countdown"):
        parsed = parse_countdown(completion)
        return None if parsed is None else str(parsed.answer)
    return completion.strip() or None


def majority_correct(answers: Sequence[str | None], correct: Sequence[bool]) -> bool:
    """Whether the most common non-None answer is correct (ties: the first seen; a sample with
    that answer decides); False when no sample has an answer."""
    counts: dict[str, int] = {}
    for answer in answers:
        if answer is not None:
            counts[answer] = counts.get(answer, 0) + 1
    if not counts:
        return False
    best = max(counts, key=counts.__getitem__)  # dicts keep insertion order: ties -> first seen
    return bool(correct[list(answers).index(best)])


def load_eval_records(cfg: ml_collections.ConfigDict, tokenizer, eval_set: "wiring.EvalSet | None" = None
                      ) -> list[dict]:
    """The first ``eval.max_examples`` prompt records of ``eval_set`` (default: the first of
    ``wiring.eval_sets``), read with its preset, validated and tokenised."""
    if eval_set is None:
        sets = wiring.eval_sets(cfg)
        if not sets:
            raise ValueError("no held-out set: set eval.files or eval.sets")
        eval_set = sets[0]
    records, _ = load_prompt_records(resolve_files(list(eval_set.files)), tokenizer,
                                     **wiring.prompt_options(cfg, eval_set.preset))
    if not records:
        raise ValueError(f"held-out set {eval_set.name!r} has no usable prompts ({list(eval_set.files)})")
    return records[: cfg.eval.max_examples]


def _generate(params, model_cfg, tokenizer, records, n: int, cfg, key, mesh, temperature: float, top_p: float):
    """Completions (token lists, lengths) [len(records) * n] in record order, decoded
    ``eval.batch_prompts`` prompts at a time and cut at ``sampling.stop_strings`` as in training."""
    backend = wiring.rollout_backend(cfg, model_cfg, mesh, max_rows_per_call=cfg.eval.batch_prompts * n,
                                     compute_entropy=False)
    tokens, lengths = left_pad_prompts(records, cfg.data.max_prompt_tokens, backend.pad_id)
    rollout = backend.wait(backend.generate(params, tokens, lengths, n, key, temperature=temperature, top_p=top_p))
    out_tokens, out_lengths = host_array(rollout.tokens), host_array(rollout.lengths)
    out_lengths, _ = cut_at_stop_strings(out_tokens, out_lengths, host_array(rollout.finish_reason), tokenizer,
                                         cfg.sampling.stop_strings)
    return [(out_tokens[row, : out_lengths[row]].tolist(), int(out_lengths[row])) for row in range(len(out_lengths))]


def evaluate_records(params, model_cfg, tokenizer, records: Sequence[dict], cfg: ml_collections.ConfigDict, *,
                     key: jax.Array, rewards: RewardExecutor | None = None, mesh=None) -> dict[str, Any]:
    """Greedy accuracy, avg@k, pass@j of ``params`` on ``records`` → JSON-ready report.

    rewards: a RewardExecutor (default: one built from ``cfg.rewards``); its "correct"
    component decides correctness. mesh: where the rollouts run (None = default device).
    Report: {"summary": {...}, "problems": [...]}.
    """
    own_executor = rewards is None
    if own_executor:
        rewards = wiring.reward_executor(cfg)
    k = cfg.eval.num_samples
    greedy_key, sample_key = jax.random.split(key)
    try:
        greedy = _generate(params, model_cfg, tokenizer, records, 1, cfg, greedy_key, mesh, 0.0, 1.0)
        sampled = _generate(params, model_cfg, tokenizer, records, k, cfg, sample_key, mesh, cfg.eval.temperature,
                            cfg.eval.top_p)

        def correctness(outputs, per_problem):
            rows = [records[i // per_problem] for i in range(len(outputs))]
            texts = [decode_completion(tokenizer, ids) for ids, _ in outputs]
            examples = [{**r["example"], "completion_tokens": length} for r, (_, length) in zip(rows, outputs)]
            _, components, _ = rewards.score([r["prompt_text"] for r in rows], texts, examples)
            correct = components[wiring.CORRECT_COMPONENT] >= cfg.rewards.correct_threshold
            return correct.reshape(len(records), per_problem), texts

        greedy_correct, greedy_texts = correctness(greedy, 1)
        sampled_correct, sampled_texts = correctness(sampled, k)
    finally:
        if own_executor:
            rewards.close()
    counts = sampled_correct.sum(axis=1)
    summary: dict[str, Any] = {
        "num_problems": len(records),
        "k": k,
        "greedy_accuracy": float(greedy_correct.mean()),
        "avg_at_k": float(sampled_correct.mean()),
        "temperature": cfg.eval.temperature,
        "top_p": cfg.eval.top_p,
    }
    for j in pass_k_values(k):
        summary[f"pass_at_{j}"] = float(np.mean([pass_at_k(k, int(c), j) for c in counts]))
    summary["pass_at_k"] = summary[f"pass_at_{k}"]
    answers = [final_answer(cfg.rewards.task, text) for text in sampled_texts]
    summary["maj_at_k"] = float(np.mean([majority_correct(answers[i * k:(i + 1) * k], sampled_correct[i])
                                         for i in range(len(records))]))
    problems = [
        {"prompt": r["prompt_text"], "answer": r["answer"], "greedy_correct": bool(g[0]),
         "greedy_completion": text, "num_correct": int(c)}
        for r, g, text, c in zip(records, greedy_correct, greedy_texts, counts)
    ]
    return {"summary": summary, "problems": problems}


def evaluate_sets(params, model_cfg, tokenizer, cfg: ml_collections.ConfigDict, *, key: jax.Array,
                  rewards: RewardExecutor | None = None, mesh=None) -> dict[str, dict[str, Any]]:
    """``evaluate_records`` on every held-out set of ``wiring.eval_sets(cfg)`` with the same key →
    {set name: report}; {} when there is none."""
    return {eval_set.name: evaluate_records(params, model_cfg, tokenizer, load_eval_records(cfg, tokenizer, eval_set),
                                            cfg, key=key, rewards=rewards, mesh=mesh)
            for eval_set in wiring.eval_sets(cfg)}
