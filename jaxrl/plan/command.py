"""``jaxrl plan``: the memory plan of an experiment config or a model on a hardware slice."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any, Sequence


from jaxrl import config as config_lib
from jaxrl.models.config import ModelConfig
from jaxrl.plan.advice import plan
from jaxrl.plan.hardware import parse_hardware, resolve_model
from jaxrl.plan.memory import ATTENTION_IMPLS, PlanSettings

DESCRIPTION = "Memory planner: per-device bytes of one RL step, whether it fits, and which knob to turn."


def _has_heldout(cfg) -> bool:
    """Whether the run ends with the held-out report (a second params copy)."""
    return bool(cfg.eval.files or cfg.eval.sets or cfg.data.source == "synthetic")


def settings_from_config(cfg) -> tuple[ModelConfig, PlanSettings]:
    """(model shapes, settings) from a jaxrl ConfigDict (see jaxrl.config.base_config)."""
    model = resolve_model(cfg.model.path)
    rows = int(cfg.rl.prompts_per_step) * int(cfg.rl.samples_per_prompt)
    settings = PlanSettings(
        mesh=(int(cfg.mesh.data), int(cfg.mesh.fsdp), int(cfg.mesh.tensor)),
        param_dtype=cfg.model.param_dtype, dtype=cfg.model.dtype, remat=cfg.model.remat,
        micro_batch_rows=int(cfg.rl.micro_batch_rows),
        micro_batch_tokens=int(cfg.rl.micro_batch_tokens),
        mini_batch_rows=int(cfg.rl.mini_batch_prompts) * int(cfg.rl.samples_per_prompt),
        prompt_len=int(cfg.data.max_prompt_tokens),
        response_len=int(cfg.sampling.max_new_tokens),
        logprob_chunk=int(cfg.rl.logprob_chunk_size),
        sampling_rows=min(rows, int(cfg.sampling.max_rows_per_call)) if cfg.sampling.max_rows_per_call > 0 else rows,
        reference_model=float(cfg.rl.loss.kl_coef) > 0,
        eval_rows=int(cfg.eval.batch_prompts) * int(cfg.eval.num_samples) if _has_heldout(cfg) else 0,
        attention=cfg.model.get("attention_impl", "auto"),
        overlap=int(cfg.rl.get("rollout_staleness", 0)) == 1,
    )
    return model, settings


def main(argv: Sequence[str] | None = None) -> int:
    """``jaxrl plan --config FILE [--config.KEY=VALUE ...] | --model NAME_OR_PATH --hardware v5p-128 [...]``."""
    parser = argparse.ArgumentParser(prog="jaxrl plan", description=DESCRIPTION)
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
    parser.add_argument("--attention", choices=ATTENTION_IMPLS, help="model.attention_impl")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args, overrides = parser.parse_known_args(argv)  # the rest: --config.KEY=VALUE overrides
    if overrides and not args.config:
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")

    if args.config:
        model, settings = settings_from_config(config_lib.load_config(args.config, list(overrides), check_files=False))
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
    try:
        result = plan(model, settings, parse_hardware(args.hardware))
    except ValueError as error:  # unknown hardware, a mesh that does not fit it: one line, exit 2
        parser.error(str(error))
    if args.json:
        print(json.dumps(result.as_dict(), indent=1))
    else:
        print(f"model {model.model_type}: {model.num_params() / 1e9:.2f} B parameters; "
              f"train seq {settings.prompt_len}+{settings.response_len}, micro-batch "
              f"{settings.micro_batch_tokens or settings.micro_batch_rows} "
              f"{'tokens' if settings.micro_batch_tokens else 'rows'}, remat {settings.remat}, dtype {settings.dtype}, "
              f"params {settings.param_dtype}; {settings.sampling_rows} rollout rows")
        print(result.format())
    return 0 if result.fits else 1
