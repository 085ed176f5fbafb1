"""Checkpoint time and peak host memory: the whole state gathered onto rank 0, against DCP from every rank.

    python -m bench --only checkpoint

A random Qwen2 of 124M parameters (hidden 768, 12 layers, vocab 32,000, untied head: 0.5 GB of
fp32 weights, 1.5 GB with AdamW's two moments) under FSDP2 on 1 and 2 gloo CPU processes
(``--smoke``: 0.2M parameters, 2 processes, the async and the checksum cases, all in one torchrun so
that the smoke run pays for one launch), each case in a torchrun of its own,
AdamW stepped once so that its moments exist. Every rank times each save from a barrier and
takes its peak resident memory above the resident memory before it (VmHWM reset through
/proc/self/clear_refs, bench/timing.py); a row is the median over saves of the slowest rank's
time and the largest rank's peak (each rank's in the note, with what stays resident from the
first save on: the async save's kept staging buffers). The files go to a temporary directory
on the local disk, fsynced.
  full_gather  the checkpoint path before issue 20: ``D.full_state_dict`` and
               ``D.full_optimizer_state`` (gathered onto rank 0's CPU), rank 0 ``torch.save``s
               both and fsyncs them.
  medix_fast   ``Checkpointer.save`` (medix_fast/checkpoint.py): every rank writes its own shards
               with torch.distributed.checkpoint; "until on disk": ``async_save=False``, until
               published; "training blocked": ``async_save=True``, until ``save`` returns (the
               host staging copy and the plan), the write going on in the background (the time
               until published in the note; the peak covers the whole save).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .case import SUBJECT, Case
from .timing import Budget, PeakMemory, Timing, summarize

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=1000),
         "full": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                      num_key_value_heads=4, vocab_size=32000)}
CASES = {"save until on disk": False, "save, training blocked": True}  # case -> async


def _parameters(size: str) -> int:
    s = SIZES[size]
    h, kv = s["hidden_size"], s["hidden_size"] // s["num_attention_heads"] * s["num_key_value_heads"]
    layer = 2 * h * h + 2 * h * kv + 2 * kv + h + 3 * h * s["intermediate_size"] + 2 * h
    return s["num_hidden_layers"] * layer + 2 * s["vocab_size"] * h + h


def _model(size: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**SIZES[size], tie_word_embeddings=False, attn_implementation="sdpa"))


def _full_gather(root: Path, i: int, wrapped, model, optimizer, rank: int) -> None:
    from medix_fast import distributed as D

    model_state = D.full_state_dict(wrapped, model)
    optimizer_state = D.full_optimizer_state(wrapped, optimizer)
    if rank == 0:
        directory = root / f"full_{i}"
        directory.mkdir()
        for name, state in (("model.pt", model_state), ("optimizer.pt", optimizer_state)):
            torch.save(state, directory / name)
            with open(directory / name, "rb") as f:
                os.fsync(f.fileno())
        shutil.rmtree(root / f"full_{i - 1}", ignore_errors=True)
    D.barrier()


def _worker(jobs: list[str], size: str, saves: int, out: Path) -> None:
    """One torchrun process: for each job ``IMPL:ASYNC``, ``saves`` checkpoints (the first a warm-up);
    rank 0 writes the figures, by job, to ``out``."""
    import torch.distributed.checkpoint as dcp

    import medix_fast.checksums
    from medix_fast import distributed as D

    info = D.init_distributed("cpu", "gloo", "fsdp")
    figures, writer = {}, medix_fast.checksums.ChecksumWriter
    for job in jobs:
        impl, asynchronous = job.split(":")
        # save_shards imports its writer at each call: no_checksum swaps it for DCP's own
        medix_fast.checksums.ChecksumWriter = writer if impl != "no_checksum" else dcp.FileSystemWriter
        figures[job] = _job(info, impl, asynchronous == "1", size, saves)
    if info.rank == 0:
        out.write_text(json.dumps(figures))
    D.close()


def _job(info, impl: str, asynchronous: bool, size: str, saves: int) -> dict:
    from medix_fast import checkpoint as C
    from medix_fast import distributed as D
    from medix_fast.rl.update import PolicyObjective

    model = _model(size)
    wrapped = D.wrap(PolicyObjective(model, 1.0), model, "fsdp", info, torch.float32)
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-4)
    for p in wrapped.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    root = Path(tempfile.mkdtemp(prefix="medix_bench_ckpt_")) if info.rank == 0 else None
    root = Path(D.broadcast_object(str(root) if info.rank == 0 else None))
    ckpt = C.Checkpointer(root, info.rank, info.world, "bench", keep_last=1, async_save=asynchronous)
    blocked, total, peaks = [], [], []
    memory = PeakMemory(torch.device("cpu"))
    resident = []  # MB before each save (after the heap trim that memory.start() does)
    for i in range(saves):
        D.barrier()
        memory.start()
        resident.append(memory.before / 2**20)
        t0 = time.perf_counter()
        if impl == "full_gather":
            _full_gather(root, i, wrapped, model, optimizer, info.rank)
        else:
            ckpt.save(i, D.training_state(wrapped, model, optimizer), {}, lambda directory: None)
        t1 = time.perf_counter()
        ckpt.wait()
        t2 = time.perf_counter()
        peak = memory.stop()
        figures = torch.zeros(3, info.world)  # (blocked s, total s, peak MB) per rank
        figures[:, info.rank] = torch.tensor([t1 - t0, t2 - t0, peak])
        figures = D.all_reduce(figures, info.device)
        blocked.append(figures[0].max().item())
        total.append(figures[1].max().item())
        peaks.append(figures[2].tolist())
    held = torch.zeros(info.world)  # MB still resident after the first save (the async staging buffers)
    held[info.rank] = resident[1] - resident[0]
    held = D.all_reduce(held, info.device)
    if info.rank == 0:
        shutil.rmtree(root, ignore_errors=True)
    return {"blocked_s": blocked[1:], "total_s": total[1:], "peak_mb": peaks[1:], "held_mb": held.tolist()}


@functools.lru_cache(maxsize=None)
def _launch(jobs: tuple[str, ...], ranks: int, size: str, saves: int) -> dict:
    """One torchrun of ``ranks`` processes running ``jobs`` in turn: the figures by job."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "figures.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_port=0",
               "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0", "-m", "bench.bench_checkpoint",
               "--size", size, "--saves", str(saves), "--out", str(out), "--jobs", *jobs]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            raise RuntimeError(f"torchrun exit {done.returncode}: {' '.join(done.stderr.split()[-40:])}")
        return json.loads(out.read_text())


