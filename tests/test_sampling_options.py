"""Options that cost nothing when off: entropies only when asked for (log-probs always), and
the run-time skips of the jnp sampler (no truncation, all greedy) against float64 numpy; the
phased (live-length) decode loop against a single full-width phase; the rolled layer loop
against the unrolled one; the sampler compiled without its threshold searches when no row
truncates."""

import functools

import jax
import numpy as np
import pytest

from jaxrl.kernels.sampling import make_key_data, sample_tokens
from jaxrl.kernels.sampling_controls import controls_may_truncate
from jaxrl.models.config import ModelConfig
from jaxrl.models.transformer import Transformer, init_params
from jaxrl.sampling import decode
from jaxrl.sampling.engine import SamplingConfig, generate, generate_from_params
from tests.test_kernel_sampling import check_against_numpy, mixed_rows


@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_entropy_switch_keeps_tokens_and_logprobs(impl):
    rng = np.random.default_rng(4)
    z, temperature, top_k, top_p = mixed_rows(rng, vocab=700, num_rows=8)
    key_data = make_key_data(jax.random.key(9), 3)
    options = dict(impl=impl, block_v=256) if impl == "pallas" else dict(impl=impl)
    with_h = [np.asarray(a) for a in sample_tokens(z, key_data, temperature, top_k, top_p, **options)]
    without = [np.asarray(a) for a in sample_tokens(z, key_data, temperature, top_k, top_p,
                                                     compute_entropy=False, **options)]
    np.testing.assert_array_equal(without[0], with_h[0])
    np.testing.assert_array_equal(without[1], with_h[1])  # the same float ops: bit-identical
    np.testing.assert_array_equal(without[2], 0.0)
    check_against_numpy(z, temperature, top_k, top_p, *with_h, atol=1e-5)


@pytest.mark.parametrize("mode", ["untruncated", "all-greedy"])
def test_reference_fast_paths_match_numpy(mode):
    """Rows where nothing is cut (kept-set pass skipped) or all greedy (noise skipped)."""
    rng = np.random.default_rng(5)
    z, temperature, top_k, top_p = mixed_rows(rng, vocab=500, num_rows=8)
    top_k[:], top_p[:] = 0, 1.0
    if mode == "all-greedy":
        temperature[:] = 0.0
    out = [np.asarray(a) for a in sample_tokens(z, make_key_data(jax.random.key(2), 1), temperature,
                                                top_k, top_p, impl="reference")]
    check_against_numpy(z, temperature, top_k, top_p, *out, atol=1e-5)


def test_attention_windows():
    assert decode.attention_windows(64, 192) == (128, 192)
    # 4,112 slots: the first window is >= 4112 / 16 (512), and 4,096 is within 1/64 of 4,112.
    assert decode.attention_windows(16, 4096 + 16) == (512, 1024, 2048, 4112)
    assert decode.attention_windows(16, 4096) == (256, 512, 1024, 2048, 4096)
    # The DAPO shape: 2k prompt bucket + 20k budget; short prompts + 20k: 5 phases (was 9).
    assert decode.attention_windows(2048, 2048 + 20480) == (4096, 8192, 16384, 22528)
    assert decode.attention_windows(64, 64 + 20480) == (2048, 4096, 8192, 16384, 20544)
    assert decode.attention_windows(256, 320) == (320,)  # no window leaves room past the prompt
    assert decode.attention_windows(16, 4112, phased=False) == (4112,)


def test_skipped_phases_cost_few_reads():
    """The phases kept read at most 2% more slots than one phase per power of two would
    (the old rule), summed over a full decode; the reads are counted slot by slot here."""
    def reads(windows, prompt, total):
        return sum(next(w for w in windows if slot < w) for slot in range(prompt, total))

    def old_rule(prompt, total):
        windows, width = [], decode.MIN_WINDOW
        while width < total:
            if width > prompt:
                windows.append(width)
            width *= 2
        return tuple(windows) + (total,)

    for prompt, total in ((16, 4112), (64, 20544), (2048, 22528), (64, 192), (128, 1152), (64, 1088),
                          (64, 2112), (16, 1040), (512, 8704), (64, 4160)):
        new = reads(decode.attention_windows(prompt, total), prompt, total)
        assert new <= 1.02 * reads(old_rule(prompt, total), prompt, total), (prompt, total)


@pytest.fixture(scope="module")
def small_model():
    cfg = ModelConfig(model_type="qwen3", vocab_size=128, hidden_size=32, intermediate_size=48,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True,
                      eos_token_id=2, pad_token_id=0)
    return Transformer(cfg, params=init_params(cfg, jax.random.key(1), std=0.3))


