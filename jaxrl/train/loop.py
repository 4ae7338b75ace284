"""The RL loop: the only place that sequences effects (sampling, rewarding, updates, I/O).

One RL step (docs/design.md): ``rollouts.collect`` (prompts → Rollout → Scored, dynamic
sampling) → ``rollouts.make_train_batch`` (advantages, device TrainBatch) →
``optimise.optimise`` (trainer log-prob pass, forking-token selection, mini-batch updates)
→ metrics, samples, periodic eval, checkpoints (every K steps, at the end, on SIGTERM/SIGINT).

All state is in one ``LoopState``: the ``TrainState`` (params, optimizer, step, RNG) plus
the data-iterator position and the loop's counters, and all of it is checkpointed, so
``train(cfg)`` resumes from the newest checkpoint (``checkpoint.resume``) bit-exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec

from jaxrl import wiring
from jaxrl.config import ConfigError, to_json, validate
from jaxrl.eval.evaluate import evaluate_records, load_eval_records
from jaxrl.models import model_params, save_pretrained, with_params
from jaxrl.train import rollouts
from jaxrl.train import step as train_step
from jaxrl.train import health
from jaxrl.train import run_dir as run_dir_io
from jaxrl.sharding.watchdog import Watchdog
from jaxrl.train.checkpoint import Checkpointer
from jaxrl.train.health import RunUnhealthy
from jaxrl.train.metrics import MetricsLogger
from jaxrl.train.optimise import make_updater, optimise
from jaxrl.types import StepMetrics


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclasses.dataclass
class RunResult:
    """What ``train`` returns: the final state, where the run lives, how it ended.

    metrics: the per-step metric dicts this process computed (host floats).
    stop_reason: "completed" | "signal" | "max_steps". signal: the signal number that
    stopped the run (SIGTERM/SIGINT), else None.
    """

    state: train_step.TrainState
    run_dir: str
    metrics: list[dict[str, Any]]
    stop_reason: str
    signal: int | None = None


@dataclasses.dataclass
class LoopState:
    """Everything a run carries from step to step; all of it but ``pending`` is in the checkpoint.

    train: params, optimizer state, RL step, RNG key (device). data_state: the prompt
    iterator's position before ``pending``'s prompts were drawn. consecutive_bad_steps: steps
    in a row whose update was skipped. sampler_params: with ``rl.rollout_staleness=1``, the
    params the next step samples with (the previous step's, a copy: updates donate theirs);
    None = sample with ``train.params``. pending: the next step's first round, already
    dispatched with ``sampler_params``; not saved, because ``launch`` from ``sampler_params``
    and ``data_state`` dispatches the same round again on resume.
    """

    train: train_step.TrainState
    data_state: dict[str, Any]
    consecutive_bad_steps: int = 0
    sampler_params: Any = None
    pending: rollouts.Launched | None = None

    def checkpoint_meta(self, cfg: ml_collections.ConfigDict) -> dict[str, Any]:
        """The JSON sidecar saved beside ``train``."""
        return {"data_state": self.data_state, "consecutive_bad_steps": self.consecutive_bad_steps,
                "config": json.loads(to_json(cfg))}


@dataclasses.dataclass
class Run:
    """The run's components (built once by ``start``); nothing here changes between steps."""

    cfg: ml_collections.ConfigDict
    run_dir: str
    is_writer: bool
    policy: wiring.Policy
    mesh: Any
    collector: rollouts.Collector
    algorithm: wiring.Algorithm
    updater: Any
    lr_schedule: Any
    build_batch: Any
    checkpointer: Checkpointer
    replicated: NamedSharding
    ref_params: Any

    def close(self) -> None:
        self.checkpointer.close()
        self.collector.rewards.close()


def start(cfg: ml_collections.ConfigDict, allow_config_change: Sequence[str] = ()
          ) -> tuple[Run, LoopState, int | None]:
    """Components + the initial (or resumed) loop state + the step resumed from (or None).

    allow_config_change: config keys that may differ from the stored config on resume.
    """
    run_dir = wiring.run_dir_of(cfg)
    resume = cfg.checkpoint.resume
    if resume == "off":
        run_dir_io.move_old_run_aside(run_dir)
    elif run_dir_io.has_checkpoints(run_dir):
        run_dir_io.check_resume_config(cfg, run_dir, allow_config_change)
    elif resume == "on":
        raise ConfigError(f"checkpoint.resume='on' but {os.path.join(run_dir, 'checkpoints')} has no checkpoint")
    os.makedirs(run_dir, exist_ok=True)
    mesh = wiring.mesh_of(cfg)
    policy = wiring.load_policy(cfg, mesh)
    row_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    replicated = NamedSharding(mesh, PartitionSpec())
    optimizer = train_step.make_optimizer(cfg)
    state = train_step.init_train_state(model_params(policy.model), optimizer, cfg.run.seed)
    # Pin every state leaf's sharding (params as loaded, scalars replicated) and make the
    # update return exactly these, so step 2 sees the same input shardings as step 1.
    state_sharding = jax.tree.map(lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else replicated, state)
    state = jax.device_put(state, state_sharding)
    algorithm = wiring.algorithm(cfg)
    try:
        data = wiring.prompt_iterator(cfg, policy.tokenizer, wiring.data_files(cfg, "train"),
                                      cfg.rl.prompts_per_step, shuffle=cfg.data.shuffle, num_epochs=None)
    except (ValueError, KeyError) as error:  # empty, all-bad or unreadable prompt files: one line
        text = error.args[0] if isinstance(error, KeyError) and error.args else error
        raise ConfigError(f"data.train_files: {text}") from None
    collector = rollouts.Collector(backend=wiring.rollout_backend(cfg, policy.model_cfg, mesh), data=data,
                                   rewards=wiring.reward_executor(cfg), tokenizer=policy.tokenizer, cfg=cfg,
                                   row_sharding=row_sharding)
    run = Run(
        cfg=cfg, run_dir=run_dir, is_writer=jax.process_index() == 0, policy=policy, mesh=mesh, collector=collector,
        algorithm=algorithm,
        lr_schedule=train_step.learning_rate_schedule(cfg),
        updater=make_updater(cfg, policy.model_cfg, algorithm.loss, optimizer, state_sharding, row_sharding,
                             replicated),
        build_batch=rollouts.train_batch_fn(row_sharding, overlong_filter=cfg.rl.overlong_filter),
        checkpointer=Checkpointer(os.path.join(run_dir, "checkpoints"), keep=cfg.checkpoint.keep,
                                  async_save=cfg.checkpoint.async_save),
        replicated=replicated,
        # A frozen copy; nothing holds a reference model when the KL term is off.
        ref_params=jax.tree.map(jnp.copy, state.params) if algorithm.loss.kl_coef > 0 else None,
    )
    loop_state = LoopState(train=state, data_state=data.get_state())
    if resume == "off":
        return run, loop_state, None
    try:
        found = run.checkpointer.restore_latest(state, run_dir_io.note)
        if found is not None and cfg.rl.rollout_staleness and found[2].get("sampler_params"):
            sampler_params = run.checkpointer.restore_sampler_params(found[0], state.params)
        else:  # none saved (a staleness-0 checkpoint): the next step samples with the restored params
            sampler_params = None
    except BaseException:
        run.close()
        raise
    if found is None:
        return run, loop_state, None
    step, restored, meta = found
    data.set_state(meta["data_state"])
    return run, LoopState(restored, meta["data_state"], int(meta["consecutive_bad_steps"]), sampler_params), step


def run_step(run: Run, loop_state: LoopState, logger: MetricsLogger, *, launch_next: bool = True
             ) -> tuple[LoopState, StepMetrics, rollouts.Collected]:
    """One RL step: collect → train batch → optimise → advance step and RNG; also returns what
    was collected (samples, completion keys for the health check).

    With ``rl.rollout_staleness=1`` the rollouts come from ``loop_state.sampler_params`` (the
    previous step's params) and, when ``launch_next``, the next step's first sampling round
    is dispatched with this step's params before this step's update, so they overlap.
    """
    state = loop_state.train
    step_number = int(state.step) + 1
    rng, step_key = jax.random.split(state.rng)
    sampler_params = state.params if loop_state.sampler_params is None else loop_state.sampler_params
    collected = rollouts.collect(run.collector, sampler_params, step_key, first=loop_state.pending)
    data_state, next_sampler, pending = run.collector.data.get_state(), None, None
    if run.cfg.rl.rollout_staleness:
        next_sampler = jax.tree.map(jnp.copy, state.params)  # the update below donates state.params
        if launch_next:  # the next step's key, as that step will split it from ``rng``
            pending = rollouts.launch(run.collector, next_sampler, jax.random.split(rng)[1])
    metrics = dict(collected.metrics)
    metrics["rollout/policy_lag"] = float(loop_state.sampler_params is not None)
    metrics["rows_trained"] = 0.0
    if collected.scored is not None:
        batch, truncated, real = rollouts.make_train_batch(run.collector, run.algorithm.advantages, run.build_batch,
                                                           collected.scored)
        metrics["rows_trained"] = float(real)
        state, update_metrics = optimise(run.updater, state, batch, truncated, run.ref_params)
        metrics.update(update_metrics)
    else:
        metrics["update_skipped"] = 0.0
        logger.message(f"step {step_number}: no group with reward variance; no update")
    state = state.replace(step=jax.device_put(state.step + 1, run.replicated), rng=jax.device_put(rng, run.replicated))
    bad = metrics["update_skipped"] > 0
    loop_state = LoopState(state, data_state, loop_state.consecutive_bad_steps + 1 if bad else 0, next_sampler,
                           pending)
    metrics["lr"] = float(run.lr_schedule(step_number - 1))
    metrics["data/rows_malformed"] = float(run.collector.data.stats.rows_malformed)
    metrics.update({f"data/skipped/{reason}": float(n) for reason, n in run.collector.data.stats.skipped.items()})
    metrics["compiles/update"] = float(train_step.TRACE_COUNTS["update"])
    metrics["compiles/logprobs"] = float(train_step.TRACE_COUNTS["logprobs"])
    metrics["skipped_updates_total"] = float(int(state.skipped_updates))
    return loop_state, StepMetrics(step_number, metrics), collected


def _eval(run: Run, params, step: int) -> dict[str, float]:
    """Held-out report of ``params`` written to RUN_DIR/eval/step_<step>.json → eval/* metrics."""
    records = load_eval_records(run.cfg, run.policy.tokenizer)
    report = evaluate_records(params, run.policy.model_cfg, run.policy.tokenizer, records, run.cfg,
                              key=jax.random.PRNGKey(run.cfg.run.seed + 1), rewards=run.collector.rewards,
                              mesh=run.mesh)
    if run.is_writer:
        out_dir = os.path.join(run.run_dir, "eval")
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"step_{step}.json"), "w") as handle:
            json.dump(report, handle, indent=2)
    return {f"eval/{k}": v for k, v in report["summary"].items() if isinstance(v, (int, float))}