def _measure(impl: str, asynchronous: bool, ranks: int, size: str, budget: Budget,
             together: tuple[str, ...] = ()) -> tuple[Timing, float, str]:
    """One case's row; ``together``: the jobs of the launch it shares (the smoke run's), else its own."""
    job = f"{impl}:{int(asynchronous)}"
    figures = _launch(together or (job,), ranks, size, budget.warmup + budget.min_reps)[job]
    timing = summarize([1e3 * s for s in figures["blocked_s" if asynchronous else "total_s"]])
    by_rank = [max(save[r] for save in figures["peak_mb"]) for r in range(ranks)]
    note = "peak MB by rank " + " / ".join(f"{mb:,.0f}" for mb in by_rank)
    note += "; kept between saves, MB by rank " + " / ".join(f"{mb:,.0f}" for mb in figures["held_mb"])
    if asynchronous:
        note += f"; until published {1e3 * sorted(figures['total_s'])[len(figures['total_s']) // 2]:,.0f} ms"
    return timing, max(by_rank), note


def cases(smoke: bool, device: torch.device) -> list[Case]:
    size = "smoke" if smoke else "full"
    params = _parameters(size)
    # (case, impl, async, ranks); smoke: the bench cannot rot, at 2 ranks in one launch
    plan = [(case, impl, asynchronous and impl == SUBJECT, ranks) for ranks in ((2,) if smoke else (1, 2))
            for case, asynchronous in (CASES.items() if not smoke else [("save, training blocked", True)])
            for impl in (SUBJECT, "full_gather")]
    plan += [("shard checksums, save until on disk", impl, False, 2 if smoke else 1)
             for impl in (SUBJECT, "no_checksum")]
    together = tuple(f"{impl}:{int(asynchronous)}" for _, impl, asynchronous, _ in plan) if smoke else ()
    out = []
    for case, impl, asynchronous, ranks in plan:
        shape = f"Qwen2 {params / 1e6:.1f}M fp32 + AdamW ({12 * params / 2**20:,.0f} MB), FSDP2 x{ranks} gloo"

        def measure(dev, budget, impl=impl, asynchronous=asynchronous, ranks=ranks):
            return _measure(impl, asynchronous, ranks, size, budget, together)
        out.append(Case("checkpoint", case, impl, shape, params, None, measure=measure))
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", nargs="+", metavar="IMPL:ASYNC", required=True)
    parser.add_argument("--size", choices=SIZES, required=True)
    parser.add_argument("--saves", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    _worker(args.jobs, args.size, args.saves, args.out)
