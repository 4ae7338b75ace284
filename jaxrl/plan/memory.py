"""Memory model of the planner: per-device bytes of one RL step and whether it fits.

``estimate(model_cfg, settings, hardware) -> Plan`` is a pure function of shapes. It uses the
same sharding rules as the run (``jaxrl.sharding.rules.logical_to_spec`` on the mesh sizes),
so parameter, optimizer and gradient bytes are exact per-device shard sizes; activations,
log-prob chunk buffers and the KV cache follow the formulas below. ``jaxrl.plan.plan`` adds
the knob advice (``advice.py``); ``jaxrl.plan.main(argv)`` is the ``jaxrl plan`` command.

Phases (one device; everything per device):

* persistent: master params + AdamW moments (+ a frozen reference model, + a separate
  sampling copy when the sampler uses another dtype or mesh).
* train: persistent + gradients (the micro-batch gradient and the accumulator) + the
  update's temporaries + activations of one micro-batch under the remat policy + the
  log-prob/entropy chunk buffers + the layer weights gathered over fsdp (one layer at a
  time: ``jaxrl.models.sharding.gather_layer`` pins the gather inside the layer scan; two
  layers are counted, the one in use and the next).
* sample: persistent + KV cache of the concurrent rollout rows + one decode step's logits.
* overlapped (``rl.rollout_staleness=1``): the next step's rollout runs during the update, so
  train additionally holds the sampler's params copy (``param_dtype``, training sharding), its
  KV cache and decode logits; sample holds the copy too.

Peak = max(train, sample). Units: bytes; GiB = 2**30 bytes.

Activation model per layer (b rows on this device, S positions, c compute-dtype bytes,
Hq/K/F/V the per-device query heads, KV heads, MLP width and vocab after tensor sharding):
residual-sized terms ``b·S·D·c``, head-sized ``b·S·Hq·hd·c``, MLP-sized ``b·S·F·c`` and the
attention scores, which follow ``model.attention_impl`` (``attention_impl``): ``xla``
materialises ``b·Hq·S·S`` float32 scores + probabilities + mask; ``blocked`` keeps
``_BLOCKED_SCORE_BUFFERS`` float32 ``b·Hq·S·block`` buffers live (one key block of the
backward) and saves only the output and a float32 log-sum-exp ``b·Hq·S``; ``cudnn`` /
``tpu_flash`` keep scores on chip (only the log-sum-exp in HBM). remat
"none" keeps every intermediate of every layer; "dots" keeps the matmul outputs (scores
included); "full" keeps each layer's input and recomputes one layer at a time in the
backward pass. The multipliers (``_UPDATE_TEMP_TREES``, ``_ACTIVATION_SCALE``) were fitted by
least squares against XLA's ``memory_analysis()`` of ``jaxrl.train.step``'s update on an
8-device CPU mesh for one small model and checked on another (BENCHMARKS.md, "Memory
planner").
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

from jaxrl.data.token_budget import bucket_shapes
from jaxrl.kernels.flash_attention import ATTENTION_IMPLS, DEFAULT_BLOCK, resolve_impl
from jaxrl.models.config import ModelConfig
from jaxrl.models.sharding import logical_to_spec, param_logical_axes, param_shapes, shard_shape
from jaxrl.plan.hardware import GIB, Hardware
from jaxrl.sharding.mesh import resolve_axis_sizes

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "float8": 1}


# --------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class PlanSettings:
    """Training and sampling shapes of one RL step (global sizes unless stated).

    mesh: (data, fsdp, tensor); -1 = the rest of the devices.
    micro_batch_rows: rows per gradient micro-batch (all devices together).
    micro_batch_tokens: ``rl.micro_batch_tokens``; > 0 = token-budget micro-batches, whose
      activations are the largest over their shapes (``jaxrl.data.token_budget``), and
      ``micro_batch_rows`` is not used.
    mini_batch_rows: rows per optimizer update; more than ``micro_batch_rows`` means gradient
      accumulation (a second parameter-sized gradient tree). None = equal (no accumulation).
    prompt_len / response_len: padded P and T; training sequences are P + T long.
    logprob_chunk: positions per chunk of the log-prob/entropy scan.
    sampling_rows: rollout rows decoded concurrently (all devices together).
    sampling_mesh: mesh of the sampler, None = the training mesh (same arrays, no copy).
    sampling_dtype: dtype of the sampler's weights; a copy is kept when it differs from
      ``param_dtype`` or the sampling mesh differs. kv_dtype: KV-cache dtype (None = dtype).
    reference_model: keep a frozen reference (KL): a copy of the params (``param_dtype``, the
      training sharding), as the loop holds it.
    eval_rows: rows decoded at once by the end-of-run report, which loads a second copy of the
      starting params next to the trained state (0 = no report phase).
    overlap: ``rl.rollout_staleness=1``: sampling runs during the update (see the phases).
    attention: ``model.attention_impl`` (auto | xla | blocked | cudnn | tpu_flash); auto is
      resolved for the hardware kind as the run resolves it (``attention_impl``).
    """

    mesh: tuple[int, int, int] = (1, -1, 1)
    param_dtype: str = "float32"
    dtype: str = "bfloat16"
    remat: str = "full"
    micro_batch_rows: int = 8
    micro_batch_tokens: int = 0
    mini_batch_rows: int | None = None
    prompt_len: int = 1024
    response_len: int = 4096
    logprob_chunk: int = 256
    sampling_rows: int = 64
    sampling_mesh: tuple[int, int, int] | None = None
    sampling_dtype: str | None = None
    kv_dtype: str | None = None
    reference_model: bool = False
    attention: str = "auto"
    eval_rows: int = 0
    overlap: bool = False

    def __post_init__(self):
        if self.remat not in ("none", "full", "dots"):
            raise ValueError(f"remat must be none | full | dots, got {self.remat!r}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in _DTYPE_BYTES:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {sorted(_DTYPE_BYTES)}")


@dataclasses.dataclass
class Plan:
    """Per-device bytes of each component, the phase peaks, and the verdict."""

    hardware: Hardware
    mesh: dict[str, int]
    components: dict[str, int]
    train_bytes: int
    sample_bytes: int
    peak_bytes: int
    fits: bool
    advice: list[str]
    notes: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "hardware": dataclasses.asdict(self.hardware), "mesh": self.mesh,
            "components": self.components, "train_bytes": self.train_bytes,
            "sample_bytes": self.sample_bytes, "peak_bytes": self.peak_bytes,
            "fits": self.fits, "advice": self.advice, "notes": self.notes,
        }

    def format(self) -> str:
        """Human-readable table (GiB per device)."""
        hw = self.hardware
        lines = [
            f"hardware {hw.name}: {hw.num_devices} devices x {hw.hbm_bytes / GIB:.0f} GiB "
            f"(plan for {hw.usable_fraction:.0%} = {hw.usable_bytes / GIB:.1f} GiB)",
            "mesh " + " ".join(f"{k}={v}" for k, v in self.mesh.items()),
            f"{'component':<34}{'GiB/device':>12}",
        ]
        for name, value in self.components.items():
            lines.append(f"  {name:<32}{value / GIB:>12.2f}")
        lines += [
            f"{'train phase':<34}{self.train_bytes / GIB:>12.2f}",
            f"{'sample phase':<34}{self.sample_bytes / GIB:>12.2f}",
            f"{'peak':<34}{self.peak_bytes / GIB:>12.2f}  -> {'FITS' if self.fits else 'DOES NOT FIT'}",
        ]
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"knob: {a}" for a in self.advice]
        return "\n".join(lines)


# --------------------------------------------------------------------------- the model
# Fitted multipliers (XLA CPU memory_analysis, see BENCHMARKS.md "Memory planner").
_UPDATE_TEMP_TREES = 0.7     # optimizer-update temporaries, in parameter-sized trees
_LOGITS_BUFFERS = 3.0        # [b, C, V] float32 buffers live in one log-prob chunk (fwd+bwd)
# XLA's activation bytes relative to the count in ``activation_bytes`` (it keeps rope tables,
# broadcast masks and softmax pieces, and reuses buffers of dead intermediates).
_ACTIVATION_SCALE = {"none": 1.1, "dots": 0.7, "full": 0.67}
# The same scale without S^2 scores (blocked / cudnn / tpu_flash), fitted at S = 4,096 with the
# blocked kernel on model A, checked on model B (BENCHMARKS.md, issue 13).
_ACTIVATION_SCALE_FLASH = {"none": 1.16, "dots": 0.89, "full": 0.83}
# float32 [b, Hq, S, block] buffers live in one key block of the blocked backward (s/p, dp,
# ds, mask): measured 3.3 on the kernel alone (XLA CPU, S = 2k..16k, BENCHMARKS.md issue 13).
_BLOCKED_SCORE_BUFFERS = 3.3
_GATHERED_LAYERS = 2         # fsdp-gathered layers live at once (in use + next)


def _mesh_sizes(mesh: tuple[int, int, int], num_devices: int) -> dict[str, int]:
    data, fsdp, tensor = resolve_axis_sizes(num_devices, *mesh)
    return {"data": data, "fsdp": fsdp, "tensor": tensor}


def _param_shard_elements(cfg: ModelConfig, sizes: dict[str, int], rules=None) -> tuple[int, int]:
    """(elements of all parameter shards on one device, elements of the layer weights on one
    device once gathered over fsdp, i.e. still split over tensor)."""
    is_shape = lambda x: isinstance(x, tuple)  # noqa: E731
    flat_shapes = jax.tree_util.tree_leaves(param_shapes(cfg), is_leaf=is_shape)
    flat_axes = jax.tree_util.tree_leaves(param_logical_axes(cfg), is_leaf=is_shape)
    no_fsdp = dict(sizes, fsdp=1)
    total = gathered = 0
    for shape, logical in zip(flat_shapes, flat_axes):
        total += math.prod(shard_shape(shape, logical_to_spec(logical, shape, sizes, rules), sizes))
        if logical and logical[0] == "layers":
            spec = logical_to_spec(logical, shape, no_fsdp, rules)
            gathered += math.prod(shard_shape(shape, spec, no_fsdp))
    return total, gathered


def _split(n: int, ways: int) -> int:
    """n / ways when ways divides n (the rule shards it), otherwise n (replicated)."""
    return n // ways if n % ways == 0 else n


def _rows_per_device(rows: int, sizes: dict[str, int]) -> int:
    spec = logical_to_spec(("batch",), (rows,), sizes)
    return shard_shape((rows,), spec, sizes)[0]


def attention_impl(settings: PlanSettings, hardware: Hardware, seq_len: int | None = None) -> str:
    """The concrete attention implementation the run would use (``auto`` resolved by kind) at
    ``seq_len`` positions (default the full P + T)."""
    kind = hardware.kind.lower()
    backend = "tpu" if kind.startswith("v") else "cpu" if kind.startswith("cpu") else "gpu"
    length = settings.prompt_len + settings.response_len if seq_len is None else seq_len
    return resolve_impl(settings.attention, length, settings.dtype, backend)


def activation_bytes(cfg: ModelConfig, settings: PlanSettings, sizes: dict[str, int],
                     impl: str = "xla", impl_at=None) -> dict[str, int]:
    """Per-device activation bytes of one micro-batch's forward + backward (see module doc).

    impl: the concrete attention implementation (``attention_impl``), not ``auto``. With
    ``micro_batch_tokens`` each term is its largest over the token-budget micro-batch shapes
    (rows(w) rows of P + w positions; narrow ones hold more rows, so more logits), and
    ``impl_at(length)``, when given, resolves the implementation per micro-batch length (auto
    picks dense attention for short sequences on a CPU).
    """
    if not settings.micro_batch_tokens:
        return _micro_batch_activation_bytes(cfg, settings, sizes, impl)
    shapes = bucket_shapes(settings.micro_batch_tokens, settings.prompt_len, settings.response_len,
                           row_multiple=sizes["data"] * sizes["fsdp"], max_rows=settings.mini_batch_rows)
    each = [_micro_batch_activation_bytes(cfg, dataclasses.replace(settings, micro_batch_rows=rows, response_len=width,
                                                                     micro_batch_tokens=0), sizes,
                                          impl if impl_at is None else impl_at(settings.prompt_len + width))
            for width, rows in shapes]
    return {name: max(terms[name] for terms in each) for name in each[0]}


def _micro_batch_activation_bytes(cfg: ModelConfig, settings: PlanSettings, sizes: dict[str, int],
                                  impl: str) -> dict[str, int]:
    c = _DTYPE_BYTES[settings.dtype]
    t = sizes["tensor"]
    b = _rows_per_device(settings.micro_batch_rows, sizes)
    s = settings.prompt_len + settings.response_len
    resp = settings.response_len
    d, hd = cfg.hidden_size, cfg.head_dim
    hq = _split(cfg.num_heads * hd, t)
    kv = _split(cfg.num_kv_heads * hd, t)
    f = _split(cfg.intermediate_size, t)
    v = _split(cfg.vocab_size, t)
    heads = _split(cfg.num_heads, t)
    residual = b * s * d * c
    head_terms = b * s * (hq + 2 * kv) * c
    mlp = b * s * f * c
    lse = b * heads * s * 4
    transient = 0  # live only while one layer's backward runs
    if impl == "xla":  # scores (f32) + probs + mask: intermediates of the layer
        kept_scores = b * heads * s * s * (4 + c) + b * s * s
    else:  # out + lse kept; blocked: one key block of the backward live; cudnn/tpu: on chip
        kept_scores = lse
        if impl == "blocked":
            transient = int(_BLOCKED_SCORE_BUFFERS * b * heads * s * min(s, DEFAULT_BLOCK) * 4)
    # every intermediate of one layer: 4 residual-sized (input, 2 norms, mid), q/k/v before
    # and after rope + attention output, the attention scores, gate/up/silu/product
    layer_all = 4 * residual + 2 * head_terms + b * s * hq * c + kept_scores + 4 * mlp
    # "dots" keeps the unbatched matmul outputs (projections, MLP), never the scores
    layer_dots = 2 * residual + head_terms + 2 * mlp
    layers = cfg.num_layers
    if settings.remat == "none":
        saved = layers * layer_all
    elif settings.remat == "dots":
        saved = layers * layer_dots
    else:
        saved = layers * residual
    live = layer_all + transient
    scale = (_ACTIVATION_SCALE if impl == "xla" else _ACTIVATION_SCALE_FLASH)[settings.remat]
    chunk = min(settings.logprob_chunk, resp)
    logits = int(_LOGITS_BUFFERS * b * chunk * v * 4)
    hidden = 2 * b * resp * d * c + 2 * b * s * d * c  # final hidden + its cotangent, embeds
    return {"activations_saved": int(scale * saved), "activations_live": int(scale * (live + hidden)),
            "logprob_chunk_buffers": logits}


def estimate(model_cfg: ModelConfig, settings: PlanSettings, hardware: Hardware) -> Plan:
    """Per-device memory of one RL step on ``hardware`` (see the module docstring); no advice."""
    sizes = _mesh_sizes(settings.mesh, hardware.num_devices)
    p = _DTYPE_BYTES[settings.param_dtype]
    c = _DTYPE_BYTES[settings.dtype]
    param_elems, gathered_elems = _param_shard_elements(model_cfg, sizes)
    comps: dict[str, int] = {}
    comps["params"] = param_elems * p
    comps["optimizer_state"] = 2 * param_elems * p
    if settings.reference_model:
        comps["reference_params"] = param_elems * p
    sampling_dtype = settings.sampling_dtype or settings.param_dtype
    sampling_sizes = sizes
    notes: list[str] = []
    if settings.sampling_mesh is not None:
        sampling_sizes = _mesh_sizes(settings.sampling_mesh, hardware.num_devices)
    if sampling_dtype != settings.param_dtype or sampling_sizes != sizes:
        sampling_elems, _ = _param_shard_elements(model_cfg, sampling_sizes)
        comps["sampling_params_copy"] = sampling_elems * _DTYPE_BYTES[sampling_dtype]
    persistent = sum(comps.values())

    accumulating = ((settings.mini_batch_rows or settings.micro_batch_rows) > settings.micro_batch_rows
                    or settings.micro_batch_tokens > 0)  # the budget loop always carries a gradient sum
    comps["gradients"] = (2 if accumulating else 1) * param_elems * p
    comps["update_temporaries"] = int(_UPDATE_TEMP_TREES * param_elems * p)
    # gather_layer gathers one layer's weights inside the scan (in the param dtype, then cast)
    layer_elems = gathered_elems // model_cfg.num_layers
    comps["fsdp_gathered_weights"] = _GATHERED_LAYERS * layer_elems * (p + c) if sizes["fsdp"] > 1 else 0
    impl = attention_impl(settings, hardware)
    comps.update(activation_bytes(model_cfg, settings, sizes, impl,
                                  impl_at=lambda length: attention_impl(settings, hardware, length)))
    train = persistent + sum(comps[k] for k in (
        "gradients", "update_temporaries", "fsdp_gathered_weights", "activations_saved",
        "activations_live", "logprob_chunk_buffers"))

    kv_bytes = _DTYPE_BYTES[settings.kv_dtype or settings.dtype]
    rows = _rows_per_device(settings.sampling_rows, sampling_sizes)
    kv_heads = _split(model_cfg.num_kv_heads, sampling_sizes["tensor"])
    slots = settings.prompt_len + settings.response_len
    comps["kv_cache"] = 2 * model_cfg.num_layers * rows * slots * kv_heads * model_cfg.head_dim * kv_bytes
    comps["decode_logits"] = 3 * rows * _split(model_cfg.vocab_size, sampling_sizes["tensor"]) * 4
    sample = persistent + comps["kv_cache"] + comps["decode_logits"]
    if settings.overlap:  # the sampler's copy of the previous step's params, live during the update
        comps["overlap_sampler_params"] = param_elems * p
        train += comps["overlap_sampler_params"] + comps["kv_cache"] + comps["decode_logits"]
        sample += comps["overlap_sampler_params"]

    peak = max(train, sample)
    if settings.eval_rows:  # end-of-run report: trained state + starting params + eval KV cache
        eval_rows = _rows_per_device(settings.eval_rows, sampling_sizes)
        comps["report_params_copy"] = param_elems * p
        comps["report_kv_cache"] = comps["kv_cache"] * eval_rows // max(rows, 1)
        peak = max(peak, persistent + comps["report_params_copy"] + comps["report_kv_cache"])
    fits = peak <= hardware.usable_bytes
    notes.append(f"attention: {impl}" + (f" (model.attention_impl={settings.attention})"
                                         if settings.attention != impl else ""))
    if impl == "xla" and comps["activations_live"] > 0.25 * hardware.usable_bytes:
        notes.append("attention scores [b, H/tensor, S, S] float32 dominate: model.attention_impl=xla "
                     "materialises them; blocked / cudnn / tpu_flash remove the S^2 term")
    if model_cfg.num_kv_heads % sizes["tensor"]:
        notes.append(f"{model_cfg.num_kv_heads} KV heads do not split over tensor={sizes['tensor']}: "
                     "the KV cache is replicated over the tensor axis")
    return Plan(hardware, sizes, comps, train, sample, peak, fits, advice=[], notes=notes)
