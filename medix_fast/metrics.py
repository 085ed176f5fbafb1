"""Per-step metrics: ``metrics.jsonl`` always, TensorBoard and a reward-curve PNG when available.

    logger = MetricsLogger("runs/x", tensorboard=True)
    logger.log(step, {"reward/overall": 0.4, "loss": 0.01})
    logger.close(plot=True)                       # writes runs/x/rewards.png (needs matplotlib)

Only rank 0 writes. On ``--resume`` the lines of steps after the checkpoint are dropped first
(:func:`truncate_after`), so the file reads as one uninterrupted run. ``tensorboard`` and
``matplotlib`` are optional (``pip install medix_fast[logging]``); so is Weights & Biases
(``wandb``: a :class:`medix_fast.wandb_log.WandbSink` given as ``wandb`` gets every record and the plot).
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
    def __init__(self, output_dir: str | Path, enabled: bool = True, tensorboard: bool = True, wandb=None):
        self.dir = Path(output_dir)
        self.wandb = wandb if enabled else None
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
        if self.wandb is not None:
            self.wandb.log(step, record)

    def close(self, plot: bool = True, title: str = "") -> Path | None:
        """Flush TensorBoard; with ``plot`` write ``rewards.png`` (titled ``title``) and return its path."""
        if not self.enabled:
            return None
        if self.writer is not None:
            self.writer.close()
        png = plot_rewards(self.path, self.dir / "rewards.png", title) if plot else None
        if self.wandb is not None:
            self.wandb.finish(png)
        return png


def rolling_mean(values: list[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at each point (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


COMPONENTS = ("accuracy", "semantic", "modality", "format", "overlong")  # fixed colours, in this order


def reward_figure(records: list[dict], title: str = ""):
    """The reward curves as a matplotlib figure of two panels, legends beside them (never over the
    lines): (1) the training reward (overall) and the held-out accuracy (greedy, with pass@1 /
    pass@k when sampled); (2) every reward component, training as lines and held-out as markers
    in the same colour; (3) when logged, the trainer-sampler mismatch (``mismatch/*``: mean and max
    |delta logp|, k3 KL) on a log scale. Training values are faint per step with a rolling mean over a
    tenth of the run on top. None when no reward was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list, list]:
        points = [(r["step"], r[key]) for r in records if key in r and r[key] == r[key]]
        return ([s for s, _ in points], [v for _, v in points]) if points else ([], [])

    def train_line(ax, key: str, color: str, label: str) -> None:
        steps, values = series(key)
        if steps:
            ax.plot(steps, values, color=color, alpha=0.2, linewidth=1)
            ax.plot(steps, rolling_mean(values, max(1, len(values) // 10)), color=color, linewidth=2, label=label)

    def eval_line(ax, key: str, color: str, label: str, style: str = "--") -> None:
        steps, values = series(key)
        if steps:
            ax.plot(steps, values, color=color, linestyle=style, marker="o", markersize=5, label=label)

    if not any(k.startswith(("reward/", "eval/")) for r in records for k in r):
        return None
    colors = plt.get_cmap("tab10").colors
    mismatch = [k for k in ("mismatch/abs_mean", "mismatch/abs_max", "mismatch/k3_kl") if any(k in r for r in records)]
    fig, (top, bottom, *third) = plt.subplots(2 + bool(mismatch), 1, figsize=(10, 7.5 + 3 * bool(mismatch)),
                                              sharex=True)
    train_line(top, "reward/overall", "black", "training reward (overall)")
    eval_line(top, "eval/accuracy", colors[0], "held-out accuracy (greedy)", "-")
    passes = sorted({k for r in records for k in r if k.startswith("eval/pass@")}, key=lambda k: int(k[10:]))
    for key, style in zip(passes, (":", "-.")):
        eval_line(top, key, colors[0], f"held-out {key[5:]} (sampled)", style)
    top.set_title("training reward and held-out accuracy", fontsize=10)
    present = {k.split("/", 1)[1] for r in records for k in r if k.startswith(("reward/", "eval/")) and k.count("/") == 1}
    others = sorted(present - set(COMPONENTS) - {"overall", "mean_accuracy"} - {k[5:] for k in passes})
    for i, name in enumerate([c for c in COMPONENTS if c in present] + others):
        color = colors[(i + 1) % len(colors)] if name != "accuracy" else colors[0]
        train_line(bottom, f"reward/{name}", color, f"{name}: training")
        eval_line(bottom, f"eval/{name}", color, f"{name}: held-out")
    bottom.set_title("reward components: training (lines), held-out (markers)", fontsize=10)
    for ax in (top, bottom):
        ax.set_ylim(-0.03, 1.03)
        ax.set_ylabel("mean over responses")
    for i, key in enumerate(mismatch):
        train_line(third[0], key, colors[i + 6], key.split("/")[1])
    if third:
        third[0].set_yscale("symlog", linthresh=1e-8)
        third[0].set_title("trainer-sampler mismatch (sampled tokens)", fontsize=10)
    (third or [bottom])[0].set_xlabel("step")
    for ax in (top, bottom, *third):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a panel with nothing logged yet has no legend
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.suptitle(title or "reward curves")
    fig.tight_layout()
    return fig


def plot_rewards(metrics_path: str | Path, out: str | Path, title: str = "") -> Path | None:
    """Write :func:`reward_figure` of ``metrics_path`` to the PNG ``out`` (None without matplotlib
    or rewards)."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no reward plot")
        return None
    fig = reward_figure(read_metrics(metrics_path), title)
    if fig is None:
        return None
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)
