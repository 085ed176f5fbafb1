"""Weights & Biases: the same scalars as ``metrics.jsonl`` / TensorBoard, and the reward plot as an image.

    sink = WandbSink.open(cfg.logging, output_dir)   # None unless logging.wandb (rank 0)
    sink.log(step, {"reward/overall": 0.4})
    sink.finish(plot_path)

``logging.wandb_mode: offline`` writes the run under ``<output_dir>/wandb`` for a later ``wandb
sync`` (no account, no network). ``wandb`` is optional (``pip install wandb``): asked for without
it, the run says so and goes on with the other logs.
"""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


class WandbSink:
    def __init__(self, run):
        self.run = run

    @classmethod
    def open(cls, cfg, output_dir: str | Path) -> WandbSink | None:
        """A run for ``cfg`` (the ``logging`` section), or None when off or wandb is not installed."""
        if not cfg.wandb:
            return None
        try:
            import wandb
        except ImportError:
            log.warning("logging.wandb: the wandb package is not installed (pip install wandb): not logged there")
            return None
        out = Path(output_dir)
        run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or out.name, dir=str(out),
                         mode=cfg.wandb_mode, resume="allow", reinit="finish_previous")
        return cls(run)

    def log(self, step: int, record: dict[str, float]) -> None:
        self.run.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def finish(self, plot: Path | None) -> None:
        if plot is not None:
            import wandb

            self.run.log({"rewards": wandb.Image(str(plot))})
        self.run.finish()
