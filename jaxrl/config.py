"""Experiment configuration: one base ``ml_collections.ConfigDict`` holding every knob.

An experiment file (``configs/<name>.py``) defines ``get_config()`` returning a modified
``base_config()``. Command-line overrides ``--config.rl.lr=1e-6`` are applied on top, typed
by the existing value (so ``--config.rl.samples_per_prompt=abc`` fails naming the key).
The config is locked: an unknown key (a typo) is an error naming the key and listing the
keys that exist. ``validate`` checks value ranges, impossible combinations, missing files
and the mesh against the devices before anything expensive starts.

Units: lengths in tokens, learning-rate warm-up in RL steps, times in seconds.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import json
import os
from typing import Any, Sequence

import ml_collections
from ml_collections import config_dict

from jaxrl.rl.advantages import ESTIMATORS, GRPO_SCALES
from jaxrl.rl.losses import (
    AGGREGATIONS,
    ENTROPY_SOURCES,
    KL_TYPES,
    LOSS_TYPES,
    MASK_NORMALIZERS,
    MASK_SCOPES,
    TOKEN_MASKS,
    LossConfig,
)

TASKS = ("countdown", "math")
DATA_SOURCES = ("synthetic", "files")
SCHEDULES = ("constant", "cosine")
OLD_LOGP_SOURCES = ("trainer", "sampler")
DTYPES = ("float32", "bfloat16")
REMAT = ("none", "full", "dots")
TOGGLES = ("auto", "on", "off")


class ConfigError(ValueError):
    """A user error in the configuration; the message names the key (or file)."""


def base_config() -> ml_collections.ConfigDict:
    """The base config with every knob (see the comment next to each)."""
    c = ml_collections.ConfigDict()

    c.run = ml_collections.ConfigDict()
    c.run.name = "default"  # run directory name under run.root
    c.run.root = "runs"  # parent directory of run directories
    c.run.seed = 0  # seeds sampling, data order and the synthetic task

    c.model = ml_collections.ConfigDict()
    c.model.path = "assets/default_model"  # local HF directory (config.json + safetensors)
    c.model.tokenizer_path = ""  # tokenizer directory; "" = model.path
    c.model.dtype = "float32"  # compute dtype of activations/matmuls: float32 | bfloat16
    c.model.param_dtype = "float32"  # master-weight (optimizer) dtype; float32 recommended
    c.model.remat = "none"  # activation recomputation per layer: none | full | dots

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"  # synthetic (countdown-lite, generated) | files
    c.data.train_files = ()  # jsonl/parquet paths or globs (data.source = files)
    c.data.prompt_field = "prompt"  # column holding the prompt text
    c.data.answer_field = "answer"  # column holding the gold answer
    c.data.system_prompt = config_dict.placeholder(str)  # optional system turn
    c.data.use_chat_template = True  # render prompts with the tokenizer's chat template
    c.data.max_prompt_tokens = 64  # prompts are left-padded to exactly this (static shapes)
    c.data.overlong_prompts = "skip"  # skip | truncate prompts longer than max_prompt_tokens
    c.data.shuffle = True  # shuffle rows each epoch (seeded by run.seed)
    c.data.synthetic_num_train = 20000  # problems generated for data.source = synthetic
    c.data.synthetic_num_heldout = 200  # held-out problems (used by eval)
    c.data.synthetic_difficulty = "medium"  # countdown difficulty (see jaxrl.data.synthetic)

    c.sampling = ml_collections.ConfigDict()
    c.sampling.temperature = 1.0  # rollout temperature (also used for the trainer's log-probs)
    c.sampling.top_p = 1.0  # nucleus sampling; 1.0 = off
    c.sampling.top_k = 0  # top-k sampling; 0 = off
    c.sampling.max_new_tokens = 64  # maximum response length L_max
    c.sampling.max_rows_per_call = 0  # cap on rows (prompts x n) decoded at once (KV-cache memory); 0 = all

    c.rewards = ml_collections.ConfigDict()
    c.rewards.task = "countdown"  # countdown (synthetic verifier) | math (boxed-answer grader)
    c.rewards.task_weight = 1.0  # weight of the correctness reward
    c.rewards.format_weight = 0.0  # weight of the format reward (0 = not computed)
    c.rewards.overlong_penalty = False  # DAPO soft overlong punishment added to the reward
    c.rewards.overlong_buffer = 16  # L_cache of the soft overlong punishment (tokens)
    c.rewards.custom = ()  # extra rewarders "package.module:function=weight" (weight default 1)
    c.rewards.num_workers = 0  # reward process pool size; 0 = inline in the trainer
    c.rewards.timeout_s = 10.0  # limit per rewarder call
    c.rewards.failure_reward = 0.0  # component value of a failed/hung call
    c.rewards.correct_threshold = 0.5  # task reward >= this counts as correct (accuracy)

    c.rl = ml_collections.ConfigDict()
    c.rl.prompts_per_step = 8  # P: groups in one step's train batch
    c.rl.samples_per_prompt = 8  # n: responses per prompt (group size)
    c.rl.mini_batch_prompts = 4  # prompts per optimizer update (P / this updates per epoch)
    c.rl.micro_batch_rows = 16  # rows per gradient-accumulation micro-batch
    c.rl.epochs = 1  # μ: passes over the step batch
    c.rl.lr = 1e-6  # peak learning rate
    c.rl.estimator = "grpo"  # advantage estimator (jaxrl.rl.advantages.ESTIMATORS)
    c.rl.grpo_scale = "group"  # grpo std scale: group | batch | none
    c.rl.positive_weight = 0.1  # W-REINFORCE λ
    c.rl.dynamic_sampling = False  # DAPO: keep only groups whose rewards are not all equal
    c.rl.max_sampling_rounds = 3  # prompt batches drawn per step at most (dynamic sampling)
    c.rl.overlong_filter = False  # mask truncated responses out of the loss
    c.rl.old_logp_source = "trainer"  # trainer (recomputed) | sampler (strictly on-policy only)
    c.rl.measure_logprob_gap = True  # trainer log-prob pass to log the sampler–trainer gap
    c.rl.tis_cap = 0.0  # truncated importance sampling: weight min(π_train/π_sampler, cap); 0 = off
    c.rl.logprob_chunk_size = 128  # positions per chunk of the log-prob/entropy scan

    c.rl.loss = ml_collections.ConfigDict()  # fields of jaxrl.rl.losses.LossConfig
    c.rl.loss.loss_type = "ppo"  # ppo | gspo | gspo_token | cispo
    c.rl.loss.clip_eps_low = 0.2  # PPO clip 1 − ε_low
    c.rl.loss.clip_eps_high = 0.2  # PPO clip 1 + ε_high (DAPO clip-higher: 0.28)
    c.rl.loss.dual_clip_c = 0.0  # dual-clip c for negative advantages; 0 = off
    c.rl.loss.aggregation = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm
    c.rl.loss.norm_constant = 0.0  # Dr.GRPO constant; 0 = sampling.max_new_tokens
    c.rl.loss.kl_coef = 0.0  # β of the KL to the frozen reference; 0 = no reference model
    c.rl.loss.kl_type = "k3"  # k1 | k2 | k3
    c.rl.loss.entropy_coef = 0.0  # entropy bonus weight
    c.rl.loss.token_mask = "all"  # all | top (forking tokens) | bottom
    c.rl.loss.entropy_rho = 0.2  # ρ: fraction of tokens kept by token_mask top/bottom
    c.rl.loss.mask_scope = "batch"  # batch (whole step, the paper) | minibatch
    c.rl.loss.mask_normalizer = "all_tokens"  # all_tokens (paper) | selected_tokens
    c.rl.loss.entropy_source = "train"  # train (trainer's policy at step start) | rollout (sampler)
    c.rl.loss.mask_include_truncated = True  # truncated rows count in the threshold population

    c.optim = ml_collections.ConfigDict()
    c.optim.warmup_steps = 0  # linear warm-up length in RL steps
    c.optim.schedule = "constant"  # after warm-up: constant | cosine (to min_lr_ratio at train.num_steps)
    c.optim.min_lr_ratio = 0.0  # cosine floor as a fraction of rl.lr
    c.optim.weight_decay = 0.0  # AdamW decoupled weight decay (matrices only)
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.grad_clip = 1.0  # global-norm clip; 0 = off

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 100  # RL steps
    c.train.max_bad_steps = 3  # stop after this many consecutive steps with a non-finite update

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 50  # save every K steps (and at the end, and on SIGTERM/SIGINT)
    c.checkpoint.keep = 3  # keep the last N checkpoints
    c.checkpoint.async_save = True  # write in the background
    c.checkpoint.resume = "auto"  # auto (resume when the run dir has one) | on | off
    c.checkpoint.save_final_model = True  # write final_model/ (HF directory) at the end

    c.logging = ml_collections.ConfigDict()
    c.logging.progress_bar = True  # one-line progress on stderr
    c.logging.tensorboard = "auto"  # auto (when tensorboardX/tensorboard importable) | on | off
    c.logging.wandb = False  # log to Weights & Biases (requires wandb)
    c.logging.wandb_project = "jaxrl"
    c.logging.samples_every = 10  # write completions to samples.jsonl every K steps; 0 = never
    c.logging.num_samples = 4  # completions written each time

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 0  # periodic eval during training; 0 = off
    c.eval.files = ()  # eval jsonl/parquet; empty with data.source = synthetic → held-out split
    c.eval.max_examples = 64  # evaluate on the first N examples
    c.eval.num_samples = 4  # k: samples per problem for avg@k / pass@k
    c.eval.temperature = 1.0  # sampling temperature for avg@k / pass@k
    c.eval.top_p = 1.0  # DAPO evaluates with top-p 0.7
    c.eval.batch_prompts = 16  # prompts per generation call

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # data-parallel axis; -1 = the devices not used by the other axes
    c.mesh.fsdp = 1  # fully sharded data parallel axis (one axis may be -1)
    c.mesh.tensor = 1  # tensor-parallel axis

    # Multi-process runs. TPU pod slices and multi-task SLURM jobs are detected from the
    # environment; set coordinator_address only to start jax.distributed explicitly.
    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ""  # "host:port" of process 0; "" = auto-detect
    c.distributed.num_processes = 0  # with coordinator_address: total processes
    c.distributed.process_id = -1  # with coordinator_address: this process's index
    c.lock()
    return c


# ----------------------------------------------------------------------------- loading
def _import_config_file(path: str) -> ml_collections.ConfigDict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"_jaxrl_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ConfigError:
        raise
    except (AttributeError, KeyError, TypeError) as error:
        raise ConfigError(f"{path}: {_short(error)}") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} does not define get_config()")
    try:
        cfg = module.get_config()
    except (AttributeError, KeyError, TypeError) as error:
        raise ConfigError(f"{path}: get_config(): {_describe_locked_error(error)}") from None
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict")
    return cfg


def _dotted_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for key in cfg.keys():
        keys.append(prefix + key)
        if isinstance(cfg[key], ml_collections.ConfigDict):
            keys.extend(_dotted_keys(cfg[key], prefix + key + "."))
    return keys


def _describe_locked_error(error: BaseException) -> str:
    """'unknown config key 'x'; did you mean 'a.b.y'?' for ml_collections' locked-key error."""
    import re

    match = re.search(r'Key "([^"]+)" does not exist', str(error))
    if not match:
        return _short(error)
    name = match.group(1)
    known = _dotted_keys(base_config())
    leaf_to_dotted = {}
    for dotted in known:
        leaf_to_dotted.setdefault(dotted.split(".")[-1], dotted)
    hint = difflib.get_close_matches(name, list(leaf_to_dotted), n=1)
    suggestion = f"; did you mean {leaf_to_dotted[hint[0]]!r}?" if hint else ""
    return f"unknown config key {name!r}{suggestion}"


