"""Run every benchmark that fits this machine and write one CSV and one Markdown table.

    python -m bench                         # or: python bench/run.py
    python -m bench --smoke                 # each benchmark at its smallest size (the CI smoke test)
    python -m bench --only policy_loss      # a benchmark (advantages, logprobs, policy_loss, ...) or a module
                                            # (kernels, cpp, sampler, rewards, train, vl, moe, integrations,
                                            # checkpoint, optimizer, lora); repeatable
    python -m bench --out DIR               # default bench/results/ (--smoke: a temporary folder)
    python -m bench --gpu-check [--dry-run] # the prepared check of every CUDA path (bench/gpu_check.py)

Output: ``DIR/<cpu|gpu>[_smoke].csv`` and ``.md``, headed by the device, date, torch version and
this command. Each row: implementation, shape, device, median and 20/80th-percentile ms, peak
memory, throughput, TFLOP/s / GB/s and % of peak (GPU), ratios to every baseline of its group.
The implementations of one comparison are timed round-robin, so a busy machine slows them alike.
On the CPU that happens in a fresh process per comparison, and each case's peak memory is taken in
a fresh process of its own (bench/isolate.py); ``--in-process`` trades that for speed (the
default under ``--smoke``).
Exit status 1 if a medix_fast case failed (baselines that cannot run here are rows, not errors).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import os
import sys
import tempfile

if __package__ in (None, ""):  # python bench/run.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench import report  # noqa: E402
from bench.case import SUBJECT, Result, run_group  # noqa: E402
from bench.device import default_device, device_name  # noqa: E402
from bench.isolate import run_isolated  # noqa: E402
from bench.timing import SMOKE_BUDGET, Budget  # noqa: E402

# name -> module; a module has cases(smoke, device) -> list[Case] (preferred), or run(smoke) -> list[dict]
MODULES = {
    "kernels": "bench.bench_kernels",
    "cpp": "bench.bench_cpp",
    "sampler": "bench.bench_sampler",
    "rewards": "bench.bench_rewards",
    "judge": "bench.bench_judge",
    "train": "bench.bench_train",
    "vl": "bench.bench_vl",
    "moe": "bench.bench_moe",
    "integrations": "bench.bench_integrations",
    "checkpoint": "bench.bench_checkpoint",
    "optimizer": "bench.bench_optimizer",
    "partial": "bench.bench_partial",
    "lora": "bench.bench_lora",
}
# module name -> the benchmark names its cases carry (``--only`` takes these or a module name, and imports
# only the modules it names: each imports its libraries); bench/test_bench_cases.py checks them against the cases
MODULE_BENCHES = {"kernels": ("advantages", "logprobs", "policy_loss"),
                  "cpp": ("advantages", "policy_loss_logp", "sample_step"), "sampler": ("sampler",),
                  "rewards": ("rewards",), "judge": ("judge",), "train": ("train",), "vl": ("vl_rollout",),
                  "moe": ("moe",), "integrations": ("integrations",), "checkpoint": ("checkpoint",),
                  "optimizer": ("optimizer",), "partial": (), "lora": ("lora_sampling",)}
BENCHES = tuple(dict.fromkeys(b for benches in MODULE_BENCHES.values() for b in benches))
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="smallest size of each benchmark")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="run only this module or benchmark (repeatable); modules: " + ", ".join(MODULES)
                   + "; benchmarks: " + ", ".join(b for b in BENCHES if b not in MODULES))
    p.add_argument("--out", default=None,
                   help="output folder (default bench/results/; --smoke: a temporary folder, its figures are no results)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's own choice; 1 is steadier on a busy machine)")
    p.add_argument("--gpu-check", action="store_true",  # main() hands the whole command line to bench/gpu_check.py
                   help="the prepared check of every CUDA path instead (its own flags: python -m bench --gpu-check --help)")
    iso = p.add_mutually_exclusive_group()
    iso.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                     help="each case in a fresh process (default on CPU, except under --smoke)")
    iso.add_argument("--in-process", dest="isolate", action="store_false")
    return p.parse_args(argv)


def _from_dict(row: dict, bench: str, device: torch.device) -> Result:
    """A row returned by a ``run(smoke)`` module; keys that are not Result fields go to ``note``."""
    names = {f.name for f in dataclasses.fields(Result)}
    known = {k: v for k, v in row.items() if k in names}
    extra = ", ".join(f"{k}={v}" for k, v in row.items() if k not in names)
    known.setdefault("bench", bench)
    known.setdefault("device", device_name(device))
    for key, default in (("case", ""), ("impl", SUBJECT), ("shape", ""), ("tokens", 0)):
        known.setdefault(key, default)
    if extra:
        known["note"] = "; ".join(x for x in (known.get("note", ""), extra) if x)
    return Result(**known)


def _wanted(only: list[str], *names: str) -> bool:
    return not only or any(n in only for n in names)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--gpu-check" in argv:  # the prepared GPU check has its own flags (bench/gpu_check.py)
        from bench.gpu_check import main as gpu_check
        return gpu_check(argv)
    args = _parse(argv)
    device = torch.device(args.device) if args.device else default_device()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the per-case processes
        torch.set_num_threads(args.threads)
    isolate = args.isolate if args.isolate is not None else (device.type == "cpu" and not args.smoke)
    budget = SMOKE_BUDGET if args.smoke else Budget()
    load_at_start = report.load_average()
    rows: list[Result] = []
    matched: set[str] = set()
    for name, module_name in MODULES.items():
        if not _wanted(args.only, name, *MODULE_BENCHES[name]):
            continue
        if importlib.util.find_spec(module_name) is None:
            print(f"[bench] {name}: {module_name} not written yet, skipped", flush=True)
            continue
        module = importlib.import_module(module_name)
        if not hasattr(module, "cases"):
            if _wanted(args.only, name):
                matched.add(name)
                print(f"[bench] {name} ...", flush=True)
                rows += [dataclasses.replace(_from_dict(r, name, device), suite=name)
                         for r in module.run(smoke=args.smoke)]
            continue
        chosen = [c for c in module.cases(args.smoke, device) if _wanted(args.only, name, c.bench)]
        matched.update([name, *(c.bench for c in chosen)] if chosen else [])
        groups: dict[tuple, list] = {}
        for case in chosen:  # one comparison: the implementations of one (bench, case, shape)
            groups.setdefault((case.bench, case.case, case.shape), []).append(case)
        for i, group in enumerate(groups.values(), 1):
            results = (run_isolated(module_name, group, device, args.smoke) if isolate
                       else run_group(group, device, budget))
            for r in results:
                r.suite = name
                what = f"{r.median_ms:,.2f} ms  {r.peak_mb:,.0f} MB" if r.status == "ok" else r.status
                print(f"[bench] {name} {i}/{len(groups)}  {r.bench} {r.case} {r.shape} {r.impl}: {what}",
                      flush=True)
            rows += results
    unknown = [n for n in args.only if n not in matched]
    if unknown:
        print(f"[bench] --only {unknown} matched nothing", file=sys.stderr)
        return 2
    meta = report.header(device_name(device), report.command_line(), isolate, load_at_start)
    stem = ("gpu" if device.type == "cuda" else "cpu") + ("_smoke" if args.smoke else "")
    out = args.out or (tempfile.mkdtemp(prefix="medix_bench_smoke_") if args.smoke else DEFAULT_OUT)
    csv_path, md_path = report.write(out, rows, meta, stem)
    print(report.markdown(rows, meta))
    print(f"[bench] wrote {csv_path} and {md_path}", flush=True)
    if importlib.util.find_spec("matplotlib") is not None:
        from bench.plot import main as plot_main
        plot_main([csv_path])
    broken = [r for r in rows if r.impl == SUBJECT and r.status.startswith("failed")]
    return 1 if broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
