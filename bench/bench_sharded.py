"""Sharded against unsharded decode on the CPU: the tensor-parallel group sampler (2 gloo ranks)
beside one Sampler on the whole model, and what the per-layer all-reduces cost there.

    python -m bench.bench_sharded            # -> bench/results/sharded/cpu.md
    python -m bench.bench_sharded --smoke    # tiny sizes, a temporary folder

The model is bench/bench_sampler.py's CPU Qwen2 (~3M parameters, fp32; 4 heads / 2 K/V heads, so
k = 2 holds one K/V head per rank); the workload 16 prompts x G=8 x 64 new tokens, no stop token,
``max_num_seqs`` 128, one thread per process. Each timed call is the median of 3 after a warm-up. Both
ranks of the group decode all 16 prompts' rows on half the weights; one process decodes them on the
whole model. The all-reduce row is the time spent inside the group's all-reduces (two per layer and
step), measured on rank 0. On a CPU over gloo (loopback TCP) an all-reduce of a few KB costs tens of
microseconds, about what the halved GEMMs of a model this small save: the split is for memory here,
and its speed-up belongs to GPUs over NVLink (docs/sampler.md).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "bench", "results", "sharded")


def _measure(sampler, prompts, new: int, reps: int) -> tuple[float, int]:
    """Median seconds of ``reps`` calls after a warm-up, and the tokens of one call."""
    call = dict(n=8, max_new_tokens=new, stop_token_ids=[], seed=0)
    sampler.generate(prompts, **call)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = sampler.generate(prompts, **call)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), sum(map(len, out.completion_ids))


def worker(out: str, smoke: bool) -> None:
    """One rank of ``torchrun --nproc_per_node=2``: the group sampler; rank 0 also the whole model."""
    import torch.distributed as dist

    from bench.bench_sampler import CPU_MODEL, SMOKE_MODEL, random_model
    from medix_fast import distributed as D
    from medix_fast.generate import GroupSampler, Sampler

    torch.set_num_threads(1)
    info = D.init_distributed("cpu", "gloo")
    torch.manual_seed(0)
    model = random_model(SMOKE_MODEL if smoke else CPU_MODEL, torch.device("cpu"), torch.float32)
    prompts = [[int(t) for t in torch.randint(0, 200, (48,))] for _ in range(4 if smoke else 16)]
    new, reps = (8, 1) if smoke else (64, 3)
    engine = dict(max_num_seqs=128, kv_cache_gb=0.5)
    group = GroupSampler(model, 2, info, torch.float32, **engine)
    spent = [0.0, 0]  # seconds inside the all-reduces, their count
    reduce = dist.all_reduce

    def timed_all_reduce(t, *args, **kwargs):
        t0 = time.perf_counter()
        done = reduce(t, *args, **kwargs)
        spent[0] += time.perf_counter() - t0
        spent[1] += 1
        return done

    with group.weights():
        dist.all_reduce = timed_all_reduce
        seconds, tokens = _measure(group, prompts, new, reps)
        dist.all_reduce = reduce
    rows = [("tensor-parallel k=2 (2 gloo ranks)", seconds, tokens),
            ("  of which all-reduce (rank 0)", spent[0] / (reps + 1), spent[1] // (reps + 1))]
    if info.rank == 0:
        whole = Sampler(model, **engine)
        rows.insert(0, ("unsharded (1 process)", *_measure(whole, prompts, new, reps)))
        params = sum(p.numel() for p in model.parameters())
        with open(os.path.join(out, "rows.txt"), "w") as f:
            f.write(f"{params}\t{len(prompts)}\t{new}\n")
            f.writelines(f"{name}\t{s}\t{n}\n" for name, s, n in rows)
    D.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_sharded", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, results to a temporary folder")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    out = args.out or (tempfile.mkdtemp(prefix="medix_bench_sharded_") if args.smoke else OUT)
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "bench.bench_sharded", "--worker", out] + (["--smoke"] if args.smoke else [])
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    with open(os.path.join(out, "rows.txt")) as f:
        head, *rows = [line.rstrip("\n").split("\t") for line in f]
    os.remove(os.path.join(out, "rows.txt"))  # the workers' hand-over, not a result
    command = "python -m bench.bench_sharded" + (" --smoke" if args.smoke else "")
    lines = [f"# Sharded decode on the CPU ({time.strftime('%Y-%m-%d')}, torch {torch.__version__})", "",
             f"`{command}`: a random Qwen2 of {int(head[0]) / 1e6:.2f}M parameters (fp32), {head[1]} prompts x G=8 x "
             f"{head[2]} new tokens, one thread per process.", "",
             "| sampler | s per call | tokens | tokens/s |", "|---|---|---|---|"]
    for name, seconds, count in rows:
        s, n = float(seconds), int(count)
        rate = f"{n / s:,.0f}" if not name.startswith(" ") else f"{n} calls"
        lines.append(f"| {name.strip()} | {s:.3f} | {n if not name.startswith(' ') else ''} | {rate} |")
    with open(os.path.join(out, "cpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(sys.argv[2], "--smoke" in sys.argv)
    else:
        sys.exit(main())