def test_phased_decode_equals_one_phase(small_model, monkeypatch):
    """Windows of 16 slots (5 phases over 80 slots) give the very rollout of one full phase:
    the live-length bound drops only slots no row may attend to."""
    cfg = SamplingConfig(max_prompt_tokens=16, max_new_tokens=60, stop_token_ids=(2,), top_k=30,
                         temperature=0.9, impl="reference")
    prompts = [[5, 6, 7], list(range(10, 26)), [40] * 9]
    monkeypatch.setattr(decode, "MIN_WINDOW", 10**6)
    one = generate(small_model, prompts, 2, cfg, jax.random.key(4))
    monkeypatch.setattr(decode, "MIN_WINDOW", 16)
    assert decode.attention_windows(16, 80) == (32, 64, 80)
    phased = generate(small_model, prompts, 2, cfg, jax.random.key(4))
    for field in ("tokens", "lengths", "finish_reason"):
        np.testing.assert_array_equal(np.asarray(getattr(phased, field)), np.asarray(getattr(one, field)))
    # Attention over fewer masked-out slots: the same sums up to float32 reassociation.
    np.testing.assert_allclose(np.asarray(phased.logprobs), np.asarray(one.logprobs), atol=1e-5)
    np.testing.assert_allclose(np.asarray(phased.entropies), np.asarray(one.entropies), atol=1e-5)


def test_layer_loops_give_the_same_rollout(small_model, monkeypatch):
    """The rolled layer loop (one fori_loop body over stacked weights and caches) and the
    unrolled one give the same rollout over 3 phases, with stops, top-k and greedy rows. Same
    float ops in the same order per layer: tokens exact, floats at 1e-6 (a fusion may still
    reassociate a sum on another CPU)."""
    cfg = SamplingConfig(max_prompt_tokens=16, max_new_tokens=60, stop_token_ids=(2,), top_k=30,
                         temperature=0.9, impl="reference")
    prompts = [[5, 6, 7], list(range(10, 26)), [40] * 9]
    monkeypatch.setattr(decode, "MIN_WINDOW", 16)
    temperature = np.repeat(np.array([0.9, 0.0, 1.3], np.float32), 2)
    out = {loop: generate(small_model, prompts, 2, cfg.replace(layer_loop=loop), jax.random.key(6),
                          temperature=temperature) for loop in ("rolled", "unrolled")}
    for field in ("tokens", "lengths", "finish_reason"):
        np.testing.assert_array_equal(np.asarray(getattr(out["rolled"], field)),
                                      np.asarray(getattr(out["unrolled"], field)))
    for field in ("logprobs", "entropies"):
        np.testing.assert_allclose(np.asarray(getattr(out["rolled"], field)),
                                   np.asarray(getattr(out["unrolled"], field)), atol=1e-6)
    assert len(set(np.asarray(out["rolled"].lengths).tolist())) > 1  # some rows stopped early


def test_auto_layer_loop_rule():
    deep, shallow = decode.ROLLED_MIN_LAYERS, decode.ROLLED_MIN_LAYERS - 1
    assert decode.choose_layer_loop("auto", "reference", decode.ROLLED_MAX_SLOTS, deep) == "rolled"
    assert decode.choose_layer_loop("auto", "reference", decode.ROLLED_MAX_SLOTS + 1, deep) == "unrolled"
    assert decode.choose_layer_loop("auto", "reference", 64, shallow) == "unrolled"
    assert decode.choose_layer_loop("auto", "pallas", 64, deep) == "unrolled"
    assert decode.choose_layer_loop("rolled", "reference", 4096, 2) == "rolled"
    assert decode.choose_layer_loop("unrolled", "reference", 64, deep) == "unrolled"
    with pytest.raises(ValueError, match="layer_loop"):
        SamplingConfig(layer_loop="scan")


@pytest.mark.parametrize("loop, grows", [("rolled", False), ("unrolled", True)])
def test_rolled_program_holds_one_layer_body(loop, grows):
    """Compile time follows program size: the rolled engine's program is the same size at 2 and
    8 layers (one layer body), the unrolled one grows with the layers."""
    sizes = []
    for layers in (2, 8):
        model_cfg = ModelConfig(model_type="qwen3", vocab_size=128, hidden_size=32, intermediate_size=48,
                                num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True,
                                eos_token_id=2, pad_token_id=0)
        params = init_params(model_cfg, jax.random.key(1))
        cfg = SamplingConfig(max_prompt_tokens=16, max_new_tokens=32, stop_token_ids=(2,), impl="reference",
                             layer_loop=loop)
        tokens, lengths = np.full((2, 16), 5, np.int32), np.full((2,), 16, np.int32)
        text = jax.jit(lambda p: generate_from_params(p, model_cfg, tokens, lengths, 2, cfg, jax.random.key(0)).tokens
                       ).lower(params).as_text()
        sizes.append(text.count("\n"))
    assert (sizes[1] > 1.5 * sizes[0]) == grows, sizes


