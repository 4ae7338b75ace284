"""jaxrl's decoder vs transformers (the oracle) on tiny random llama / qwen2 / qwen3 models."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl.models import forward, from_pretrained, save_pretrained
from jaxrl.models.hf_io import iter_hf_tensors
from tests.hf_models import hf_logits, left_padded_batch, make_hf_model

MODEL_TYPES = ["llama", "qwen2", "qwen3"]
LENGTHS = [11, 4, 16, 1]


@pytest.fixture(scope="module", params=MODEL_TYPES)
def hf_pair(request, tmp_path_factory):
    directory = str(tmp_path_factory.mktemp(request.param))
    model = make_hf_model(request.param, directory, seed=MODEL_TYPES.index(request.param))
    return request.param, directory, model


def _valid(mask):
    return np.asarray(mask, bool)


def test_fp32_logits_match_hf_on_left_padded_batch(hf_pair):
    model_type, directory, hf_model = hf_pair
    model, cfg = from_pretrained(directory, dtype="float32")
    assert cfg.model_type == model_type
    tokens, mask, positions = left_padded_batch(cfg.vocab_size, LENGTHS, 16, seed=1)
    ours = np.asarray(forward(model, tokens, attention_mask=mask), np.float64)
    ref = hf_logits(hf_model, tokens, mask, positions)
    valid = _valid(mask)
    err = np.abs(ours - ref)[valid].max()
    assert err < 1e-4, f"{model_type}: max abs logit error {err}"
    # Padding must not leak into real tokens: the shortest row alone gives the same logits.
    alone = np.asarray(forward(model, tokens[3:4, -1:]))
    np.testing.assert_allclose(alone[0, 0], ours[3, -1], atol=1e-4)


def test_bf16_compute_stays_close(hf_pair):
    model_type, directory, hf_model = hf_pair
    model, _ = from_pretrained(directory, dtype="bfloat16")
    tokens, mask, positions = left_padded_batch(model.config.vocab_size, LENGTHS, 16, seed=2)
    ours = np.asarray(forward(model, tokens, attention_mask=mask), np.float64)
    ref = hf_logits(hf_model, tokens, mask, positions)
    valid = _valid(mask)
    rel = np.linalg.norm((ours - ref)[valid]) / np.linalg.norm(ref[valid])
    assert rel < 2e-2, f"{model_type}: bf16 relative error {rel}"


def test_round_trip_through_save_pretrained(hf_pair, tmp_path):
    # heavy, test-extra dependencies: imported only by the test that reloads with transformers
    import torch
    from transformers import AutoModelForCausalLM

    model_type, directory, hf_model = hf_pair
    model, cfg = from_pretrained(directory)
    out = str(tmp_path / "export")
    save_pretrained(model, out)

    original = {name: (arr.shape, str(arr.dtype)) for name, arr in iter_hf_tensors(directory)}
    exported = {name: (arr.shape, str(arr.dtype)) for name, arr in iter_hf_tensors(out)}
    assert exported == original, "tensor names/shapes/dtypes differ from transformers' own save"

    reloaded = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    reloaded.eval()
    tokens, mask, positions = left_padded_batch(cfg.vocab_size, LENGTHS, 16, seed=3)
    a = hf_logits(hf_model, tokens, mask, positions)
    b = hf_logits(reloaded, tokens, mask, positions)
    valid = _valid(mask)
    assert np.abs(a - b)[valid].max() < 1e-5
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["model_type"] == model_type


def test_sharded_checkpoint_and_bf16_storage(hf_pair, tmp_path):
    _, directory, _ = hf_pair
    model, cfg = from_pretrained(directory)
    out = str(tmp_path / "sharded")
    save_pretrained(model, out, max_shard_bytes=64 * 1024, dtype="bfloat16")
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    assert not os.path.exists(os.path.join(out, "model.safetensors"))
    again, _ = from_pretrained(out, param_dtype="bfloat16", dtype="float32")
    assert again.embed[...].dtype == jnp.bfloat16
    tokens, mask, _ = left_padded_batch(cfg.vocab_size, LENGTHS, 16, seed=4)
    a = np.asarray(forward(model, tokens, attention_mask=mask))
    b = np.asarray(forward(again, tokens, attention_mask=mask))
    valid = _valid(mask)
    rel = np.linalg.norm((a - b)[valid]) / np.linalg.norm(a[valid])
    assert 0 < rel < 2e-2  # bf16 storage rounds the weights, but only a little
