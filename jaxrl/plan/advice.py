"""Knob advice: which setting to turn, in order, until one RL step fits the hardware."""

from __future__ import annotations

import dataclasses

from jaxrl.models.config import ModelConfig
from jaxrl.plan.hardware import GIB, Hardware
from jaxrl.plan.memory import Plan, PlanSettings, _mesh_sizes, attention_impl, estimate


def plan(model_cfg: ModelConfig, settings: PlanSettings, hardware: Hardware, *,
         search_knobs: bool = True) -> Plan:
    """Per-device memory of one RL step on ``hardware`` (see ``jaxrl.plan.memory``).

    When it does not fit and ``search_knobs``, ``advice`` names the first knob to turn.
    """
    result = estimate(model_cfg, settings, hardware)
    if not result.fits and search_knobs:
        result.advice = _advice(model_cfg, settings, hardware)
    return result


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
        return estimate(cfg, s, hardware).train_bytes

    def sample_of(s):
        return estimate(cfg, s, hardware).sample_bytes

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
        if attention_impl(current, hardware) == "xla":
            candidates.append(("model.attention_impl=blocked (no S^2 float32 scores)",
                               lambda s: dataclasses.replace(s, attention="blocked")))
        if sizes["data"] > 1:
            candidates.append((f"mesh.data=1 mesh.fsdp={sizes['data'] * sizes['fsdp']}",
                               lambda s: dataclasses.replace(s, mesh=(1, -1, sizes["tensor"]))))
        for name, change in candidates:
            if train_of(current) <= budget:
                break
            if name == "micro" and current.micro_batch_tokens:
                # token budget: in whole full-width rows per row shard
                unit = sizes["data"] * sizes["fsdp"] * (current.prompt_len + current.response_len)
                n = _largest_fitting(1, max(1, current.micro_batch_tokens // unit),
                    lambda n: train_of(dataclasses.replace(current, micro_batch_tokens=n * unit)) <= budget)
                if n is not None and n * unit < current.micro_batch_tokens:
                    current = dataclasses.replace(current, micro_batch_tokens=n * unit)
                    steps.append(f"rl.micro_batch_tokens={n * unit}")
                continue
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
    final = estimate(cfg, current, hardware)
    lead = "turn first: " if steps else ""
    return [lead + steps[0]] + [f"then: {s}" for s in steps[1:]] + (
        [f"-> peak {final.peak_bytes / GIB:.1f} GiB/device ({'fits' if final.fits else 'still too big'})"]
        if steps else [])
