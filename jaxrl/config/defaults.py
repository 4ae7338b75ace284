"""The base config: every knob of a run, with its default and a comment.

An experiment file (``configs/<name>.py``) defines ``get_config()`` returning a modified
``base_config()``. Sections that configure a component with its own dataclass are derived
from that dataclass's fields (``rl.loss`` from ``jaxrl.rl.losses.LossConfig``), so each
default lives in exactly one place.

Units: lengths in tokens, learning-rate warm-up in RL steps, times in seconds.
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from jaxrl.rl.losses import LossConfig


class ConfigError(ValueError):
    """A user error in the configuration; the message names the key (or file)."""


def section_from_dataclass(cls) -> ml_collections.ConfigDict:
    """A config section with one key per field of dataclass ``cls``, holding its default;
    a ``None`` default becomes a typed placeholder (float, or str) so overrides still type-check."""
    section = ml_collections.ConfigDict()
    for field in dataclasses.fields(cls):
        value = field.default
        if value is None:
            kind = str if "str" in str(field.type) else float
            value = config_dict.placeholder(kind)
        section[field.name] = value
    return section


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
    c.model.attention_impl = "auto"  # training/prefill attention: auto | xla | blocked | cudnn | tpu_flash

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"  # synthetic (countdown-lite, generated) | files
    c.data.train_files = ()  # jsonl/json/parquet paths, globs or save_to_disk dirs (data.source = files)
    # Row layout (jaxrl.data.presets): generic | dapo_math | gsm8k | math | aime | countdown
    # (or a registered one). It fixes where the prompt, gold answer and id live and how the
    # gold is normalised; the three *_field keys below override it ("" = the preset's).
    c.data.preset = "generic"
    c.data.prompt_field = ""  # dotted path to the prompt: text or a list of chat messages
    c.data.answer_field = ""  # dotted path to the gold answer (read as text, stripped)
    c.data.id_field = ""  # dotted path to the row id
    c.data.system_prompt = config_dict.placeholder(str)  # optional system turn (unless the row has one)
    c.data.prompt_template = config_dict.placeholder(str)  # e.g. "{prompt}\nPut the answer in \\boxed{}."
    c.data.use_chat_template = True  # render prompts with the tokenizer's chat template
    c.data.chat_template_kwargs = "{}"  # JSON object for the template, e.g. '{"enable_thinking": false}'
    c.data.drop_duplicates = False  # duplicate rows (same prompt and gold) are counted; drop them too
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
    c.sampling.backend = "static"  # rollout backend (jaxrl.sampling.backend registry)
    c.sampling.max_rows_per_call = 0  # cap on rows (prompts x n) decoded at once (KV-cache memory); 0 = all
    # static backend, single-process CPU only: decode the rows as this many concurrent engine
    # calls on host threads (one XLA:CPU program uses ~1 core); 1 = one call; 0 = auto (the
    # available cores, at most 8, where threads can run; 1 with rl.rollout_staleness=1, whose
    # overlap needs a sampler that returns before its rows are computed)
    c.sampling.cpu_threads = 0
    # static engine's decode layers: "rolled" (one loop body: compiles ~3.5x faster on 28
    # layers, ~10% slower with 2 CPU threads), "unrolled", or "auto" (rolled on CPU for >= 16
    # layers and <= 256 cache slots); the same rollout either way
    c.sampling.layer_loop = "auto"
    # Stop ids: the model's (config.json + generation_config.json eos ids), these ids, and each
    # stop string that is one token; longer stop strings are matched in text after sampling
    # (the completion is cut there and the tokens after the cut leave the loss: data/stops.py).
    c.sampling.stop_token_ids = ()
    c.sampling.stop_strings = ()

    c.rewards = ml_collections.ConfigDict()
    c.rewards.task = "countdown"  # countdown (synthetic verifier) | math (boxed-answer grader)
    c.rewards.task_weight = 1.0  # weight of the correctness reward
    c.rewards.format_weight = 0.0  # weight of the format reward (0 = not computed)
    c.rewards.overlong_penalty = False  # DAPO soft overlong punishment added to the reward
    c.rewards.overlong_buffer = 16  # L_cache of the soft overlong punishment (tokens)
    c.rewards.custom = ()  # extra rewarders "package.module:function=weight" (weight default 1)
    c.rewards.num_workers = 4  # reward worker processes (crash-isolated, forked); 0 = inline (debugging)
    c.rewards.timeout_s = 10.0  # limit per rewarder call (hung calls time out concurrently)
    c.rewards.failure_reward = 0.0  # component value of a failed/hung call
    c.rewards.correct_threshold = 0.5  # task reward >= this counts as correct (accuracy)

    c.rl = ml_collections.ConfigDict()
    c.rl.prompts_per_step = 8  # P: groups in one step's train batch
    c.rl.samples_per_prompt = 8  # n: responses per prompt (group size)
    c.rl.mini_batch_prompts = 4  # prompts per optimizer update (P / this updates per epoch)
    c.rl.micro_batch_rows = 16  # rows per gradient-accumulation micro-batch
    # > 0: micro-batches by a token budget instead (rows x own width <= this; docs/design.md §1)
    c.rl.micro_batch_tokens = 0
    c.rl.epochs = 1  # μ: passes over the step batch
    c.rl.lr = 1e-6  # peak learning rate
    c.rl.estimator = "grpo"  # advantage estimator (jaxrl.rl.advantages.ESTIMATORS)
    c.rl.grpo_scale = "group"  # grpo std scale: group | batch | none
    c.rl.positive_weight = 0.1  # W-REINFORCE λ
    c.rl.dynamic_sampling = False  # DAPO: keep only groups with spread in rl.dynamic_sampling_metric
    # Dynamic sampling keeps groups whose metric is not all equal: "acc" = correctness (the
    # `correct` component >= rewards.correct_threshold; DAPO) | "reward" = total reward.
    c.rl.dynamic_sampling_metric = "acc"
    c.rl.max_sampling_rounds = 3  # prompt batches drawn per step at most (dynamic sampling)
    c.rl.overlong_filter = False  # mask truncated responses out of the loss
    c.rl.old_logp_source = "trainer"  # trainer (recomputed) | sampler (strictly on-policy only)
    c.rl.measure_logprob_gap = True  # trainer log-prob pass to log the sampler–trainer gap
    c.rl.tis_cap = 0.0  # truncated importance sampling: weight min(π_train/π_sampler, cap); 0 = off
    c.rl.logprob_chunk_size = 128  # positions per chunk of the log-prob/entropy scan
    # 0: each step samples with the params it updates. 1 (one-step off-policy): step t+1's first
    # sampling round runs with step t's params while step t updates (overlapped on the devices).
    c.rl.rollout_staleness = 0

    # Every field of jaxrl.rl.losses.LossConfig, with its default (documented there): the
    # loss's defaults live in one place. Sentinels: dual_clip_c None = off; norm_constant
    # None = sampling.max_new_tokens.
    c.rl.loss = section_from_dataclass(LossConfig)

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
    c.eval.files = ()  # eval files read with data.preset; empty with data.source = synthetic → held-out split
    # More held-out sets, each "name=preset:path" (preset optional: "name=path" uses data.preset),
    # e.g. ("math500=math:data/math500.jsonl", "aime24=aime:data/aime24.parquet"); each is reported apart.
    c.eval.sets = ()
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
    c.distributed.heartbeat_timeout_s = 30.0  # a process silent this long is reported dead (all stop)
    c.lock()
    return c
