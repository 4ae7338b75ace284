"""Continuous-batching rollout engine over a paged KV cache (rollout backend "continuous").

One jitted ``lax.while_loop`` runs a whole rollout of R = N * n rows through S decode slots.
Each iteration:

1. **Admit**: every free slot takes the next waiting row (rows in order prompt * n + sample)
   whose prompt is prefilled, if the pool can reserve the row's worst case (Cp pages).
2. **Decode**: one forward of the S slots' last tokens; each token's K/V goes to its row's
   page (a fresh page from the free list when it starts one), attention reads the row's pages
   through its block table (:func:`jaxrl.kernels.paged_attention.paged_attention`).
3. **Prefill** (``lax.cond``): while fewer than S prefilled rows wait, one chunk of C tokens of
   the next prompt goes through the decoder into that prompt's pages. A prompt is prefilled
   once; its n samples point their block tables at the same pages (no copy). The prompt is
   right-aligned in its ``n_pp = ceil(len / page)`` pages (start offset ``n_pp * page - len``),
   so every sample's completion starts on a fresh page of its own.
4. **Sample** with the fused sampler; a freshly admitted slot samples its first token from the
   prompt's stored last hidden state. The noise of row r's token g is the static engine's
   (key words of ``fold_in(key, g)``, row index r hashed in), whatever the slot or iteration.
5. **Finish**: a row that emitted a stop id or reached ``max_new_tokens`` frees its slot and
   its own pages at once; the prompt's pages go back when its last sample finishes.

Compiled shapes depend only on (S, pool pages, page size, C, bucketed N, n, prompt bucket,
max_new_tokens), never on the data, so rollouts of one shape never retrace (``trace_count``).
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrl.kernels.backend import resolve_impl
from jaxrl.kernels.noise import make_key_data, shift_rows
from jaxrl.kernels.sampling import sample_tokens
from jaxrl.kernels.sampling_controls import controls_may_truncate
from jaxrl.models.config import ModelConfig
from jaxrl.models.transformer import Params, logits_from_hidden
from jaxrl.sampling import paged_cache as pc
from jaxrl.sampling.backend import register_backend
from jaxrl.sampling.config import SamplingConfig
from jaxrl.sampling.paged_forward import EnginePlan, paged_decode_step, paged_prefill_chunk
from jaxrl.sampling.static import bucket_size
from jaxrl.types import FINISH_LENGTH, FINISH_STOP, Rollout

_TRACE_COUNTS: collections.Counter = collections.Counter()


def trace_count() -> int:
    """Number of times the continuous engine's rollout function was traced so far."""
    return sum(_TRACE_COUNTS.values())


def row_key_data(key: jax.Array, rows: jax.Array, token_index: jax.Array, slots: jax.Array
                 ) -> jax.Array:
    """uint32 [S, 2] sampler key words for slots holding ``rows`` at ``token_index`` (int32 [S]).

    The sampler hashes the slot index s into the noise; shifting it by ``row - s``
    (:func:`~jaxrl.kernels.noise.shift_rows`) makes slot s draw exactly the noise of row
    ``row`` at step ``token_index`` of the static engine (key words of
    ``fold_in(key, token_index)``).
    """
    words = jax.vmap(lambda g: make_key_data(key, g))(token_index)
    return shift_rows(words, rows - slots)


