"""Per-step metrics: ``metrics.jsonl`` always, TensorBoard and a reward-curve PNG when available.

    logger = MetricsLogger("runs/x", tensorboard=True)
    logger.log(step, {"reward/overall": 0.4, "loss": 0.01})
    logger.close(plot=True)                       # writes runs/x/rewards.png (needs matplotlib)

Only rank 0 writes. On ``--resume`` the lines of steps after the checkpoint are dropped first
(:func:`truncate_after`), so the file reads as one uninterrupted run. ``tensorboard`` and
``matplotlib`` are optional (``pip install medix_fast[logging]``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_after(path: str | Path, step: int) -> None:
    """Keep only the records of steps <= ``step`` (those the resumed checkpoint has seen)."""
    path = Path(path)
    records = [r for r in read_metrics(path) if r["step"] <= step]
    if path.exists():
        path.write_text("".join(json.dumps(r) + "\n" for r in records))


class MetricsLogger:
    def __init__(self, output_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.dir = Path(output_dir)
        self.path = self.dir / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.dir / "tensorboard"))
            except ImportError:
                log.info("tensorboard is not installed: metrics go to %s only", self.path)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step":
                    self.writer.add_scalar(key, value, step)

    def close(self, plot: bool = True) -> Path | None:
        """Flush TensorBoard; with ``plot`` write ``rewards.png`` and return its path."""
        if not self.enabled:
            return None
        if self.writer is not None:
            self.writer.close()
        return plot_rewards(self.path, self.dir / "rewards.png") if plot else None


def rolling_mean(values: list[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at each point (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_rewards(metrics_path: str | Path, out: str | Path) -> Path | None:
    """Reward components (``reward/*`` and the held-out ``eval/*`` means, not per task) against
    the step, as a PNG: training rewards faint per step with a rolling mean over a tenth of the
    run on top."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no reward plot")
        return None
    records = read_metrics(metrics_path)
    keys = sorted({k for r in records for k in r if k.startswith(("reward/", "eval/")) and k.count("/") == 1
                   and k != "eval/mean_accuracy"})
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key in keys:
        steps, values = zip(*[(r["step"], r[key]) for r in records if key in r])
        if key.startswith("eval/"):
            ax.plot(steps, values, label=key, marker="o", linestyle="--")
            continue
        (line,) = ax.plot(steps, values, alpha=0.25)
        ax.plot(steps, rolling_mean(list(values), max(1, len(values) // 10)), color=line.get_color(), label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)
