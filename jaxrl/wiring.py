"""Wiring: a config → the components of a run (mesh, policy, data, rollout backend, rewarders).

Every builder here is a function of the config (and of what an earlier builder returned);
none holds state. ``train/loop.py`` sequences them, ``eval/`` and ``cli.py`` reuse them.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import ml_collections
from jax.sharding import Mesh

from jaxrl.config import advantage_config, loss_config, mesh_shape, rewarder_spec
from jaxrl.config.defaults import ConfigError
from jaxrl.data import synthetic
from jaxrl.data.sources import PromptIterator, make_prompt_iterator
from jaxrl.data.tokenizer import load_tokenizer
from jaxrl.models import ModelConfig, Transformer, from_pretrained
from jaxrl.rewards.base import RewardExecutor
from jaxrl.rewards.registry import get_task
from jaxrl.rewards.shaping import make_overlong_rewarder
from jaxrl.rl.advantages import AdvantageConfig
from jaxrl.rl.losses import LossConfig
from jaxrl.sampling.backend import RolloutBackend, make_backend
from jaxrl.sampling.engine import SamplingConfig
from jaxrl.sharding.mesh import make_mesh

# The rewarder whose score decides correctness (accuracy, pass@k, dynamic sampling's "acc").
CORRECT_COMPONENT = "correct"


def run_dir_of(cfg: ml_collections.ConfigDict) -> str:
    """RUN_DIR = run.root / run.name."""
    return os.path.join(cfg.run.root, cfg.run.name)


def mesh_of(cfg: ml_collections.ConfigDict) -> Mesh:
    """The (data, fsdp, tensor) mesh over all devices (ConfigError if it does not fit)."""
    return make_mesh(*mesh_shape(cfg, jax.device_count()))


def sampling_config(cfg: ml_collections.ConfigDict, *, temperature: float | None = None,
                    top_p: float | None = None) -> SamplingConfig:
    """The engine's SamplingConfig for training rollouts (or eval, with overrides)."""
    return SamplingConfig(
        max_prompt_tokens=cfg.data.max_prompt_tokens,
        max_new_tokens=cfg.sampling.max_new_tokens,
        temperature=cfg.sampling.temperature if temperature is None else temperature,
        top_k=cfg.sampling.top_k,
        top_p=cfg.sampling.top_p if top_p is None else top_p,
    )


def rollout_backend(cfg: ml_collections.ConfigDict, model_cfg: ModelConfig, mesh: Mesh | None, *,
                    max_rows_per_call: int | None = None, **sampling_overrides) -> RolloutBackend:
    """The ``sampling.backend`` rollout backend; decodes at most ``max_rows_per_call`` rows at
    once (default ``sampling.max_rows_per_call``; 0 = all)."""
    cap = cfg.sampling.max_rows_per_call if max_rows_per_call is None else max_rows_per_call
    return make_backend(cfg.sampling.backend, model_cfg, sampling_config(cfg, **sampling_overrides), mesh,
                        max_rows_per_call=cap)


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


def reward_executor(cfg: ml_collections.ConfigDict) -> RewardExecutor:
    """The executor that scores completions with ``rewarders(cfg)`` (close it when done)."""
    return RewardExecutor(rewarders(cfg), num_workers=cfg.rewards.num_workers, timeout_s=cfg.rewards.timeout_s,
                          failure_reward=cfg.rewards.failure_reward)


def data_files(cfg: ml_collections.ConfigDict, split: str = "train") -> list[str]:
    """Prompt files of ``split`` ("train" | "eval"); the synthetic task is written once to
    RUN_DIR/data (by process 0)."""
    if cfg.data.source == "files":
        return list(cfg.data.train_files if split == "train" else cfg.eval.files)
    if split == "eval" and cfg.eval.files:
        return list(cfg.eval.files)
    out_dir = os.path.join(run_dir_of(cfg), "data")
    path = os.path.join(out_dir, f"{'train' if split == 'train' else 'heldout'}.jsonl")
    if not os.path.isfile(path) and jax.process_index() == 0:
        synthetic.dump_splits(out_dir, num_train=cfg.data.synthetic_num_train,
                              num_heldout=cfg.data.synthetic_num_heldout, seed=cfg.run.seed,
                              difficulty=cfg.data.synthetic_difficulty, with_reference=False)
    return [path]


def prompt_options(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """The data.* settings that decide how a row becomes a prompt (train and eval alike)."""
    return dict(prompt_field=cfg.data.prompt_field, answer_field=cfg.data.answer_field,
                system_prompt=cfg.data.system_prompt, use_chat_template=cfg.data.use_chat_template,
                max_prompt_tokens=cfg.data.max_prompt_tokens, overlong=cfg.data.overlong_prompts)


def prompt_iterator(cfg: ml_collections.ConfigDict, tokenizer, files: list[str], batch_size: int, *,
                    shuffle: bool, num_epochs: int | None) -> PromptIterator:
    """The grain prompt iterator over ``files`` (every process reads the same stream)."""
    return make_prompt_iterator(files, tokenizer, batch_size=batch_size, seed=cfg.run.seed, shuffle=shuffle,
                                num_epochs=num_epochs, **prompt_options(cfg))


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
