"""The engine's decode loop: one token per row per step, KV cache updated in place.

Cache layout: the prefill's head-major cache k, v [L, B, K, S, hd] (see
:func:`jaxrl.sampling.kv_cache.fan_out`) becomes, per phase of attention window W, either one
buffer [B * K, W, hd] per layer ("unrolled") or one stacked buffer [L, B * K, W, hd]
("rolled"). Each (row, kv head) holds its slots contiguously, so decode attention is one
batched matmul over B * K (:func:`jaxrl.kernels.attention.decode_attention_heads`). The new
slot is written with one ``dynamic_update_slice`` per layer and buffer, in place.

Layer loop (:func:`choose_layer_loop`), a trade between compile time and speed on XLA CPU:

* "unrolled": a Python loop over the layers in the traced step (weights sliced once per call),
  so attention reads each layer's buffer in place. The program holds one copy of every layer
  per phase: the deep bench shape (28 layers, 2 phases) compiles ~4x longer than "rolled".
* "rolled": a ``fori_loop`` over the layers with stacked weights and caches: one layer body in
  the program, but XLA copies each layer's live cache slice before its attention dot. On the
  28-layer bench shape at 192 slots (a short call, where compile time is a large share) it
  compiles in 1.3 s instead of 4.5 s and runs -14%..+9% (one thread) and -10% (two threads)
  against "unrolled"; on 4 layers it saves only ~0.3 s of compile for -6..-25%; at 320-1,088 slots it
  is 8-30% slower (BENCHMARKS.md, issue 15 session 5). "auto" picks it on the jnp path for
  models of >= ``ROLLED_MIN_LAYERS`` layers and caches of <= ``ROLLED_MAX_SLOTS`` slots.

Live length: row r attends to slots ``[start_r, P_b + step)`` (its left-padded prompt and the
tokens fed so far), so no validity mask is built. On the jnp path the loop runs in phases of
static attention windows (:func:`attention_windows`): while ``P_b + step <= w`` the buffers hold
``w`` slots (grown with zeros between phases), so the cost of a step follows the filled length,
not the bucket. The Pallas kernel skips blocks past each row's end by itself and runs one phase.
Each phase compiles its own copy of the step: compile time grows with layers x phases for
"unrolled", so phases that would save almost no reads are skipped (:func:`attention_windows`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxrl.kernels.attention import decode_attention_heads
from jaxrl.kernels.noise import make_key_data, shift_rows
from jaxrl.kernels.sampling import sample_tokens
from jaxrl.models.config import ModelConfig
from jaxrl.models.transformer import Params, _block, embed, logits_from_hidden, rms_norm, rope_inverse_frequencies
from jaxrl.sampling.config import LAYER_LOOPS
from jaxrl.types import FINISH_LENGTH, FINISH_STOP

MIN_WINDOW = 128  # smallest attention window (slots) of the phased jnp decode loop
# Each phase compiles its own copy of the unrolled decode step, so phases that save almost no
# reads are not worth their compile time:
FIRST_WINDOW_FRACTION = 16  # first window >= total / 16: the steps below it then read at most
#                             (1/16)^2 / (2 ln 2 / 2) ~ 0.6% more slots over a full decode
LAST_WINDOW_SLACK = 1 / 64  # no phase for a window within 1/64 of the full cache (its steps
#                             would read <= 1.6% fewer slots than the last phase's)


ROLLED_MAX_SLOTS = 256  # "auto" rolls the layer loop on the jnp path up to this many cache slots
ROLLED_MIN_LAYERS = 16  # ... for models at least this deep (below, rolling saves little compile)


def choose_layer_loop(requested: str, attention_impl: str, total_slots: int, num_layers: int) -> str:
    """"rolled" or "unrolled" (module docstring). "auto": rolled on the jnp attention path
    ("reference") for a model of at least ROLLED_MIN_LAYERS layers and a cache of at most
    ROLLED_MAX_SLOTS slots, else unrolled (the Pallas kernels read per-layer buffers, untried
    with a stacked cache)."""
    if requested not in LAYER_LOOPS:
        raise ValueError(f"layer_loop must be one of {LAYER_LOOPS}, got {requested!r}")
    if requested != "auto":
        return requested
    short_and_deep = total_slots <= ROLLED_MAX_SLOTS and num_layers >= ROLLED_MIN_LAYERS
    return "rolled" if attention_impl == "reference" and short_and_deep else "unrolled"


def bucket_size(length: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(length, minimum) (``minimum`` itself a power of two): the
    engines' shape buckets and the decode phases' windows."""
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    target = max(int(length), int(minimum), 1)
    return 1 << (target - 1).bit_length()


