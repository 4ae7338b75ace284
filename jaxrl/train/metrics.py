"""Run observability: progress line, metrics.jsonl, samples.jsonl, TensorBoard, W&B, plots.

``MetricsLogger`` receives one dict of host floats per RL step. It appends it to
``RUN_DIR/metrics.jsonl`` (one JSON object per line, ``step`` first), to TensorBoard when
``tensorboardX`` (or ``torch.utils.tensorboard``) is importable, to W&B when enabled, and
updates a one-line progress display on stderr (a plain line per step when stderr is not a
terminal). On resume, lines of steps after the restored checkpoint are dropped first, so
the files describe exactly the steps of the final state.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Iterable, Mapping

import matplotlib

matplotlib.use("Agg")  # before pyplot: plots are written to files, never shown
import matplotlib.pyplot as plt  # noqa: E402

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"


class DependencyMissing(RuntimeError):
    """A logging backend was requested but its package is not installed."""


def _truncate_jsonl(path: str, keep_through_step: int | None) -> None:
    """Keeps only lines whose ``step`` <= keep_through_step (all lines dropped for None)."""
    if not os.path.exists(path):
        return
    kept = []
    if keep_through_step is not None:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash mid-write
                if record.get("step", math.inf) <= keep_through_step:
                    kept.append(line if line.endswith("\n") else line + "\n")
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(kept)


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """All complete JSON lines of ``path``."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if line:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return records