def _short(error: BaseException) -> str:
    text = str(error).split("Other fields present")[0].strip().rstrip(".,")
    return text.strip("'\"")


def _lookup_parent(cfg: ml_collections.ConfigDict, dotted: str) -> tuple[ml_collections.ConfigDict, str]:
    """The ConfigDict holding ``dotted``'s last part; an unknown part is a ConfigError."""
    parts = dotted.split(".")
    node = cfg
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[: depth + 1])
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            keys = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            hint = difflib.get_close_matches(part, keys, n=1)
            suggestion = f"; did you mean {'.'.join(parts[:depth] + [hint[0]])!r}?" if hint else ""
            raise ConfigError(f"unknown config key {prefix!r}{suggestion}")
        if depth < len(parts) - 1:
            node = node[part]
    return node, parts[-1]


def _coerce(key: str, text: str, current: Any) -> Any:
    """Parses override ``text`` to the type of ``current`` (the base value)."""
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"config key {key!r} is a section; override one of its fields")
    if isinstance(current, bool):
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"config key {key!r} expects true/false, got {text!r}")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"config key {key!r} expects an integer, got {text!r}") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"config key {key!r} expects a number, got {text!r}") from None
    if isinstance(current, (tuple, list)):
        stripped = text.strip()
        if stripped.startswith(("[", "(")):
            try:
                value = ast.literal_eval(stripped)
            except (ValueError, SyntaxError):
                raise ConfigError(f"config key {key!r} expects a list, got {text!r}") from None
            return tuple(value)
        return tuple(part.strip() for part in stripped.split(",") if part.strip())
    return text


