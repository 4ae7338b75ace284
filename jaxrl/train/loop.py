"""The RL loop: the only place that sequences effects (sampling, rewarding, updates, I/O).

One RL step (DESIGN.md):

1. Draw P prompts, sample n responses each with the current params (device arrays, no
   host round trip), score them on the host, and — with dynamic sampling — keep only
   groups whose rewards differ, drawing more prompt batches until P groups are kept or
   ``rl.max_sampling_rounds`` is reached; a short batch is padded with rows that carry no
   loss (``dynamic_sampling/groups_kept`` records it). Shapes stay static: P·n rows,
   prompt width bucket(data.max_prompt_tokens), response width sampling.max_new_tokens.
2. Group-relative advantages; optional overlong filter.
3. Trainer log-prob pass (forward only) at the rollout temperature: old log-probs (or the
   sampler's when ``rl.old_logp_source='sampler'``), the sampler–trainer gap, optional
   truncated-IS weights, step-start entropies for the forking-token threshold; reference
   log-probs only when ``rl.loss.kl_coef > 0``.
4. μ epochs over mini-batches, each one jitted update with micro-batch accumulation.
5. Metrics, samples, periodic eval, checkpoints (every K steps, at the end, on SIGTERM/SIGINT).

``train(cfg)`` resumes from the newest checkpoint of the run directory (``checkpoint.resume``)
and continues bit-exactly: the RNG key, data-iterator position, optimizer state and loop
counters are all in the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxrl import config as config_lib
from jaxrl.rl.advantages import compute_advantages
from jaxrl.rl.filters import DynamicSamplingAccumulator
from jaxrl.rl.losses import LossConfig, select_tokens
from jaxrl.train import step as train_step
from jaxrl.train.checkpoint import Checkpointer
from jaxrl.train.metrics import MetricsLogger
from jaxrl.sharding.transfer import host_array, put_on_mesh
from jaxrl.types import FINISH_LENGTH, TrainBatch

CORRECT_COMPONENT = "correct"


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclasses.dataclass
class RunResult:
    """What ``train`` returns: the final state, where the run lives, how it ended.

    metrics: the per-step metric dicts this process computed (host floats).
    stop_reason: "completed" | "signal".
    """

    state: train_step.TrainState
    run_dir: str
    metrics: list[dict[str, Any]]
    stop_reason: str


# ----------------------------------------------------------------------------- set-up
def run_dir_of(cfg: ml_collections.ConfigDict) -> str:
    """RUN_DIR = run.root / run.name."""
    return os.path.join(cfg.run.root, cfg.run.name)


def make_mesh(cfg: ml_collections.ConfigDict) -> Mesh:
    """The (data, fsdp, tensor) mesh over all devices (ConfigError if it does not fit)."""
    from jaxrl.sharding.mesh import make_mesh as build

    data, fsdp, tensor = config_lib.mesh_shape(cfg, jax.device_count())
    return build(data, fsdp, tensor)


def sampling_config(cfg: ml_collections.ConfigDict, *, temperature=None, top_p=None):
    """The engine's SamplingConfig for training rollouts (or eval with overrides)."""
    from jaxrl.sampling.engine import SamplingConfig

    return SamplingConfig(
        max_prompt_tokens=cfg.data.max_prompt_tokens,
        max_new_tokens=cfg.sampling.max_new_tokens,
        temperature=cfg.sampling.temperature if temperature is None else temperature,
        top_k=cfg.sampling.top_k,
        top_p=cfg.sampling.top_p if top_p is None else top_p,
    )


def make_rewarders(cfg: ml_collections.ConfigDict) -> dict[str, tuple[Any, float]]:
    """name → (rewarder, weight) for ``rewards.task`` (+ format, + DAPO overlong)."""
    if cfg.rewards.task == "countdown":
        from jaxrl.rewards.tasks import countdown_format_reward as format_fn
        from jaxrl.rewards.tasks import countdown_reward as correct_fn
    else:
        from jaxrl.rewards.math import math_reward as correct_fn
        from jaxrl.rewards.shaping import format_reward as format_fn
    rewarders = {CORRECT_COMPONENT: (correct_fn, cfg.rewards.task_weight)}
    if cfg.rewards.format_weight:
        rewarders["format"] = (format_fn, cfg.rewards.format_weight)
    for spec in cfg.rewards.custom:
        name, function, weight = config_lib.resolve_rewarder_spec(spec)
        if name in rewarders:
            raise config_lib.ConfigError(f"rewards.custom: rewarder name {name!r} is already used")
        rewarders[name] = (function, weight)
    if cfg.rewards.overlong_penalty:
        from jaxrl.rewards.shaping import make_overlong_rewarder

        rewarders["overlong"] = (
            make_overlong_rewarder(cfg.sampling.max_new_tokens, cfg.rewards.overlong_buffer), 1.0
        )
    return rewarders