def _open_logger(run: Run, resumed_from: int | None) -> MetricsLogger:
    cfg = run.cfg
    logger = MetricsLogger(
        run.run_dir, resume_step=resumed_from, total_steps=cfg.train.num_steps,
        progress_bar=cfg.logging.progress_bar, tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb,
        wandb_project=cfg.logging.wandb_project, config=json.loads(to_json(cfg)), is_writer=run.is_writer,
    )
    for note in logger.notes:
        logger.message(note)
    data_stats = run.collector.data.stats.as_dict()
    if data_stats["rows_malformed"] or data_stats["prompts_overlong_skipped"]:
        logger.message(
            f"data: {data_stats['rows_kept']} rows kept of {data_stats['rows_read']}; "
            f"{data_stats['rows_malformed']} malformed, {data_stats['prompts_overlong_skipped']} over-long skipped"
            f" (first problem: {data_stats['first_malformed_error']})"
        )
    if resumed_from is not None:
        logger.message(f"resumed from checkpoint step {resumed_from}")
    return logger


def _check_health(run: Run, loop_state: LoopState, tracker: health.HealthTracker, step_number: int,
                  metrics: dict[str, Any], completion_keys: list[str]) -> None:
    """RunUnhealthy when the state after step ``step_number`` is non-finite or the policy has
    collapsed for ``train.max_bad_steps`` steps; the unhealthy checkpoints are then moved aside.
    completion_keys: every process's completions as keys (equal on every process, so all
    processes decide alike; see ``rollouts.Collected``)."""
    reasons = health.collapse_reasons(completion_keys, metrics)
    if reasons:  # these rollouts came from the params saved after step t-1 (t-2 under staleness 1)
        for step in range(step_number - 1 - run.cfg.rl.rollout_staleness, step_number):
            run.checkpointer.mark_unhealthy(step)
    stop = tracker.observe(reasons)
    metrics["health/collapsed_steps"] = float(tracker.collapsed_steps)
    problem = None
    if not health.all_finite(loop_state.train):
        problem = f"step {step_number}: parameters or optimizer state became non-finite after the update"
    elif stop:
        problem = (f"policy collapsed for {tracker.collapsed_steps} steps ({'; '.join(reasons)}; "
                   f"train.max_bad_steps={run.cfg.train.max_bad_steps})")
    if problem is not None:
        healthy = run.checkpointer.quarantine_unhealthy()
        kept = f"newest healthy checkpoint: step {healthy}" if healthy is not None else "no healthy checkpoint"
        raise RunUnhealthy(f"{problem}; {kept} (later ones moved to checkpoints_unhealthy/)")


