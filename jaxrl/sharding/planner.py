"""Memory planner: per-device bytes of one RL step, whether it fits, and which knob to turn.

``plan(model_cfg, settings, hardware) -> Plan`` is a pure function of shapes. It uses the
same sharding rules as the run (``jaxrl.sharding.rules.logical_to_spec`` on the mesh sizes),
so parameter, optimizer and gradient bytes are exact per-device shard sizes; activations,
log-prob chunk buffers and the KV cache follow the formulas below. ``main(argv)`` is the
``jaxrl plan`` command.

Phases (one device; everything per device):

* persistent: master params + AdamW moments (+ a frozen reference model, + a separate
  sampling copy when the sampler uses another dtype or mesh).
* train: persistent + gradients (the micro-batch gradient and the accumulator) + the
  update's temporaries + activations of one micro-batch under the remat policy + the
  log-prob/entropy chunk buffers + the layer weights gathered over fsdp (XLA hoists that
  all-gather out of the layer scan, so all layers' weights are gathered at once).
* sample: persistent + KV cache of the concurrent rollout rows + one decode step's logits.

Peak = max(train, sample). Units: bytes; GiB = 2**30 bytes.

Activation model per layer (b rows on this device, S positions, c compute-dtype bytes,
Hq/K/F/V the per-device query heads, KV heads, MLP width and vocab after tensor sharding):
residual-sized terms ``b·S·D·c``, head-sized ``b·S·Hq·hd·c``, MLP-sized ``b·S·F·c`` and the
attention scores ``b·Hq·S·S`` in float32 (the jnp attention materialises them). remat
"none" keeps every intermediate of every layer; "dots" keeps the matmul outputs (scores
included); "full" keeps each layer's input and recomputes one layer at a time in the
backward pass. The multipliers (``_UPDATE_TEMP_TREES``, ``_ACTIVATION_SCALE``) were fitted by
least squares against XLA's ``memory_analysis()`` of ``jaxrl.train.step``'s update on an
8-device CPU mesh for one small model and checked on another (BENCHMARKS.md, "Memory
planner").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from typing import Any, Sequence

from jaxrl.models.config import ModelConfig

GIB = 2**30
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "float8": 1}


# --------------------------------------------------------------------------- hardware
@dataclasses.dataclass(frozen=True)
class Hardware:
    """An accelerator slice: ``num_devices`` JAX devices with ``hbm_bytes`` each.

    usable_fraction: share of HBM the run may plan for (XLA's own reservations, fragmentation;
    on GPU launch with XLA_PYTHON_CLIENT_MEM_FRACTION at least this high).
    """

    name: str
    kind: str
    num_devices: int
    hbm_bytes: int
    usable_fraction: float = 0.9

    @property
    def usable_bytes(self) -> int:
        return int(self.hbm_bytes * self.usable_fraction)


# kind -> (HBM GiB per JAX device, whether the slice name counts TensorCores (2 per device))
HARDWARE_KINDS: dict[str, tuple[float, bool]] = {
    "v4": (32, True),
    "v5p": (95, True),
    "v5e": (16, False),
    "v6e": (32, False),
    "h100": (80, False),
    "h200": (141, False),
    "a100": (80, False),
    "a100-40g": (40, False),
    "b200": (180, False),
    "cpu": (16, False),
}


def parse_hardware(spec: str) -> Hardware:
    """Hardware from a name: TPU "v5p-128" / "v5e-256" / "v4-64" / "v6e-8", GPU "h100x8" / "8xh200".

    TPU v4 / v5p slice names count TensorCores (2 per chip; one JAX device per chip), so
    v5p-128 is 64 devices; v5e / v6e names count chips.
    """
    text = spec.strip().lower()
    match = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", text)
    if match:
        kind, count = match.group(1), int(match.group(2))
        gib, counts_cores = HARDWARE_KINDS[kind]
        devices = count // 2 if counts_cores else count
        return Hardware(spec, kind, max(devices, 1), int(gib * GIB), usable_fraction=0.95)
    match = re.fullmatch(r"([a-z0-9-]+?)(?:x|-)(\d+)", text) or re.fullmatch(r"(\d+)x([a-z0-9-]+)", text)
    if match:
        a, b = match.groups()
        kind, count = (b, int(a)) if a.isdigit() else (a, int(b))
        if kind in HARDWARE_KINDS:
            return Hardware(spec, kind, count, int(HARDWARE_KINDS[kind][0] * GIB))
    known = ", ".join(sorted(HARDWARE_KINDS))
    raise ValueError(f"unknown hardware {spec!r}: use e.g. v5p-128, v5e-256, h100x8 (kinds: {known})")


# --------------------------------------------------------------------------- models
KNOWN_MODELS: dict[str, ModelConfig] = {
    "qwen3-8b": ModelConfig(
        model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
        num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, qk_norm=True,
        rope_theta=1e6, max_position_embeddings=40960),
    "qwen3-32b": ModelConfig(
        model_type="qwen3", vocab_size=151936, hidden_size=5120, intermediate_size=25600,
        num_layers=64, num_heads=64, num_kv_heads=8, head_dim=128, qk_norm=True,
        rope_theta=1e6, max_position_embeddings=40960),
    "qwen2.5-math-1.5b": ModelConfig(
        model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
        num_layers=28, num_heads=12, num_kv_heads=2, head_dim=128, qkv_bias=True,
        tie_word_embeddings=True, rope_theta=1e4, max_position_embeddings=4096),
}


def resolve_model(name_or_path: str) -> ModelConfig:
    """ModelConfig from a known name (case-insensitive, "Qwen3-8B"), an HF dir or config.json.

    A path that does not exist but whose last component is a known name (e.g. the recipe's
    "models/Qwen3-32B") falls back to the built-in shapes.
    """
    if os.path.exists(name_or_path):
        return ModelConfig.from_hf(name_or_path)
    key = os.path.basename(os.path.normpath(name_or_path)).lower()
    if key in KNOWN_MODELS:
        return KNOWN_MODELS[key]
    raise ValueError(
        f"model {name_or_path!r} is neither a file/directory nor a known model "
        f"({', '.join(sorted(KNOWN_MODELS))})"
    )


# --------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class PlanSettings:
    """Training and sampling shapes of one RL step (global sizes unless stated).

    mesh: (data, fsdp, tensor); -1 = the rest of the devices.
    micro_batch_rows: rows per gradient micro-batch (all devices together).
    mini_batch_rows: rows per optimizer update; more than ``micro_batch_rows`` means gradient
      accumulation (a second parameter-sized gradient tree). None = equal (no accumulation).
    prompt_len / response_len: padded P and T; training sequences are P + T long.
    logprob_chunk: positions per chunk of the log-prob/entropy scan.
    sampling_rows: rollout rows decoded concurrently (all devices together).
    sampling_mesh: mesh of the sampler, None = the training mesh (same arrays, no copy).
    sampling_dtype: dtype of the sampler's weights; a copy is kept when it differs from
      ``param_dtype`` or the sampling mesh differs. kv_dtype: KV-cache dtype (None = dtype).
    reference_model: keep a frozen reference (KL) in ``dtype`` with the training sharding.
    attention: "jnp" (materialises [b, Hq, S, S] float32 scores, what the trainer runs
      today) or "flash" (a blocked kernel; scores O(b·Hq·S·block)).
    """

    mesh: tuple[int, int, int] = (1, -1, 1)
    param_dtype: str = "float32"
    dtype: str = "bfloat16"
    remat: str = "full"
    micro_batch_rows: int = 8
    mini_batch_rows: int | None = None
    prompt_len: int = 1024
    response_len: int = 4096
    logprob_chunk: int = 256
    sampling_rows: int = 64
    sampling_mesh: tuple[int, int, int] | None = None
    sampling_dtype: str | None = None
    kv_dtype: str | None = None
    reference_model: bool = False
    attention: str = "jnp"

    def __post_init__(self):
        if self.remat not in ("none", "full", "dots"):
            raise ValueError(f"remat must be none | full | dots, got {self.remat!r}")
        if self.attention not in ("jnp", "flash"):
            raise ValueError(f"attention must be jnp | flash, got {self.attention!r}")
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


def _mesh_sizes(mesh: tuple[int, int, int], num_devices: int) -> dict[str, int]:
    from jaxrl.sharding.mesh import resolve_axis_sizes

    data, fsdp, tensor = resolve_axis_sizes(num_devices, *mesh)
    return {"data": data, "fsdp": fsdp, "tensor": tensor}


def _param_shard_elements(cfg: ModelConfig, sizes: dict[str, int], rules=None) -> tuple[int, int]:
    """(elements of all parameter shards on one device, elements of the layer weights on one
    device once gathered over fsdp, i.e. still split over tensor)."""
    import jax

    from jaxrl.models.transformer import param_logical_axes, param_shapes
    from jaxrl.sharding.rules import logical_to_spec, shard_shape

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
    from jaxrl.sharding.rules import logical_to_spec, shard_shape

    spec = logical_to_spec(("batch",), (rows,), sizes)
    return shard_shape((rows,), spec, sizes)[0]


def activation_bytes(cfg: ModelConfig, settings: PlanSettings, sizes: dict[str, int]) -> dict[str, int]:
    """Per-device activation bytes of one micro-batch's forward + backward (see module doc)."""
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
    if settings.attention == "jnp":
        score_cols = s
    else:
        score_cols = min(s, 512)
    residual = b * s * d * c
    head_terms = b * s * (hq + 2 * kv) * c
    mlp = b * s * f * c
    scores = b * heads * s * score_cols * 4
    probs = b * heads * s * score_cols * c
    # every intermediate of one layer: 4 residual-sized (input, 2 norms, mid), q/k/v before
    # and after rope + attention output, scores (f32) + probs + mask, gate/up/silu/product
    layer_all = (4 * residual + 2 * head_terms + b * s * hq * c + scores + probs
                 + b * s * score_cols + 4 * mlp)
    layer_dots = (2 * residual + head_terms + b * s * hq * c + scores + 2 * mlp)
    layers = cfg.num_layers
    if settings.remat == "none":
        saved = layers * layer_all
        live = layer_all
    elif settings.remat == "dots":
        saved = layers * layer_dots
        live = layer_all
    else:
        saved = layers * residual
        live = layer_all
    scale = _ACTIVATION_SCALE[settings.remat]
    chunk = min(settings.logprob_chunk, resp)
    logits = int(_LOGITS_BUFFERS * b * chunk * v * 4)
    hidden = 2 * b * resp * d * c + 2 * b * s * d * c  # final hidden + its cotangent, embeds
    return {"activations_saved": int(scale * saved), "activations_live": int(scale * (live + hidden)),
            "logprob_chunk_buffers": logits}


