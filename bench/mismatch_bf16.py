"""The trainer-sampler mismatch figures of docs/mismatch.md's table in bf16 on
the CPU: 8 prompts x G=4, <= 32 new tokens, 3 ``Trainer.train_step`` of ``model.dtype=bfloat16``
(the sampler under CPU autocast) with the update's forward under CPU autocast too; the mean of
the per-step ``mismatch/*`` figures.

    python -m bench.mismatch_bf16 tiny-moe model.router_replay=true
    python -m bench.mismatch_bf16 tiny-vl-moe "data.train_files=[sample:train, sample:train_vl]" \\
        data.min_pixels=784 data.max_pixels=12544
"""
from __future__ import annotations

import statistics
import sys
import tempfile

import torch

from medix_fast.config import load_config
from medix_fast.rl.update import Updater
from medix_fast.train import Trainer

FIGURES = ("abs_mean", "abs_max", "k3_kl", "frac_above_1e-3", "pearson")


def main(model: str = "tiny-moe", *overrides: str, steps: int = 3) -> dict:
    Updater._autocast = lambda self: torch.autocast("cpu", dtype=torch.bfloat16)  # the update as the sampler
    with tempfile.TemporaryDirectory() as out:
        t = Trainer(load_config(None, [
            f"train.output_dir={out}", f"model.path={model}", "model.dtype=bfloat16", "eval.every=0",
            "train.prompts_per_step=8", "train.mini_batch_prompts=8", "sampling.group_size=4",
            "sampling.max_new_tokens=32", "algorithm.dynamic_sampling=false", "checkpoint.every=0",
            "logging.tensorboard=false", "logging.plot=false", "logging.progress=false", *overrides]))
        records = [t.train_step() for _ in range(steps)]
    return {k: statistics.mean(r[f"mismatch/{k}"] for r in records) for k in FIGURES}


if __name__ == "__main__":
    torch.set_num_threads(1)
    figures = main(*sys.argv[1:])
    print(" ".join(sys.argv[1:]), {k: f"{v:.2g}" for k, v in figures.items()})
