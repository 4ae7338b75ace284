"""Rollout backends: the "static" backend equals the engine, chunks (max_rows_per_call, CPU
threads) draw the whole batch's noise, "auto" threads resolve where they can run, the registry
names unknown backends."""

import jax
import numpy as np
import pytest

from jaxrl.models.config import ModelConfig
from jaxrl.models.transformer import init_params
from jaxrl.sampling.backend import MAX_AUTO_CPU_THREADS, StaticBackend, available_cpu_cores, make_backend, resolve_cpu_threads
from jaxrl.sampling.config import SamplingConfig
from jaxrl.sampling.static import generate_from_params
from jaxrl.sharding.mesh import make_mesh

MODEL_CFG = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                        num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16, eos_token_id=2,
                        pad_token_id=0)
# One engine call per generate (no threads): these tests compare floats bit for bit, and a
# different chunk size may round a matmul differently.
CFG = SamplingConfig(max_prompt_tokens=8, max_new_tokens=6, min_prompt_bucket=8,
                     min_new_tokens_bucket=8, impl="reference", cpu_threads=1)
N_SAMPLES = 2
FIELDS = ("prompt_tokens", "prompt_lengths", "tokens", "lengths", "finish_reason", "group_ids")


@pytest.fixture(scope="module")
def params():
    return init_params(MODEL_CFG, jax.random.key(0), std=0.3)


@pytest.fixture(scope="module")
def prompts():
    """5 left-padded prompts [5, 8] and their lengths [5] (host int32)."""
    rng = np.random.default_rng(1)
    lengths = np.array([6, 3, 8, 1, 5], np.int32)
    tokens = np.zeros((len(lengths), 8), np.int32)
    for i, length in enumerate(lengths):
        tokens[i, 8 - length:] = rng.integers(3, MODEL_CFG.vocab_size, length)
    return tokens, lengths


def _host(rollout):
    return {name: np.asarray(getattr(rollout, name)) for name in (*FIELDS, "logprobs", "entropies")}


def _assert_rows_equal(got, want, exact_floats=True):
    for name in FIELDS:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    for name in ("logprobs", "entropies"):
        if exact_floats:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
        else:
            np.testing.assert_allclose(got[name], want[name], atol=1e-5, err_msg=name)


@pytest.mark.parametrize("temperature", [0.0, None], ids=["greedy", "sampled"])
def test_static_backend_equals_the_engine(params, prompts, temperature):
    backend = make_backend("static", MODEL_CFG, CFG, None)
    key = jax.random.key(3)
    got = backend.generate(params, *prompts, N_SAMPLES, key, temperature=temperature)
    want = generate_from_params(params, MODEL_CFG, *prompts, N_SAMPLES, CFG, key, temperature=temperature)
    _assert_rows_equal(_host(got), _host(want))
    assert backend.pad_id == 0 and backend.stop_token_ids == (2,)
    assert backend.update_params(params) is None


def test_chunked_greedy_equals_unchunked(params, prompts):
    """5 prompts x 2 samples under a 4-row cap: chunks of 2 prompts, a ragged 1-prompt tail."""
    key = jax.random.key(4)
    whole = make_backend("static", MODEL_CFG, CFG, None).generate(params, *prompts, N_SAMPLES, key,
                                                                  temperature=0.0)
    chunked = make_backend("static", MODEL_CFG, CFG, None, max_rows_per_call=4).generate(
        params, *prompts, N_SAMPLES, key, temperature=0.0)
    got = _host(chunked)
    assert got["tokens"].shape == (10, CFG.max_new_tokens)
    np.testing.assert_array_equal(got["group_ids"], np.repeat(np.arange(5), N_SAMPLES))
    _assert_rows_equal(got, _host(whole), exact_floats=False)


def test_chunks_draw_the_whole_batch_noise(params, prompts):
    """Chunk at prompt ``first`` is the engine's call on its prompts with ``first_prompt=first``
    (bit for bit; the padded tail chunk's real rows too), and the chunked T = 1 rollout samples
    the very tokens of the unchunked one: every row draws the same noise either way. Only the
    matmuls' rounding can differ between batch sizes (~1e-7 here), which could flip a token only
    at a Gumbel near-tie of that size: the tokens are compared exactly, the floats at 1e-5."""
    tokens, lengths = prompts
    key = jax.random.key(5)
    got = _host(StaticBackend(MODEL_CFG, CFG, None, max_rows_per_call=4).generate(params, tokens, lengths,
                                                                                  N_SAMPLES, key))
    for first in (0, 2, 4):
        want = _host(generate_from_params(params, MODEL_CFG, tokens[first:first + 2], lengths[first:first + 2],
                                          N_SAMPLES, CFG, key, first_prompt=first))
        rows = slice(first * N_SAMPLES, (first + 2) * N_SAMPLES)
        _assert_rows_equal({name: value[rows] for name, value in got.items()}, want)
    whole = _host(StaticBackend(MODEL_CFG, CFG, None).generate(params, tokens, lengths, N_SAMPLES, key))
    _assert_rows_equal(got, whole, exact_floats=False)
    assert len(np.unique(got["tokens"], axis=0)) > 5  # sampled rows, not one repeated row