def plan(model_cfg: ModelConfig, settings: PlanSettings, hardware: Hardware, *,
         search_knobs: bool = True) -> Plan:
    """Per-device memory of one RL step on ``hardware`` (see the module docstring).

    When it does not fit and ``search_knobs``, ``advice`` names the first knob to turn.
    """
    sizes = _mesh_sizes(settings.mesh, hardware.num_devices)
    p = _DTYPE_BYTES[settings.param_dtype]
    c = _DTYPE_BYTES[settings.dtype]
    param_elems, gathered_elems = _param_shard_elements(model_cfg, sizes)
    comps: dict[str, int] = {}
    comps["params"] = param_elems * p
    comps["optimizer_state"] = 2 * param_elems * p
    if settings.reference_model:
        comps["reference_params"] = param_elems * c
    sampling_dtype = settings.sampling_dtype or settings.param_dtype
    sampling_sizes = sizes
    notes: list[str] = []
    if settings.sampling_mesh is not None:
        sampling_sizes = _mesh_sizes(settings.sampling_mesh, hardware.num_devices)
    if sampling_dtype != settings.param_dtype or sampling_sizes != sizes:
        sampling_elems, _ = _param_shard_elements(model_cfg, sampling_sizes)
        comps["sampling_params_copy"] = sampling_elems * _DTYPE_BYTES[sampling_dtype]
    persistent = sum(comps.values())

    accumulating = (settings.mini_batch_rows or settings.micro_batch_rows) > settings.micro_batch_rows
    comps["gradients"] = (2 if accumulating else 1) * param_elems * p
    comps["update_temporaries"] = int(_UPDATE_TEMP_TREES * param_elems * p)
    # XLA hoists the fsdp all-gather of the stacked layer weights out of the layer scan (seen
    # in the compiled HLO): every layer's weights, gathered over fsdp, in the compute dtype.
    comps["fsdp_gathered_weights"] = gathered_elems * c if sizes["fsdp"] > 1 else 0
    comps.update(activation_bytes(model_cfg, settings, sizes))
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

    peak = max(train, sample)
    fits = peak <= hardware.usable_bytes
    if settings.attention == "jnp" and comps["activations_live"] > 0.25 * hardware.usable_bytes:
        notes.append("attention scores [b, H/tensor, S, S] float32 dominate: the trainer's jnp "
                     "attention materialises them; a blocked (flash) kernel removes the S^2 term")
    if model_cfg.num_kv_heads % sizes["tensor"]:
        notes.append(f"{model_cfg.num_kv_heads} KV heads do not split over tensor={sizes['tensor']}: "
                     "the KV cache is replicated over the tensor axis")
    return Plan(hardware, sizes, comps, train, sample, peak, fits,
                advice=[] if fits or not search_knobs else _advice(model_cfg, settings, hardware),
                notes=notes)


