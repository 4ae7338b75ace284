"""Wiring: a config → the components of a run (mesh, policy, data, rollout backend, rewarders).

Every builder here is a function of the config (and of what an earlier builder returned);
none holds state. ``train/loop.py`` sequences them, ``eval/`` and ``cli.py`` reuse them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import ml_collections
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxrl.config import advantage_config, loss_config, mesh_shape, rewarder_spec
from jaxrl.config.defaults import ConfigError
from jaxrl.data import synthetic
from jaxrl.data.presets import parse_eval_set
from jaxrl.data.sources import PromptIterator, make_prompt_iterator
from jaxrl.data.tokenizer import load_tokenizer
from jaxrl.models import ModelConfig, Transformer, from_pretrained
from jaxrl.rewards.base import RewardExecutor
from jaxrl.rewards.registry import get_task
from jaxrl.rewards.shaping import make_overlong_rewarder
from jaxrl.rl.advantages import AdvantageConfig
from jaxrl.rl.losses import LossConfig
import jaxrl.sampling.continuous  # noqa: F401  registers the "continuous" rollout backend
from jaxrl.sampling.backend import RolloutBackend, make_backend
from jaxrl.sampling.engine import SamplingConfig
from jaxrl.sharding.mesh import make_mesh
from jaxrl.sharding.transfer import process_block

# The rewarder whose score decides correctness (accuracy, pass@k, dynamic sampling's "acc").
CORRECT_COMPONENT = "correct"


def run_dir_of(cfg: ml_collections.ConfigDict) -> str:
    """RUN_DIR = run.root / run.name."""
    return os.path.join(cfg.run.root, cfg.run.name)


def mesh_of(cfg: ml_collections.ConfigDict) -> Mesh:
    """The (data, fsdp, tensor) mesh over all devices (ConfigError if it does not fit)."""
    return make_mesh(*mesh_shape(cfg, jax.device_count()))


def stop_token_ids(cfg: ml_collections.ConfigDict, model_cfg: ModelConfig, tokenizer=None) -> tuple[int, ...]:
    """The model's stop ids (config.json + generation_config.json eos ids), then
    ``sampling.stop_token_ids``, then the id of each ``sampling.stop_strings`` entry that encodes
    to exactly one token (the tokenizer is loaded from the model when not given). Longer stop
    strings are matched in text after sampling (``data/stops.py``)."""
    ids = list(model_cfg.stop_token_ids) + [int(i) for i in cfg.sampling.stop_token_ids]
    if cfg.sampling.stop_strings:
        tokenizer = tokenizer or load_tokenizer(cfg.model.tokenizer_path or cfg.model.path)
        for text in cfg.sampling.stop_strings:
            if not isinstance(text, str) or not text:
                raise ConfigError(f"sampling.stop_strings: each entry must be non-empty text, got {text!r}")
            encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(encoded) == 1:
                ids.append(int(encoded[0]))
    bad = [i for i in ids if not 0 <= i < model_cfg.vocab_size]
    if bad:
        raise ConfigError(f"sampling.stop_token_ids: {bad} outside the vocabulary of {model_cfg.vocab_size}")
    return tuple(dict.fromkeys(ids))


def rollout_entropy_needed(cfg: ml_collections.ConfigDict) -> bool:
    """Whether training rollouts compute full-vocabulary entropies: only with the forking-token
    mask on (its threshold population; log-probs are always computed). Off, the step logs no
    ``rollout/entropy_mean`` and the collapse check reads the completions only."""
    return cfg.rl.loss.token_mask != "all"


def sampling_config(cfg: ml_collections.ConfigDict, *, temperature: float | None = None,
                    top_p: float | None = None, stop_ids: tuple[int, ...] | None = None,
                    compute_entropy: bool | None = None) -> SamplingConfig:
    """The engine's SamplingConfig for training rollouts (or eval, with overrides); ``stop_ids``
    None = the model's eos ids; ``compute_entropy`` None = ``rollout_entropy_needed(cfg)``."""
    return SamplingConfig(
        max_prompt_tokens=cfg.data.max_prompt_tokens,
        max_new_tokens=cfg.sampling.max_new_tokens,
        temperature=cfg.sampling.temperature if temperature is None else temperature,
        top_k=cfg.sampling.top_k,
        top_p=cfg.sampling.top_p if top_p is None else top_p,
        stop_token_ids=stop_ids,
        compute_entropy=rollout_entropy_needed(cfg) if compute_entropy is None else compute_entropy,
        # Threaded decoding blocks on its rows; the overlapped loop needs a sampler that returns
        # at once, so "auto" keeps one call there.
        cpu_threads=1 if cfg.sampling.cpu_threads == 0 and cfg.rl.rollout_staleness else cfg.sampling.cpu_threads,
        layer_loop=cfg.sampling.layer_loop,
    )