def data_files(cfg: ml_collections.ConfigDict, split: str = "train") -> list[str]:
    """Prompt files of ``split`` ("train" | "eval"); the synthetic task is written to RUN_DIR/data."""
    if cfg.data.source == "files":
        return list(cfg.data.train_files if split == "train" else cfg.eval.files)
    if split == "eval" and cfg.eval.files:
        return list(cfg.eval.files)
    from jaxrl.data import synthetic

    out_dir = os.path.join(run_dir_of(cfg), "data")
    name = "train" if split == "train" else "heldout"
    path = os.path.join(out_dir, f"{name}.jsonl")
    if not os.path.isfile(path) and jax.process_index() == 0:
        synthetic.dump_splits(
            out_dir,
            num_train=cfg.data.synthetic_num_train,
            num_heldout=cfg.data.synthetic_num_heldout,
            seed=cfg.run.seed,
            difficulty=cfg.data.synthetic_difficulty,
            with_reference=False,
        )
    return [path]


def make_prompt_iterator(cfg: ml_collections.ConfigDict, tokenizer, files: list[str], batch_size: int, *,
                         shuffle: bool, num_epochs: int | None):
    """The grain prompt iterator over ``files`` (every process reads the same stream)."""
    from jaxrl.data.sources import make_prompt_iterator as build

    return build(files, tokenizer, batch_size=batch_size, seed=cfg.run.seed, shuffle=shuffle,
                 num_epochs=num_epochs, **prompt_options(cfg))


