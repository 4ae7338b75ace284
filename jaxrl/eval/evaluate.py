"""Evaluation: greedy accuracy, avg@k and pass@k (unbiased estimator) on a prompt dataset.

For each problem the policy is sampled once greedily and k times at the eval temperature /
top-p; a sample is correct when the task's correctness reward is >= the threshold.

* greedy_accuracy: mean over problems of the greedy sample's correctness.
* avg@k: mean over problems of c/k (c correct among k samples).
* pass@j (j = 1, 2, 4, ..., k): mean over problems of 1 − C(k−c, j) / C(k, j).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np


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


def load_eval_records(cfg: ml_collections.ConfigDict, tokenizer) -> list[dict]:
    """The first ``eval.max_examples`` prompt records of the eval split (validated, tokenised)."""
    from jaxrl.data.sources import load_prompt_records, resolve_files
    from jaxrl.train.loop import data_files, prompt_options

    records, _ = load_prompt_records(resolve_files(data_files(cfg, "eval")), tokenizer, **prompt_options(cfg))
    if not records:
        raise ValueError("the eval split has no usable prompts")
    return records[: cfg.eval.max_examples]


def _generate(params, model_cfg, records, n, sampling_cfg, key, pad_id, batch_prompts, temperature, top_p):
    """Completions (token lists) [len(records) * n] in record order, batch by batch."""
    from jaxrl.sampling.engine import generate_from_params
    from jaxrl.sharding.transfer import host_array
    from jaxrl.train.loop import left_pad_prompts

    outputs = []
    for start in range(0, len(records), batch_prompts):
        chunk = records[start : start + batch_prompts]
        real = len(chunk)
        chunk = chunk + [chunk[0]] * (batch_prompts - real)  # static shape: no recompile on the tail
        tokens, lengths = left_pad_prompts(chunk, sampling_cfg.max_prompt_tokens, pad_id)
        rollout = generate_from_params(
            params, model_cfg, tokens, lengths, n, sampling_cfg, jax.random.fold_in(key, start),
            temperature=temperature, top_p=top_p,
        )
        out_tokens, out_lengths = host_array(rollout.tokens), host_array(rollout.lengths)
        for row in range(real * n):
            outputs.append((out_tokens[row, : out_lengths[row]].tolist(), int(out_lengths[row])))
    return outputs


def evaluate_records(params, model_cfg, tokenizer, records: Sequence[dict], cfg: ml_collections.ConfigDict, *,
                     key: jax.Array, rewards=None) -> dict[str, Any]:
    """Greedy accuracy, avg@k, pass@j of ``params`` on ``records`` → JSON-ready report.

    rewards: a RewardExecutor (default: one built from ``cfg.rewards``); its "correct"
    component decides correctness. Report: {"summary": {...}, "problems": [...]}.
    """
    from jaxrl.data.tokenizer import decode_completion
    from jaxrl.rewards.base import RewardExecutor
    from jaxrl.train.loop import CORRECT_COMPONENT, make_rewarders, sampling_config

    own_executor = rewards is None
    if own_executor:
        rewards = RewardExecutor(make_rewarders(cfg), num_workers=cfg.rewards.num_workers,
                                 timeout_s=cfg.rewards.timeout_s, failure_reward=cfg.rewards.failure_reward)
    k = cfg.eval.num_samples
    sampling_cfg = sampling_config(cfg)
    pad_id = sampling_cfg.resolved_pad_id(model_cfg)
    greedy_key, sample_key = jax.random.split(key)
    batch = cfg.eval.batch_prompts
    try:
        greedy = _generate(params, model_cfg, records, 1, sampling_cfg, greedy_key, pad_id, batch, 0.0, 1.0)
        sampled = _generate(params, model_cfg, records, k, sampling_cfg, sample_key, pad_id, batch,
                            cfg.eval.temperature, cfg.eval.top_p)

        def correctness(outputs, per_problem):
            rows = [records[i // per_problem] for i in range(len(outputs))]
            texts = [decode_completion(tokenizer, ids) for ids, _ in outputs]
            examples = [{**r["example"], "completion_tokens": length} for r, (_, length) in zip(rows, outputs)]
            _, components, _ = rewards.score([r["prompt_text"] for r in rows], texts, examples)
            correct = components[CORRECT_COMPONENT] >= cfg.rewards.correct_threshold
            return correct.reshape(len(records), per_problem), texts

        greedy_correct, greedy_texts = correctness(greedy, 1)
        sampled_correct, _ = correctness(sampled, k)
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
    problems = [
        {"prompt": r["prompt_text"], "answer": r["answer"], "greedy_correct": bool(g[0]),
         "greedy_completion": text, "num_correct": int(c)}
        for r, g, text, c in zip(records, greedy_correct, greedy_texts, counts)
    ]
    return {"summary": summary, "problems": problems}
