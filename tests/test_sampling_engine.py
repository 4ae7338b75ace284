"""Sampling engine: HF greedy parity, log-probs/entropies vs teacher forcing, stop handling,
bucketing without recompiles, bucket-padding isolation, reproducibility, config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl.models import forward, from_pretrained
from jaxrl.sampling import engine
from jaxrl.sampling.engine import SamplingConfig, generate
from jaxrl.types import FINISH_LENGTH, FINISH_STOP
from tests.hf_models import make_hf_model

PAD, EOS = 0, 2
PROMPT_LENGTHS = [11, 4, 16, 1]
NEW_TOKENS = 32
# One SamplingConfig shape (prompt bucket 16, decode bucket 32, 4 prompts x 2 samples) shared by
# most tests so they reuse one compilation per model; controls and stop ids are traced values.
BASE = SamplingConfig(max_prompt_tokens=16, max_new_tokens=NEW_TOKENS, stop_token_ids=(EOS,),
                      pad_id=PAD, impl="reference")


def _prompts(vocab_size, lengths, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab_size, n).tolist() for n in lengths]


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def hf_pair(request, tmp_path_factory):
    directory = str(tmp_path_factory.mktemp(request.param))
    hf_model = make_hf_model(request.param, directory, seed=7)
    model, _ = from_pretrained(directory, dtype="float32")
    return request.param, hf_model, model


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("qwen3_engine"))
    make_hf_model("qwen3", directory, seed=11)
    model, _ = from_pretrained(directory, dtype="float32")
    return model


def _hf_greedy(hf_model, prompts, width):
    import torch

    tokens = np.full((len(prompts), width), PAD, np.int64)
    mask = np.zeros((len(prompts), width), np.int64)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        out = hf_model.generate(
            input_ids=torch.as_tensor(tokens), attention_mask=torch.as_tensor(mask),
            max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=EOS, pad_token_id=PAD,
        ).numpy()[:, width:]
    return np.pad(out, ((0, 0), (0, NEW_TOKENS - out.shape[1])), constant_values=PAD)


def test_greedy_matches_hf_generate(hf_pair):
    model_type, hf_model, model = hf_pair
    prompts = _prompts(model.config.vocab_size, PROMPT_LENGTHS, seed=3)
    rollout = generate(model, prompts, 2, BASE.replace(temperature=0.0), jax.random.key(0))
    ours = np.asarray(rollout.tokens)
    ref = _hf_greedy(hf_model, prompts, 16)
    # Both samples of a prompt are greedy, hence identical, and equal to HF (pads after eos).
    np.testing.assert_array_equal(ours[0::2], ref, err_msg=model_type)
    np.testing.assert_array_equal(ours[1::2], ref, err_msg=model_type)
    is_eos = ref == EOS
    expected_len = np.where(is_eos.any(1), is_eos.argmax(1) + 1, NEW_TOKENS)
    np.testing.assert_array_equal(np.asarray(rollout.lengths)[0::2], expected_len)
    assert np.all(np.asarray(rollout.logprobs) == 0.0)  # greedy: degenerate distribution


def _teacher_forced(model, rollout):
    """float64 logits [B, T, V] predicting each completion token, from one full forward."""
    prompt_mask = np.asarray(rollout.prompt_tokens) != PAD
    width = prompt_mask.shape[1]
    prompt_mask = np.arange(width)[None] >= width - np.asarray(rollout.prompt_lengths)[:, None]
    inputs = np.concatenate([np.asarray(rollout.prompt_tokens), np.asarray(rollout.tokens)], 1)
    mask = np.concatenate([prompt_mask, np.asarray(rollout.response_mask)], 1)
    logits = np.asarray(forward(model, inputs, attention_mask=mask), np.float64)
    return logits[:, width - 1:-1]


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _check_stop_layout(rollout, stop_ids):
    tokens, lengths = np.asarray(rollout.tokens), np.asarray(rollout.lengths)
    finish = np.asarray(rollout.finish_reason)
    live = np.asarray(rollout.response_mask)
    for row in range(tokens.shape[0]):
        n = lengths[row]
        hits = np.isin(tokens[row, :n], stop_ids)
        if finish[row] == FINISH_STOP:
            assert hits[-1] and not hits[:-1].any(), row
        else:
            assert finish[row] == FINISH_LENGTH and n == NEW_TOKENS and not hits.any(), row
    assert np.all(tokens[~live] == PAD)
    assert np.all(np.asarray(rollout.logprobs)[~live] == 0.0)
    assert np.all(np.asarray(rollout.entropies)[~live] == 0.0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_entropies_match_teacher_forcing(qwen3, temperature):
    stop_ids = (5, 6)
    cfg = BASE.replace(temperature=temperature, stop_token_ids=stop_ids)
    prompts = _prompts(qwen3.config.vocab_size, PROMPT_LENGTHS, seed=4)
    rollout = generate(qwen3, prompts, 2, cfg, jax.random.key(1))
    _check_stop_layout(rollout, stop_ids)
    finish = np.asarray(rollout.finish_reason)
    assert (finish == FINISH_STOP).any() and (finish == FINISH_LENGTH).any()

    scaled = _teacher_forced(qwen3, rollout) / temperature
    logp = _log_softmax(scaled)
    tokens, live = np.asarray(rollout.tokens), np.asarray(rollout.response_mask)
    expected_logp = np.take_along_axis(logp, tokens[..., None], -1)[..., 0]
    expected_entropy = -(np.exp(logp) * logp).sum(-1)
    np.testing.assert_allclose(np.asarray(rollout.logprobs)[live], expected_logp[live], atol=1e-4)
    np.testing.assert_allclose(np.asarray(rollout.entropies)[live], expected_entropy[live], atol=1e-4)
    assert np.asarray(rollout.group_ids).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def _kept_set(z, top_k, top_p, temperature):
    """bool [V]: tokens kept by top-k then top-p (ties at the threshold kept), float64."""
    kept = np.ones_like(z, bool)
    if 0 < top_k < z.size:
        kept = z >= np.sort(z)[::-1][top_k - 1]
    if top_p < 1.0:
        x = np.where(kept, z / temperature, -np.inf)
        p = np.exp(x - x.max())
        p /= p.sum()
        order = np.argsort(-z, kind="stable")
        cutoff = np.searchsorted(np.cumsum(p[order]), top_p)
        kept &= z >= z[order[min(cutoff, z.size - 1)]]
    return kept


def test_top_k_top_p_logprobs_are_renormalised(qwen3):
    temperature = 0.8
    top_k = np.array([0, 0, 10, 10, 5, 5, 40, 40], np.int32)
    top_p = np.array([0.8, 0.8, 1.0, 1.0, 0.6, 0.6, 0.95, 0.95], np.float32)
    prompts = _prompts(qwen3.config.vocab_size, PROMPT_LENGTHS, seed=5)
    rollout = generate(qwen3, prompts, 2, BASE.replace(temperature=temperature), jax.random.key(2),
                       top_k=top_k, top_p=top_p)
    z = _teacher_forced(qwen3, rollout)
    tokens, lengths = np.asarray(rollout.tokens), np.asarray(rollout.lengths)
    logprobs, entropies = np.asarray(rollout.logprobs), np.asarray(rollout.entropies)
    for row in range(tokens.shape[0]):
        for t in range(lengths[row]):
            kept = _kept_set(z[row, t], int(top_k[row]), float(top_p[row]), temperature)
            token = tokens[row, t]
            assert kept[token], (row, t)
            x = z[row, t] / temperature
            kept_x = x[kept]
            expected = x[token] - (kept_x.max() + np.log(np.exp(kept_x - kept_x.max()).sum()))
            assert abs(logprobs[row, t] - expected) < 1e-4, (row, t, logprobs[row, t], expected)
            full = _log_softmax(x)
            assert abs(entropies[row, t] + (np.exp(full) * full).sum()) < 1e-4, (row, t)


def test_buckets_do_not_recompile_and_padding_rows_are_isolated(qwen3):
    vocab = qwen3.config.vocab_size
    cfg = BASE.replace(stop_token_ids=())
    three = _prompts(vocab, [3, 9, 5], seed=6)
    before = engine.trace_count()
    # n=3 is used by no other test, so this first call must trace the engine's one program once.
    first = generate(qwen3, three, 3, cfg, jax.random.key(3))
    assert engine.trace_count() == before + 1
    # Same buckets (4 prompts, width 16, decode 32): other lengths, a 4th prompt, other
    # controls and stop ids reuse the compiled functions.
    four = generate(qwen3, three + _prompts(vocab, [14], seed=7), 3, cfg, jax.random.key(3))
    generate(qwen3, _prompts(vocab, [12, 2, 7], seed=8), 3,
             cfg.replace(temperature=0.5, stop_token_ids=(9, 10), max_new_tokens=20), jax.random.key(4))
    assert engine.trace_count() == before + 1
    # Turning top-k / top-p on compiles the sampler with its threshold searches once (a program
    # without them serves calls where no row truncates); other truncation values reuse it.
    generate(qwen3, _prompts(vocab, [12, 2, 7], seed=8), 3,
             cfg.replace(temperature=0.5, top_p=0.9, top_k=7, stop_token_ids=(9, 10), max_new_tokens=20),
             jax.random.key(4))
    generate(qwen3, three, 3, cfg.replace(top_k=3), jax.random.key(4))
    assert engine.trace_count() == before + 2
    again = generate(qwen3, three, 3, cfg, jax.random.key(3))
    other_key = generate(qwen3, three, 3, cfg, jax.random.key(5))
    assert engine.trace_count() == before + 2

    assert first.tokens.shape == (9, NEW_TOKENS) and first.prompt_tokens.shape == (9, 16)
    # The bucket-padding prompt row of `first` is the real 4th prompt of `four`: rows 0..8 agree.
    np.testing.assert_array_equal(np.asarray(four.tokens)[:9], np.asarray(first.tokens))
    np.testing.assert_allclose(np.asarray(four.logprobs)[:9], np.asarray(first.logprobs), atol=1e-6)
    for field in ("tokens", "logprobs", "entropies", "lengths", "finish_reason"):
        np.testing.assert_array_equal(np.asarray(getattr(again, field)), np.asarray(getattr(first, field)))
    assert not np.array_equal(np.asarray(other_key.tokens), np.asarray(first.tokens))
    # Samples of one prompt differ from each other (independent noise per row).
    assert not np.array_equal(np.asarray(first.tokens)[0], np.asarray(first.tokens)[1])


def test_max_new_tokens_is_trimmed_and_respected(qwen3):
    cfg = BASE.replace(max_new_tokens=20, stop_token_ids=())
    prompts = _prompts(qwen3.config.vocab_size, PROMPT_LENGTHS, seed=9)
    rollout = generate(qwen3, prompts, 2, cfg, jax.random.key(6))
    assert rollout.tokens.shape == (8, 20)
    assert np.all(np.asarray(rollout.lengths) == 20)
    assert np.all(np.asarray(rollout.finish_reason) == FINISH_LENGTH)


def test_every_row_stopping_on_its_first_token(qwen3):
    cfg = BASE.replace(stop_token_ids=tuple(range(qwen3.config.vocab_size)))
    prompts = _prompts(qwen3.config.vocab_size, PROMPT_LENGTHS, seed=10)
    rollout = generate(qwen3, prompts, 2, cfg, jax.random.key(7))
    assert np.all(np.asarray(rollout.lengths) == 1)
    assert np.all(np.asarray(rollout.finish_reason) == FINISH_STOP)
    assert np.all(np.asarray(rollout.tokens)[:, 1:] == PAD)
    assert np.all(np.asarray(rollout.logprobs)[:, 0] < 0.0)


class _FakeModel:
    """Only ``config`` is read before validation fails."""

    def __init__(self, config):
        self.config = config


@pytest.mark.parametrize(
    "prompts, n, changes, field",
    [
        ([[5, 6], []], 2, {}, r"prompts\[1\] is empty"),
        ([], 2, {}, "prompts is empty"),
        ([[5] * 17], 2, {}, "max_prompt_tokens"),
        ([[5, 6]], 0, {}, "n "),
        ([[5, 6]], 2, {"stop_token_ids": (97,)}, "stop_token_ids"),
        ([[5, 200]], 2, {}, r"prompts\[0\]"),
    ],
)
def test_bad_inputs_raise_naming_the_field(prompts, n, changes, field):
    from jaxrl.models.config import ModelConfig

    model_cfg = ModelConfig(model_type="qwen3", vocab_size=97, hidden_size=16, intermediate_size=32,
                            num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, eos_token_id=2)
    with pytest.raises(ValueError, match=field):
        generate(_FakeModel(model_cfg), prompts, n, BASE.replace(**changes), jax.random.key(0))


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"impl": "cuda"}, "impl"),
        ({"min_prompt_bucket": 12}, "min_prompt_bucket"),
    ],
)
def test_bad_config_raises_naming_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**changes)


def test_bucket_size():
    assert [engine.bucket_size(x, 16) for x in (1, 16, 17, 100)] == [16, 16, 32, 128]
    assert [engine.bucket_size(x) for x in (1, 3, 4, 5)] == [1, 4, 4, 8]


@pytest.fixture(scope="module")
def tiny_native():
    """A 1-layer llama with head_dim 16 (the Pallas attention kernel needs a power of two)."""
    from jaxrl.models.config import ModelConfig
    from jaxrl.models.transformer import Transformer, init_params

    model_cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                            num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16, eos_token_id=2,
                            pad_token_id=0)
    return Transformer(model_cfg, params=init_params(model_cfg, jax.random.key(0), std=0.3))


def test_generate_from_params_under_jit_matches_eager(tiny_native):
    """The training loop's entry point traces under an outer jit (device arrays in and out)."""
    import functools

    from jaxrl.models.transformer import model_params

    cfg = SamplingConfig(max_prompt_tokens=8, max_new_tokens=6, min_prompt_bucket=8,
                         min_new_tokens_bucket=8, impl="reference")
    tokens = jnp.array([[0, 0, 5, 6, 7, 8, 9, 10], [0, 0, 0, 0, 0, 3, 4, 5]], jnp.int32)
    lengths = jnp.array([6, 3], jnp.int32)
    params = model_params(tiny_native)
    jitted = jax.jit(functools.partial(engine.generate_from_params, model_cfg=tiny_native.config,
                                       n=2, cfg=cfg))
    inside = jitted(params, prompt_tokens=tokens, prompt_lengths=lengths, key=jax.random.key(3))
    eager = engine.generate_from_params(params, tiny_native.config, tokens, lengths, 2, cfg,
                                        jax.random.key(3))
    for field in ("tokens", "lengths", "finish_reason", "group_ids", "prompt_tokens"):
        np.testing.assert_array_equal(np.asarray(getattr(inside, field)), np.asarray(getattr(eager, field)))
    np.testing.assert_allclose(np.asarray(inside.logprobs), np.asarray(eager.logprobs), atol=1e-5)


def test_pallas_kernels_in_the_engine_match_reference(tiny_native):
    """Sampler and decode-attention kernels (interpret mode on CPU) inside the decode loop."""
    model = tiny_native
    cfg = SamplingConfig(max_prompt_tokens=8, max_new_tokens=6, min_prompt_bucket=8,
                         min_new_tokens_bucket=8, stop_token_ids=(), top_k=20, top_p=0.9,
                         impl="reference")
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14]]
    reference = generate(model, prompts, 2, cfg, jax.random.key(1))
    kernels = generate(model, prompts, 2, cfg.replace(impl="pallas"), jax.random.key(1))
    jax.block_until_ready(kernels)
    np.testing.assert_array_equal(np.asarray(kernels.tokens), np.asarray(reference.tokens))
    np.testing.assert_allclose(np.asarray(kernels.logprobs), np.asarray(reference.logprobs), atol=1e-5)
    np.testing.assert_allclose(np.asarray(kernels.entropies), np.asarray(reference.entropies), atol=1e-5)
