"""End-to-end RL loop on a tiny random model: algorithms, no recompilation, determinism.

The random policy never solves the countdown task, so these runs add a test rewarder
(the fraction of digits in the completion, via ``rewards.custom``) that varies between
samples and gives every group a reward spread.
"""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
import pytest

from jaxrl.config import base_config, validate
from jaxrl.train import loop
from jaxrl.train import step as train_step

TIMING_PREFIXES = ("time/", "throughput/", "reward/score_seconds", "compiles/")


def digit_reward(prompt, completion, example) -> float:
    """Fraction of the completion's characters that are digits (0 for an empty one)."""
    del prompt, example
    return sum(ch.isdigit() for ch in completion) / len(completion) if completion else 0.0


def make_tiny_model_dir(path: str) -> str:
    """A random 2-layer qwen3-style model + the synthetic character tokenizer, in HF format."""
    from jaxrl.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, build_tokenizer, tokenizer_vocab
    from jaxrl.models import save_pretrained
    from jaxrl.models.config import ModelConfig
    from jaxrl.models.transformer import Transformer, init_params

    model_cfg = ModelConfig(
        model_type="qwen3", vocab_size=len(tokenizer_vocab()), hidden_size=32, intermediate_size=64,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True, bos_token_id=BOS_ID,
        eos_token_id=EOS_ID, pad_token_id=PAD_ID, max_position_embeddings=128,
    )
    save_pretrained(Transformer(model_cfg, params=init_params(model_cfg, jax.random.PRNGKey(0), std=0.2)), path)
    build_tokenizer(path)
    return path


def tiny_config(model_dir: str, root: str, algorithm: str = "grpo", *, name: str | None = None, **overrides):
    """A 2-prompt × 4-sample config on the synthetic task for the given algorithm."""
    cfg = base_config()
    cfg.model.path = model_dir
    cfg.run.root = root
    cfg.run.name = name or algorithm
    cfg.data.synthetic_num_train = 64
    cfg.data.synthetic_num_heldout = 8
    cfg.data.max_prompt_tokens = 32
    cfg.sampling.max_new_tokens = 8
    cfg.rl.prompts_per_step = 2
    cfg.rl.samples_per_prompt = 4
    cfg.rl.mini_batch_prompts = 1
    cfg.rl.micro_batch_rows = 2
    cfg.rl.lr = 3e-3
    cfg.rl.logprob_chunk_size = 4
    cfg.rewards.custom = ("tests.test_train_loop:digit_reward=1.0",)
    # Inline rewards: worker mode (the default) would import this heavy module in its
    # dispatcher, ~3 s CPU per tiny run; tests/test_fault_injection.py runs the loop with workers.
    cfg.rewards.num_workers = 0
    cfg.logging.progress_bar = False
    cfg.logging.tensorboard = "off"
    cfg.logging.samples_every = 1
    cfg.checkpoint.every_steps = 2
    cfg.checkpoint.save_final_model = False
    if algorithm == "grpo":
        cfg.rl.estimator = "grpo"
        cfg.rl.loss.clip_eps_high = 0.2
        cfg.rl.loss.aggregation = "seq-mean-token-mean"
        cfg.rl.loss.kl_coef = 0.01
    elif algorithm == "dr_grpo":
        cfg.rl.estimator = "dr_grpo"
        cfg.rl.loss.aggregation = "seq-mean-token-sum-norm"
    elif algorithm == "dapo_forking":
        cfg.rl.estimator = "grpo"
        cfg.rl.loss.clip_eps_high = 0.28
        cfg.rl.loss.aggregation = "token-mean"
        cfg.rl.loss.token_mask = "top"
        cfg.rl.loss.entropy_rho = 0.2
        cfg.rl.dynamic_sampling = True
        cfg.rl.dynamic_sampling_metric = "reward"  # a random policy is never correct: filter on the shaped reward
        cfg.rl.max_sampling_rounds = 2
        cfg.rewards.overlong_penalty = True
        cfg.rewards.overlong_buffer = 4
        cfg.rl.tis_cap = 2.0
        cfg.rl.epochs = 2
    else:
        raise ValueError(algorithm)
    for key, value in overrides.items():
        section, field = key.split("__")
        cfg[section][field] = value
    validate(cfg)
    return cfg


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_model_dir(str(tmp_path_factory.mktemp("tiny_model")))


def comparable(metrics: dict) -> dict:
    """Metrics without wall-clock timings (those differ between identical runs)."""
    return {k: v for k, v in metrics.items() if not k.startswith(TIMING_PREFIXES)}