def _largest_fitting(low: int, high: int, fits) -> int | None:
    """Largest n in [low, high] with fits(n), for fits monotone decreasing in n; None if none."""
    if not fits(low):
        return None
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def _advice(cfg: ModelConfig, settings: PlanSettings, hardware: Hardware) -> list[str]:
    """Knobs to turn, in order, until the step fits (each applied on top of the previous ones).

    Order (cheapest in throughput first): train phase: remat=full, a smaller gradient
    micro-batch, a smaller log-prob chunk, more tensor parallelism (from fsdp), blocked
    attention, all data-parallel devices into fsdp; sample phase: fewer rollout rows in flight.
    """
    budget = hardware.usable_bytes
    steps: list[str] = []
    current = settings

    def train_of(s):
        return plan(cfg, s, hardware, search_knobs=False).train_bytes

    def sample_of(s):
        return plan(cfg, s, hardware, search_knobs=False).sample_bytes

    if train_of(current) > budget:
        sizes = _mesh_sizes(current.mesh, hardware.num_devices)
        candidates = []
        if current.remat != "full":
            candidates.append(("model.remat=full", lambda s: dataclasses.replace(s, remat="full")))
        candidates.append(("micro", None))
        if current.logprob_chunk > 128:
            candidates.append(("rl.logprob_chunk_size=128",
                               lambda s: dataclasses.replace(s, logprob_chunk=128)))
        candidates.append(("tensor", None))
        if current.attention == "jnp":
            candidates.append(("a blocked (flash) attention kernel in the training forward "
                               "(removes the S^2 float32 scores; not in jaxrl yet)",
                               lambda s: dataclasses.replace(s, attention="flash")))
        if sizes["data"] > 1:
            candidates.append((f"mesh.data=1 mesh.fsdp={sizes['data'] * sizes['fsdp']}",
                               lambda s: dataclasses.replace(s, mesh=(1, -1, sizes["tensor"]))))
        for name, change in candidates:
            if train_of(current) <= budget:
                break
            if name == "micro":
                row_unit = sizes["data"] * sizes["fsdp"]
                per_device = _largest_fitting(1, max(1, current.micro_batch_rows // row_unit),
                    lambda n: train_of(dataclasses.replace(current, micro_batch_rows=n * row_unit)) <= budget)
                if per_device is not None and per_device * row_unit < current.micro_batch_rows:
                    current = dataclasses.replace(current, micro_batch_rows=per_device * row_unit)
                    steps.append(f"rl.micro_batch_rows={per_device * row_unit} "
                                 f"({per_device} per device)")
                elif per_device is None and current.micro_batch_rows > row_unit:
                    current = dataclasses.replace(current, micro_batch_rows=row_unit)
                    steps.append(f"rl.micro_batch_rows={row_unit} (1 per device)")
                continue
            if name == "tensor":
                # more tensor parallelism (taken from fsdp) while it divides the heads and helps
                while train_of(current) > budget:
                    d, f, t = _mesh_sizes(current.mesh, hardware.num_devices).values()
                    if f % 2 or cfg.num_heads % (2 * t):
                        break
                    # keep the rows per device: fewer rows per micro-batch on fewer batch shards
                    micro = max(d * (f // 2), current.micro_batch_rows // 2)
                    wider = dataclasses.replace(current, mesh=(d, f // 2, 2 * t), micro_batch_rows=micro)
                    if train_of(current) - train_of(wider) < 0.01 * budget:
                        break
                    current = wider
                    steps.append(f"mesh.fsdp={f // 2} mesh.tensor={2 * t} rl.micro_batch_rows={micro} "
                                 "(heads, MLP, vocab and attention scores split further)")
                continue
            changed = change(current)
            if train_of(current) - train_of(changed) < 0.01 * budget:
                continue  # saves too little to be worth naming
            current = changed
            steps.append(name)
        if train_of(current) > budget:
            steps.append(f"train phase still needs {train_of(current) / GIB:.1f} GiB/device: "
                         "more devices or more tensor parallelism")
    if sample_of(current) > budget:
        sizes = _mesh_sizes(current.sampling_mesh or current.mesh, hardware.num_devices)
        row_unit = sizes["data"] * sizes["fsdp"]
        per_device = _largest_fitting(1, max(1, current.sampling_rows // row_unit),
            lambda n: sample_of(dataclasses.replace(current, sampling_rows=n * row_unit)) <= budget)
        if per_device is None:
            steps.append("the KV cache of one rollout row per device does not fit: more tensor "
                         "parallelism for sampling or an int8/fp8 KV cache")
        else:
            rows = per_device * row_unit
            rounds = -(-settings.sampling_rows // rows)
            steps.append(f"decode at most {rows} rollout rows at a time ({per_device} per batch shard; "
                         f"{settings.sampling_rows} rows in {rounds} rounds)")
            current = dataclasses.replace(current, sampling_rows=rows)
    final = plan(cfg, current, hardware, search_knobs=False)
    lead = "turn first: " if steps else ""
    return [lead + steps[0]] + [f"then: {s}" for s in steps[1:]] + (
        [f"-> peak {final.peak_bytes / GIB:.1f} GiB/device ({'fits' if final.fits else 'still too big'})"]
        if steps else [])


# --------------------------------------------------------------------------- CLI
def settings_from_config(cfg) -> tuple[ModelConfig, PlanSettings]:
    """(model shapes, settings) from a jaxrl ConfigDict (see jaxrl.config.base_config)."""
    model = resolve_model(cfg.model.path)
    rows = int(cfg.rl.prompts_per_step) * int(cfg.rl.samples_per_prompt)
    settings = PlanSettings(
        mesh=(int(cfg.mesh.data), int(cfg.mesh.fsdp), int(cfg.mesh.tensor)),
        param_dtype=cfg.model.param_dtype, dtype=cfg.model.dtype, remat=cfg.model.remat,
        micro_batch_rows=int(cfg.rl.micro_batch_rows),
        mini_batch_rows=int(cfg.rl.mini_batch_prompts) * int(cfg.rl.samples_per_prompt),
        prompt_len=int(cfg.data.max_prompt_tokens),
        response_len=int(cfg.sampling.max_new_tokens),
        logprob_chunk=int(cfg.rl.logprob_chunk_size),
        sampling_rows=min(rows, int(cfg.sampling.max_rows_per_call)) if cfg.sampling.max_rows_per_call > 0 else rows,
        reference_model=float(cfg.rl.loss.kl_coef) > 0,
    )
    return model, settings


def _config_file(path: str):
    """The experiment file's ``get_config()`` (no start-up checks: the weights need not exist)."""
    import importlib.util

    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location("_jaxrl_plan_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def main(argv: Sequence[str] | None = None) -> int:
    """``jaxrl plan --config FILE | --model NAME_OR_PATH --hardware v5p-128 [overrides]``."""
    parser = argparse.ArgumentParser(prog="jaxrl plan", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="jaxrl experiment config (.py with get_config())")
    parser.add_argument("--model", help="known name (qwen3-8b, qwen3-32b, qwen2.5-math-1.5b), "
                        "HF directory or config.json; overrides the config's model.path")
    parser.add_argument("--hardware", required=True, help="v5p-128, v5e-256, h100x8, ...")
    parser.add_argument("--mesh", help="data,fsdp,tensor (e.g. 1,-1,4)")
    parser.add_argument("--remat", choices=("none", "full", "dots"))
    parser.add_argument("--micro-batch-rows", type=int)
    parser.add_argument("--prompt-len", type=int)
    parser.add_argument("--response-len", type=int)
    parser.add_argument("--logprob-chunk", type=int)
    parser.add_argument("--sampling-rows", type=int, help="rollout rows decoded concurrently")
    parser.add_argument("--sampling-mesh", help="data,fsdp,tensor of the sampler (default: same)")
    parser.add_argument("--sampling-dtype")
    parser.add_argument("--kv-dtype")
    parser.add_argument("--attention", choices=("jnp", "flash"))
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)

    if args.config:
        model, settings = settings_from_config(_config_file(args.config))
    else:
        model, settings = None, PlanSettings()
    if args.model:
        model = resolve_model(args.model)
    if model is None:
        parser.error("give --config or --model")
    changes: dict[str, Any] = {}
    for name in ("remat", "micro_batch_rows", "prompt_len", "response_len", "logprob_chunk",
                 "sampling_rows", "sampling_dtype", "kv_dtype", "attention"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    for name in ("mesh", "sampling_mesh"):
        if getattr(args, name):
            changes[name] = tuple(int(x) for x in getattr(args, name).split(","))
    settings = dataclasses.replace(settings, **changes)
    result = plan(model, settings, parse_hardware(args.hardware))
    if args.json:
        print(json.dumps(result.as_dict(), indent=1))
    else:
        print(f"model {model.model_type}: {model.num_params() / 1e9:.2f} B parameters; "
              f"train seq {settings.prompt_len}+{settings.response_len}, micro-batch "
              f"{settings.micro_batch_rows} rows, remat {settings.remat}, dtype {settings.dtype}, "
              f"params {settings.param_dtype}; {settings.sampling_rows} rollout rows")
        print(result.format())
    return 0 if result.fits else 1


if __name__ == "__main__":
    sys.exit(main())