def apply_override(cfg: ml_collections.ConfigDict, dotted: str, text: str) -> None:
    """Sets ``cfg.<dotted>`` from its command-line text, typed by the existing value."""
    parent, leaf = _lookup_parent(cfg, dotted)
    field = parent.get_ref(leaf) if isinstance(parent._fields.get(leaf), config_dict.FieldReference) else None
    current = parent[leaf]
    if current is None and field is not None:
        kind = field.get_type()
        value: Any = text if kind is str else _coerce(dotted, text, kind())
        if text.strip().lower() in ("none", "null"):
            value = None
    else:
        value = _coerce(dotted, text, current)
    try:
        parent[leaf] = value
    except (TypeError, ValueError) as error:
        raise ConfigError(f"config key {dotted!r}: {_short(error)}") from None


def parse_overrides(argv: Sequence[str]) -> list[tuple[str, str]]:
    """``["--config.a.b=1", "--config.c", "x"]`` → ``[("a.b", "1"), ("c", "x")]``."""
    pairs = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        if not arg.startswith("--config."):
            raise ConfigError(f"unrecognised argument {arg!r} (overrides look like --config.rl.lr=1e-6)")
        body = arg[len("--config."):]
        if "=" in body:
            key, value = body.split("=", 1)
        else:
            if index + 1 >= len(argv):
                raise ConfigError(f"override {arg!r} has no value")
            key, value = body, argv[index + 1]
            index += 1
        pairs.append((key, value))
        index += 1
    return pairs