def train(cfg: ml_collections.ConfigDict, *, max_steps: int | None = None,
          allow_config_change: Sequence[str] = (), watchdog: Watchdog | None = None) -> RunResult:
    """Run (or resume) the experiment described by ``cfg`` until ``train.num_steps``.

    max_steps: stop after this many steps in this call (for tests and staged runs).
    watchdog: multi-process failure detection (``jaxrl.sharding.watchdog``), checked each step.
    allow_config_change: config keys that may differ from the stored config on resume.
    Writes RUN_DIR/config.json, metrics.jsonl, samples.jsonl, checkpoints/, final_model/.
    Raises ConfigError on bad config, TrainingDiverged after ``train.max_bad_steps``
    consecutive non-finite steps (the last good checkpoint is kept), RunUnhealthy when the
    weights become non-finite or the policy collapses (the newest healthy checkpoint is kept).
    """
    validate(cfg, num_devices=jax.device_count())
    existed = os.path.exists(wiring.run_dir_of(cfg))
    run = logger = None
    try:
        run, loop_state, resumed_from = start(cfg, allow_config_change)
        if run.is_writer:
            with open(os.path.join(run.run_dir, "config.json"), "w") as handle:
                handle.write(to_json(cfg))
        logger = _open_logger(run, resumed_from)
    except BaseException:
        if run is not None:
            run.close()
        run_dir_io.remove_new_run_dir(wiring.run_dir_of(cfg), existed)
        raise
    history: list[dict[str, Any]] = []
    stop_reason = "completed"
    last_saved = resumed_from
    checkpoint_time = 0.0
    tracker = health.HealthTracker(limit=cfg.train.max_bad_steps)
    stop = run_dir_io.StopSignal()
    try:
        # Under the mesh, the layer scan pins activation rows to data/fsdp (models.sharding.constrain).
        with stop, jax.set_mesh(run.mesh):
            while int(loop_state.train.step) < cfg.train.num_steps:
                if max_steps is not None and len(history) >= max_steps:
                    stop_reason = "max_steps"
                    break
                if watchdog is not None:  # raises PeerFailure when another process failed
                    watchdog.check(int(loop_state.train.step) + 1)
                step_started = time.monotonic()
                last = int(loop_state.train.step) + 1 >= cfg.train.num_steps or (
                    max_steps is not None and len(history) + 1 >= max_steps)
                loop_state, step_metrics, collected = run_step(run, loop_state, logger,
                                                               launch_next=not last and stop.received is None)
                samples = collected.samples
                step_number, metrics = step_metrics.step, step_metrics.values
                bad = metrics["update_skipped"] > 0
                if cfg.eval.every_steps and step_number % cfg.eval.every_steps == 0 and not bad:
                    eval_started = time.monotonic()
                    metrics.update(_eval(run, loop_state.train.params, step_number))
                    metrics["time/eval"] = time.monotonic() - eval_started
                metrics["time/checkpoint"] = checkpoint_time  # the save after the previous step
                metrics["time/step"] = time.monotonic() - step_started
                metrics["throughput/tokens_per_s"] = metrics["generated_tokens"] / max(metrics["time/step"], 1e-9)
                try:
                    _check_health(run, loop_state, tracker, step_number, metrics, collected.completion_keys)
                finally:
                    logger.log_step(step_number, metrics)
                if cfg.logging.samples_every and step_number % cfg.logging.samples_every == 0:
                    logger.log_samples(step_number, samples[: cfg.logging.num_samples])
                history.append(metrics)

                # The step's log lines go out before its checkpoint: a crash in between resumes
                # from the previous checkpoint and rewrites them, so no step's line is lost.
                checkpoint_time = 0.0
                final = step_number >= cfg.train.num_steps
                if not bad and (step_number % cfg.checkpoint.every_steps == 0 or final or stop.received):
                    started = time.monotonic()
                    run.checkpointer.save(step_number, loop_state.train, loop_state.checkpoint_meta(cfg),
                                          healthy=tracker.healthy, sampler_params=loop_state.sampler_params)
                    checkpoint_time = time.monotonic() - started
                    last_saved = step_number
                if loop_state.consecutive_bad_steps >= cfg.train.max_bad_steps:
                    raise TrainingDiverged(
                        f"{loop_state.consecutive_bad_steps} consecutive steps with a non-finite loss or "
                        f"gradient (train.max_bad_steps={cfg.train.max_bad_steps}); last good checkpoint: "
                        f"step {last_saved}"
                    )
                if stop.received is not None:
                    stop_reason = "signal"
                    logger.message(f"signal {stop.received}: saved checkpoint at step {last_saved}, stopping")
                    break
        if stop_reason == "completed" and cfg.checkpoint.save_final_model:
            save_pretrained(with_params(run.policy.model, loop_state.train.params),
                            os.path.join(run.run_dir, "final_model"))
    finally:
        try:
            run.close()
        finally:
            logger.close()
    return RunResult(state=loop_state.train, run_dir=run.run_dir, metrics=history, stop_reason=stop_reason,
                     signal=stop.received if stop_reason == "signal" else None)