def tensorboard_writer_class():
    """``SummaryWriter`` from tensorboardX or torch.utils.tensorboard, or None."""
    try:
        from tensorboardX import SummaryWriter  # optional (the logging extra): imported only when asked for

        return SummaryWriter
    except ImportError:
        pass
    try:
        import tensorboard  # noqa: F401  (torch's writer needs it)
        from torch.utils.tensorboard import SummaryWriter  # torch is optional, never a runtime dependency

        return SummaryWriter
    except ImportError:
        return None


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` for a non-negative number of seconds."""
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class MetricsLogger:
    """Writes per-step metrics and sample completions of one run (host side only).

    run_dir: the run directory. resume_step: the restored checkpoint's step (older lines
    kept, newer dropped) or None for a fresh run (files emptied). total_steps: for the ETA.
    tensorboard: "auto" | "on" | "off"; wandb: bool (DependencyMissing if not installed).
    """

    def __init__(
        self,
        run_dir: str,
        *,
        resume_step: int | None,
        total_steps: int,
        progress_bar: bool = True,
        tensorboard: str = "auto",
        wandb: bool = False,
        wandb_project: str = "jaxrl",
        config: Mapping[str, Any] | None = None,
        is_writer: bool = True,
    ):
        self.run_dir = run_dir
        self.total_steps = total_steps
        self.progress_bar = progress_bar and is_writer
        self.is_writer = is_writer
        self.metrics_path = os.path.join(run_dir, METRICS_FILE)
        self.samples_path = os.path.join(run_dir, SAMPLES_FILE)
        self.notes: list[str] = []
        self._started = time.monotonic()
        self._steps_logged = 0
        self._tb = None
        self._wandb = None
        if not is_writer:
            return
        os.makedirs(run_dir, exist_ok=True)
        _truncate_jsonl(self.metrics_path, resume_step)
        _truncate_jsonl(self.samples_path, resume_step)
        if tensorboard != "off":
            writer_class = tensorboard_writer_class()
            if writer_class is not None:
                self._tb = writer_class(os.path.join(run_dir, "tensorboard"))
            elif tensorboard == "on":
                raise DependencyMissing("logging.tensorboard='on' needs tensorboardX (pip install tensorboardX)")
            else:
                self.notes.append("TensorBoard off: install tensorboardX to get event files")
        if wandb:
            try:
                import wandb as wandb_module  # optional (the logging extra)
            except ImportError:
                raise DependencyMissing("logging.wandb=True needs wandb (pip install wandb)") from None
            self._wandb = wandb_module.init(
                project=wandb_project, name=os.path.basename(os.path.abspath(run_dir)),
                config=dict(config or {}), resume="allow", dir=run_dir,
            )

    def log_step(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record the metrics of RL step ``step`` (1-based) everywhere."""
        if not self.is_writer:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for key, value in numeric.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)
        self._steps_logged += 1
        self._progress(step, record)

    def log_samples(self, step: int, samples: Iterable[Mapping[str, Any]]) -> None:
        """Append sample completions (dicts) of step ``step`` to samples.jsonl."""
        if not self.is_writer:
            return
        with open(self.samples_path, "a", encoding="utf-8") as handle:
            for sample in samples:
                handle.write(json.dumps({"step": int(step), **sample}) + "\n")

    def message(self, text: str) -> None:
        """A line for the user (stderr), kept apart from the progress line."""
        if self.is_writer:
            sys.stderr.write(("\n" if self.progress_bar and sys.stderr.isatty() else "") + text + "\n")
            sys.stderr.flush()

    def _progress(self, step: int, record: Mapping[str, Any]) -> None:
        if not self.progress_bar:
            return
        elapsed = time.monotonic() - self._started
        per_step = elapsed / max(self._steps_logged, 1)
        eta = per_step * max(self.total_steps - step, 0)
        parts = [f"step {step}/{self.total_steps}"]
        for key, label, fmt in (("reward/mean", "reward", "{:.3f}"), ("accuracy", "acc", "{:.3f}"),
                                ("loss", "loss", "{:.4f}"), ("throughput/tokens_per_s", "tok/s", "{:.0f}")):
            if key in record and isinstance(record[key], (int, float)):
                parts.append(f"{label} {fmt.format(record[key])}")
        parts.append(f"eta {format_duration(eta)}")
        line = " | ".join(parts)
        if sys.stderr.isatty():
            sys.stderr.write("\r" + line.ljust(100))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        """Flush and close the backends."""
        if self.progress_bar and sys.stderr.isatty():
            sys.stderr.write("\n")
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _plain(value: Any) -> Any:
    """JSON-friendly scalar (numpy/jax scalars → float; NaN/inf kept as strings by json)."""
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


# Curves drawn by ``plot_run``: file name → metric keys on one set of axes.
PLOT_GROUPS = {
    "reward": ("reward/mean", "accuracy"),
    "loss": ("loss", "pg_loss", "kl_loss"),
    "entropy": ("entropy_mean", "entropy_selected_mean", "rollout/entropy_mean"),
    "clipping": ("clip_frac_low", "clip_frac_high", "clip_frac_dual"),
    "grad_norm": ("grad_norm",),
    "response_length": ("rollout/response_length_mean", "rollout/truncated_fraction"),
    "logprob_gap": ("logprob_gap/abs_mean", "logprob_gap/kl_k3"),
    "dynamic_sampling": ("dynamic_sampling/rounds", "dynamic_sampling/groups_kept"),
    "time": ("time/sample", "time/reward", "time/update", "time/checkpoint", "time/step"),
    "eval": ("eval/greedy_accuracy", "eval/avg_at_k", "eval/pass_at_k"),
    "learning_rate": ("lr",),
}


def plot_run(run_dir: str) -> list[str]:
    """Writes PNG curves of ``RUN_DIR/metrics.jsonl`` to ``RUN_DIR/plots``; returns the paths."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {METRICS_FILE} in {run_dir}")
    records = read_jsonl(path)
    if not records:
        raise ValueError(f"{path} holds no metrics yet")
    out_dir = os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, keys in PLOT_GROUPS.items():
        series = {}
        for key in keys:
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if points:
                series[key] = points
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key, points in series.items():
            steps, values = zip(*points)
            ax.plot(steps, values, label=key, marker="." if len(points) < 50 else None)
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        target = os.path.join(out_dir, f"{name}.png")
        fig.savefig(target, dpi=100)
        plt.close(fig)
        written.append(target)
    return written