def prompt_options(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """The data.* settings that decide how a row becomes a prompt (train and eval alike)."""
    return dict(
        prompt_field=cfg.data.prompt_field,
        answer_field=cfg.data.answer_field,
        system_prompt=cfg.data.system_prompt,
        use_chat_template=cfg.data.use_chat_template,
        max_prompt_tokens=cfg.data.max_prompt_tokens,
        overlong=cfg.data.overlong_prompts,
    )


def left_pad_prompts(records: list[dict], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompt records → (int32 tokens [N, width] left-padded, int32 lengths [N])."""
    tokens = np.full((len(records), width), pad_id, np.int32)
    lengths = np.zeros(len(records), np.int32)
    for i, record in enumerate(records):
        ids = record["prompt_tokens"]
        tokens[i, width - len(ids):] = ids
        lengths[i] = len(ids)
    return tokens, lengths


# ----------------------------------------------------------------------------- pure helpers
def _advantages(cfg: ml_collections.ConfigDict, rewards: np.ndarray, group_ids: np.ndarray, num_groups: int) -> np.ndarray:
    """float32 [B] advantages for host rewards [B] (group ids in [0, num_groups))."""
    adv = compute_advantages(
        cfg.rl.estimator,
        rewards,
        group_ids,
        num_groups=num_groups,
        grpo_scale=cfg.rl.grpo_scale,
        positive_weight=cfg.rl.positive_weight,
        correct_threshold=cfg.rewards.correct_threshold,
    )
    return np.asarray(adv, np.float32)


def build_train_rows(rows: dict[str, np.ndarray], num_rows: int) -> tuple[dict[str, np.ndarray], int]:
    """Pads kept rows (dict of [B', ...] host arrays) to ``num_rows`` with loss-free rows.

    Padding rows copy row 0's tokens (harmless inputs) and get ``live`` = False.
    Returns (rows [num_rows, ...], number of real rows).
    """
    real = next(iter(rows.values())).shape[0]
    if real > num_rows:
        raise ValueError(f"{real} rows exceed the train batch of {num_rows}")
    index = np.concatenate([np.arange(real), np.zeros(num_rows - real, np.int64)])
    padded = {key: value[index] for key, value in rows.items()}
    padded["live"] = np.arange(num_rows) < real
    return padded, real


def assemble_batch(rows: dict[str, np.ndarray], advantages: np.ndarray, loss_mask: np.ndarray,
                   group_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Host arrays of a TrainBatch (old_logp filled later on device)."""
    prompt = rows["prompt_tokens"]
    width = prompt.shape[1]
    response_len = rows["tokens"].shape[1]
    prompt_mask = np.arange(width)[None, :] >= (width - rows["prompt_lengths"])[:, None]
    response_mask = np.arange(response_len)[None, :] < rows["lengths"][:, None]
    attention_mask = np.concatenate([prompt_mask, response_mask], axis=1)
    positions = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0).astype(np.int32)
    return {
        "input_tokens": np.concatenate([prompt, rows["tokens"]], axis=1).astype(np.int32),
        "attention_mask": attention_mask,
        "positions": positions,
        "targets": rows["tokens"].astype(np.int32),
        "loss_mask": loss_mask.astype(np.float32),
        "advantages": advantages.astype(np.float32),
        "rollout_logp": rows["logprobs"].astype(np.float32),
        "rollout_entropy": rows["entropies"].astype(np.float32),
        "group_ids": group_ids.astype(np.int32),
        "truncated": rows["finish_reason"] == FINISH_LENGTH,
    }


@jax.jit
def logprob_gap_metrics(trainer_logp: jax.Array, sampler_logp: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Sampler–trainer log-prob gap over valid tokens (float32 scalars)."""
    weights = (mask > 0).astype(jnp.float32)
    count = jnp.maximum(jnp.sum(weights), 1.0)
    delta = jnp.where(weights > 0, trainer_logp - sampler_logp, 0.0)
    return {
        "logprob_gap/abs_mean": jnp.sum(jnp.abs(delta)) / count,
        "logprob_gap/abs_max": jnp.max(jnp.abs(delta)),
        "logprob_gap/mean": jnp.sum(delta) / count,
        # k3 estimate of KL(sampler ‖ trainer) with samples from the sampler
        "logprob_gap/kl_k3": jnp.sum(weights * (jnp.expm1(-delta) + delta)) / count,
    }


def tis_weights(trainer_logp: jax.Array, sampler_logp: jax.Array, cap: float) -> jax.Array:
    """Truncated importance weights min(π_trainer / π_sampler, cap), float32 [B, T]."""
    return jnp.minimum(jnp.exp(jnp.clip(trainer_logp - sampler_logp, -20.0, 20.0)), cap)


def _select_fn(loss_cfg: LossConfig):
    """Jitted forking-token selection over one population → (select bool [B, T], τ)."""

    @jax.jit
    def select(mask, train_entropy, rollout_entropy, truncated):
        return select_tokens(
            loss_cfg, mask, train_entropy=train_entropy, rollout_entropy=rollout_entropy, truncated=truncated
        )

    return select


def _slice_rows_fn(rows: int, row_sharding):
    """Jitted ``(tree, i) -> rows i·rows .. (i+1)·rows - 1`` of every leaf (one compile).

    The slices come out in ``row_sharding``, the layout the update's in_shardings expect.
    """

    def take(tree, index):
        return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, index * rows, rows, axis=0), tree)

    return jax.jit(take, out_shardings=row_sharding)


# ----------------------------------------------------------------------------- the loop
class _StopSignal:
    """Turns SIGTERM/SIGINT into a flag checked between steps (restores handlers on exit)."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """Holds the run's resources (model config, jitted functions, data, rewards, logging).

    Built by ``train``; methods are the phases of one step. State lives in ``self.state``.
    """

    def __init__(self, cfg: ml_collections.ConfigDict):
        from jaxrl.data.tokenizer import load_tokenizer
        from jaxrl.models import from_pretrained
        from jaxrl.rewards.base import RewardExecutor

        self.cfg = cfg
        self.run_dir = run_dir_of(cfg)
        self.is_writer = jax.process_index() == 0
        os.makedirs(self.run_dir, exist_ok=True)
        self.mesh = make_mesh(cfg)
        self.model, self.model_cfg = from_pretrained(
            cfg.model.path, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, mesh=self.mesh,
            remat=cfg.model.remat,
        )
        self.tokenizer = load_tokenizer(cfg.model.tokenizer_path or cfg.model.path)
        self.loss_cfg = config_lib.loss_config(cfg)
        self.sampling_cfg = sampling_config(cfg)
        self.pad_id = self.sampling_cfg.resolved_pad_id(self.model_cfg)
        self.prompts_per_step = cfg.rl.prompts_per_step
        self.n = cfg.rl.samples_per_prompt
        self.batch_rows = self.prompts_per_step * self.n
        self.mini_rows = cfg.rl.mini_batch_prompts * self.n
        self.row_sharding = NamedSharding(self.mesh, PartitionSpec(("data", "fsdp")))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())

        from jaxrl.models import model_params

        self.optimizer = train_step.make_optimizer(cfg)
        self.lr_schedule = train_step.learning_rate_schedule(cfg)
        state = train_step.init_train_state(model_params(self.model), self.optimizer, cfg.run.seed)
        # Pin every state leaf's sharding (params as loaded, scalars replicated) and make the
        # update return exactly these, so step 2 sees the same input shardings as step 1.
        self.state_sharding = jax.tree.map(
            lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else self.replicated, state
        )
        self.state = jax.device_put(state, self.state_sharding)
        common = dict(temperature=cfg.sampling.temperature, chunk_size=cfg.rl.logprob_chunk_size,
                      micro_batch_rows=cfg.rl.micro_batch_rows)
        self.update_fn = train_step.make_update_fn(
            self.model_cfg, self.loss_cfg, self.optimizer, **common,
            in_shardings=(self.state_sharding, self.row_sharding, self.row_sharding),
            out_shardings=(self.state_sharding, self.replicated),
        )
        self.logprob_fn = train_step.make_logprob_fn(self.model_cfg, **common)
        self.select_fn = _select_fn(self.loss_cfg)
        self.take_minibatch = _slice_rows_fn(self.mini_rows, self.row_sharding)

        self.data = make_prompt_iterator(cfg, self.tokenizer, data_files(cfg, "train"), self.prompts_per_step,
                                         shuffle=cfg.data.shuffle, num_epochs=None)
        self.rewards = RewardExecutor(make_rewarders(cfg), num_workers=cfg.rewards.num_workers,
                                      timeout_s=cfg.rewards.timeout_s, failure_reward=cfg.rewards.failure_reward)
        self.checkpointer = Checkpointer(os.path.join(self.run_dir, "checkpoints"), keep=cfg.checkpoint.keep,
                                         async_save=cfg.checkpoint.async_save)
        self.ref_params = None
        if self.loss_cfg.kl_coef > 0:
            # A frozen copy; nothing holds a reference model when the KL term is off.
            self.ref_params = jax.tree.map(jnp.copy, self.state.params)
        self.consecutive_bad_steps = 0
        self.last_data_state = self.data.get_state()
        self.resumed_from: int | None = None

    # -- checkpointing ----------------------------------------------------------
    def checkpoint_meta(self) -> dict[str, Any]:
        return {
            "data_state": self.last_data_state,
            "consecutive_bad_steps": self.consecutive_bad_steps,
            "config": json.loads(config_lib.to_json(self.cfg)),
        }

    def maybe_resume(self) -> None:
        """Restore the newest checkpoint per ``checkpoint.resume``."""
        mode = self.cfg.checkpoint.resume
        latest = self.checkpointer.latest_step()
        if mode == "off" or latest is None:
            if mode == "on":
                raise config_lib.ConfigError(
                    f"checkpoint.resume='on' but {self.checkpointer.directory} has no checkpoint"
                )
            return
        self.state, meta = self.checkpointer.restore(latest, self.state)
        self.data.set_state(meta["data_state"])
        self.last_data_state = meta["data_state"]
        self.consecutive_bad_steps = int(meta["consecutive_bad_steps"])
        self.resumed_from = latest

    def save_checkpoint(self) -> float:
        started = time.monotonic()
        self.checkpointer.save(int(self.state.step), self.state, self.checkpoint_meta())
        return time.monotonic() - started

    # -- phases -------------------------------------------------------------------
    def sample_round(self, key: jax.Array) -> tuple[dict[str, np.ndarray], list[dict], dict[str, float]]:
        """Draw one prompt batch, sample, score → (host rows, records per row, reward metrics)."""
        from jaxrl.data.tokenizer import decode_completion
        from jaxrl.sampling.engine import generate_from_params
        from jaxrl.sharding.rules import named_sharding

        records = next(self.data)
        prompt_tokens, prompt_lengths = left_pad_prompts(records, self.cfg.data.max_prompt_tokens, self.pad_id)
        started = time.monotonic()
        # Decode at most sampling.max_rows_per_call rows at once (equal chunks: one compile).
        cap = self.cfg.sampling.max_rows_per_call
        chunk = len(records) if cap <= 0 else max(1, min(len(records), cap // self.n))
        fields = ("prompt_tokens", "prompt_lengths", "tokens", "logprobs", "entropies", "lengths",
                  "finish_reason", "group_ids")
        parts: dict[str, list[np.ndarray]] = {name: [] for name in fields}
        for first in range(0, len(records), chunk):
            tokens_in, lengths_in = prompt_tokens[first:first + chunk], prompt_lengths[first:first + chunk]
            # The sampler's rows follow the batch rule (data, fsdp), replicated where they do not divide.
            rollout = generate_from_params(
                self.state.params, self.model_cfg,
                put_on_mesh(tokens_in, named_sharding(("batch", None), self.mesh, tokens_in.shape)),
                put_on_mesh(lengths_in, named_sharding(("batch",), self.mesh, lengths_in.shape)),
                self.n, self.sampling_cfg, key if first == 0 else jax.random.fold_in(key, first),
            )
            for name in fields:
                parts[name].append(host_array(getattr(rollout, name)))
            parts["group_ids"][-1] = parts["group_ids"][-1] + first
        rows = {name: np.concatenate(values) for name, values in parts.items()}
        sample_time = time.monotonic() - started
        started = time.monotonic()
        row_records = [records[g] for g in rows["group_ids"]]
        completions = [decode_completion(self.tokenizer, rows["tokens"][i, : rows["lengths"][i]])
                       for i in range(len(row_records))]
        examples = [{**r["example"], "completion_tokens": int(length)}
                    for r, length in zip(row_records, rows["lengths"])]
        rewards, components, reward_metrics = self.rewards.score(
            [r["prompt_text"] for r in row_records], completions, examples
        )
        rows["rewards"] = np.asarray(rewards, np.float32)
        rows["correct"] = (components[CORRECT_COMPONENT] >= self.cfg.rewards.correct_threshold).astype(np.float32)
        rows["row_index"] = np.arange(len(row_records))
        timing = {"time/sample": sample_time, "time/reward": time.monotonic() - started,
                  "generated_tokens": float(rows["lengths"].sum())}
        samples = [{"prompt": r["prompt_text"], "completion": c, "reward": float(x)}
                   for r, c, x in zip(row_records, completions, rows["rewards"])]
        return rows, samples, {**reward_metrics, **timing}

    def collect(self, step_key: jax.Array) -> tuple[dict[str, np.ndarray], dict[str, float], list[dict]]:
        """Sampling rounds until the train batch is full (dynamic sampling) → rows + metrics."""
        cfg = self.cfg
        dynamic = cfg.rl.dynamic_sampling
        acc = DynamicSamplingAccumulator(
            target_groups=self.prompts_per_step, max_rounds=cfg.rl.max_sampling_rounds if dynamic else 1
        )
        all_rewards, all_correct, all_lengths, all_truncated, all_entropy = [], [], [], [], []
        totals: dict[str, float] = {"time/sample": 0.0, "time/reward": 0.0, "generated_tokens": 0.0}
        reward_metrics: dict[str, Any] = {}
        samples: list[dict] = []
        kept_rows = None
        while True:
            key = jax.random.fold_in(step_key, acc.rounds)
            rows, round_samples, metrics = self.sample_round(key)
            for name in totals:
                totals[name] += metrics.pop(name)
            if not samples:  # the first round's prompts: an unfiltered view of the policy
                samples = round_samples
                reward_metrics = {k: v for k, v in metrics.items() if not isinstance(v, str)}
            valid = np.arange(rows["tokens"].shape[1])[None] < rows["lengths"][:, None]
            all_rewards.append(rows["rewards"])
            all_correct.append(rows["correct"])
            all_lengths.append(rows["lengths"])
            all_truncated.append(rows["finish_reason"] == FINISH_LENGTH)
            all_entropy.append(float((rows["entropies"] * valid).sum() / max(valid.sum(), 1)))
            if not dynamic:
                kept_rows = rows
                break
            acc.add(rows, rows["rewards"], rows["group_ids"])
            if acc.is_full or acc.out_of_rounds:
                break
        stats: dict[str, float] = {}
        if dynamic:
            stats.update(acc.stats)
            if acc.groups_kept:
                kept_rows, _, group_ids = acc.result(allow_partial=True)
                kept_rows = dict(kept_rows)
                kept_rows["group_ids"] = group_ids
        generated = np.concatenate(all_lengths)
        metrics = {
            "reward/mean": float(np.mean(np.concatenate(all_rewards))),
            "accuracy": float(np.mean(np.concatenate(all_correct))),
            "rollout/response_length_mean": float(np.mean(generated)),
            "rollout/response_length_max": float(np.max(generated)),
            "rollout/truncated_fraction": float(np.mean(np.concatenate(all_truncated))),
            "rollout/entropy_mean": float(np.mean(all_entropy)),
            **{k: float(v) for k, v in reward_metrics.items() if k not in ("reward/mean",)},
            **stats,
            **totals,
        }
        metrics["throughput/sample_tokens_per_s"] = totals["generated_tokens"] / max(totals["time/sample"], 1e-9)
        return kept_rows, metrics, samples

    def make_batch(self, kept_rows: dict[str, np.ndarray] | None) -> tuple[dict[str, np.ndarray], int]:
        """Kept rows → padded host TrainBatch arrays of P·n rows + the number of real rows."""
        if kept_rows is None:  # no group had reward variance: an all-padding, loss-free batch
            return None, 0
        rows, real = build_train_rows(kept_rows, self.batch_rows)
        live = rows["live"]
        # Padding rows form their own group (id P) so they cannot move any real group's baseline.
        group_ids = np.where(live, rows["group_ids"], self.prompts_per_step).astype(np.int32)
        rewards = np.where(live, rows["rewards"], 0.0).astype(np.float32)
        advantages = _advantages(self.cfg, rewards, group_ids, self.prompts_per_step + 1)
        advantages = np.where(live, advantages, 0.0)
        response_mask = np.arange(rows["tokens"].shape[1])[None] < rows["lengths"][:, None]
        loss_mask = response_mask & live[:, None]
        if self.cfg.rl.overlong_filter:
            loss_mask &= (rows["finish_reason"] != FINISH_LENGTH)[:, None]
        return assemble_batch(rows, advantages, loss_mask, group_ids), real

    def optimise(self, host_batch: dict[str, np.ndarray]) -> dict[str, float]:
        """Trainer log-prob pass, token selection, μ epochs of mini-batch updates → metrics."""
        cfg, loss_cfg = self.cfg, self.loss_cfg
        dev = {key: put_on_mesh(value, self.row_sharding) for key, value in host_batch.items()}
        device_metrics: dict[str, Any] = {}
        trainer_logp = trainer_entropy = None
        need_trainer_pass = (cfg.rl.old_logp_source == "trainer" or cfg.rl.measure_logprob_gap
                             or (loss_cfg.token_mask != "all" and loss_cfg.entropy_source == "train"))
        started = time.monotonic()
        if need_trainer_pass:
            trainer_logp, trainer_entropy = self.logprob_fn(
                self.state.params, dev["input_tokens"], dev["attention_mask"], dev["positions"], dev["targets"]
            )
            device_metrics.update(logprob_gap_metrics(trainer_logp, dev["rollout_logp"], dev["loss_mask"]))
        old_logp = trainer_logp if cfg.rl.old_logp_source == "trainer" else dev["rollout_logp"]
        advantages = dev["advantages"]
        if cfg.rl.tis_cap:
            weights = tis_weights(trainer_logp, dev["rollout_logp"], cfg.rl.tis_cap)
            advantages = advantages[:, None] * weights
        ref_logp = None
        if self.ref_params is not None:
            ref_logp, _ = self.logprob_fn(
                self.ref_params, dev["input_tokens"], dev["attention_mask"], dev["positions"], dev["targets"]
            )
        batch = TrainBatch(
            input_tokens=dev["input_tokens"], attention_mask=dev["attention_mask"], positions=dev["positions"],
            targets=dev["targets"], loss_mask=dev["loss_mask"], advantages=advantages, old_logp=old_logp,
            rollout_entropy=dev["rollout_entropy"], group_ids=dev["group_ids"], ref_logp=ref_logp,
        )
        train_entropy = trainer_entropy if trainer_entropy is not None else dev["rollout_entropy"]
        batch_select = None
        if loss_cfg.token_mask == "all":
            batch_select = dev["loss_mask"] > 0
        elif loss_cfg.mask_scope == "batch":
            batch_select, threshold = self.select_fn(dev["loss_mask"], train_entropy, dev["rollout_entropy"],
                                                     dev["truncated"])
            device_metrics["entropy_threshold"] = threshold
        logprob_time = time.monotonic() - started

        started = time.monotonic()
        num_minibatches = self.batch_rows // self.mini_rows
        update_metrics = []
        for _ in range(cfg.rl.epochs):
            for index in range(num_minibatches):
                mini, extras = self.take_minibatch((batch, (batch_select, dev["truncated"])), index)
                select, truncated = extras
                if select is None:  # minibatch scope: the population is this mini-batch
                    if loss_cfg.entropy_source == "train":
                        _, entropy = self.logprob_fn(self.state.params, mini.input_tokens, mini.attention_mask,
                                                     mini.positions, mini.targets)
                    else:
                        entropy = mini.rollout_entropy
                    select, _ = self.select_fn(mini.loss_mask, entropy, mini.rollout_entropy, truncated)
                self.state, metrics = self.update_fn(self.state, mini, select)
                update_metrics.append(metrics)
        host_updates = jax.device_get(update_metrics)
        host_extra = jax.device_get(device_metrics)
        update_time = time.monotonic() - started
        out = {key: float(np.mean([m[key] for m in host_updates])) for key in host_updates[0]}
        out["ratio_max"] = float(np.max([m["ratio_max"] for m in host_updates]))
        out["update_skipped"] = float(np.sum([m["update_skipped"] for m in host_updates]))
        out.update({k: float(v) for k, v in host_extra.items()})
        out["time/logprobs"] = logprob_time
        out["time/update"] = update_time
        return out

    # -- eval -----------------------------------------------------------------------
    def run_eval(self, step: int) -> dict[str, float]:
        from jaxrl.eval.evaluate import evaluate_records, load_eval_records

        records = load_eval_records(self.cfg, self.tokenizer)
        report = evaluate_records(
            self.state.params, self.model_cfg, self.tokenizer, records, self.cfg,
            key=jax.random.PRNGKey(self.cfg.run.seed + 1), rewards=self.rewards,
        )
        if self.is_writer:
            out_dir = os.path.join(self.run_dir, "eval")
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, f"step_{step}.json"), "w") as handle:
                json.dump(report, handle, indent=2)
        return {f"eval/{k}": v for k, v in report["summary"].items() if isinstance(v, (int, float))}


def train(cfg: ml_collections.ConfigDict, *, max_steps: int | None = None) -> RunResult:
    """Run (or resume) the experiment described by ``cfg`` until ``train.num_steps``.

    max_steps: stop after this many steps in this call (for tests and staged runs).
    Writes RUN_DIR/config.json, metrics.jsonl, samples.jsonl, checkpoints/, final_model/.
    Raises ConfigError on bad config, TrainingDiverged after ``train.max_bad_steps``
    consecutive non-finite steps (the last good checkpoint is kept).
    """
    config_lib.validate(cfg, num_devices=jax.device_count())
    trainer = Trainer(cfg)
    trainer.maybe_resume()
    run_dir = trainer.run_dir
    if trainer.is_writer:
        with open(os.path.join(run_dir, "config.json"), "w") as handle:
            handle.write(config_lib.to_json(cfg))
    logger = MetricsLogger(
        run_dir, resume_step=trainer.resumed_from, total_steps=cfg.train.num_steps,
        progress_bar=cfg.logging.progress_bar, tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb,
        wandb_project=cfg.logging.wandb_project, config=json.loads(config_lib.to_json(cfg)),
        is_writer=trainer.is_writer,
    )
    for note in logger.notes:
        logger.message(note)
    data_stats = trainer.data.stats.as_dict()
    if data_stats["rows_malformed"] or data_stats["prompts_overlong_skipped"]:
        logger.message(
            f"data: {data_stats['rows_kept']} rows kept of {data_stats['rows_read']}; "
            f"{data_stats['rows_malformed']} malformed, {data_stats['prompts_overlong_skipped']} over-long skipped"
            f" (first problem: {data_stats['first_malformed_error']})"
        )
    if trainer.resumed_from is not None:
        logger.message(f"resumed from checkpoint step {trainer.resumed_from}")

    history: list[dict[str, Any]] = []
    stop_reason = "completed"
    steps_this_call = 0
    last_saved = trainer.resumed_from
    checkpoint_time = 0.0
    try:
        # Under the mesh, the layer scan pins activation rows to data/fsdp (sharding.rules.constrain).
        with _StopSignal() as stop, jax.set_mesh(trainer.mesh):
            while int(trainer.state.step) < cfg.train.num_steps:
                if max_steps is not None and steps_this_call >= max_steps:
                    stop_reason = "max_steps"
                    break
                step_started = time.monotonic()
                step_number = int(trainer.state.step) + 1
                rng, step_key = jax.random.split(trainer.state.rng)
                kept_rows, metrics, samples = trainer.collect(step_key)
                host_batch, real_rows = trainer.make_batch(kept_rows)
                metrics["rows_trained"] = float(real_rows)
                if host_batch is not None:
                    metrics.update(trainer.optimise(host_batch))
                else:
                    metrics["update_skipped"] = 0.0
                    logger.message(f"step {step_number}: no group with reward variance; no update")
                trainer.state = trainer.state.replace(
                    step=jax.device_put(trainer.state.step + 1, trainer.replicated),
                    rng=jax.device_put(rng, trainer.replicated),
                )
                trainer.last_data_state = trainer.data.get_state()
                metrics["lr"] = float(trainer.lr_schedule(step_number - 1))
                metrics["data/rows_malformed"] = float(data_stats["rows_malformed"])
                metrics["compiles/update"] = float(train_step.TRACE_COUNTS["update"])
                metrics["compiles/logprobs"] = float(train_step.TRACE_COUNTS["logprobs"])
                metrics["skipped_updates_total"] = float(int(trainer.state.skipped_updates))
                bad = metrics["update_skipped"] > 0
                trainer.consecutive_bad_steps = trainer.consecutive_bad_steps + 1 if bad else 0

                if cfg.eval.every_steps and step_number % cfg.eval.every_steps == 0 and not bad:
                    eval_started = time.monotonic()
                    metrics.update(trainer.run_eval(step_number))
                    metrics["time/eval"] = time.monotonic() - eval_started

                metrics["time/checkpoint"] = checkpoint_time  # the save after the previous step
                metrics["time/step"] = time.monotonic() - step_started
                metrics["throughput/tokens_per_s"] = metrics["generated_tokens"] / max(metrics["time/step"], 1e-9)
                logger.log_step(step_number, metrics)
                if cfg.logging.samples_every and step_number % cfg.logging.samples_every == 0:
                    logger.log_samples(step_number, samples[: cfg.logging.num_samples])
                history.append(metrics)
                steps_this_call += 1

                # The step's log lines go out before its checkpoint: a crash in between resumes
                # from the previous checkpoint and rewrites them, so no step's line is lost.
                checkpoint_time = 0.0
                final = step_number >= cfg.train.num_steps
                if not bad and (step_number % cfg.checkpoint.every_steps == 0 or final or stop.received):
                    checkpoint_time = trainer.save_checkpoint()
                    last_saved = step_number

                if trainer.consecutive_bad_steps >= cfg.train.max_bad_steps:
                    raise TrainingDiverged(
                        f"{trainer.consecutive_bad_steps} consecutive steps with a non-finite loss or "
                        f"gradient (train.max_bad_steps={cfg.train.max_bad_steps}); last good checkpoint: "
                        f"step {last_saved}"
                    )
                if stop.received is not None:
                    stop_reason = "signal"
                    logger.message(f"signal {stop.received}: saved checkpoint at step {last_saved}, stopping")
                    break
        if stop_reason == "completed" and cfg.checkpoint.save_final_model:
            from jaxrl.models import save_pretrained, with_params

            save_pretrained(with_params(trainer.model, trainer.state.params), os.path.join(run_dir, "final_model"))
    finally:
        trainer.checkpointer.close()
        trainer.rewards.close()
        logger.close()
    return RunResult(state=trainer.state, run_dir=run_dir, metrics=history, stop_reason=stop_reason)
