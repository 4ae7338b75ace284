"""One validation pass over a config, and the typed objects built from its sections.

``validate`` raises ``ConfigError`` naming the key (or file) on a bad value, an impossible
combination, a missing file or a mesh that does not fit, before anything expensive starts.
Choices that are extension points (estimators, losses, tasks) are read from their
registries, so a registered extension is a valid value.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import ml_collections

from jaxrl.config.defaults import ConfigError
from jaxrl.data.presets import PRESETS, parse_eval_set
from jaxrl.data.sources import resolve_files
from jaxrl.models.config import ATTENTION_IMPLS, DTYPES
from jaxrl.rewards.registry import load_rewarder_spec, task_names
from jaxrl.rl.advantages import GRPO_SCALES, AdvantageConfig, estimator_names, get_estimator
from jaxrl.rl.losses import LossConfig
from jaxrl.sampling.config import LAYER_LOOPS
from jaxrl.sharding.mesh import resolve_axis_sizes

DATA_SOURCES = ("synthetic", "files")
SCHEDULES = ("constant", "cosine")
OLD_LOGP_SOURCES = ("trainer", "sampler")
REMAT = ("none", "full", "dots")
TOGGLES = ("auto", "on", "off")

_CHOICES = {
    "model.dtype": DTYPES,
    "model.param_dtype": DTYPES,
    "model.remat": REMAT,
    "model.attention_impl": ATTENTION_IMPLS,
    "data.source": DATA_SOURCES,
    "data.overlong_prompts": ("skip", "truncate"),
    "rl.grpo_scale": GRPO_SCALES,
    "rl.dynamic_sampling_metric": ("acc", "reward"),  # issue 12: the dynamic-sampling filter metric
    "rl.old_logp_source": OLD_LOGP_SOURCES,
    "rl.rollout_staleness": (0, 1),  # issue 16: one-step off-policy rollouts
    "optim.schedule": SCHEDULES,
    "checkpoint.resume": ("auto", "on", "off"),
    "logging.tensorboard": TOGGLES,
}
_POSITIVE = (
    "data.max_prompt_tokens", "sampling.max_new_tokens", "rl.prompts_per_step", "rl.samples_per_prompt",
    "rl.mini_batch_prompts", "rl.micro_batch_rows", "rl.epochs", "rl.max_sampling_rounds",
    "rl.logprob_chunk_size", "train.num_steps", "train.max_bad_steps", "checkpoint.every_steps",
    "checkpoint.keep", "rewards.timeout_s", "eval.max_examples", "eval.num_samples", "eval.batch_prompts",
    "rl.lr",
    "distributed.heartbeat_timeout_s",
)
_NON_NEGATIVE = (
    "optim.warmup_steps", "optim.weight_decay", "optim.grad_clip", "rl.tis_cap", "rewards.num_workers",
    "logging.samples_every", "logging.num_samples", "eval.every_steps", "rewards.format_weight",
    "sampling.top_k",
)


# Ranges beyond the sign checks: key -> (predicate, text for the error).
_RANGES = {
    "optim.b1": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "optim.b2": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "optim.eps": (lambda v: v > 0.0, "> 0"),
    "rl.positive_weight": (lambda v: v >= 0.0, ">= 0"),
    "run.seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
}


def _leaves(node, prefix: str = ""):
    """(dotted key, value) of every leaf of a ConfigDict (tuples are one leaf)."""
    for key in node.keys():
        value = node[key]
        if isinstance(value, ml_collections.ConfigDict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _check_numbers(cfg) -> None:
    """Every number in the config is finite; the ranges of ``_RANGES`` hold."""
    for key, value in _leaves(cfg):
        items = value if isinstance(value, (tuple, list)) else (value,)
        for item in items:
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"{key} must be a finite number, got {value}")
    for key, (ok, text) in _RANGES.items():
        if not ok(_get(cfg, key)):
            raise ConfigError(f"{key} must be {text}, got {_get(cfg, key)}")


def _check_run_name(cfg) -> None:
    """run.name is one directory name, so RUN_DIR stays under run.root."""
    name = cfg.run.name
    parts = [p for p in (os.sep, os.altsep) if p]
    if not name or name in (".", "..") or any(p in name for p in parts) or "\0" in name:
        raise ConfigError(f"run.name must be a single directory name (not empty, '.', '..', no '/'), got {name!r}")
    if not cfg.run.root:
        raise ConfigError("run.root must not be empty")


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def loss_config(cfg: ml_collections.ConfigDict) -> LossConfig:
    """The ``LossConfig`` of ``cfg.rl.loss`` (sentinels resolved: dual_clip_c 0/None = off,
    norm_constant 0/None = sampling.max_new_tokens)."""
    fields = {f.name: cfg.rl.loss[f.name] for f in dataclasses.fields(LossConfig)}
    fields["dual_clip_c"] = fields["dual_clip_c"] or None
    fields["norm_constant"] = fields["norm_constant"] or float(cfg.sampling.max_new_tokens)
    try:
        return LossConfig(**fields)
    except ValueError as error:
        raise ConfigError(str(error).replace("LossConfig.", "rl.loss.")) from None


def advantage_config(cfg: ml_collections.ConfigDict) -> AdvantageConfig:
    """The ``AdvantageConfig`` of ``rl.estimator``, ``rl.grpo_scale``, ``rl.positive_weight``
    and ``rewards.correct_threshold``."""
    return AdvantageConfig(estimator=cfg.rl.estimator, grpo_scale=cfg.rl.grpo_scale,
                           positive_weight=cfg.rl.positive_weight,
                           correct_threshold=cfg.rewards.correct_threshold)


def mesh_shape(cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with one -1 axis inferred; ConfigError when it does not fit."""
    try:
        return resolve_axis_sizes(num_devices, cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    except ValueError as error:
        raise ConfigError(f"mesh: {error}") from None


def rewarder_spec(spec: str) -> tuple[str, Any, float]:
    """One ``rewards.custom`` entry → (name, rewarder, weight); ConfigError naming the entry."""
    try:
        return load_rewarder_spec(spec)
    except ValueError as error:
        raise ConfigError(f"rewards.custom: {error}") from None


def _check_values(cfg) -> None:
    _check_numbers(cfg)
    _check_run_name(cfg)
    for key, allowed in _CHOICES.items():
        if _get(cfg, key) not in allowed:
            raise ConfigError(f"{key} must be one of {list(allowed)}, got {_get(cfg, key)!r}")
    if cfg.rewards.task not in task_names():
        raise ConfigError(f"rewards.task must be one of {list(task_names())}, got {cfg.rewards.task!r}")
    if cfg.rl.estimator not in estimator_names():
        raise ConfigError(f"rl.estimator must be one of {list(estimator_names())}, got {cfg.rl.estimator!r}")
    for key in _POSITIVE:
        if not _get(cfg, key) > 0:
            raise ConfigError(f"{key} must be > 0, got {_get(cfg, key)}")
    for key in _NON_NEGATIVE:
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {_get(cfg, key)}")
    for key, low, high in (("sampling.top_p", 0.0, 1.0), ("eval.top_p", 0.0, 1.0)):
        if not low < _get(cfg, key) <= high:
            raise ConfigError(f"{key} must be in (0, 1], got {_get(cfg, key)}")
    if not cfg.sampling.temperature > 0:
        raise ConfigError(f"sampling.temperature must be > 0, got {cfg.sampling.temperature}")
    if cfg.eval.temperature < 0:
        raise ConfigError(f"eval.temperature must be >= 0, got {cfg.eval.temperature}")
    if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {cfg.optim.min_lr_ratio}")
    loss_config(cfg)


def _check_combinations(cfg) -> None:
    if cfg.rl.samples_per_prompt < 2 and get_estimator(cfg.rl.estimator).needs_groups:
        raise ConfigError(
            f"rl.samples_per_prompt must be >= 2 for the group-relative estimator {cfg.rl.estimator!r}"
        )
    if cfg.rl.prompts_per_step % cfg.rl.mini_batch_prompts:
        raise ConfigError(
            f"rl.mini_batch_prompts={cfg.rl.mini_batch_prompts} must divide "
            f"rl.prompts_per_step={cfg.rl.prompts_per_step}"
        )
    mini_rows = cfg.rl.mini_batch_prompts * cfg.rl.samples_per_prompt
    if mini_rows % cfg.rl.micro_batch_rows:
        raise ConfigError(
            f"rl.micro_batch_rows={cfg.rl.micro_batch_rows} must divide the mini-batch of "
            f"rl.mini_batch_prompts x rl.samples_per_prompt = {mini_rows} rows"
        )
    _check_micro_batch_tokens(cfg, row_shards=1)
    if cfg.rl.old_logp_source == "sampler":
        if cfg.sampling.top_p < 1.0 or cfg.sampling.top_k:
            raise ConfigError(
                "rl.old_logp_source='sampler' needs sampling.top_p=1 and sampling.top_k=0: the "
                "sampler's log-probs are then those of the policy at the rollout temperature"
            )
        if cfg.rl.tis_cap:
            raise ConfigError("rl.tis_cap needs rl.old_logp_source='trainer' (it reweights by trainer/sampler)")
        if cfg.rl.rollout_staleness:
            raise ConfigError("rl.rollout_staleness=1 needs rl.old_logp_source='trainer': stale sampler "
                              "log-probs are not the policy being updated")
    if cfg.rewards.overlong_penalty and not 0 < cfg.rewards.overlong_buffer <= cfg.sampling.max_new_tokens:
        raise ConfigError(
            f"rewards.overlong_buffer must be in (0, sampling.max_new_tokens={cfg.sampling.max_new_tokens}], "
            f"got {cfg.rewards.overlong_buffer}"
        )
    if cfg.data.source == "files" and not cfg.data.train_files:
        raise ConfigError("data.train_files is empty but data.source='files'")
    if cfg.data.source == "files" and cfg.eval.every_steps and not (cfg.eval.files or cfg.eval.sets):
        raise ConfigError("eval.every_steps > 0 with data.source='files' needs eval.files or eval.sets")
    if cfg.data.preset not in PRESETS:
        raise ConfigError(f"data.preset={cfg.data.preset!r}; registered: {', '.join(sorted(PRESETS))}")
    if cfg.sampling.max_rows_per_call and cfg.sampling.max_rows_per_call < cfg.rl.samples_per_prompt:
        raise ConfigError(
            f"sampling.max_rows_per_call={cfg.sampling.max_rows_per_call} must be 0 (no cap) or at least "
            f"rl.samples_per_prompt={cfg.rl.samples_per_prompt} (one group)"
        )
    if cfg.sampling.layer_loop not in LAYER_LOOPS:
        raise ConfigError(f"sampling.layer_loop={cfg.sampling.layer_loop!r}; choose one of {', '.join(LAYER_LOOPS)}")
    threads = cfg.sampling.cpu_threads
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 0:
        raise ConfigError(f"sampling.cpu_threads must be an int >= 0 (0 = auto), got {threads!r}")
    if threads > 1 and cfg.sampling.backend != "static":
        raise ConfigError(f"sampling.cpu_threads={threads} works with sampling.backend='static' only, "
                          f"got {cfg.sampling.backend!r}")
    if threads > 1 and (cfg.distributed.num_processes or 0) > 1:
        raise ConfigError(f"sampling.cpu_threads={threads} is for one process; this run has "
                          f"distributed.num_processes={cfg.distributed.num_processes}")
    if threads > 1:
        import jax  # single process (checked above): reading the backend cannot race an initialize

        if jax.default_backend() != "cpu":
            raise ConfigError(f"sampling.cpu_threads={threads} is for CPU runs; this one runs on "
                              f"{jax.default_backend()!r} (set it to 0 = auto, or 1)")
    for spec in cfg.rewards.custom:
        rewarder_spec(spec)


def _check_micro_batch_tokens(cfg, row_shards: int) -> None:
    budget = cfg.rl.micro_batch_tokens
    prompt = 1 << (max(int(cfg.data.max_prompt_tokens), 16) - 1).bit_length()  # the widest prompt bucket
    full = prompt + cfg.sampling.max_new_tokens
    if budget < 0 or (budget and budget < row_shards * full):
        per = f" x mesh.data x mesh.fsdp = {row_shards}" if row_shards > 1 else ""
        raise ConfigError(
            f"rl.micro_batch_tokens={budget} must be 0 (fixed micro-batches of rl.micro_batch_rows) or at least "
            f"one full-width row per row shard: (prompt bucket {prompt} + sampling.max_new_tokens="
            f"{cfg.sampling.max_new_tokens}){per} = {row_shards * full} tokens")


def _check_files(cfg) -> None:
    if not os.path.isdir(cfg.model.path):
        raise ConfigError(f"model.path: model directory not found: {cfg.model.path}")
    model_json = os.path.join(cfg.model.path, "config.json")
    if not os.path.isfile(model_json):
        raise ConfigError(f"model.path: no config.json in {cfg.model.path}")
    try:
        with open(model_json, encoding="utf-8") as handle:
            if not isinstance(json.load(handle), dict):
                raise ValueError("not a JSON object")
    except (OSError, ValueError) as error:
        raise ConfigError(f"model.path: {model_json} is not a valid config.json ({error})") from None
    if cfg.model.tokenizer_path and not os.path.isdir(cfg.model.tokenizer_path):
        raise ConfigError(f"model.tokenizer_path: directory not found: {cfg.model.tokenizer_path}")
    file_lists = (("data.train_files", cfg.data.train_files if cfg.data.source == "files" else ()),
                  ("eval.files", cfg.eval.files), ("eval.sets", [parse_eval_set(s)[2] for s in cfg.eval.sets]))
    for key, patterns in file_lists:
        if patterns:
            try:
                resolve_files(list(patterns))
            except (FileNotFoundError, ValueError) as error:
                raise ConfigError(f"{key}: {error}") from None


def _check_mesh(cfg, num_devices: int) -> None:
    data, fsdp, _ = mesh_shape(cfg, num_devices)
    mini_rows = cfg.rl.mini_batch_prompts * cfg.rl.samples_per_prompt
    if mini_rows % (data * fsdp):
        raise ConfigError(
            f"rl.mini_batch_prompts x rl.samples_per_prompt = {mini_rows} rows must divide over "
            f"mesh.data x mesh.fsdp = {data * fsdp} devices"
        )
    _check_micro_batch_tokens(cfg, row_shards=data * fsdp)


def validate(cfg: ml_collections.ConfigDict, *, num_devices: int | None = None, check_files: bool = True) -> None:
    """Raises ConfigError (naming the key) on a bad value, combination, file or mesh."""
    _check_values(cfg)
    _check_combinations(cfg)
    if check_files:
        _check_files(cfg)
    if num_devices is not None:
        _check_mesh(cfg, num_devices)