def rollout_backend(cfg: ml_collections.ConfigDict, model_cfg: ModelConfig, mesh: Mesh | None, *,
                    max_rows_per_call: int | None = None, **sampling_overrides) -> RolloutBackend:
    """The ``sampling.backend`` rollout backend with ``stop_token_ids(cfg, model_cfg)``; decodes at
    most ``max_rows_per_call`` rows at once (default ``sampling.max_rows_per_call``; 0 = all)."""
    cap = cfg.sampling.max_rows_per_call if max_rows_per_call is None else max_rows_per_call
    sampling = sampling_config(cfg, stop_ids=stop_token_ids(cfg, model_cfg), **sampling_overrides)
    return make_backend(cfg.sampling.backend, model_cfg, sampling, mesh, max_rows_per_call=cap)


def rewarders(cfg: ml_collections.ConfigDict) -> dict[str, tuple[Callable, float]]:
    """name → (rewarder, weight): ``rewards.task``'s correctness (+ format, + custom, + DAPO
    soft overlong punishment)."""
    task = get_task(cfg.rewards.task)
    chosen = {CORRECT_COMPONENT: (task.correct, cfg.rewards.task_weight)}
    if cfg.rewards.format_weight:
        chosen["format"] = (task.format, cfg.rewards.format_weight)
    for spec in cfg.rewards.custom:
        name, function, weight = rewarder_spec(spec)
        if name in chosen:
            raise ConfigError(f"rewards.custom: rewarder name {name!r} is already used")
        chosen[name] = (function, weight)
    if cfg.rewards.overlong_penalty:
        chosen["overlong"] = (make_overlong_rewarder(cfg.sampling.max_new_tokens, cfg.rewards.overlong_buffer), 1.0)
    return chosen


class _FirstBatchCheck(RewardExecutor):
    """A RewardExecutor that stops the run (ConfigError naming the rewarder and its error) when
    a rewarder raises on every row of the first batch it scores: a rewarder that cannot read its
    field would otherwise train on ``rewards.failure_reward`` silently."""

    _checked = False

    def score(self, prompts, completions, examples):
        """As ``RewardExecutor.score``; the first call also checks every rewarder ran at least once."""
        total, components, metrics = super().score(prompts, completions, examples)
        if not self._checked and len(prompts):
            self._checked = True
            for name in self.names:
                failed, timed_out = metrics[f"reward/{name}/failures"], metrics[f"reward/{name}/timeouts"]
                if failed == len(prompts) and timed_out < failed:
                    raise ConfigError(f"rewarder {name!r} failed on every row of the first batch: "
                                      f"{metrics.get(f'reward/{name}/first_error')}")
        return total, components, metrics


def reward_executor(cfg: ml_collections.ConfigDict) -> RewardExecutor:
    """The executor that scores completions with ``rewarders(cfg)`` (close it when done); it
    stops the run when a rewarder fails on every row of its first batch."""
    return _FirstBatchCheck(rewarders(cfg), num_workers=cfg.rewards.num_workers, timeout_s=cfg.rewards.timeout_s,
                            failure_reward=cfg.rewards.failure_reward)


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """A held-out set: its name (report key), dataset preset and files."""

    name: str
    preset: str
    files: tuple[str, ...]


def data_files(cfg: ml_collections.ConfigDict, split: str = "train") -> list[str]:
    """Prompt files of ``split`` ("train" | "eval": the first eval set's); the synthetic task is
    written once to RUN_DIR/data (by process 0)."""
    if split == "eval":
        sets = eval_sets(cfg)
        if not sets:
            raise ConfigError("no held-out set: set eval.files or eval.sets")
        return list(sets[0].files)
    if cfg.data.source == "files":
        return list(cfg.data.train_files)
    return [_synthetic_file(cfg, "train")]


def _synthetic_file(cfg: ml_collections.ConfigDict, split: str) -> str:
    """RUN_DIR/data/<split>.jsonl, written by process 0 if missing; every process calls this at
    the same point and waits for the file (RUN_DIR is on storage all processes share)."""
    out_dir = os.path.join(run_dir_of(cfg), "data")
    path = os.path.join(out_dir, f"{split}.jsonl")
    if not os.path.isfile(path) and jax.process_index() == 0:
        synthetic.dump_splits(out_dir, num_train=cfg.data.synthetic_num_train,
                              num_heldout=cfg.data.synthetic_num_heldout, seed=cfg.run.seed,
                              difficulty=cfg.data.synthetic_difficulty, with_reference=False)
    if jax.process_count() > 1:  # the others must not look for the file before it is written
        multihost_utils.sync_global_devices(f"jaxrl synthetic data {path}")
    return path


