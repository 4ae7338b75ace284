"""GRPO on Qwen2.5-Math-1.5B, one GPU (80 GB): bf16 compute, fp32 master weights.

Download the model to ./models/Qwen2.5-Math-1.5B, the MATH train split (``problem`` /
``solution`` with the final \\boxed{}, preset "math") to ./data/math_train.jsonl and MATH-500
to ./data/math500.jsonl first; nothing is fetched at run time.

    jaxrl train --config configs/qwen2_5_math_1_5b_grpo.py
"""

from jaxrl.config import base_config

HARDWARE = "h100"  # one 80 GB GPU (tests/test_configs_fit.py plans it)


def get_config():
    cfg = base_config()
    cfg.run.name = "qwen2_5_math_1_5b_grpo"
    cfg.model.path = "models/Qwen2.5-Math-1.5B"
    cfg.model.dtype = "bfloat16"
    cfg.model.param_dtype = "float32"
    cfg.model.remat = "full"
    cfg.data.source = "files"
    cfg.data.train_files = ("data/math_train.jsonl",)
    cfg.data.preset = "math"  # gold = MATH-500's answer, else the last \\boxed{} of solution
    cfg.data.system_prompt = "Please reason step by step, and put your final answer within \\boxed{}."
    cfg.data.max_prompt_tokens = 1024
    cfg.sampling.max_new_tokens = 3072
    cfg.sampling.temperature = 1.0
    cfg.sampling.max_rows_per_call = 256  # KV cache of 256 x 4k-token rows (`jaxrl plan --hardware h100`)
    cfg.rewards.task = "math"
    cfg.rewards.num_workers = 8
    cfg.rl.estimator = "grpo"
    cfg.rl.prompts_per_step = 64
    cfg.rl.samples_per_prompt = 8
    cfg.rl.mini_batch_prompts = 16
    cfg.rl.micro_batch_rows = 8
    cfg.rl.lr = 1e-6
    cfg.rl.logprob_chunk_size = 256
    cfg.rl.loss.clip_eps_low = 0.2
    cfg.rl.loss.clip_eps_high = 0.2
    cfg.rl.loss.aggregation = "seq-mean-token-mean"
    cfg.rl.loss.kl_coef = 0.001
    cfg.rl.loss.kl_type = "k3"
    cfg.optim.warmup_steps = 10
    cfg.optim.weight_decay = 0.01
    cfg.optim.grad_clip = 1.0
    cfg.train.num_steps = 500
    cfg.checkpoint.every_steps = 20
    cfg.eval.sets = ("math500=math:data/math500.jsonl",)
    cfg.eval.every_steps = 50
    cfg.eval.max_examples = 500
    cfg.eval.num_samples = 4
    cfg.eval.temperature = 0.6
    cfg.eval.batch_prompts = 64
    cfg.mesh.data = -1
    return cfg
