"""The trainer-sampler mismatch figures of docs/mismatch.md's table in bf16 on
the CPU: 8 prompts x G=4, <= 32 new tokens, 3 ``Trainer.train_step`` of ``model.dtype=bfloat16``
(the sampler under CPU autocast) with the update's forward under CPU autocast too; the mean of
the per-step ``mismatch/*`` figures, and the mean time per ``train_step`` after the first.

    python -m bench.mismatch_bf16 tiny-moe model.router_replay=true
    python -m bench.mismatch_bf16 tiny-vl-moe "data.train_files=[sample:train, sample:train_vl]" \\
        data.min_pixels=784 data.max_pixels=12544
    python -m bench.mismatch_bf16 --cost tiny   # sampling.exact against the default, alternating runs

``--cost MODEL [overrides]``: the wall and CPU time per ``train_step`` of the default and of
``sampling.exact=true`` (docs/mismatch.md#exact-mode), and of exact mode without the per-step mismatch
forward (``algorithm.mismatch_metrics=false``: what exactness makes redundant), on one thread, ``--steps`` steps per run
(default 6; the first of each run, which builds the engine's state, is left out), the two runs
alternated ``--repeats`` times (default 2) so a shared machine's load falls on both, with the
trained tokens per step beside them (the sampled lengths differ between the two, and a step's
time follows them).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time

import torch

from medix_fast.config import load_config
from medix_fast.rl.update import Updater
from medix_fast.train import Trainer

FIGURES = ("abs_mean", "abs_max", "k3_kl", "frac_above_1e-3", "pearson")
# --cost's runs; "exact, unmeasured": exact mode makes the sampler's log-probs the trainer's bit for
# bit, so the no-grad forward that measures their mismatch each step (mismatch_metrics) can go
MODES = {"default": (), "exact": ("sampling.exact=true",),
         "exact, unmeasured": ("sampling.exact=true", "algorithm.mismatch_metrics=false")}


def main(model: str = "tiny-moe", *overrides: str, steps: int = 3) -> dict:
    Updater._autocast = lambda self: torch.autocast("cpu", dtype=torch.bfloat16)  # the update as the sampler
    with tempfile.TemporaryDirectory() as out:
        t = Trainer(load_config(None, [
            f"train.output_dir={out}", f"model.path={model}", "model.dtype=bfloat16", "eval.every=0",
            "train.prompts_per_step=8", "train.mini_batch_prompts=8", "sampling.group_size=4",
            "sampling.max_new_tokens=32", "algorithm.dynamic_sampling=false", "checkpoint.every=0",
            "logging.tensorboard=false", "logging.plot=false", "logging.progress=false", *overrides]))
        records, seconds, cpu = [], [], []
        for _ in range(steps):
            start, start_cpu = time.perf_counter(), time.process_time()
            records.append(t.train_step())
            seconds.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    figures = {k: statistics.mean(r.get(f"mismatch/{k}", math.nan) for r in records) for k in FIGURES}
    figures["step_s"] = statistics.mean(seconds[1:] or seconds)
    figures["step_cpu_s"] = statistics.mean(cpu[1:] or cpu)
    figures["train_tokens"] = statistics.mean(r["train_tokens"] for r in records[1:] or records)
    return figures


def cost(model: str, *overrides: str, steps: int = 6, repeats: int = 2) -> dict[str, dict]:
    """Mean wall and CPU time per step and trained tokens per step of the default and of exact mode,
    on one thread (``train.threads=1``: the CPU time is then the step's work, whatever else runs)."""
    runs = {name: [] for name in MODES}
    for _ in range(repeats):
        for name, extra in MODES.items():
            runs[name].append(main(model, "train.threads=1", *overrides, *extra, steps=steps))
    keys = ("step_s", "step_cpu_s", "train_tokens", "abs_mean", "abs_max")
    return {name: {k: statistics.mean(r[k] for r in rs) for k in keys} for name, rs in runs.items()}


if __name__ == "__main__":
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cost", action="store_true")
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2)
    args, rest = parser.parse_known_args()
    if args.cost:
        result = cost(*rest, steps=args.steps or 6, repeats=args.repeats)
        base = result["default"]
        print("| model | mode | wall s / step | vs default | CPU s / step | vs default | trained tokens / step "
              "| mean abs delta | max abs delta |")
        for name, r in result.items():
            print(f"| {' '.join(rest)} | {name} | {r['step_s']:.2f} | {r['step_s'] / base['step_s'] - 1:+.0%} | "
                  f"{r['step_cpu_s']:.2f} | {r['step_cpu_s'] / base['step_cpu_s'] - 1:+.0%} | "
                  f"{r['train_tokens']:.0f} | {r['abs_mean']:.2g} | {r['abs_max']:.2g} |")
        sys.exit(0)
    figures = main(*rest, steps=args.steps or 3)
    print(" ".join(rest), {k: f"{v:.2g}" for k, v in figures.items()})