def eval_sets(cfg: ml_collections.ConfigDict) -> list[EvalSet]:
    """The held-out sets: ``eval.files`` (named "eval", read with ``data.preset``), then each
    ``eval.sets`` entry; with neither and ``data.source = synthetic``, the generated held-out
    split ("heldout"). Empty when there is none."""
    sets = [EvalSet("eval", cfg.data.preset, tuple(cfg.eval.files))] if cfg.eval.files else []
    for spec in cfg.eval.sets:
        try:
            name, preset, path = parse_eval_set(spec)
        except ValueError as error:
            raise ConfigError(f"eval.sets: {error}") from None
        sets.append(EvalSet(name, preset or cfg.data.preset, (path,)))
    if not sets and cfg.data.source == "synthetic":
        sets.append(EvalSet("heldout", cfg.data.preset, (_synthetic_file(cfg, "heldout"),)))
    return sets


def chat_template_kwargs(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """``data.chat_template_kwargs`` parsed (ConfigError naming the key if it is not a JSON object)."""
    try:
        value = json.loads(cfg.data.chat_template_kwargs or "{}")
    except json.JSONDecodeError as error:
        raise ConfigError(f"data.chat_template_kwargs: invalid JSON ({error.msg})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"data.chat_template_kwargs must be a JSON object, got {cfg.data.chat_template_kwargs!r}")
    return value


def prompt_options(cfg: ml_collections.ConfigDict, preset: str | None = None) -> dict[str, Any]:
    """The data.* settings that decide how a row becomes a prompt (train and eval alike);
    ``preset`` replaces ``data.preset`` (an eval set's own)."""
    return dict(preset=preset or cfg.data.preset, prompt_field=cfg.data.prompt_field,
                answer_field=cfg.data.answer_field, id_field=cfg.data.id_field,
                system_prompt=cfg.data.system_prompt, prompt_template=cfg.data.prompt_template,
                use_chat_template=cfg.data.use_chat_template, chat_template_kwargs=chat_template_kwargs(cfg),
                max_prompt_tokens=cfg.data.max_prompt_tokens, overlong=cfg.data.overlong_prompts,
                drop_duplicates=cfg.data.drop_duplicates)


def prompt_iterator(cfg: ml_collections.ConfigDict, tokenizer, files: list[str], batch_size: int, *,
                    shuffle: bool, num_epochs: int | None) -> PromptIterator:
    """The grain prompt iterator over ``files``, yielding batches of ``batch_size`` prompts.

    Every process iterates the same stream, so a batch (and the checkpointed position) does
    not depend on the number of processes; process i of k then samples the batch over the
    whole mesh but decodes and scores only its block of prompts, ``process_block(batch_size)``
    (``train/rollouts.py``, ``score``). Process 0 prints the rows kept and skipped by reason;
    with several processes each prints its block.
    """
    iterator = make_prompt_iterator(files, tokenizer, batch_size=batch_size, seed=cfg.run.seed, shuffle=shuffle,
                                    num_epochs=num_epochs, **prompt_options(cfg))
    if jax.process_index() == 0:
        print(f"data: {iterator.stats.summary()}", flush=True)
    if jax.process_count() > 1:
        start, stop = process_block(batch_size)
        print(f"data: process {jax.process_index()}/{jax.process_count()} scores prompts [{start}, {stop}) of "
              f"each batch of {batch_size}", flush=True)
    return iterator


@dataclasses.dataclass(frozen=True)
class Policy:
    """The policy as loaded: model (params inside), its config, and its tokenizer."""

    model: Transformer
    model_cfg: ModelConfig
    tokenizer: Any


def load_policy(cfg: ml_collections.ConfigDict, mesh: Mesh | None, *, model_dir: str | None = None) -> Policy:
    """``model.path`` (or ``model_dir``) loaded in ``model.dtype`` / ``model.param_dtype``,
    each parameter straight into its sharding on ``mesh``; tokenizer from
    ``model.tokenizer_path`` or the model directory."""
    path = model_dir or cfg.model.path
    model, model_cfg = from_pretrained(path, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, mesh=mesh,
                                       remat=cfg.model.remat, attention_impl=cfg.model.attention_impl)
    return Policy(model, model_cfg, load_tokenizer(cfg.model.tokenizer_path or path))


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """The RL algorithm's static settings: loss, advantage estimator, rows per step."""

    loss: LossConfig
    advantages: AdvantageConfig
    prompts_per_step: int
    samples_per_prompt: int
    mini_batch_rows: int

    @property
    def batch_rows(self) -> int:
        """Rows in one step's train batch: prompts_per_step × samples_per_prompt."""
        return self.prompts_per_step * self.samples_per_prompt


def algorithm(cfg: ml_collections.ConfigDict) -> Algorithm:
    """The ``Algorithm`` of ``cfg.rl`` (validated)."""
    return Algorithm(loss=loss_config(cfg), advantages=advantage_config(cfg),
                     prompts_per_step=cfg.rl.prompts_per_step, samples_per_prompt=cfg.rl.samples_per_prompt,
                     mini_batch_rows=cfg.rl.mini_batch_prompts * cfg.rl.samples_per_prompt)
