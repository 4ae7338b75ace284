"""Continuous-batching backend: greedy and sampled rollouts identical to the static engine,
identical across schedules (slot counts, a pool too small to run rows side by side), no page
leaks, no retrace, log-probs vs a float64 teacher-forced reference, chi-square of the sampled
distribution, and bad-input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxrl.models.config import ModelConfig
from jaxrl.models.transformer import forward_params, init_params
from jaxrl.sampling import continuous
from jaxrl.sampling.backend import make_backend
from jaxrl.sampling.config import SamplingConfig

MODEL = ModelConfig(model_type="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128,
                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True,
                    eos_token_id=2, pad_token_id=0)
WIDTH, NEW, N_SAMPLES = 20, 40, 3
# Several stop ids so rows finish at very different lengths (ragged, like RL rollouts).
SAMPLING = SamplingConfig(max_prompt_tokens=WIDTH, max_new_tokens=NEW, stop_token_ids=(2, 5, 7),
                          pad_id=0, impl="reference")


@pytest.fixture(scope="module")
def params():
    return init_params(MODEL, jax.random.key(0), std=0.2)


def _prompts(seed, num=5):
    """Left-padded prompts [num, WIDTH] of lengths 1..WIDTH (one a full page, one a single token)."""
    rng = np.random.default_rng(seed)
    lengths = np.concatenate([[16, 1], rng.integers(1, WIDTH + 1, num - 2)]).astype(np.int32)
    tokens = np.zeros((num, WIDTH), np.int32)
    for i, length in enumerate(lengths):
        tokens[i, WIDTH - length:] = rng.integers(3, MODEL.vocab_size, length)
    return tokens, lengths


@pytest.fixture(scope="module")
def backends():
    """Two schedules: 3 slots with the default pool; 8 slots with the smallest legal pool (one
    row's worst case), so rows run one or two at a time and wait for pages."""
    few = make_backend("continuous", MODEL, SAMPLING, None, max_rows_per_call=3)
    tight = continuous.ContinuousBackend(MODEL, SAMPLING, None, slots=8, prefill_chunk=16)
    minimum = tight.prompt_pages + tight.plan(8, N_SAMPLES).completion_pages + 1
    tight.pages = minimum
    return few, tight


def _arrays(rollout):
    return {k: np.asarray(v) for k, v in vars(rollout).items()}


def _assert_same(a, b, exact_floats=False):
    for name in ("tokens", "lengths", "finish_reason", "group_ids", "prompt_tokens", "prompt_lengths"):
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # Same tokens; log-probs / entropies come from attention summed in a different order
    # (pages vs one dense cache): float32 rounding, ~1e-6 on these O(1) values.
    for name in ("logprobs", "entropies"):
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=2e-5, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_matches_the_static_engine(params, backends, temperature):
    tokens, lengths = _prompts(1)
    key = jax.random.key(3)
    static = make_backend("static", MODEL, SAMPLING, None)
    want = _arrays(static.generate(params, tokens, lengths, N_SAMPLES, key, temperature=temperature))
    for backend in backends:
        got = _arrays(backend.generate(params, tokens, lengths, N_SAMPLES, key, temperature=temperature))
        _assert_same(got, want)
        assert backend.last_stats["free_pages"] == backend.last_stats["pool_pages"] - 1  # no leak
    if temperature > 0:
        assert len(set(want["lengths"].tolist())) > 3  # the rollout really is ragged
    few, tight = backends
    assert tight.last_stats["peak_pages"] <= tight.last_stats["pool_pages"] - 1


def test_sampled_logprobs_match_float64_teacher_forcing(params, backends):
    """Independent check: the rollout's log-probs and entropies equal a float64 log-softmax of
    the dense (cache-free) forward over [prompt; completion] at the rollout temperature."""
    tokens, lengths = _prompts(2)
    temperature = 0.8
    out = _arrays(backends[0].generate(params, tokens, lengths, N_SAMPLES, jax.random.key(5), temperature=temperature))
    rows = out["tokens"].shape[0]
    sequences = np.zeros((rows, WIDTH + NEW), np.int32)  # [prompt; completion], right-padded
    for r in range(rows):
        prompt = out["prompt_tokens"][r, out["prompt_tokens"].shape[1] - out["prompt_lengths"][r]:]
        sequences[r, :len(prompt) + out["lengths"][r]] = np.concatenate([prompt, out["tokens"][r, :out["lengths"][r]]])
    logits = np.asarray(forward_params(params, MODEL, jnp.asarray(sequences)), np.float64)
    for r in range(rows):
        start, count = out["prompt_lengths"][r] - 1, out["lengths"][r]
        completion = out["tokens"][r, :count]
        z = logits[r, start:start + count] / temperature
        logp = z - z.max(1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(1, keepdims=True))
        # float32 model vs float64 softmax of its logits: ~1e-6; 1e-4 leaves room for accumulation order.
        np.testing.assert_allclose(out["logprobs"][r, :count], logp[np.arange(count), completion], atol=1e-4)
        np.testing.assert_allclose(out["entropies"][r, :count], -(np.exp(logp) * logp).sum(1), atol=1e-4)


def test_no_retrace_across_rollouts_of_one_shape(params, backends):
    few, _ = backends
    few.generate(params, *_prompts(3), N_SAMPLES, jax.random.key(0))
    before = continuous.trace_count()
    for seed in (4, 5):  # new prompts, lengths, keys and temperature: same compiled rollout
        few.generate(params, *_prompts(seed), N_SAMPLES, jax.random.key(seed), temperature=0.5 * seed)
        assert few.last_stats["free_pages"] == few.last_stats["pool_pages"] - 1
    assert continuous.trace_count() == before


@pytest.mark.slow
def test_first_token_chi_square(params, backends):
    """First tokens of many samples of one prompt follow softmax(z / T) of the dense forward."""
    few, _ = backends
    prompt = _prompts(6)[0][2:3]
    tokens, lengths = np.repeat(prompt, 5, axis=0), np.full(5, WIDTH, np.int32)
    temperature = 0.7
    logits = np.asarray(forward_params(params, MODEL, jnp.asarray(prompt)), np.float64)[0, -1]
    probs = np.exp((logits - logits.max()) / temperature)
    probs /= probs.sum()
    firsts = np.concatenate([
        np.asarray(few.generate(params, tokens, lengths, N_SAMPLES, jax.random.key(100 + i),
                                temperature=temperature).tokens[:, 0])
        for i in range(60)
    ])  # 900 draws
    counts = np.bincount(firsts, minlength=MODEL.vocab_size).astype(np.float64)
    expected = probs * counts.sum()
    big = expected >= 5  # pool the rare tokens into one bin
    observed = np.append(counts[big], counts[~big].sum())
    target = np.append(expected[big], expected[~big].sum())
    assert stats.chisquare(observed, target).pvalue > 1e-3
    # ...and the same test rejects the untempered distribution.
    wrong = np.exp(logits - logits.max())
    wrong = wrong / wrong.sum() * counts.sum()
    assert stats.chisquare(np.append(counts[big], counts[~big].sum()),
                           np.append(wrong[big], wrong[~big].sum())).pvalue < 1e-3


def test_bad_inputs_name_the_field(params):
    backend = continuous.ContinuousBackend(MODEL, SAMPLING, None, slots=2)
    tokens, lengths = _prompts(7)
    with pytest.raises(ValueError, match="prompt_lengths"):
        backend.generate(params, tokens, lengths + WIDTH, 2, jax.random.key(0))
    with pytest.raises(ValueError, match="prompt_tokens"):
        backend.generate(params, tokens[0], lengths, 2, jax.random.key(0))
    with pytest.raises(ValueError, match="prefill_chunk"):
        continuous.ContinuousBackend(MODEL, SAMPLING, None, prefill_chunk=24)
    with pytest.raises(ValueError, match="pages"):
        continuous.ContinuousBackend(MODEL, SAMPLING, None, pages=3).plan(8, 2)


def test_free_list_pops_and_pushes_by_hand():
    from jaxrl.sampling import paged_cache as pc

    pool = pc.init_pool(MODEL, pages_per_layer=5, page_size=16)  # pages 0..3 + trash page 4
    assert int(pool.num_free) == 4 and pool.k.shape == (MODEL.num_layers * 5, 16, 2, 16)
    pool, ids = pc.allocate(pool, jnp.array([True, False, True]))
    assert ids.tolist() == [0, 4, 1] and int(pool.num_free) == 2
    pool = pc.release(pool, jnp.array([1, 0, 3]), jnp.array([False, True, False]))
    assert int(pool.num_free) == 3
    pool, ids = pc.allocate(pool, jnp.array([True, True, True]))
    assert sorted(ids.tolist()) == [0, 2, 3] and int(pool.num_free) == 0


def test_slot_noise_is_the_static_engines_row_noise():
    """Slot s holding row r at token g draws the noise of row r at step g of the static engine."""
    from jaxrl.kernels.noise import gumbel_noise, make_key_data

    key, rows, steps = jax.random.key(9), jnp.array([7, 0, 12]), jnp.array([3, 5, 3])
    got = gumbel_noise(continuous.row_key_data(key, rows, steps, jnp.arange(3)), 3, 64)
    for s in range(3):
        want = gumbel_noise(make_key_data(key, int(steps[s])), 16, 64)[int(rows[s])]
        np.testing.assert_array_equal(np.asarray(got[s]), np.asarray(want))


@pytest.mark.slow
def test_pallas_paged_kernel_in_the_engine_matches_reference(params, backends):
    """The engine with the Pallas paged-attention kernel (interpret mode on CPU) draws the same
    sampled rollout as with the jnp reference."""
    tokens, lengths = _prompts(8)
    key = jax.random.key(11)
    kernel = make_backend("continuous", MODEL, SAMPLING.replace(attention_impl="pallas"), None,
                          max_rows_per_call=3)
    _assert_same(_arrays(kernel.generate(params, tokens, lengths, N_SAMPLES, key)),
                 _arrays(backends[0].generate(params, tokens, lengths, N_SAMPLES, key)))


def test_a_failed_schedule_is_raised_by_wait_not_hidden(params, monkeypatch):
    """``generate`` returns without waiting for the device; ``wait`` (what the loop, eval and
    ``jaxrl sample`` call) then checks the schedule: a row that never finished raises."""
    backend = make_backend("continuous", MODEL, SAMPLING, None, max_rows_per_call=3)
    tokens, lengths = _prompts(2, num=2)
    ok = backend.wait(backend.generate(params, tokens, lengths, N_SAMPLES, jax.random.key(0)))
    assert int(np.asarray(ok.lengths).min()) >= 1
    real = continuous.rollout

    def one_row_short(*args, **kwargs):
        out = real(*args, **kwargs)
        return dict(out, rows_done=out["rows_done"] - 1)

    monkeypatch.setattr(continuous, "rollout", one_row_short)
    rollout = backend.generate(params, tokens, lengths, N_SAMPLES, jax.random.key(0))  # no check yet
    with pytest.raises(RuntimeError, match="continuous backend: scheduling failed"):
        backend.wait(rollout)
    with pytest.raises(RuntimeError, match="scheduling failed"):
        backend.last_stats