@pytest.mark.parametrize("algorithm", ["grpo", "dr_grpo", "dapo_forking"])
def test_three_steps_finite_metrics_and_no_recompilation(tiny_model_dir, tmp_path, algorithm):
    from jaxrl.sampling import engine

    cfg = tiny_config(tiny_model_dir, str(tmp_path), algorithm, train__num_steps=3)
    traces = {}

    def record_traces(step_metrics_count):
        traces[step_metrics_count] = (dict(train_step.TRACE_COUNTS), engine.trace_count())

    original = loop.MetricsLogger.log_step

    def log_step(self, step, metrics):
        record_traces(step)
        return original(self, step, metrics)

    loop.MetricsLogger.log_step = log_step
    try:
        result = loop.train(cfg)
    finally:
        loop.MetricsLogger.log_step = original
    assert result.stop_reason == "completed" and int(result.state.step) == 3
    assert len(result.metrics) == 3
    for metrics in result.metrics:
        for key in ("loss", "pg_loss", "grad_norm", "reward/mean", "accuracy", "lr", "logprob_gap/abs_mean",
                    "clip_frac_low", "clip_frac_high", "entropy_mean", "time/sample", "time/reward",
                    "time/update", "time/checkpoint", "throughput/tokens_per_s"):
            assert key in metrics, key
            assert math.isfinite(metrics[key]), (key, metrics[key])
        assert metrics["update_skipped"] == 0.0
        assert metrics["rows_trained"] > 0
        if algorithm == "grpo":  # one sampling round: Σ lengths / (B · max) = mean / max
            expected = metrics["rollout/response_length_mean"] / metrics["rollout/response_length_max"]
            assert abs(metrics["rollout/length_fill"] - expected) < 1e-12
    assert traces[1] == traces[3], "recompiled after the first step"
    if algorithm == "grpo":
        assert all("kl" in m and m["kl"] >= 0 for m in result.metrics)
    if algorithm == "dapo_forking":
        for metrics in result.metrics:
            assert "entropy_threshold" in metrics and "dynamic_sampling/groups_kept" in metrics
            assert 0.15 < metrics["selected_fraction"] < 0.45  # ⌈0.2·N⌉ of the tokens
    run_dir = result.run_dir
    lines = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert os.path.isfile(os.path.join(run_dir, "samples.jsonl"))
    assert json.load(open(os.path.join(run_dir, "config.json")))["rl"]["estimator"] == cfg.rl.estimator


def test_same_seed_gives_identical_metrics_for_four_steps(tiny_model_dir, tmp_path):
    runs = []
    for name in ("first", "second"):
        cfg = tiny_config(tiny_model_dir, str(tmp_path), "dapo_forking", name=name, train__num_steps=4)
        runs.append(loop.train(cfg))
    first, second = ([comparable(m) for m in run.metrics] for run in runs)
    assert len(first) == 4 and first == second
    for a, b in zip(jax.tree.leaves(runs[0].state.params), jax.tree.leaves(runs[1].state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert first[0]["loss"] != first[1]["loss"]  # the steps did different work


def test_length_fill_by_hand():
    from jaxrl.train.rollouts import length_fill

    # Round 1: lengths 3, 1, 0, 4 -> 8 live row-steps of 4 rows x 4 steps; round 2: 2, 2 -> 4 of 4.
    assert length_fill([np.array([3, 1, 0, 4]), np.array([2, 2])]) == 12 / 20
    assert length_fill([np.array([5, 5, 5])]) == 1.0
    assert length_fill([np.array([0, 0])]) == 1.0  # nothing generated: no wasted step


def test_cpu_threads_reach_the_rollout_backend(tiny_model_dir, tmp_path):
    """sampling.cpu_threads=2: the loop's backend splits the 2 prompts into two concurrent
    engine calls (the second with first_prompt=1), and the run completes."""
    from jaxrl.sampling import backend as backend_module

    cfg = tiny_config(tiny_model_dir, str(tmp_path), train__num_steps=1)
    cfg.sampling.cpu_threads = 2
    calls = []
    original = backend_module.generate_from_params

    def recording(params, model_cfg, tokens, lengths, n, sampling_cfg, key, **kwargs):
        calls.append((tokens.shape[0], sampling_cfg.cpu_threads))
        return original(params, model_cfg, tokens, lengths, n, sampling_cfg, key, **kwargs)

    backend_module.generate_from_params = recording
    try:
        result = loop.train(cfg)
    finally:
        backend_module.generate_from_params = original
    assert result.stop_reason == "completed"
    assert (1, 2) in calls and all(rows == 1 for rows, _ in calls[:2])  # the step's 2 prompts, 1 per call


def test_auto_cpu_threads_keep_one_call_for_the_overlapped_loop(tiny_model_dir, tmp_path):
    """sampling.cpu_threads=0 (auto) reaches the backend as auto, except with
    rl.rollout_staleness=1, whose overlap needs a sampler that returns at once: one call there.
    An explicit count is passed through either way."""
    from jaxrl.wiring import sampling_config

    cfg = tiny_config(tiny_model_dir, str(tmp_path))
    assert cfg.sampling.cpu_threads == 0 and sampling_config(cfg).cpu_threads == 0
    cfg.rl.rollout_staleness = 1
    assert sampling_config(cfg).cpu_threads == 1
    cfg.sampling.cpu_threads = 2
    assert sampling_config(cfg).cpu_threads == 2
