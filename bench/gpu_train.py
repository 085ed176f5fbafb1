"""``python -m medix_fast.train`` for the GPU check: run it (in the part's own process for one rank,
under torchrun for more) and turn its ``metrics.jsonl`` into report rows, one per step (time by
phase, peak memory, the trainer-sampler mismatch) and one for the run.

One rank runs in the calling process: the part has already imported torch and transformers, so a
second interpreter would only start them again (the part's own process is what isolates a crash or
a hang, and its time limit what stops one).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

from bench.gpu_report import Row

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what a check's run does not need: no held-out evaluation, plot, TensorBoard, bar or rollouts file
QUIET = ["eval.every=0", "logging.tensorboard=false", "logging.plot=false", "logging.progress=false",
         "logging.rollouts_every=0", "algorithm.dynamic_sampling=false"]


def run_train(overrides: list[str], ranks: int, deadline: float, cwd: str, resume: str | None = None) -> int | str:
    """``python -m medix_fast.train OVERRIDES [--resume-from RESUME]``: its exit status, or why it has none."""
    argv = [*overrides] + (["--resume-from", resume] if resume else [])
    if ranks == 1:
        from medix_fast.train import main

        return main(argv)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    try:
        return subprocess.run([*launcher, "-m", "medix_fast.train", *argv], cwd=cwd, env=env,
                              timeout=max(1.0, deadline - time.time())).returncode
    except subprocess.TimeoutExpired:
        return "stopped at the part's time limit"


def metrics(output_dir: str) -> list[dict]:
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def train_rows(part: str, overrides: list[str], steps: int, ranks: int, deadline: float, emit, shape: str,
               output_dir: str, case: str = "", resume: str | None = None) -> list[dict]:
    """Run ``steps`` steps into ``output_dir`` and emit a row per step and one for the run (``case``
    heads each row's name); the steps' metrics (empty when the run wrote none)."""
    overrides = [*overrides, f"train.steps={steps}", f"train.output_dir={output_dir}"]
    code = run_train(overrides, ranks, deadline, os.path.dirname(output_dir), resume)
    steps_done = [m for m in metrics(output_dir) if m.get("step", 0) > 0]
    head = f"{case} " if case else ""
    for m in steps_done:
        emit(Row(part, f"{head}step {m['step']}", shape=shape, ms=1e3 * m["time/step_s"],
                 peak_gb=m["memory/peak_gib"],
                 note=f"rollout {m['time/rollout_s']:.2f} s, update {m['time/update_s']:.2f} s, "
                      f"{m.get('throughput/train_tokens_per_s', math.nan):,.0f} train tok/s; mismatch |dlogp| mean "
                      f"{m.get('mismatch/abs_mean', math.nan):.2g} max {m.get('mismatch/abs_max', math.nan):.2g}, "
                      f"k3 KL {m.get('mismatch/k3_kl', math.nan):.2g}, "
                      f">1e-3 {m.get('mismatch/frac_above_1e-3', math.nan):.2g}"))
    first = int(resume.rsplit("_", 1)[-1]) if resume else 0
    ok = code == 0 and [m["step"] for m in steps_done if m["step"] > first] == list(range(first + 1, steps + 1))
    emit(Row(part, f"{head}{steps - first} step{'s' * (steps - first != 1)}", shape=shape,
             status="ok" if ok else f"failed: exit {code}, {len(steps_done)} steps"))
    return steps_done