def load_config(path: str | None, overrides: Sequence[tuple[str, str]] | Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Experiment file (``get_config()``; None = the base config) + overrides, validated.

    ``overrides`` are ``(dotted_key, text)`` pairs or raw ``--config.k=v`` arguments.
    Raises ConfigError naming the key or file.
    """
    cfg = base_config() if path is None else _import_config_file(path)
    _check_against_base(cfg, base_config(), "")
    cfg.lock()
    if overrides and isinstance(overrides[0], str):
        overrides = parse_overrides(overrides)  # type: ignore[arg-type]
    for key, text in overrides:
        apply_override(cfg, key, text)
    validate(cfg)
    return cfg


def _check_against_base(cfg, base, prefix: str) -> None:
    """An experiment file may only change keys of the base config (catches typos)."""
    for key in cfg.keys():
        name = f"{prefix}{key}"
        if key not in base:
            hint = difflib.get_close_matches(key, list(base.keys()), n=1)
            suggestion = f"; did you mean {prefix + hint[0]!r}?" if hint else ""
            raise ConfigError(f"unknown config key {name!r}{suggestion}")
        if isinstance(base[key], ml_collections.ConfigDict):
            if not isinstance(cfg[key], ml_collections.ConfigDict):
                raise ConfigError(f"config key {name!r} must be a section")
            _check_against_base(cfg[key], base[key], name + ".")
    for key in base.keys():
        if key not in cfg:
            raise ConfigError(f"config is missing key {prefix + key!r} (start from jaxrl.config.base_config())")


def config_from_json(text: str) -> ml_collections.ConfigDict:
    """Rebuilds a config from ``config.json`` of a run directory (validated against the base)."""
    data = json.loads(text)
    cfg = base_config()

    def fill(node, values, prefix):
        for key, value in values.items():
            name = prefix + key
            if key not in node:
                raise ConfigError(f"unknown config key {name!r} in saved config")
            if isinstance(node[key], ml_collections.ConfigDict):
                fill(node[key], value, name + ".")
            else:
                node[key] = tuple(value) if isinstance(value, list) else value

    fill(cfg, data, "")
    return cfg


# ----------------------------------------------------------------------------- validation
def _choice(cfg, key: str, allowed: Sequence[str]) -> None:
    value = _get(cfg, key)
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _positive(cfg, key: str, *, allow_zero: bool = False) -> None:
    value = _get(cfg, key)
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def loss_config(cfg: ml_collections.ConfigDict) -> LossConfig:
    """The ``LossConfig`` described by ``cfg.rl.loss`` (0 sentinels resolved)."""
    loss = cfg.rl.loss
    norm_constant = loss.norm_constant or float(cfg.sampling.max_new_tokens)
    try:
        return LossConfig(
            loss_type=loss.loss_type,
            clip_eps_low=loss.clip_eps_low,
            clip_eps_high=loss.clip_eps_high,
            dual_clip_c=loss.dual_clip_c or None,
            aggregation=loss.aggregation,
            norm_constant=norm_constant,
            kl_coef=loss.kl_coef,
            kl_type=loss.kl_type,
            entropy_coef=loss.entropy_coef,
            token_mask=loss.token_mask,
            entropy_rho=loss.entropy_rho,
            mask_scope=loss.mask_scope,
            mask_normalizer=loss.mask_normalizer,
            entropy_source=loss.entropy_source,
            mask_include_truncated=loss.mask_include_truncated,
        )
    except ValueError as error:
        raise ConfigError(str(error).replace("LossConfig.", "rl.loss.")) from None


def mesh_shape(cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with one -1 axis inferred; ConfigError when it does not fit."""
    from jaxrl.sharding.mesh import resolve_axis_sizes

    try:
        return resolve_axis_sizes(num_devices, cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    except ValueError as error:
        raise ConfigError(f"mesh: {error}") from None


def validate(cfg: ml_collections.ConfigDict, *, num_devices: int | None = None, check_files: bool = True) -> None:
    """Raises ConfigError (naming the key) on a bad value, combination, file or mesh."""
    _choice(cfg, "model.dtype", DTYPES)
    _choice(cfg, "model.param_dtype", DTYPES)
    _choice(cfg, "model.remat", REMAT)
    _choice(cfg, "data.source", DATA_SOURCES)
    _choice(cfg, "data.overlong_prompts", ("skip", "truncate"))
    _choice(cfg, "rewards.task", TASKS)
    _choice(cfg, "rl.estimator", ESTIMATORS)
    _choice(cfg, "rl.grpo_scale", GRPO_SCALES)
    _choice(cfg, "rl.old_logp_source", OLD_LOGP_SOURCES)
    _choice(cfg, "rl.loss.loss_type", LOSS_TYPES)
    _choice(cfg, "rl.loss.aggregation", AGGREGATIONS)
    _choice(cfg, "rl.loss.kl_type", KL_TYPES)
    _choice(cfg, "rl.loss.token_mask", TOKEN_MASKS)
    _choice(cfg, "rl.loss.mask_scope", MASK_SCOPES)
    _choice(cfg, "rl.loss.mask_normalizer", MASK_NORMALIZERS)
    _choice(cfg, "rl.loss.entropy_source", ENTROPY_SOURCES)
    _choice(cfg, "optim.schedule", SCHEDULES)
    _choice(cfg, "checkpoint.resume", ("auto", "on", "off"))
    _choice(cfg, "logging.tensorboard", TOGGLES)
    for key in ("data.max_prompt_tokens", "sampling.max_new_tokens", "rl.prompts_per_step",
                "rl.samples_per_prompt", "rl.mini_batch_prompts", "rl.micro_batch_rows", "rl.epochs",
                "rl.max_sampling_rounds", "rl.logprob_chunk_size", "train.num_steps",
                "train.max_bad_steps", "checkpoint.every_steps", "checkpoint.keep",
                "rewards.timeout_s", "eval.max_examples", "eval.num_samples", "eval.batch_prompts",
                "rl.lr"):
        _positive(cfg, key)
    for key in ("optim.warmup_steps", "optim.weight_decay", "optim.grad_clip", "rl.tis_cap",
                "rewards.num_workers", "logging.samples_every", "logging.num_samples",
                "eval.every_steps", "rewards.format_weight", "sampling.top_k"):
        _positive(cfg, key, allow_zero=True)
    if not 0.0 < cfg.sampling.top_p <= 1.0:
        raise ConfigError(f"sampling.top_p must be in (0, 1], got {cfg.sampling.top_p}")
    if not 0.0 < cfg.eval.top_p <= 1.0:
        raise ConfigError(f"eval.top_p must be in (0, 1], got {cfg.eval.top_p}")
    if not cfg.sampling.temperature > 0:
        raise ConfigError(f"sampling.temperature must be > 0, got {cfg.sampling.temperature}")
    if cfg.eval.temperature < 0:
        raise ConfigError(f"eval.temperature must be >= 0, got {cfg.eval.temperature}")
    if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {cfg.optim.min_lr_ratio}")
    if cfg.rl.samples_per_prompt < 2 and cfg.rl.estimator in ("grpo", "dr_grpo", "rloo"):
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
    if cfg.rl.old_logp_source == "sampler":
        if cfg.sampling.top_p < 1.0 or cfg.sampling.top_k:
            raise ConfigError(
                "rl.old_logp_source='sampler' needs sampling.top_p=1 and sampling.top_k=0: the "
                "sampler's log-probs are then those of the policy at the rollout temperature"
            )
        if cfg.rl.tis_cap:
            raise ConfigError("rl.tis_cap needs rl.old_logp_source='trainer' (it reweights by trainer/sampler)")
    if cfg.rewards.overlong_penalty and not 0 < cfg.rewards.overlong_buffer <= cfg.sampling.max_new_tokens:
        raise ConfigError(
            f"rewards.overlong_buffer must be in (0, sampling.max_new_tokens={cfg.sampling.max_new_tokens}], "
            f"got {cfg.rewards.overlong_buffer}"
        )
    if cfg.rl.loss.kl_coef < 0:
        raise ConfigError(f"rl.loss.kl_coef must be >= 0, got {cfg.rl.loss.kl_coef}")
    loss_config(cfg)
    if cfg.data.source == "files" and not cfg.data.train_files:
        raise ConfigError("data.train_files is empty but data.source='files'")
    if cfg.data.source == "files" and cfg.eval.every_steps and not cfg.eval.files:
        raise ConfigError("eval.every_steps > 0 with data.source='files' needs eval.files")
    for spec in cfg.rewards.custom:
        resolve_rewarder_spec(spec)
    if check_files:
        _check_model_dir(cfg.model.path, "model.path")
        if cfg.model.tokenizer_path and not os.path.isdir(cfg.model.tokenizer_path):
            raise ConfigError(f"model.tokenizer_path: directory not found: {cfg.model.tokenizer_path}")
        if cfg.data.source == "files":
            _check_files(cfg.data.train_files, "data.train_files")
        if cfg.eval.files:
            _check_files(cfg.eval.files, "eval.files")
    if num_devices is not None:
        data, fsdp, _ = mesh_shape(cfg, num_devices)
        mini_rows = cfg.rl.mini_batch_prompts * cfg.rl.samples_per_prompt
        if mini_rows % (data * fsdp):
            raise ConfigError(
                f"rl.mini_batch_prompts x rl.samples_per_prompt = {mini_rows} rows must divide over "
                f"mesh.data x mesh.fsdp = {data * fsdp} devices"
            )
    if cfg.sampling.max_rows_per_call and cfg.sampling.max_rows_per_call < cfg.rl.samples_per_prompt:
        raise ConfigError(
            f"sampling.max_rows_per_call={cfg.sampling.max_rows_per_call} must be 0 (no cap) or at least "
            f"rl.samples_per_prompt={cfg.rl.samples_per_prompt} (one group)"
        )


def resolve_rewarder_spec(spec: str) -> tuple[str, Any, float]:
    """``"pkg.mod:fn=weight"`` → (name "fn", the function, weight); ConfigError naming rewards.custom."""
    target, _, weight_text = spec.partition("=")
    module_name, _, function_name = target.partition(":")
    if not module_name or not function_name:
        raise ConfigError(f"rewards.custom entry {spec!r} must look like 'package.module:function=weight'")
    try:
        weight = float(weight_text) if weight_text else 1.0
    except ValueError:
        raise ConfigError(f"rewards.custom entry {spec!r}: weight {weight_text!r} is not a number") from None
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"rewards.custom entry {spec!r}: cannot import {module_name!r} ({error})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"rewards.custom entry {spec!r}: {module_name} has no function {function_name!r}")
    return function_name, function, weight


def _check_model_dir(path: str, key: str) -> None:
    if not os.path.isdir(path):
        raise ConfigError(f"{key}: model directory not found: {path}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"{key}: no config.json in {path}")


def _check_files(patterns: Sequence[str], key: str) -> None:
    from jaxrl.data.sources import resolve_files

    try:
        resolve_files(list(patterns))
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"{key}: {error}") from None


def to_json(cfg: ml_collections.ConfigDict) -> str:
    """The resolved config as indented JSON (written to RUN_DIR/config.json)."""
    return cfg.to_json(indent=2, sort_keys=True)
