"""Tiny random HF models built with torch from a config (the test oracle; never downloaded)."""

from __future__ import annotations

import os

import numpy as np

# torch and transformers are imported where used: heavy (seconds), and torch is only in the
# "test" extra.

TINY_COMMON = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def hf_config(model_type: str, **overrides):
    """A transformers config object for a tiny model of the given type."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    kwargs = dict(TINY_COMMON)
    if model_type == "llama":
        kwargs.update(rope_theta=500000.0, tie_word_embeddings=False,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
        kwargs.update(overrides)
        return LlamaConfig(**kwargs)
    if model_type == "qwen2":
        kwargs.update(rope_theta=1000000.0, tie_word_embeddings=True)
        kwargs.update(overrides)
        return Qwen2Config(**kwargs)
    if model_type == "qwen3":
        kwargs.update(rope_theta=1000000.0, head_dim=24, tie_word_embeddings=False)
        kwargs.update(overrides)
        return Qwen3Config(**kwargs)
    raise ValueError(model_type)


def make_hf_model(model_type: str, directory: str, *, seed: int = 0, **overrides):
    """Build a seeded random HF model, perturb norms/biases (so they matter), save it."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = hf_config(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    model.eval()
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    return model


def hf_logits(model, tokens, attention_mask, positions):
    """float64 numpy logits of an HF model for numpy int inputs."""
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(np.asarray(tokens), dtype=torch.long),
            attention_mask=torch.as_tensor(np.asarray(attention_mask), dtype=torch.long),
            position_ids=torch.as_tensor(np.asarray(positions), dtype=torch.long),
        )
    return out.logits.double().numpy()


def left_padded_batch(vocab_size: int, lengths, total: int, *, seed: int = 0, pad_id: int = 0):
    """tokens, mask, positions (numpy) for a left-padded batch of the given real lengths."""
    rng = np.random.default_rng(seed)
    b = len(lengths)
    tokens = np.full((b, total), pad_id, np.int32)
    mask = np.zeros((b, total), np.int32)
    for i, n in enumerate(lengths):
        tokens[i, total - n:] = rng.integers(3, vocab_size, n)
        mask[i, total - n:] = 1
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    return tokens, mask, positions