def _admit(state, plan: EnginePlan, prompt_lengths):
    """Free slots take the next prefilled rows while the pool can reserve their worst case."""
    page, cp, n = plan.page_size, plan.completion_pages, plan.samples_per_prompt
    live = state["live"]
    owned = -(-jnp.maximum(state["gen"] - 1, 0) // page)
    reserved = jnp.sum(jnp.where(live, cp - owned, 0))
    capacity = state["pool"].num_free - reserved
    room = capacity // cp if cp else jnp.int32(plan.slots)
    rank = jnp.cumsum(~live) - 1
    admit = ~live & (rank < jnp.minimum(state["ready_rows"] - state["next_row"], room))
    row = jnp.where(admit, state["next_row"] + rank, state["row"])
    prompt = jnp.maximum(row, 0) // n
    plen = prompt_lengths[prompt]
    prompt_slots = -(-plen // page) * page
    column = jnp.arange(plan.table_width)[None, :]
    trash = pc.trash_page(plan.pages)
    shared = jnp.pad(state["prompt_table"][prompt, :plan.prompt_pages],
                     ((0, 0), (0, cp)), constant_values=trash)
    table = jnp.where(column < (prompt_slots // page)[:, None], shared, trash)
    pick = lambda new, old: jnp.where(admit.reshape(admit.shape + (1,) * (new.ndim - 1)), new, old)
    return dict(
        state, live=live | admit, fresh=admit, row=row, gen=pick(jnp.zeros_like(plen), state["gen"]),
        table=pick(table, state["table"]), plen=pick(plen, state["plen"]),
        next_row=state["next_row"] + jnp.sum(admit, dtype=jnp.int32),
    ), capacity - jnp.sum(admit, dtype=jnp.int32) * cp


def _decode(state, params, plan: EnginePlan):
    """Allocate pages for slots starting one, then one decode forward (skipped when idle)."""
    page, s = plan.page_size, plan.slots
    gen, plen = state["gen"], state["plen"]
    decoding = state["live"] & ~state["fresh"]
    prompt_slots = -(-plen // page) * page
    write_slot = jnp.maximum(prompt_slots + gen - 1, 0)
    pool, ids = pc.allocate(state["pool"], decoding & ((gen - 1) % page == 0))
    slots, column = jnp.arange(s), write_slot // page
    table = state["table"].at[slots, column].set(
        jnp.where(decoding & ((gen - 1) % page == 0), ids, state["table"][slots, column]))

    def run(pool):
        return paged_decode_step(params, plan, pool, state["last"], plen + gen - 1, table,
                               prompt_slots - plen, write_slot, decoding)

    def idle(pool):
        return jnp.zeros((s, plan.model_cfg.hidden_size), plan.model_cfg.dtype), pool

    hidden, pool = lax.cond(jnp.any(decoding), run, idle, pool)
    return dict(state, pool=pool, table=table), hidden


def _prefill(state, params, plan: EnginePlan, prompt_rows, prompt_lengths, num_prompts, capacity):
    """One prefill chunk of the prompt at the cursor, when rows run short and pages allow."""
    page, n = plan.page_size, plan.samples_per_prompt
    cursor, chunk = state["cursor"], state["chunk"]
    plen = prompt_lengths[jnp.minimum(cursor, prompt_lengths.shape[0] - 1)]
    pages_needed = -(-plen // page)
    go = ((cursor < num_prompts) & (state["ready_rows"] - state["next_row"] < plan.slots)
          & ((chunk > 0) | (capacity >= pages_needed + plan.completion_pages)))

    def run(carry):
        pool, prompt_table, prompt_hidden, cursor, chunk, ready = carry
        pool, ids = lax.cond(
            chunk == 0, lambda p: pc.allocate(p, jnp.arange(plan.prompt_pages) < pages_needed),
            lambda p: (p, prompt_table[cursor, :plan.prompt_pages]), pool)
        prompt_table = prompt_table.at[cursor, :plan.prompt_pages].set(ids)
        hidden, pool = paged_prefill_chunk(params, plan, pool, prompt_rows[cursor], prompt_table[cursor],
                                      plen, chunk)
        last_slot = pages_needed * page - 1
        finished = last_slot < (chunk + 1) * plan.prefill_chunk
        last_hidden = hidden[jnp.clip(last_slot - chunk * plan.prefill_chunk, 0, plan.prefill_chunk - 1)]
        prompt_hidden = prompt_hidden.at[cursor].set(
            jnp.where(finished, last_hidden, prompt_hidden[cursor]))
        cursor = cursor + finished.astype(jnp.int32)
        return (pool, prompt_table, prompt_hidden, cursor, jnp.where(finished, 0, chunk + 1),
                jnp.minimum(cursor, num_prompts) * n)

    keys = ("pool", "prompt_table", "prompt_hidden", "cursor", "chunk", "ready_rows")
    carry = lax.cond(go, run, lambda c: c, tuple(state[k] for k in keys))
    return dict(state, **dict(zip(keys, carry)))


def _sample_and_record(state, params, plan: EnginePlan, hidden, key, controls, is_stop, max_new):
    """Sample every live slot, write its token to the row's outputs, retire finished rows."""
    page, s, n = plan.page_size, plan.slots, plan.samples_per_prompt
    live, gen, row = state["live"], state["gen"], jnp.maximum(state["row"], 0)
    prompt = row // n
    hidden = jnp.where(state["fresh"][:, None], state["prompt_hidden"][prompt], hidden)
    logits = logits_from_hidden(params, plan.model_cfg, hidden)
    temperature, top_k, top_p = (c[row] for c in controls)
    token, logprob, entropy = sample_tokens(logits, row_key_data(key, row, gen, jnp.arange(s)),
                                            temperature, top_k, top_p, impl=plan.sampler_impl,
                                            may_truncate=plan.may_truncate)
    out_row = jnp.where(live, row, state["tokens"].shape[0])  # idle slots: dropped writes
    column = gen
    put = lambda name, value: state[name].at[out_row, column].set(value, mode="drop")
    stopped = is_stop[token]
    gen = gen + live.astype(jnp.int32)
    done = live & (stopped | (gen >= max_new))
    used = plan.pages - 1 - state["pool"].num_free
    # Retire: the row's own pages now, the prompt's pages with its last sample.
    prompt_pages = -(-state["plen"] // page)
    page_index = jnp.arange(plan.table_width)[None, :]
    own = (page_index >= prompt_pages[:, None]) & (page_index < (prompt_pages + -(-(gen - 1) // page))[:, None])
    remaining = state["remaining"] - jax.ops.segment_sum(done.astype(jnp.int32), prompt,
                                                         state["remaining"].shape[0])
    prompt_done = (remaining == 0) & (state["remaining"] > 0)
    lengths_all = state["prompt_lengths"]
    shared_cols = jnp.arange(plan.prompt_pages)[None, :] < (-(-lengths_all // page))[:, None]
    shared = state["prompt_table"][:, :plan.prompt_pages]
    pool = pc.release(state["pool"],
                      jnp.concatenate([state["table"].ravel(), shared.ravel()]),
                      jnp.concatenate([(own & done[:, None]).ravel(), (shared_cols & prompt_done[:, None]).ravel()]))
    return dict(
        state, pool=pool, live=live & ~done, fresh=jnp.zeros_like(live), gen=gen, last=token,
        tokens=put("tokens", token), logprobs=put("logprobs", logprob), entropies=put("entropies", entropy),
        lengths=state["lengths"].at[out_row].set(gen, mode="drop"),
        finish=state["finish"].at[jnp.where(done, row, state["tokens"].shape[0])].set(
            jnp.where(stopped, FINISH_STOP, FINISH_LENGTH), mode="drop"),
        remaining=remaining, rows_done=state["rows_done"] + jnp.sum(done, dtype=jnp.int32),
        peak_pages=jnp.maximum(state["peak_pages"], used),
    )


@functools.partial(jax.jit, static_argnames=("plan",))
def rollout(params: Params, prompt_rows: jax.Array, prompt_lengths: jax.Array, num_prompts: jax.Array,
            key: jax.Array, is_stop: jax.Array, max_new: jax.Array, temperature: jax.Array,
            top_k: jax.Array, top_p: jax.Array, *, plan: EnginePlan) -> dict[str, jax.Array]:
    """The whole continuous-batching rollout (see the module docstring) in one while_loop.

    prompt_rows int32 [N_b, Pp * page + C] (prompts left-padded to Pp * page, then pad);
    prompt_lengths int32 [N_b] (>= 1); num_prompts int32 [] (real prompts, <= N_b);
    is_stop bool [V]; max_new int32 [] (<= plan.max_new_tokens); temperature / top_p float32
    and top_k int32 [N_b * n] per row (row = prompt * n + sample). Returns tokens int32,
    logprobs / entropies float32 [N_b * n, T]; lengths, finish int32 [N_b * n]; and int32
    scalars rows_done, iterations, peak_pages (pages in use at the fullest), free_pages.
    """
    _TRACE_COUNTS["rollout"] += 1
    cfg, s, n, t = plan.model_cfg, plan.slots, plan.samples_per_prompt, plan.max_new_tokens
    num_rows = prompt_rows.shape[0] * n
    total = num_prompts * n
    trash = pc.trash_page(plan.pages)
    state = dict(
        pool=pc.init_pool(cfg, plan.pages, plan.page_size),
        live=jnp.zeros((s,), bool), fresh=jnp.zeros((s,), bool), row=jnp.full((s,), -1, jnp.int32),
        gen=jnp.zeros((s,), jnp.int32), plen=jnp.ones((s,), jnp.int32), last=jnp.zeros((s,), jnp.int32),
        table=jnp.full((s, plan.table_width), trash, jnp.int32),
        next_row=jnp.int32(0), ready_rows=jnp.int32(0), cursor=jnp.int32(0), chunk=jnp.int32(0),
        prompt_table=jnp.full((prompt_rows.shape[0], plan.prompt_pages + plan.prefill_chunk // plan.page_size),
                              trash, jnp.int32),
        prompt_hidden=jnp.zeros((prompt_rows.shape[0], cfg.hidden_size), cfg.dtype),
        prompt_lengths=prompt_lengths,
        remaining=jnp.where(jnp.arange(prompt_rows.shape[0]) < num_prompts, n, 0).astype(jnp.int32),
        tokens=jnp.full((num_rows, t), plan.pad_id, jnp.int32),
        logprobs=jnp.zeros((num_rows, t), jnp.float32), entropies=jnp.zeros((num_rows, t), jnp.float32),
        lengths=jnp.zeros((num_rows,), jnp.int32), finish=jnp.full((num_rows,), FINISH_LENGTH, jnp.int32),
        rows_done=jnp.int32(0), iterations=jnp.int32(0), peak_pages=jnp.int32(0),
    )
    # Every iteration admits, decodes or prefills something while rows remain; this bound is
    # only a guard against a scheduling bug (the caller checks rows_done == total).
    limit = num_rows * t + prompt_rows.shape[0] * (prompt_rows.shape[1] // plan.prefill_chunk + 1) + 8

    def body(state):
        state, capacity = _admit(state, plan, prompt_lengths)
        state, hidden = _decode(state, params, plan)
        state = _prefill(state, params, plan, prompt_rows, prompt_lengths, num_prompts, capacity)
        state = _sample_and_record(state, params, plan, hidden, key, (temperature, top_k, top_p),
                                   is_stop, max_new)
        return dict(state, iterations=state["iterations"] + 1)

    state = lax.while_loop(lambda st: (st["rows_done"] < total) & (st["iterations"] < limit), body, state)
    names = ("tokens", "logprobs", "entropies", "lengths", "finish", "rows_done", "iterations", "peak_pages")
    return dict({k: state[k] for k in names}, free_pages=state["pool"].num_free)


@register_backend("continuous")
class ContinuousBackend:
    """Rollout backend running :func:`rollout` (see the module docstring).

    slots: decode slots S (default ``max_rows_per_call`` when > 0, else 64); page_size: KV
    slots per page (a power of two >= 16 for the GPU kernel); prefill_chunk: prompt tokens per
    prefill step (a multiple of page_size; default min(64, prompt pages)); pages: pool pages per
    layer (default: the worst case for S rows, so admission never waits on memory). After each
    ``generate``, ``last_stats`` holds iterations, peak/pool pages and their KV bytes.

    ``generate`` returns without waiting for the device (so the loop can dispatch an update
    while it runs); the schedule is checked (every row finished, every page freed) by ``wait``
    and by ``last_stats``, which raise RuntimeError when it failed.
    """

    def __init__(self, model_cfg: ModelConfig, sampling_cfg: SamplingConfig, mesh, *,
                 max_rows_per_call: int = 0, slots: int | None = None, page_size: int = 16,
                 prefill_chunk: int | None = None, pages: int | None = None):
        self.model_cfg, self.sampling_cfg, self.mesh = model_cfg, sampling_cfg, mesh
        if sampling_cfg.cpu_threads > 1:
            raise ValueError(f"sampling.cpu_threads={sampling_cfg.cpu_threads} is for the static backend; "
                             f"the continuous backend runs one rollout loop (set it to 0 or 1)")
        self.pad_id = sampling_cfg.resolved_pad_id(model_cfg)
        self.stop_token_ids = sampling_cfg.resolved_stop_token_ids(model_cfg)
        self.slots = int(slots or (max_rows_per_call if max_rows_per_call > 0 else 64))
        prompt_width = bucket_size(sampling_cfg.max_prompt_tokens, sampling_cfg.min_prompt_bucket)
        self.prompt_pages = -(-prompt_width // page_size)
        chunk = prefill_chunk or min(64, self.prompt_pages * page_size) // page_size * page_size
        if self.slots < 1 or page_size < 1 or chunk < page_size or chunk % page_size:
            raise ValueError(f"continuous backend: need slots >= 1 and prefill_chunk a positive multiple "
                             f"of page_size, got slots={self.slots}, page_size={page_size}, prefill_chunk={chunk}")
        self.page_size, self.prefill_chunk, self.pages = page_size, chunk, pages
        self._unchecked: dict[int, tuple] = {}  # id(rollout.tokens) -> (device stats, rows, plan)
        self._last: tuple | None = None

    def _checked_stats(self, unchecked: tuple) -> dict[str, int]:
        stats, num_rows, plan = unchecked
        stats = {k: int(v) for k, v in jax.device_get(stats).items()}
        if stats["rows_done"] != num_rows or stats["free_pages"] != plan.pages - 1:
            raise RuntimeError(f"continuous backend: scheduling failed ({stats}, {num_rows} rows, "
                               f"{plan.pages - 1} pages)")
        return dict(stats, pool_pages=plan.pages,
                    peak_kv_bytes=pc.pool_bytes(self.model_cfg, stats["peak_pages"], plan.page_size),
                    pool_kv_bytes=pc.pool_bytes(self.model_cfg, plan.pages, plan.page_size))

    @property
    def last_stats(self) -> dict[str, int]:
        """The last ``generate``'s iterations, rows done, peak/free/pool pages and KV bytes
        (waits for it; RuntimeError if its schedule failed); {} before the first call."""
        return {} if self._last is None else self._checked_stats(self._last)

    def wait(self, rollout: Rollout) -> Rollout:
        """Block until ``rollout`` (from this backend's ``generate``) is computed and check its
        schedule (RuntimeError if a row did not finish or a page leaked); returns it."""
        unchecked = self._unchecked.pop(id(rollout.tokens), None)
        jax.block_until_ready(rollout)
        if unchecked is not None:
            self._checked_stats(unchecked)
        return rollout

    def update_params(self, params) -> None:
        """No-op: this backend is handed the parameters at each ``generate``."""

    def plan(self, num_prompts: int, n: int) -> EnginePlan:
        """The static plan for ``num_prompts`` (bucketed) prompts with ``n`` samples each."""
        cfg = self.sampling_cfg
        plan = EnginePlan(self.model_cfg, self.slots, self.page_size, self.prefill_chunk, 0,
                          self.prompt_pages, n, cfg.max_new_tokens, self.pad_id,
                          resolve_impl(cfg.sampler_impl or cfg.impl), cfg.attention_impl or cfg.impl)
        live_rows = min(self.slots, num_prompts * n)
        worst = min(num_prompts, self.slots + self.slots // n + 2) * self.prompt_pages
        pages = self.pages or live_rows * plan.completion_pages + worst + 1
        if pages < plan.completion_pages + self.prompt_pages + 1:
            raise ValueError(f"continuous backend: pages={pages} cannot hold one row "
                             f"({self.prompt_pages} prompt + {plan.completion_pages} completion pages + trash)")
        return dataclasses.replace(plan, pages=pages)

    def generate(self, params, prompt_tokens: np.ndarray, prompt_lengths: np.ndarray, n: int,
                 key: jax.Array, *, temperature: float | None = None,
                 top_p: float | None = None) -> Rollout:
        """See :class:`jaxrl.sampling.backend.RolloutBackend`; rows as the static backend's
        (prompt_tokens [N * n, P_b] left-padded, tokens / logprobs / entropies [N * n, T]).
        temperature / top_p may also be per-row arrays [N * n]."""
        cfg = self.sampling_cfg
        tokens_in = np.asarray(prompt_tokens, np.int32)
        lengths_in = np.asarray(prompt_lengths, np.int32)
        if tokens_in.ndim != 2 or lengths_in.shape != tokens_in.shape[:1] or not tokens_in.shape[0]:
            raise ValueError(f"prompt_tokens must be [N, P] (N >= 1) and prompt_lengths [N], got "
                             f"{tokens_in.shape} and {lengths_in.shape}")
        num_prompts, width = tokens_in.shape
        if np.any(lengths_in < 1) or np.any(lengths_in > min(width, cfg.max_prompt_tokens)):
            raise ValueError(f"prompt_lengths must be in [1, min(width={width}, SamplingConfig."
                             f"max_prompt_tokens={cfg.max_prompt_tokens})], got {lengths_in.tolist()}")
        padded = bucket_size(num_prompts, cfg.min_batch_bucket)
        plan = self.plan(padded, int(n))
        full = plan.prompt_pages * plan.page_size
        rows = np.full((padded, full + plan.prefill_chunk), self.pad_id, np.int32)
        for i, length in enumerate(lengths_in):
            rows[i, full - length:full] = tokens_in[i, width - length:]
        lengths = np.concatenate([lengths_in, np.ones(padded - num_prompts, np.int32)])
        def per_row(name, value, dtype):  # a scalar or one value per row [N * n]; pad rows get it too
            value = np.asarray(value, dtype)
            if value.ndim and value.shape != (num_prompts * n,):
                raise ValueError(f"{name} must be a scalar or have shape [{num_prompts * n}], got {value.shape}")
            return np.resize(np.broadcast_to(value, (num_prompts * n,)), padded * n)

        is_stop = jnp.zeros((self.model_cfg.vocab_size,), bool).at[jnp.asarray(self.stop_token_ids, jnp.int32)].set(True)
        controls = (per_row("temperature", cfg.temperature if temperature is None else temperature, np.float32),
                    per_row("top_k", cfg.top_k, np.int32), per_row("top_p", cfg.top_p if top_p is None else top_p, np.float32))
        plan = dataclasses.replace(plan, may_truncate=controls_may_truncate(*controls, self.model_cfg.vocab_size))
        out = rollout(params, jnp.asarray(rows), jnp.asarray(lengths), jnp.int32(num_prompts), key,
                      is_stop, jnp.int32(cfg.max_new_tokens), *(jnp.asarray(c) for c in controls), plan=plan)
        num_rows, p_b = num_prompts * n, bucket_size(width, cfg.min_prompt_bucket)
        self._last = ({k: out[k] for k in ("rows_done", "iterations", "peak_pages", "free_pages")}, num_rows, plan)
        prompts_out = np.full((num_prompts, p_b), self.pad_id, np.int32)
        for i, length in enumerate(lengths_in):
            prompts_out[i, p_b - length:] = tokens_in[i, width - length:]
        result = Rollout(
            prompt_tokens=jnp.asarray(np.repeat(prompts_out, n, axis=0)),
            prompt_lengths=jnp.asarray(np.repeat(lengths_in, n)),
            tokens=out["tokens"][:num_rows], logprobs=out["logprobs"][:num_rows],
            entropies=out["entropies"][:num_rows], lengths=out["lengths"][:num_rows],
            finish_reason=out["finish"][:num_rows], group_ids=jnp.arange(num_rows, dtype=jnp.int32) // n,
        )
        if len(self._unchecked) >= 16:  # rollouts never waited for: keep the newest checks only
            self._unchecked.pop(next(iter(self._unchecked)))
        self._unchecked[id(result.tokens)] = self._last
        return result