def test_engine_without_entropy(small_model):
    cfg = SamplingConfig(max_prompt_tokens=16, max_new_tokens=20, stop_token_ids=(), impl="reference")
    prompts = [[5, 6, 7], [9, 10]]
    full = generate(small_model, prompts, 2, cfg, jax.random.key(8))
    lean = generate(small_model, prompts, 2, cfg.replace(compute_entropy=False), jax.random.key(8))
    np.testing.assert_array_equal(np.asarray(lean.tokens), np.asarray(full.tokens))
    np.testing.assert_array_equal(np.asarray(lean.logprobs), np.asarray(full.logprobs))
    np.testing.assert_array_equal(np.asarray(lean.entropies), 0.0)
    assert np.all(np.asarray(full.entropies) > 0.0)
    with pytest.raises(ValueError, match="compute_entropy"):
        cfg.replace(compute_entropy="yes")


def test_controls_may_truncate_follows_the_samplers_rule():
    vocab = 100
    t1, t0 = np.ones(3, np.float32), np.zeros(3, np.float32)
    off_k, off_p = np.zeros(3, np.int32), np.ones(3, np.float32)
    assert not controls_may_truncate(t1, off_k, off_p, vocab)
    assert not controls_may_truncate(t1, np.array([0, vocab, vocab + 5]), off_p, vocab)  # k >= V: off
    assert controls_may_truncate(t1, np.array([0, vocab - 1, 0]), off_p, vocab)
    assert controls_may_truncate(t1, off_k, np.array([1.0, 0.99, 1.0], np.float32), vocab)
    # Greedy rows never truncate, whatever their top-k / top-p say.
    assert not controls_may_truncate(t0, np.array([5, 5, 5]), np.full(3, 0.5, np.float32), vocab)
    assert controls_may_truncate(np.array([0.0, 0.7, 0.0], np.float32), np.array([0, 5, 0]), off_p, vocab)
    assert not controls_may_truncate(1.0, 0, 1.0, vocab)  # scalars
    assert controls_may_truncate(t1, None, off_p, vocab)  # not readable here: assume truncation


def test_traced_controls_compile_the_searches(small_model):
    """Under an outer jit the controls are traced, so the engine cannot know that no row
    truncates: it keeps the searches and a top-k passed as a traced value still applies."""
    cfg = SamplingConfig(max_prompt_tokens=16, max_new_tokens=12, stop_token_ids=(), impl="reference")
    prompts = [[5, 6, 7], [9, 10]]
    eager = generate(small_model, prompts, 2, cfg, jax.random.key(3), top_k=1)  # top-1 = greedy argmax
    traced = jax.jit(lambda k: generate(small_model, prompts, 2, cfg, jax.random.key(3), top_k=k).tokens)(
        np.int32(1))
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(eager.tokens))
    greedy = generate(small_model, prompts, 2, cfg.replace(temperature=0.0), jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(eager.tokens), np.asarray(greedy.tokens))


@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_sampler_without_truncation_searches_is_identical_and_smaller(impl):
    """may_truncate=False (what the engines pass when no row truncates) drops the threshold
    searches from the program (its 32-step bisection loops) and changes no output bit."""
    rng = np.random.default_rng(6)
    z, temperature, _, _ = mixed_rows(rng, vocab=700, num_rows=8)
    top_k, top_p = np.zeros(8, np.int32), np.ones(8, np.float32)
    key_data = make_key_data(jax.random.key(3), 5)
    options = dict(impl=impl, block_v=256) if impl == "pallas" else dict(impl=impl)
    outs, loops = {}, {}
    for may_truncate in (True, False):
        call = functools.partial(sample_tokens, **options, may_truncate=may_truncate)
        outs[may_truncate] = [np.asarray(a) for a in jax.block_until_ready(call(z, key_data, temperature, top_k, top_p))]
        hlo = jax.jit(call).lower(z, key_data, temperature, top_k, top_p).as_text()
        loops[may_truncate] = hlo.count("stablehlo.while")
    for with_search, without in zip(outs[True], outs[False]):
        np.testing.assert_array_equal(without, with_search)
    check_against_numpy(z, temperature, top_k, top_p, *outs[False], atol=1e-5)
    assert loops[False] < loops[True], loops
    if impl == "reference":
        assert loops[False] == 0, loops  # the reference has no loop but the searches