def test_unknown_backend_raises_naming_it():
    with pytest.raises(ValueError, match="'no-such-backend'"):
        make_backend("no-such-backend", MODEL_CFG, CFG, None)


def test_mesh_placement_keeps_rows(params, prompts):
    """With a (1-device) mesh, prompts are placed by the batch rule; rows are unchanged."""
    key = jax.random.key(6)
    plain = make_backend("static", MODEL_CFG, CFG, None, max_rows_per_call=4)
    placed = make_backend("static", MODEL_CFG, CFG, make_mesh(), max_rows_per_call=4)
    _assert_rows_equal(_host(placed.generate(params, *prompts, N_SAMPLES, key)),
                       _host(plain.generate(params, *prompts, N_SAMPLES, key)))


def test_cpu_threads_run_the_chunks_concurrently_with_their_keys(params, prompts):
    """cpu_threads=2 on 5 prompts: chunks of 3 and 2 prompts decoded on two host threads give
    exactly the rows of the same chunks decoded one after the other (max_rows_per_call=6);
    both threads really run (each records its thread while inside the engine)."""
    import threading

    from jaxrl.sampling import backend as backend_module

    key = jax.random.key(6)
    threaded = StaticBackend(MODEL_CFG, CFG.replace(cpu_threads=2), None)
    sequential = StaticBackend(MODEL_CFG, CFG, None, max_rows_per_call=6)
    seen = set()
    original = backend_module.generate_from_params

    def recording(*args, **kwargs):
        seen.add(threading.get_ident())
        return original(*args, **kwargs)

    backend_module.generate_from_params = recording
    try:
        got = _host(threaded.generate(params, *prompts, N_SAMPLES, key))
    finally:
        backend_module.generate_from_params = original
    _assert_rows_equal(got, _host(sequential.generate(params, *prompts, N_SAMPLES, key)))
    np.testing.assert_array_equal(got["group_ids"], np.repeat(np.arange(5), N_SAMPLES))
    assert len(seen) == 2 and threading.get_ident() not in seen
    # One prompt: nothing to split, the engine's own rollout.
    one = _host(threaded.generate(params, prompts[0][:1], prompts[1][:1], N_SAMPLES, key))
    _assert_rows_equal(one, _host(generate_from_params(params, MODEL_CFG, prompts[0][:1], prompts[1][:1],
                                                       N_SAMPLES, CFG, key)))


def test_auto_cpu_threads_resolve_where_threads_can_run(params, prompts):
    """cpu_threads=0 ("auto"): the available cores (at most the cap) on this single-process CPU
    run with the jnp kernels, 1 with the Pallas interpreter or the continuous backend (no
    error); the auto-threaded rollout samples the single call's tokens."""
    auto = CFG.replace(cpu_threads=0)
    assert resolve_cpu_threads(auto, None) == min(available_cpu_cores(), MAX_AUTO_CPU_THREADS)
    assert resolve_cpu_threads(auto.replace(impl="pallas"), None) == 1
    assert resolve_cpu_threads(CFG.replace(cpu_threads=3), None) == 3
    from jaxrl.sampling.continuous import ContinuousBackend

    ContinuousBackend(MODEL_CFG, auto, None)
    key = jax.random.key(8)
    threaded = StaticBackend(MODEL_CFG, auto.replace(cpu_threads=2), None).generate(params, *prompts, N_SAMPLES, key)
    single = StaticBackend(MODEL_CFG, CFG, None).generate(params, *prompts, N_SAMPLES, key)
    _assert_rows_equal(_host(threaded), _host(single), exact_floats=False)


def test_cpu_threads_refused_where_they_cannot_run():
    with pytest.raises(ValueError, match="cpu_threads"):
        SamplingConfig(cpu_threads=-1)
    with pytest.raises(ValueError, match="Pallas interpreter"):
        StaticBackend(MODEL_CFG, CFG.replace(cpu_threads=2, impl="pallas"), None)
    from jaxrl.sampling.continuous import ContinuousBackend

    with pytest.raises(ValueError, match="sampling.cpu_threads=2 is for the static backend"):
        ContinuousBackend(MODEL_CFG, CFG.replace(cpu_threads=2), None)
