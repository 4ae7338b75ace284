"""DAPO + high-entropy forking tokens (ρ = 0.2) on Qwen3-8B ("Beyond the 80/20 Rule").

The paper's recipe: lr 1e-6 after warm-up, 512 prompts × 16 responses per step, mini-batch
32 prompts (16 updates per step), clip 0.2 / 0.28, token-level loss, dynamic sampling, soft
overlong punishment with L_max 20,480 and L_cache 4,096, T = 1.0, no KL; gradients only
through the top-20% entropy tokens of the step's batch, normalised by all tokens.
``dapo_forking`` sets FSDP over all chips; ``get_config`` below is sized for one 8×H100 host
(mesh data 1 × fsdp 8 × tensor 1, from ``jaxrl plan --hardware h100x8``).

    jaxrl train --config configs/qwen3_8b_dapo_forking.py
"""

from jaxrl.config import base_config

HARDWARE = "h100x8"  # what get_config() is sized for (tests/test_configs_fit.py plans it)


def dapo_forking(cfg, model_path: str, name: str):
    """The DAPO / forking-token recipe on ``cfg`` (shared by the 8B and 32B configs)."""
    cfg.run.name = name
    cfg.model.path = model_path
    cfg.model.dtype = "bfloat16"
    cfg.model.param_dtype = "float32"
    cfg.model.remat = "full"
    cfg.data.source = "files"
    cfg.data.train_files = ("data/dapo_math_17k.parquet",)  # BytedTsinghua-SIA/DAPO-Math-17k as published
    cfg.data.preset = "dapo_math"  # chat-message prompt, gold under reward_model.ground_truth
    cfg.data.drop_duplicates = True  # the published file repeats its 17k prompts
    cfg.data.max_prompt_tokens = 2048
    cfg.sampling.max_new_tokens = 20480
    cfg.sampling.temperature = 1.0
    cfg.sampling.top_p = 1.0
    cfg.rewards.task = "math"
    cfg.rewards.overlong_penalty = True
    cfg.rewards.overlong_buffer = 4096
    cfg.rewards.num_workers = 32
    cfg.rl.estimator = "grpo"
    cfg.rl.prompts_per_step = 512
    cfg.rl.samples_per_prompt = 16
    cfg.rl.mini_batch_prompts = 32
    cfg.rl.micro_batch_rows = 32
    cfg.rl.epochs = 1
    cfg.rl.lr = 1e-6
    cfg.rl.dynamic_sampling = True
    cfg.rl.dynamic_sampling_metric = "acc"  # DAPO: filter groups on correctness, not shaped reward
    cfg.rl.max_sampling_rounds = 3
    cfg.rl.overlong_filter = False
    cfg.rl.logprob_chunk_size = 512
    cfg.rl.loss.loss_type = "ppo"
    cfg.rl.loss.clip_eps_low = 0.2
    cfg.rl.loss.clip_eps_high = 0.28
    cfg.rl.loss.dual_clip_c = 10.0
    cfg.rl.loss.aggregation = "token-mean"
    cfg.rl.loss.kl_coef = 0.0
    cfg.rl.loss.token_mask = "top"
    cfg.rl.loss.entropy_rho = 0.2
    cfg.rl.loss.mask_scope = "batch"
    cfg.rl.loss.mask_normalizer = "all_tokens"
    cfg.rl.loss.entropy_source = "step_start"
    cfg.rl.loss.mask_rule = "quantile"
    cfg.optim.warmup_steps = 10
    cfg.optim.schedule = "constant"
    cfg.optim.weight_decay = 0.1
    cfg.optim.grad_clip = 1.0
    cfg.train.num_steps = 1000
    cfg.checkpoint.every_steps = 10
    cfg.checkpoint.keep = 3
    cfg.eval.sets = ("aime24=aime:data/aime24.jsonl",)  # problem / integer answer
    cfg.eval.every_steps = 20
    cfg.eval.max_examples = 30
    cfg.eval.num_samples = 32
    cfg.eval.temperature = 1.0
    cfg.eval.top_p = 0.7
    cfg.eval.batch_prompts = 4  # 4 x 32 samples = 128 rows of KV cache, like the rollouts (`jaxrl plan`)
    cfg.mesh.data = 1
    cfg.mesh.fsdp = -1
    cfg.mesh.tensor = 1
    return cfg


def get_config():
    cfg = dapo_forking(base_config(), "models/Qwen3-8B", "qwen3_8b_dapo_forking")
    # From `jaxrl plan --config configs/qwen3_8b_dapo_forking.py --hardware h100x8`: with
    # model.attention_impl=auto (cuDNN flash attention on H100, no S^2 scores) fsdp 8 and the
    # recipe's 32-row micro-batches (4 per device) train in ~62 GiB/device; the rollout KV
    # cache (20k-token responses) allows ~152 rows decoded at once: 128 = 8 groups of 16.
    cfg.mesh.fsdp = 8
    cfg.mesh.tensor = 1
    cfg.rl.micro_batch_rows = 32
    cfg.sampling.max_rows_per_call = 128
    return cfg
