"""The collection phase of one RL step: prompts → Rollout → Scored → a device TrainBatch.

1. Draw P prompts, sample n responses each through the rollout backend (arrays stay on
   device), bring the completion tokens and per-row ints to the host, score them → Scored.
   Multi-process: every process draws the same P prompts and samples them over the whole
   mesh, but decodes and scores only its own block of prompts (``process_block``: process i
   of k gets prompts [i·P/k, (i+1)·P/k)); the per-row scores are then all-gathered, so the
   dynamic-sampling decision, the advantages and the metrics are the same on every process.
2. With dynamic sampling, keep only groups whose filter metric (``rl.dynamic_sampling_metric``:
   correctness or total reward) differs, drawing more prompt
   batches until P groups are kept or ``rl.max_sampling_rounds`` is reached; a short batch
   is padded with loss-free rows. Shapes stay static: P·n rows.
3. Group-relative advantages (host, from the rewards) and the device TrainBatch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from jaxrl.data.batching import assemble_train_batch, left_pad_prompts, padded_row_index, response_mask
from jaxrl.data.sources import PromptIterator
from jaxrl.data.stops import cut_at_stop_strings
from jaxrl.data.tokenizer import decode_completion
from jaxrl.rewards.base import RewardExecutor
from jaxrl.rl.advantages import AdvantageConfig, compute_advantages
from jaxrl.rl.filters import DynamicSamplingAccumulator
from jaxrl.sampling.backend import RolloutBackend
from jaxrl.sharding.transfer import gather_blocks, gather_scalars, host_array, process_block, process_rows, put_on_mesh
from jaxrl.types import FINISH_LENGTH, Rollout, Scored, TrainBatch
from jaxrl.wiring import CORRECT_COMPONENT, rollout_entropy_needed


@dataclasses.dataclass(frozen=True)
class Collector:
    """What the collection phase reads: the rollout backend, the prompt stream, the reward
    executor, and the shapes of a step (P prompts × n samples)."""

    backend: RolloutBackend
    data: PromptIterator
    rewards: RewardExecutor
    tokenizer: Any
    cfg: ml_collections.ConfigDict
    row_sharding: NamedSharding

    @property
    def prompts_per_step(self) -> int:
        return self.cfg.rl.prompts_per_step

    @property
    def samples_per_prompt(self) -> int:
        return self.cfg.rl.samples_per_prompt


@dataclasses.dataclass(frozen=True)
class Collected:
    """The kept rows of one step: ``scored`` rows (device rollout + host scores) with group
    ids renumbered 0..G-1, or None when no group had reward variance.

    samples: the first round's rows this process scored (prompt, completion, reward).
    completion_keys: one key per row of the first round, all processes' rows ("" for an
    empty completion, else a digest of its text: equal keys = equal texts), for the health
    check, which must decide the same on every process.
    """

    scored: Scored | None
    metrics: dict[str, float]
    samples: list[dict]
    completion_keys: list[str] = dataclasses.field(default_factory=list)


def score(collector: Collector, records: list[dict], rollout: Rollout
          ) -> tuple[Scored, list[dict], dict, list[str]]:
    """Rewards for one rollout of ``records`` → (Scored, sample records, reward metrics,
    completion keys [B]).

    This process decodes and scores only the rows of its block of prompts (all of them in a
    single process); the Scored, the float metrics and the keys then hold every process's
    rows and are identical everywhere. The sample records are this process's rows. With
    ``sampling.stop_strings``, rows are cut at the first stop string (``data/stops.py``) and
    the rollout's lengths and finish reasons follow the cut, so the loss ends there too.
    """
    all_lengths, all_group_ids = host_array(rollout.lengths), host_array(rollout.group_ids)
    all_finish = host_array(rollout.finish_reason)
    per_prompt = len(all_lengths) // len(records)
    start, stop = (i * per_prompt for i in process_block(len(records)))
    tokens = process_rows(rollout.tokens, start, stop)  # [stop - start, T]: this process's rows only
    lengths, group_ids, finish = all_lengths[start:stop], all_group_ids[start:stop], all_finish[start:stop]
    stops = collector.cfg.sampling.stop_strings
    if stops:
        lengths, finish = cut_at_stop_strings(tokens, lengths, finish, collector.tokenizer, stops)
    row_records = [records[g] for g in group_ids]
    completions = [decode_completion(collector.tokenizer, tokens[i, : lengths[i]]) for i in range(len(row_records))]
    examples = [{**r["example"], "completion_tokens": int(n)} for r, n in zip(row_records, lengths)]
    rewards, components, metrics = collector.rewards.score([r["prompt_text"] for r in row_records], completions,
                                                           examples)
    rewards = np.asarray(rewards, np.float32)
    samples = [{"prompt": r["prompt_text"], "completion": c, "reward": float(x)}
               for r, c, x in zip(row_records, completions, rewards)]
    rewards, components, metrics, keys = _share_scores(rewards, components, metrics, completions, len(all_lengths))
    if stops:  # every process's cut rows, written back to the device rollout
        cut = np.stack([lengths, finish], axis=1).astype(np.int32)
        cut = gather_blocks(cut, len(all_lengths))  # one process: returned as is
        all_lengths, all_finish = cut[:, 0], cut[:, 1]
        rollout = rollout.replace(**{name: put_on_mesh(value.astype(getattr(rollout, name).dtype),
                                                       getattr(rollout, name).sharding)
                                     for name, value in (("lengths", all_lengths), ("finish_reason", all_finish))})
    correct = (components[CORRECT_COMPONENT] >= collector.cfg.rewards.correct_threshold).astype(np.float32)
    scored = Scored(rollout=rollout, rewards=rewards, correct=correct, components=components, lengths=all_lengths,
                    finish_reason=all_finish, group_ids=all_group_ids)
    return scored, samples, metrics, keys


# Reward counters that combine across processes by max (the rest are sums, or means recomputed).
_MAX_METRICS = ("reward/score_seconds", "reward/timeouts_enforced")


def _share_scores(rewards: np.ndarray, components: dict[str, np.ndarray], metrics: dict, completions: list[str],
                  num_rows: int) -> tuple[np.ndarray, dict[str, np.ndarray], dict, list[str]]:
    """This process's rewards [b], components name → [b], reward metrics and completions →
    every process's: rewards [num_rows], components [num_rows], metrics over all rows (counts
    summed, means recomputed, times maxed; text entries stay this process's), keys [num_rows].

    One all-gather of an int32 table [b, 1 + C + 2] (float32 scores bit-cast, exact) and one
    of the float counters; nothing crosses in a single process.
    """
    digests = np.array([_completion_digest(text) for text in completions], np.uint32).reshape(-1, 2)
    if jax.process_count() == 1:
        return rewards, components, metrics, [_key_text(word) for word in digests]
    names = list(components)
    scores = np.stack([rewards] + [components[k] for k in names], axis=1).astype(np.float32)
    table = gather_blocks(np.concatenate([scores.view(np.int32), digests.view(np.int32)], axis=1), num_rows)
    scores = np.ascontiguousarray(table[:, : 1 + len(names)]).view(np.float32)
    digests = np.ascontiguousarray(table[:, 1 + len(names):]).view(np.uint32)
    keys = [_key_text(word) for word in digests]
    shared = {k: v for k, v in metrics.items() if not isinstance(v, str)}
    counters = gather_scalars(np.array(list(shared.values()), np.float32))  # [processes, M]
    for column, key in enumerate(shared):
        combine = np.max if key in _MAX_METRICS else np.sum
        metrics[key] = float(combine(counters[:, column]))
    rewards = scores[:, 0]
    components = {k: scores[:, 1 + i] for i, k in enumerate(names)}
    for name in names:
        if f"reward/{name}/mean" in metrics:
            metrics[f"reward/{name}/mean"] = float(components[name].mean()) if num_rows else 0.0
    if "reward/mean" in metrics:
        metrics["reward/mean"] = float(rewards.mean()) if num_rows else 0.0
    return rewards, components, metrics, keys


def _key_text(word: np.ndarray) -> str:
    return "" if not word.any() else f"{word[0]:08x}{word[1]:08x}"


def _completion_digest(text: str) -> tuple[int, int]:
    """(0, 0) for an empty (whitespace-only) completion, else 64 bits of its blake2b digest."""
    if not text.strip():
        return 0, 0
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    high, low = int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")
    return (high, low) if high or low else (0, 1)


def _mean_entropy(rollout: Rollout) -> float:
    valid = response_mask(rollout.tokens.shape[1], rollout.lengths)
    return float(jnp.sum(jnp.where(valid, rollout.entropies, 0.0)) / jnp.maximum(jnp.sum(valid), 1))


def _take_rows(rollouts: list[Rollout], index: np.ndarray) -> Rollout:
    """Rows ``index`` of the rollouts concatenated along rows (on device)."""
    if len(rollouts) == 1:
        return jax.tree.map(lambda x: x[index], rollouts[0])
    return jax.tree.map(lambda *xs: jnp.concatenate(xs)[index], *rollouts)


@dataclasses.dataclass(frozen=True)
class Launched:
    """A step's first sampling round, dispatched and not yet waited for: the prompt records
    drawn for it and its device rollout (JAX dispatch is asynchronous, so the sampler may
    still be running while the caller dispatches other work, e.g. the previous step's update)."""

    records: list[dict]
    rollout: Rollout


def launch(collector: Collector, params, step_key: jax.Array, round_index: int = 0) -> Launched:
    """Draw the next P prompts and dispatch sampling round ``round_index`` of the step keyed
    ``step_key`` with ``params`` (key ``fold_in(step_key, round_index)``), without waiting."""
    records = next(collector.data)
    prompt_tokens, prompt_lengths = left_pad_prompts(records, collector.cfg.data.max_prompt_tokens,
                                                     collector.backend.pad_id)
    rollout = collector.backend.generate(params, prompt_tokens, prompt_lengths, collector.samples_per_prompt,
                                         jax.random.fold_in(step_key, round_index))
    return Launched(records, rollout)


def collect(collector: Collector, params, step_key: jax.Array, first: Launched | None = None) -> Collected:
    """Sampling rounds until the train batch is full (dynamic sampling) → kept rows + metrics.

    first: round 0 already dispatched by ``launch`` (same key; its params are the caller's
    business); later rounds sample with ``params``. ``time/sample`` counts the time spent
    waiting for the sampler, so a round that finished while other work ran costs ~0.
    """
    cfg = collector.cfg
    dynamic = cfg.rl.dynamic_sampling
    acc = DynamicSamplingAccumulator(target_groups=collector.prompts_per_step,
                                     max_rounds=cfg.rl.max_sampling_rounds if dynamic else 1)
    rounds: list[Scored] = []
    totals = {"time/sample": 0.0, "time/reward": 0.0, "generated_tokens": 0.0}
    reward_metrics: dict[str, Any] = {}
    samples: list[dict] = []
    completion_keys: list[str] = []
    while True:
        started = time.monotonic()
        launched = first if first is not None and not rounds else launch(collector, params, step_key, acc.rounds)
        records, rollout = launched.records, collector.backend.wait(launched.rollout)
        totals["time/sample"] += time.monotonic() - started
        started = time.monotonic()
        scored, round_samples, metrics, keys = score(collector, records, rollout)
        totals["time/reward"] += time.monotonic() - started
        totals["generated_tokens"] += float(scored.lengths.sum())
        if not rounds:  # the first round's prompts: an unfiltered view of the policy
            samples, completion_keys = round_samples, keys
            reward_metrics = {k: v for k, v in metrics.items() if not isinstance(v, str)}
        rounds.append(scored)
        if not dynamic:
            break
        handles = {"round": np.full(len(scored.rewards), len(rounds) - 1), "row": np.arange(len(scored.rewards))}
        acc.add(handles, scored.rewards, scored.group_ids, filter_values=filter_metric(cfg, scored))
        if acc.is_full or acc.out_of_rounds:
            break
    metrics = _round_metrics(rounds)
    if rollout_entropy_needed(cfg):  # otherwise the sampler computed no entropies (zeros)
        metrics["rollout/entropy_mean"] = float(np.mean([_mean_entropy(s.rollout) for s in rounds]))
    metrics.update({k: float(v) for k, v in reward_metrics.items() if k != "reward/mean"})
    metrics.update(totals)
    metrics["throughput/sample_tokens_per_s"] = totals["generated_tokens"] / max(totals["time/sample"], 1e-9)
    if not dynamic:
        return Collected(rounds[0], metrics, samples, completion_keys)
    metrics.update(acc.stats)
    if not acc.groups_kept:
        return Collected(None, metrics, samples, completion_keys)
    handles, rewards, group_ids = acc.result(allow_partial=True)
    offsets = np.cumsum([0] + [len(s.rewards) for s in rounds])
    index = offsets[handles["round"]] + handles["row"]
    pick = lambda name: np.concatenate([getattr(s, name) for s in rounds])[index]  # noqa: E731
    kept = Scored(rollout=_take_rows([s.rollout for s in rounds], index), rewards=rewards, correct=pick("correct"),
                  components={k: np.concatenate([s.components[k] for s in rounds])[index] for k in rounds[0].components},
                  lengths=pick("lengths"), finish_reason=pick("finish_reason"), group_ids=group_ids)
    return Collected(kept, metrics, samples, completion_keys)


def filter_metric(cfg: ml_collections.ConfigDict, scored: Scored) -> np.ndarray:
    """float32 [B]: the per-row value whose spread within a group keeps the group under
    dynamic sampling: ``rl.dynamic_sampling_metric`` "acc" → correctness 0/1 (the
    ``correct`` component ≥ ``rewards.correct_threshold``; DAPO), "reward" → total reward."""
    if cfg.rl.dynamic_sampling_metric == "acc":
        return np.asarray(scored.correct, np.float32)
    return np.asarray(scored.rewards, np.float32)


def length_fill(round_lengths: list[np.ndarray]) -> float:
    """Σ response lengths / Σ (rows × longest response) over sampling rounds (each [B_r] ints):
    the share of a length-synchronous decode's row-steps that fed a live row. The static engine
    steps every row of a call until its longest row ends, so 1 - this is the decode work it
    spent on finished rows; the continuous backend frees their slots instead. 1.0 when nothing
    was generated."""
    stepped = sum(len(lengths) * int(np.max(lengths, initial=0)) for lengths in round_lengths)
    live = sum(int(np.sum(lengths)) for lengths in round_lengths)
    return live / stepped if stepped else 1.0


def _round_metrics(rounds: list[Scored]) -> dict[str, float]:
    generated = np.concatenate([s.lengths for s in rounds])
    return {
        "rollout/length_fill": length_fill([s.lengths for s in rounds]),
        "reward/mean": float(np.mean(np.concatenate([s.rewards for s in rounds]))),
        "accuracy": float(np.mean(np.concatenate([s.correct for s in rounds]))),
        "rollout/response_length_mean": float(np.mean(generated)),
        "rollout/response_length_max": float(np.max(generated)),
        "rollout/truncated_fraction": float(np.mean(np.concatenate([s.finish_reason for s in rounds]) == FINISH_LENGTH)),
    }


def group_advantages(adv_cfg: AdvantageConfig, rewards: np.ndarray, group_ids: np.ndarray, num_groups: int) -> np.ndarray:
    """float32 [B] advantages for host rewards [B] (group ids in [0, num_groups))."""
    adv = compute_advantages(adv_cfg.estimator, rewards, group_ids, num_groups=num_groups,
                             grpo_scale=adv_cfg.grpo_scale, eps=adv_cfg.eps,
                             positive_weight=adv_cfg.positive_weight, correct_threshold=adv_cfg.correct_threshold)
    return np.asarray(adv, np.float32)


def train_batch_fn(row_sharding: NamedSharding, *, overlong_filter: bool) -> Callable:
    """Jitted ``(rollout, index, live, advantages, group_ids) -> (TrainBatch, truncated)``:
    rows ``index`` of the rollout assembled into a train batch laid out by ``row_sharding``."""

    def build(rollout, index, live, advantages, group_ids):
        rows = jax.tree.map(lambda x: x[index], rollout)
        return assemble_train_batch(rows, live, advantages, group_ids, overlong_filter=overlong_filter)

    return jax.jit(build, out_shardings=row_sharding)


def make_train_batch(collector: Collector, adv_cfg: AdvantageConfig, build: Callable,
                     kept: Scored) -> tuple[TrainBatch, jax.Array, int]:
    """Kept rows → (device TrainBatch of P·n rows, truncated bool [P·n], real row count).

    Advantages are computed over the real rows only (so padding never enters a group mean
    or the ``grpo_scale=batch`` std). Rows past the real ones are loss-free copies of row 0
    in their own group (id P) with advantage 0.
    """
    num_rows = collector.prompts_per_step * collector.samples_per_prompt
    real = len(kept.rewards)
    index = padded_row_index(real, num_rows)
    live = np.arange(num_rows) < real
    group_ids = np.where(live, kept.group_ids[index], collector.prompts_per_step).astype(np.int32)
    advantages = np.zeros(num_rows, np.float32)
    advantages[:real] = group_advantages(adv_cfg, np.asarray(kept.rewards, np.float32),
                                         np.asarray(kept.group_ids, np.int32), collector.prompts_per_step)
    batch, truncated = build(kept.rollout, index, live, advantages, group_ids)
    return batch, truncated, real
