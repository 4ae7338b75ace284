"""``jaxrl`` command line: train | eval | export | plot | sample | plan | ablate.

Exit status: 0 finished; 2 a user error (bad config or data, missing or unwritable files,
disk full, a checkpoint that cannot be written), printed as one line; 3 a diverged run
(non-finite loss/gradient); 4 an unhealthy run (non-finite weights or a collapsed policy);
128 + the signal number (130 SIGINT, 143 SIGTERM) for a run stopped by a signal after
saving. Programming errors keep their traceback.

Examples::

    jaxrl train --config configs/default.py --config.rl.lr=1e-6 --config.run.name=try1
    jaxrl eval --config configs/default.py --model runs/try1/final_model --out eval.json
    jaxrl export runs/try1 --out exported_model [--step 40]
    jaxrl plot runs/try1
    jaxrl sample --model runs/try1/final_model --prompt "make 9 from 3 5 7" --n 4
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import sys
from typing import Sequence

import jax
import numpy as np

from jaxrl import wiring
from jaxrl.config import ConfigError, config_from_json, load_config, validate
from jaxrl.data.tokenizer import decode_completion, encode_prompt
from jaxrl.eval.evaluate import evaluate_sets
from jaxrl.eval.report import heldout_before_after
from jaxrl.kernels.backend import enable_compilation_cache
from jaxrl.models import from_pretrained, model_params, save_pretrained, with_params
from jaxrl.sharding.mesh import maybe_initialize_distributed
from jaxrl.sharding.transfer import host_array
from jaxrl.sharding.watchdog import PEER_FAILED_EXIT, PeerFailure, start_watchdog
from jaxrl.train import step as train_step
from jaxrl.train.checkpoint import CheckpointError, Checkpointer
from jaxrl.train.health import RunUnhealthy
from jaxrl.train.loop import TrainingDiverged, train
from jaxrl.train.metrics import DependencyMissing, plot_run

USER_ERROR = 2
DIVERGED = 3
UNHEALTHY = 4
SIGNAL_BASE = 128  # a run stopped by signal S exits with 128 + S (shell convention)
# OSErrors that describe the machine, not a bug: printed as one line (disk full, read-only, ...).
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOENT}
DEFAULT_CONFIG = "configs/default.py"


class UserError(Exception):
    """An error in what the user asked for; printed as one line."""


def _start_distributed(cfg) -> None:
    dist = cfg.distributed
    if dist.coordinator_address and (dist.num_processes < 1 or dist.process_id < 0):
        raise UserError("distributed.coordinator_address is set: set distributed.num_processes "
                        "and distributed.process_id too")
    maybe_initialize_distributed(
        {"coordinator_address": dist.coordinator_address, "num_processes": dist.num_processes,
         "process_id": dist.process_id} if dist.coordinator_address else None
    )


def cmd_train(args, overrides) -> int:
    cfg = load_config(args.config, list(overrides))
    _start_distributed(cfg)
    if args.resume is not None:
        cfg.checkpoint.resume = "on" if args.resume else "off"
    validate(cfg, num_devices=jax.device_count())
    allowed = [k.strip() for k in (args.allow_config_change or "").split(",") if k.strip()]
    for key in allowed:
        node = cfg
        for part in key.split("."):
            if not hasattr(node, "keys") or part not in node:
                raise UserError(f"--allow-config-change: unknown config key {key!r}")
            node = node[part]
    # Multi-process runs: a process that fails tells the others, and a silent one is found by
    # its missing heartbeat; both end every process with a line naming the failed one.
    watchdog = start_watchdog(timeout_s=cfg.distributed.heartbeat_timeout_s)
    try:
        with watchdog.guard():
            result = train(cfg, allow_config_change=allowed, watchdog=watchdog)
    except PeerFailure as error:
        print(f"jaxrl train: stopped: {_one_line(error)}", file=sys.stderr)
        watchdog.exit(PEER_FAILED_EXIT)
        raise
    except Exception as error:
        if not watchdog.active:  # main() prints the one line; printing here too doubled it
            raise
        code = _user_error_code("train", error)
        if code is None:
            raise
        watchdog.exit(code)
        raise
    watchdog.stop()
    print(f"{result.stop_reason}: step {int(result.state.step)}, run dir {result.run_dir}")
    if result.signal is not None:
        return SIGNAL_BASE + result.signal
    if result.stop_reason == "completed":
        with jax.set_mesh(mesh := wiring.mesh_of(cfg)):
            table = heldout_before_after(cfg, result.state.params, mesh=mesh)[2]
        if jax.process_index() == 0:
            print(table)
            for path in plot_run(result.run_dir):
                print(path)
    return 0


def cmd_eval(args, overrides) -> int:
    cfg = load_config(args.config, list(overrides))
    _start_distributed(cfg)
    model_dir = args.model or cfg.model.path
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise UserError(f"--model: no HF model (config.json) in {model_dir}")
    mesh = wiring.mesh_of(cfg)
    with jax.set_mesh(mesh):
        policy = wiring.load_policy(cfg, mesh, model_dir=model_dir)
        reports = evaluate_sets(model_params(policy.model), policy.model_cfg, policy.tokenizer, cfg,
                                key=jax.random.PRNGKey(cfg.run.seed), mesh=mesh)
    if not reports:
        raise UserError("no held-out set: set eval.sets, eval.files or data.source='synthetic'")
    out = args.out or os.path.join(cfg.run.root, cfg.run.name, "eval", "eval.json")
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as handle:
            json.dump({"model": os.path.abspath(model_dir), "sets": reports}, handle, indent=2)
        print(json.dumps({name: report["summary"] for name, report in reports.items()}, indent=2))
        print(f"report: {out}")
    return 0


def export_run(run_dir: str, out_dir: str, step: int | None = None) -> int:
    """Writes the policy of checkpoint ``step`` (default newest) of ``run_dir`` as an HF dir."""
    config_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(config_path):
        raise UserError(f"{run_dir} is not a run directory (no config.json)")
    with open(config_path) as handle:
        cfg = config_from_json(handle.read())
    checkpointer = Checkpointer(os.path.join(run_dir, "checkpoints"), keep=cfg.checkpoint.keep, async_save=False)
    try:
        steps = checkpointer.all_steps()
        if not steps:
            raise UserError(f"{run_dir}/checkpoints holds no checkpoint")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise UserError(f"no checkpoint for step {step} in {run_dir} (have {steps})")
        model, _ = from_pretrained(cfg.model.path, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype)
        optimizer = train_step.make_optimizer(cfg)
        template = train_step.init_train_state(model_params(model), optimizer, cfg.run.seed)
        state, _ = checkpointer.restore(step, template)
    finally:
        checkpointer.close()
    save_pretrained(with_params(model, state.params), out_dir)
    return step


def cmd_export(args, overrides) -> int:
    if overrides:
        raise UserError(f"export takes no config overrides, got {overrides}")
    out = args.out or os.path.join(args.run_dir, "exported_model")
    step = export_run(args.run_dir, out, args.step)
    print(f"exported step {step} of {args.run_dir} to {out}")
    return 0


def cmd_plot(args, overrides) -> int:
    if overrides:
        raise UserError(f"plot takes no config overrides, got {overrides}")
    for path in plot_run(args.run_dir):
        print(path)
    return 0


def cmd_sample(args, overrides) -> int:
    cfg = load_config(args.config, list(overrides), check_files=False)
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise UserError(f"--model: no HF model (config.json) in {args.model}")
    _start_distributed(cfg)
    mesh = wiring.mesh_of(cfg)
    with jax.set_mesh(mesh):
        policy = wiring.load_policy(cfg, mesh, model_dir=args.model)
        ids = encode_prompt(policy.tokenizer, args.prompt, use_chat_template=not args.no_chat_template)
        cfg.data.max_prompt_tokens = max(len(ids), 1)
        cfg.sampling.max_new_tokens = args.max_new_tokens
        backend = wiring.rollout_backend(cfg, policy.model_cfg, mesh, temperature=args.temperature, top_p=args.top_p)
        rollout = backend.wait(backend.generate(model_params(policy.model), np.asarray([ids], np.int32),
                                                np.asarray([len(ids)], np.int32), args.n,
                                                jax.random.PRNGKey(args.seed)))
        tokens, lengths = host_array(rollout.tokens), host_array(rollout.lengths)
    if jax.process_index() == 0:
        for i in range(args.n):
            print(f"--- sample {i} ({int(lengths[i])} tokens)")
            print(decode_completion(policy.tokenizer, tokens[i, : lengths[i]]))
    return 0


# Subcommands whose own main(argv) parses their arguments: name -> (module, help).
DELEGATED = {"plan": ("jaxrl.plan", "memory planner"),
             "ablate": ("jaxrl.ablate", "ablation runner")}


def _delegate(module_name: str, what: str):
    """A subcommand implemented by another module's ``main(argv)`` (if it exists)."""

    def run(args, overrides) -> int:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            raise UserError(f"'jaxrl {what}' is not available in this installation ({module_name} missing)") from None
        return int(module.main(list(args.rest) + list(overrides)) or 0)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxrl", description="JAX-native RL post-training for LLMs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run or resume an experiment (config overrides: --config.rl.lr=1e-6)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"experiment file with get_config() (default {DEFAULT_CONFIG})")
    p.add_argument("--resume", dest="resume", action="store_true", default=None, help="require a checkpoint to resume")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start fresh; an existing run directory is moved to RUN_DIR.old-<time>")
    p.add_argument("--allow-config-change", default="", metavar="KEY[,KEY]",
                   help="config keys that may differ from the stored config when resuming "
                        "(recorded in RUN_DIR/config_history.jsonl)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="greedy accuracy, avg@k, pass@k of a model → JSON report")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--model", default=None, help="HF model directory (default: model.path of the config)")
    p.add_argument("--out", default=None, help="report path (default RUN_DIR/eval/eval.json)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="write a run's checkpoint as an HF model directory")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="output directory (default RUN_DIR/exported_model)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("plot", help="PNG curves of RUN_DIR/metrics.jsonl into RUN_DIR/plots")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("sample", help="generate completions for one prompt")
    p.add_argument("--model", required=True, help="HF model directory (tokenizer files inside)")
    p.add_argument("--config", default="default",
                   help="experiment file for dtype, mesh and stop ids (default: the shipped default)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat-template", action="store_true")
    p.set_defaults(func=cmd_sample)

    for name, (module, text) in DELEGATED.items():
        p = sub.add_parser(name, help=text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=_delegate(module, name))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jaxrl`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _compilation_cache()
    if argv and argv[0] in DELEGATED:  # hand the arguments over verbatim, in their order
        module, _ = DELEGATED[argv[0]]
        args = argparse.Namespace(command=argv[0], rest=argv[1:], func=_delegate(module, argv[0]))
        overrides = []
    else:
        # Anything argparse does not know is a config override; parse_overrides rejects the rest.
        args, overrides = build_parser().parse_known_args(argv)
    try:
        return args.func(args, overrides)
    except Exception as error:
        code = _user_error_code(args.command, error)
        if code is None:
            raise
        return code


def _user_error_code(command: str, error: BaseException) -> int | None:
    """Prints the one-line message of a user/environment error and returns its exit status;
    None for anything else (a programming error keeps its traceback)."""
    if isinstance(error, (ConfigError, UserError, FileNotFoundError, DependencyMissing, CheckpointError)):
        print(f"jaxrl {command}: error: {_one_line(error)}", file=sys.stderr)
        return USER_ERROR
    if isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRNOS:
        where = f"{error.filename}: " if error.filename else ""
        print(f"jaxrl {command}: error: {where}{error.strerror or _one_line(error)}", file=sys.stderr)
        return USER_ERROR
    if isinstance(error, TrainingDiverged):
        print(f"jaxrl {command}: stopped: {_one_line(error)}", file=sys.stderr)
        return DIVERGED
    if isinstance(error, RunUnhealthy):
        print(f"jaxrl {command}: stopped: {_one_line(error)}", file=sys.stderr)
        return UNHEALTHY
    return None


def _compilation_cache() -> None:
    """Persistent XLA compilation cache (docs/design.md §8): a second start of the same run, or
    a resume, pays no compile. ``JAXRL_COMPILATION_CACHE`` = a directory (default
    ~/.cache/jaxrl/xla) or ``off``; an unusable directory is reported in one line and skipped."""
    path = os.environ.get("JAXRL_COMPILATION_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jaxrl", "xla"))
    if path.strip().lower() in ("off", "0", "none", ""):
        return
    try:
        enable_compilation_cache(path)
    except ValueError as error:
        print(f"jaxrl: compilation cache off: {_one_line(error)}", file=sys.stderr)


def _one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
