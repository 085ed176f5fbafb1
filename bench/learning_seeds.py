"""How much the default run learns, over seeds: as it ships, with partial rollouts, with LoRA (README's figures).

    python -m bench.learning_seeds                         # seeds 0 1 2, every mode, 2 runs at a time
    python -m bench.learning_seeds --modes synchronous lora  # full fine-tuning against LoRA
    python -m bench.learning_seeds --seeds 0 1 2 3 4 --jobs 1 --steps 40

Runs ``python -m medix_fast.train`` (configs/tiny.yaml, the default run) once per seed and mode,
``--jobs`` at a time, each in its own folder under ``--out`` (a new or empty folder): ``synchronous``
as it ships, ``partial`` with ``rollout.partial=true algorithm.tis_cap=2.0`` (what partial rollouts
need: the behaviour correction of decoupled PPO), ``lora`` with rank-16 adapters (alpha 32, the
default target layers) at learning rate 2e-3 (4x the full run's: the adapters start at zero).
Prints, per mode, held-out accuracy (greedy) and pass@1 at step 0 and at the last step as mean ± sample standard deviation over the seeds, the change, the
training time, and each seed's figures. Every run is a fresh command, so the figures are what a
user gets; the runs of one call share the machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = {"synchronous": [], "partial": ["rollout.partial=true", "algorithm.tis_cap=2.0"],
         "lora": ["model.lora.rank=16", "model.lora.alpha=32", "optim.lr=2e-3"]}
FIGURES = ("eval/accuracy", "eval/pass@1")


def _spread(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.learning_seeds", description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--out", default=None, help="where the runs go (default: a temporary folder)")
    p.add_argument("--extra", nargs="*", default=[], help="overrides for every run (section.key=value)")
    args = p.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="medix_learning_seeds_"))
    if out.exists() and any(out.iterdir()):  # runs and logs go here: nothing of an earlier call is written over
        print(f"error: --out {out} is not empty: give a new folder", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    runs = [(mode, seed) for seed in args.seeds for mode in args.modes]
    pending, running, seconds = list(runs), {}, {}
    while pending or running:
        while pending and len(running) < args.jobs:
            mode, seed = pending.pop(0)
            folder = out / f"{mode}_seed{seed}"
            cmd = [sys.executable, "-m", "medix_fast.train", f"train.seed={seed}", f"train.steps={args.steps}",
                   f"train.output_dir={folder}", "logging.progress=false", *MODES[mode], *args.extra]
            log = open(out / f"{mode}_seed{seed}.log", "w")
            running[(mode, seed)] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), time.time(), log)
        time.sleep(1)
        for key, (proc, start, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                del running[key]
                if proc.returncode:
                    print(f"{key}: exit {proc.returncode}, see {out / (key[0] + '_seed' + str(key[1]) + '.log')}")
                    return 1
                seconds[key] = time.time() - start
    print(f"the default run (configs/tiny.yaml), {args.steps} steps, seeds {args.seeds}, {args.jobs} at a time; "
          f"runs in {out}")
    print("| mode | held-out accuracy, step 0 | last step | change | pass@1, step 0 | last step | run time |")
    print("|---|---|---|---|---|---|---|")
    per_seed = []
    for mode in args.modes:
        first, last = {f: [] for f in FIGURES}, {f: [] for f in FIGURES}
        for seed in args.seeds:
            records = [json.loads(line) for line in (out / f"{mode}_seed{seed}" / "metrics.jsonl").open()]
            evals = [r for r in records if "eval/accuracy" in r]
            for f in FIGURES:
                first[f].append(evals[0][f])
                last[f].append(evals[-1][f])
            per_seed.append(f"{mode} seed {seed}: accuracy {evals[0]['eval/accuracy']:.3f} -> "
                            f"{evals[-1]['eval/accuracy']:.3f}, pass@1 {evals[0]['eval/pass@1']:.3f} -> "
                            f"{evals[-1]['eval/pass@1']:.3f}, {seconds[(mode, seed)]:.0f} s")
        change = [b - a for a, b in zip(first["eval/accuracy"], last["eval/accuracy"])]
        times = [seconds[(mode, s)] for s in args.seeds]
        print(f"| {mode} | {_spread(first['eval/accuracy'])} | {_spread(last['eval/accuracy'])} | "
              f"{_spread(change)} | {_spread(first['eval/pass@1'])} | {_spread(last['eval/pass@1'])} | "
              f"{statistics.mean(times):.0f} s |")
    print("\n".join(per_seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