def attention_windows(prompt_width: int, total_slots: int, phased: bool = True) -> tuple[int, ...]:
    """Static attention widths of the decode phases, ascending: powers of two from
    max(MIN_WINDOW, total_slots / FIRST_WINDOW_FRACTION rounded up to a power of two) that
    leave room for at least one decode step (> prompt_width) and are not within
    LAST_WINDOW_SLACK of the full cache, then ``total_slots``. ``phased=False`` gives one
    phase over every slot (the Pallas kernel bounds by itself)."""
    windows = []
    width = bucket_size(-(-total_slots // FIRST_WINDOW_FRACTION), MIN_WINDOW)
    while phased and width * (1 + LAST_WINDOW_SLACK) < total_slots:
        if width > prompt_width:
            windows.append(width)
        width *= 2
    return tuple(windows) + (total_slots,)


def layer_params(params: Params) -> tuple[Params, ...]:
    """The stacked ``params["blocks"]`` as one dict per layer (sliced once, outside the loop)."""
    blocks = params["blocks"]
    num_layers = jax.tree_util.tree_leaves(blocks)[0].shape[0]
    return tuple({name: w[i] for name, w in blocks.items()} for i in range(num_layers))


def split_cache(cache: jax.Array, slots: int) -> tuple[jax.Array, ...]:
    """[L, B, K, S, hd] -> L buffers [B * K, slots, hd] (slots past S zeros, past ``slots`` cut)."""
    layers, rows, heads, _, head_dim = cache.shape
    return tuple(_resize(cache[i].reshape(rows * heads, -1, head_dim), slots) for i in range(layers))


def stack_cache(cache: jax.Array) -> jax.Array:
    """[L, B, K, S, hd] -> [L, B * K, S, hd] (the rolled loop's layout)."""
    layers, rows, heads, slots, head_dim = cache.shape
    return cache.reshape(layers, rows * heads, slots, head_dim)


def _resize(buffer: jax.Array, slots: int, axis: int = 1) -> jax.Array:
    """A buffer grown with zero slots (or cut) to ``slots`` along ``axis`` (the slot axis)."""
    extra = slots - buffer.shape[axis]
    if extra <= 0:
        return lax.slice_in_dim(buffer, 0, slots, axis=axis)
    widths = [(0, 0)] * buffer.ndim
    widths[axis] = (0, extra)
    return jnp.pad(buffer, widths)


def _live_bounds(row_start: jax.Array, slot: jax.Array) -> jax.Array:
    """int32 [B, 3] attention bounds: row r reads slots [row_start_r, slot] (no extra offset)."""
    num_rows = row_start.shape[0]
    return jnp.stack([row_start, jnp.broadcast_to(slot + 1, (num_rows,)), jnp.zeros((num_rows,), jnp.int32)],
                     axis=1)


def _attend_buffers(cfg: ModelConfig, q: jax.Array, k_buffer: jax.Array, v_buffer: jax.Array,
                    bounds: jax.Array, attention_impl: str) -> jax.Array:
    """One token's attention, q [B, 1, H, hd], over one layer's buffers [B * K, W, hd]
    (already holding the token's own K/V); returns [B, 1, H, hd]."""
    num_rows, kv_heads, head_dim = q.shape[0], cfg.num_kv_heads, cfg.head_dim
    shape = (1, num_rows, kv_heads) + k_buffer.shape[1:]
    out = decode_attention_heads(q[:, 0].reshape(num_rows, kv_heads, cfg.num_heads // kv_heads, head_dim),
                                 k_buffer.reshape(shape), v_buffer.reshape(shape), bounds, impl=attention_impl)
    return out.reshape(num_rows, 1, cfg.num_heads, head_dim)


def decode_hidden(params: Params, cfg: ModelConfig, token: jax.Array, position: jax.Array,
                  k_cache: tuple[jax.Array, ...], v_cache: tuple[jax.Array, ...], row_start: jax.Array,
                  slot: jax.Array, *, attention_impl: str, layers: tuple[Params, ...] | None = None
                  ) -> tuple[jax.Array, tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """Feed one token per row: final-normed hidden [B, D] and the caches with slot ``slot`` set.

    token, position, row_start int32 [B]; k_cache, v_cache: one buffer [B * K, W, hd] per layer
    (W = the phase's attention window, > slot); slot int32 scalar (the new token's slot; row r
    then attends to ``[row_start_r, slot]``). layers: :func:`layer_params` of ``params``
    (computed here when None; pass it from outside a loop so it is sliced once).

    The layers are a Python loop (unrolled in the program): separate buffers are read in place,
    where the rolled loop (:func:`decode_hidden_rolled`) copies each layer's slice of a stacked
    cache before its attention dot (module docstring: when each is used).
    """
    new_slot = (token.shape[0] * cfg.num_kv_heads, 1, cfg.head_dim)
    inv_freq = rope_inverse_frequencies(cfg)
    bounds = _live_bounds(row_start, slot)
    layers = layer_params(params) if layers is None else layers
    x = embed(params, cfg, token[:, None])
    k_out, v_out = [], []
    for p, k_all, v_all in zip(layers, k_cache, v_cache):
        def attend(q, k, v, k_all=k_all, v_all=v_all):
            # Buffers are [B * K, W, hd], the attention's own layout: the update feeds the dot
            # with no reshape in between (XLA fuses an update into each reshaping user, so a
            # reshape there costs a second update and a full copy of the buffer).
            at = (0, slot, 0)
            k_new = lax.dynamic_update_slice(k_all, k.reshape(new_slot).astype(k_all.dtype), at)
            v_new = lax.dynamic_update_slice(v_all, v.reshape(new_slot).astype(v_all.dtype), at)
            return _attend_buffers(cfg, q, k_new, v_new, bounds, attention_impl), (k_new, v_new)

        x, (k_new, v_new) = _block(cfg, inv_freq, x, p, position[:, None], attend)
        k_out.append(k_new)
        v_out.append(v_new)
    return rms_norm(x[:, 0], params["final_norm"], cfg.rms_norm_eps), tuple(k_out), tuple(v_out)


def decode_hidden_rolled(params: Params, cfg: ModelConfig, token: jax.Array, position: jax.Array,
                         k_stack: jax.Array, v_stack: jax.Array, row_start: jax.Array, slot: jax.Array, *,
                         attention_impl: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`decode_hidden` with the layers as one ``fori_loop`` body over stacked weights and
    caches k_stack, v_stack [L, B * K, W, hd] (W > slot): final-normed hidden [B, D] and the
    stacks with slot ``slot`` of every layer set (in place)."""
    new_slot = (1, token.shape[0] * cfg.num_kv_heads, 1, cfg.head_dim)
    inv_freq = rope_inverse_frequencies(cfg)
    bounds = _live_bounds(row_start, slot)
    blocks = params["blocks"]

    def layer(index, carry):
        x, k_stack, v_stack = carry
        p = {name: lax.dynamic_index_in_dim(w, index, keepdims=False) for name, w in blocks.items()}

        def attend(q, k, v):
            at = (index, 0, slot, 0)
            k_all = lax.dynamic_update_slice(k_stack, k.reshape(new_slot).astype(k_stack.dtype), at)
            v_all = lax.dynamic_update_slice(v_stack, v.reshape(new_slot).astype(v_stack.dtype), at)
            out = _attend_buffers(cfg, q, lax.dynamic_index_in_dim(k_all, index, keepdims=False),
                                  lax.dynamic_index_in_dim(v_all, index, keepdims=False), bounds, attention_impl)
            return out, (k_all, v_all)

        x, (k_stack, v_stack) = _block(cfg, inv_freq, x, p, position[:, None], attend)
        return x, k_stack, v_stack

    x, k_stack, v_stack = lax.fori_loop(0, cfg.num_layers, layer, (embed(params, cfg, token[:, None]), k_stack, v_stack))
    return rms_norm(x[:, 0], params["final_norm"], cfg.rms_norm_eps), k_stack, v_stack


def decode_loop(params: Params, cfg: ModelConfig, k_cache: jax.Array, v_cache: jax.Array,
                first_logits: jax.Array, row_start: jax.Array, prompt_lengths: jax.Array,
                row_active: jax.Array, key: jax.Array, is_stop_token: jax.Array, limit: jax.Array,
                temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, *, prompt_width: int,
                budget: int, pad_id: int, sampler_impl: str, attention_impl: str,
                compute_entropy: bool, windows: tuple[int, ...], may_truncate: bool = True,
                row_offset: jax.Array | int = 0, layer_loop: str = "unrolled"):
    """Sample up to ``limit`` (<= budget) tokens per row; stop per row on a stop token.

    k_cache, v_cache [L, B, K, S, hd] with S >= P_b (prompt in slots < P_b; split and grown
    to each phase's window here); first_logits f32
    [B, V]; row_start int32 [B] = P_b - prompt length; prompt_lengths int32 [B]; row_active
    bool [B] (False = bucket padding, done from the start); is_stop_token bool [V]; per-row
    controls temperature/top_p f32 [B], top_k int32 [B]. Returns tokens int32, logprobs f32,
    entropies f32 (zeros when not ``compute_entropy``) [B, budget], lengths, finish [B].
    windows: the phases' attention widths (:func:`attention_windows`, last = P_b + budget).
    may_truncate: False when no row has top-k/top-p on (checked by the caller on concrete
    controls; the sampler is then compiled without its threshold searches).
    row_offset: int32 scalar, the global index of row 0: row r draws the noise of row
    ``row_offset + r``, so a batch decoded in chunks draws the whole batch's noise.
    layer_loop: "unrolled" or "rolled" (module docstring; same outputs).
    The loop exits when every row is done.

    Each loop iteration samples token ``step`` from the carried logits, then feeds it (slot
    P_b + step) for the next logits, so the program holds one sampler per phase and none
    outside the loop (compile time); the last iteration's feed is not used.
    """
    num_rows = row_start.shape[0]
    sample = functools.partial(sample_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                               impl=sampler_impl, compute_entropy=compute_entropy, may_truncate=may_truncate)

    def record(state, step, token, logprob, entropy):
        active = ~state["done"]
        token = jnp.where(active, token, pad_id)

        def put(buffer, column):
            return lax.dynamic_update_slice_in_dim(buffer, column[:, None], step, axis=1)

        stopped = active & is_stop_token[token]
        return dict(
            state,
            last_token=token,
            tokens=put(state["tokens"], token),
            logprobs=put(state["logprobs"], jnp.where(active, logprob, 0.0)),
            entropies=put(state["entropies"], jnp.where(active, entropy, 0.0)),
            lengths=state["lengths"] + active.astype(jnp.int32),
            finish=jnp.where(stopped, FINISH_STOP, state["finish"]),
            done=state["done"] | stopped | (step + 1 >= limit),
        )

    if layer_loop not in ("rolled", "unrolled"):
        raise ValueError(f"layer_loop must be 'rolled' or 'unrolled', got {layer_loop!r}")
    rolled = layer_loop == "rolled"
    layers = None if rolled else layer_params(params)
    state = dict(
        step=jnp.int32(0), k=(), v=(), logits=first_logits.astype(jnp.float32),
        last_token=jnp.zeros((num_rows,), jnp.int32),
        tokens=jnp.full((num_rows, budget), pad_id, jnp.int32),
        logprobs=jnp.zeros((num_rows, budget), jnp.float32),
        entropies=jnp.zeros((num_rows, budget), jnp.float32),
        lengths=jnp.zeros((num_rows,), jnp.int32),
        finish=jnp.full((num_rows,), FINISH_LENGTH, jnp.int32),
        done=~row_active,
    )

    def decode_step(state):
        step = state["step"]
        state = record(state, step, *sample(state["logits"], shift_rows(make_key_data(key, step), row_offset)))
        # Feed completion token ``step`` into slot P_b + step.
        feed = (params, cfg, state["last_token"], prompt_lengths + step, state["k"], state["v"], row_start,
                prompt_width + step)
        if rolled:
            hidden, k_new, v_new = decode_hidden_rolled(*feed, attention_impl=attention_impl)
        else:
            hidden, k_new, v_new = decode_hidden(*feed, attention_impl=attention_impl, layers=layers)
        logits = logits_from_hidden(params, cfg, hidden).astype(jnp.float32)
        return dict(state, k=k_new, v=v_new, logits=logits, step=step + 1)

    for phase, window in enumerate(windows):
        # The phase's buffers hold exactly ``window`` slots: attention reads whole buffers.
        if rolled:
            source = (stack_cache(k_cache), stack_cache(v_cache)) if phase == 0 else (state["k"], state["v"])
            k_stack, v_stack = (_resize(c, window, axis=2) for c in source)
            state = dict(state, k=k_stack, v=v_stack)
        elif phase == 0:
            state = dict(state, k=split_cache(k_cache, window), v=split_cache(v_cache, window))
        else:
            state = dict(state, k=tuple(_resize(x, window) for x in state["k"]),
                         v=tuple(_resize(x, window) for x in state["v"]))

        def keep_going(state, window=window):  # the step feeds slot P_b + step, inside the window
            return (state["step"] < limit) & (prompt_width + state["step"] < window) & ~jnp.all(state["done"])

        state = lax.while_loop(keep_going, decode_step, state)
    return state["tokens"], state["logprobs"], state["entropies"], state["lengths"], state["finish"]
