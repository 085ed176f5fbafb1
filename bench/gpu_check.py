"""``python -m bench --gpu-check``: the one prepared check of the CUDA paths, within 8 minutes on one H100.

    python -m bench --gpu-check              # on a GPU -> bench/results/gpu/check.{md,csv}, one log per part
    python -m bench --gpu-check --dry-run    # the same plumbing at tiny shapes (what a CPU runs)

Parts, one after another in one child process, each with its own time limit out of the total
budget (``--budget-s``, default 450 s; time a part leaves unused goes to the next); a crash, hang or
out-of-memory stops only that part, and a fresh process takes the rest (bench/gpu_process.py):
  tests    ``pytest -m cuda tests`` (tests/test_cuda.py and any other test marked ``cuda``): every
           Triton kernel at its GPU tiles against fp64 in bf16 and fp32 (tf32 and ieee), CUDA
           autocast, no host sync, offsets past 2^31, a
           one-process NCCL group's all_reduce of a device tensor
  lm_head  ``fused_linear_policy_loss`` (grpo, ``valid_lengths`` given) and ``fused_linear_logprobs``
           forward + backward at N=16,384, H=4,096, V=151,936 bf16: time, TFLOP/s of 6·N·H·V
           (and of what runs, recompute included), % of the card's dense bf16 peak (bench/device.py's
           table: the card it runs on; none for a card not in it), peak memory; against naive PyTorch, torch.compile of it,
           Liger's chunked GRPO loss and fused linear cross entropy, cut-cross-entropy (each when
           importable; bench/baselines.py). torch.compile runs last: its compile is the slowest.
  decode   generation throughput of the sampler (``medix_fast.generate.Sampler``, called through
           bench/bench_sampler.py) on a random model of Qwen3-1.7B's shape in bf16, batch 1, 64
           and 256 (groups of 8 past batch 1), 128-token prompts, 64 new tokens, against HF
           ``generate``: tokens/s, and % of the card's HBM bandwidth (bench/device.py) from the
           bytes a decode step must read (every weight once, plus each row's K/V)
  train    3 steps of ``python -m medix_fast.train`` on a random Qwen3-0.6B-shaped model in bf16
           with ``distributed.strategy=fsdp`` on one GPU (the embedded tiny model's tokenizer,
           whose ids fit the model's vocabulary): step time by phase, peak memory, and the
           trainer-sampler mismatch in bf16 (``mismatch/*``: mean / max |delta logp|, k3 KL, > 1e-3)
  paths    one report section per path the parts above do not run, each on an embedded tiny model:
           DDP with autocast, a checkpoint's resume, the eval command, tiny-vl, preemption, the
           routing record (bench/gpu_paths.py)
  sharded  the train part on 2 GPUs with ``sampling.tensor_parallel=2`` (torchrun, NCCL): the rollout on
           the tensor-parallel copy (generate/group_sampler.py); skipped with its reason on one GPU
``--dry-run`` (the default without CUDA): the same parts at tiny shapes, compiled baselines
skipped, results to a temporary folder unless ``--out``; tests/test_gpu_check.py runs it.
The child side is ``python -m bench.gpu_check --child --parts NAME... --out DIR --budget-s B --start T``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from functools import partial

import torch

from bench.gpu_paths import SECTIONS, part_paths
from bench.gpu_process import child, run_parts
from bench.gpu_report import SUBJECT, Row, write_report
from bench.gpu_train import QUIET, train_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "bench", "results", "gpu")
PARTS = {"tests": 110.0, "lm_head": 110.0, "decode": 45.0, "train": 45.0, "paths": sum(SECTIONS.values()),
         "sharded": 15.0}  # budget shares, s: 450 s in all


def _peak(device: torch.device):
    """The card's data-sheet peaks from ``bench/device.py``'s table (None off CUDA or for a card not in it)."""
    from bench.device import device_name, peak_for
    return peak_for(device_name(device)) if device.type == "cuda" else None


def hbm_tbps(device: torch.device) -> float:
    """The card's HBM bandwidth, TB/s (NaN off CUDA or for a card not in the table)."""
    peak = _peak(device)
    return peak.tbps if peak else math.nan


def bf16_tflops(device: torch.device) -> float:
    """The card's dense bf16 tensor-core peak, TFLOP/s (NaN off CUDA or for a card not in the table)."""
    peak = _peak(device)
    return peak.tflops if peak else math.nan
QWEN3_1_7B = dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, vocab_size=151_936)
QWEN3_0_6B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, vocab_size=151_936)
TINY_QWEN3 = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16, vocab_size=4096)


# ----------------------------------------------------------------------------- parts (child side)
def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def cuda_test_files() -> list[str]:
    """The test files with a ``cuda`` mark, the same in the dry run and on the GPU: collecting all of
    tests/ would import what the GPU machine lacks (trl, datasets) and one collection error stops
    every test."""
    tests = os.path.join(ROOT, "tests")
    return sorted(os.path.join("tests", name) for name in os.listdir(tests) if name.startswith("test_")
                  and name.endswith(".py") and "mark.cuda" in open(os.path.join(tests, name)).read())


STOP_S = 10.0  # pytest's time to write its report after Ctrl-C


def part_tests(dry: bool, deadline: float, emit) -> None:
    """``pytest -m cuda``: one row per test (its outcome), from pytest's JUnit XML."""
    xml = os.path.join(tempfile.mkdtemp(prefix="medix_gpu_check_"), "pytest.xml")
    # one process (tests/conftest.py would start xdist workers): one GPU, and their start-up would spend the budget
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", *cuda_test_files(), "-p", "no:cacheprovider",
           "-p", "no:xdist", f"--junitxml={xml}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, text=True)
    stopped = False
    try:
        ending = f"pytest exit {proc.wait(timeout=max(1.0, deadline - time.time() - STOP_S))}"
    except subprocess.TimeoutExpired:  # Ctrl-C: pytest ends its session, its report keeps the tests run so far
        proc.send_signal(signal.SIGINT)
        stopped, ending = True, "pytest stopped at the part's time limit"
        try:
            proc.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if not os.path.exists(xml):
        emit(Row("tests", "pytest -m cuda", impl="pytest", status=f"failed: {ending}, no report"))
        return
    for case in ET.parse(xml).getroot().iter("testcase"):
        if case.get("name") is None:  # the test a Ctrl-C stopped: an empty element
            continue
        outcome = next(iter(case), None)
        status = "ok" if outcome is None else (
            f"skipped: {outcome.get('message', '')}" if outcome.tag == "skipped"
            else f"failed: {' '.join((outcome.get('message') or '').split())[:200]}")
        emit(Row("tests", case.get("name"), impl="pytest", shape=case.get("classname", ""), status=status,
                 ms=float(case.get("time", "nan")) * 1e3))
    if stopped:
        emit(Row("tests", "pytest -m cuda", impl="pytest", status=f"failed: {ending}: the tests after these did not run"))


def part_lm_head(dry: bool, deadline: float, emit) -> None:
    from bench.bench_kernels import logprob_cases, loss_cases
    from bench.case import run_group
    from bench.timing import SMOKE_BUDGET, Budget

    device = _device()
    n, h, v = (64, 32, 1000) if dry else (16_384, 4096, 151_936)
    shapes = [(n, h, v, "")]
    cases = loss_cases(dry, device, variants=[("grpo", False, shapes)]) + logprob_cases(dry, device, shapes, (True,))
    cases.sort(key=lambda c: c.impl == "torch.compile")  # the slowest to build, last
    for case in cases:
        if time.time() > deadline - (60 if case.impl == "torch.compile" else 15):
            emit(Row("lm_head", f"{case.bench} {case.case}", case.impl, case.shape, status="skipped: time budget"))
            continue
        r = run_group([case], device, SMOKE_BUDGET if dry else Budget())[0]
        # medix_fast's log-prob backward recomputes the logits (8·N·H·V); everything else runs what it counts
        ran = 8 / 6 if (case.impl == SUBJECT and case.bench == "logprobs") else 1.0
        emit(Row("lm_head", f"{r.bench} {r.case}", r.impl, r.shape, r.status, r.median_ms, r.tflops,
                 r.tflops * ran if r.impl == SUBJECT else math.nan, 100 * r.tflops / bf16_tflops(device),
                 peak_gb=r.peak_mb / 1024, note=r.note))


def _timed(fn, device: torch.device, reps: int) -> tuple[float, float]:
    """(median ms of ``reps`` calls after one warm-up, peak GB of the last call over what was allocated)."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    peak = (torch.cuda.max_memory_allocated() - before) / 2**30 if device.type == "cuda" else math.nan
    return statistics.median(times), peak


def part_decode(dry: bool, deadline: float, emit) -> None:
    from bench.bench_sampler import hf_generate, medix_generate, random_model, random_prompts

    device = _device()
    fields = TINY_QWEN3 if dry else QWEN3_1_7B
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    prompt_len, new = (8, 8) if dry else (128, 64)
    layouts = [(1, 1), (2, 2)] if dry else [(1, 1), (8, 8), (32, 8)]  # (prompts, G): batch 1, 64, 256
    model = random_model(fields, device, dtype, arch="qwen3")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied head counted once
    kv_per_token = (2 * fields["num_hidden_layers"] * fields["num_key_value_heads"] * fields["head_dim"]
                    * torch.finfo(dtype).bits // 8)
    name = "tiny Qwen3" if dry else "Qwen3-1.7B shape"
    for prompts_n, g in layouts:
        batch = prompts_n * g
        prompts = random_prompts(prompts_n, fields["vocab_size"], prompt_len, prompt_len)
        step_bytes = weight_bytes + batch * (prompt_len + new / 2) * kv_per_token  # a mean decode step's reads
        shape = f"{name} {str(dtype)[6:]}, {prompts_n} prompts x G={g}, {prompt_len} + {new} tokens"
        for impl, make in ((SUBJECT, partial(medix_generate, max_num_seqs=batch)),
                           ("hf generate", partial(hf_generate, batch_rows=batch))):  # every row at once
            if time.time() > deadline - 10:
                emit(Row("decode", f"batch {batch}", impl, shape, status="skipped: time budget"))
                continue
            try:
                ms, peak = _timed(make(model, prompts, g, new), device, reps=1 if dry else 2)
            except Exception as exc:  # a row, not the end of the part
                emit(Row("decode", f"batch {batch}", impl, shape, status=f"failed: {type(exc).__name__}: {exc}"[:200]))
                continue
            gbps = step_bytes * new / (ms / 1e3) / 1e9
            emit(Row("decode", f"batch {batch}", impl, shape, ms=ms, tok_s=batch * new / (ms / 1e3), gbps=gbps,
                     pct_hbm=100 * gbps / (hbm_tbps(device) * 1e3), peak_gb=peak,
                     note="time includes the prefill; bytes: weights + K/V per decode step"))


def random_checkpoint(fields: dict, device: torch.device, where: str) -> tuple[str, int]:
    """A random Qwen3 of ``fields``' shape with the embedded tiny model's tokenizer (its ids fit the
    vocabulary), saved in bf16 under ``where``: (its directory, its parameter count)."""
    from bench.bench_sampler import random_model
    from medix_fast.demo.tiny import TinyConfig, build_tokenizer, read_train_rows

    tokenizer = build_tokenizer(read_train_rows(), TinyConfig().vocab_size)
    if len(tokenizer) > fields["vocab_size"]:
        raise ValueError(f"tokenizer ids ({len(tokenizer)}) do not fit the model's vocabulary")
    model = random_model(fields, device, torch.bfloat16, arch="qwen3")
    model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    params = sum(p.numel() for p in model.parameters())
    path = os.path.join(where, "model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return path, params


def part_train(dry: bool, deadline: float, emit, part: str = "train", ranks: int = 1) -> None:
    """3 training steps; with ``ranks`` > 1 under torchrun, the rollout tensor-parallel over them."""
    if not dry and torch.cuda.device_count() < ranks:
        emit(Row(part, "3 steps", status=f"skipped: {torch.cuda.device_count()} GPU, the sharded rollout needs "
                                         f"{ranks} (tests/test_tensor_parallel.py runs it on {ranks} gloo ranks)"))
        return
    device = _device()
    work = tempfile.mkdtemp(prefix="medix_gpu_check_train_")
    path, params = random_checkpoint(TINY_QWEN3 if dry else QWEN3_0_6B, device, work)
    w = dict(prompts=2, mini=2, group=2, new=8) if dry else dict(prompts=16, mini=8, group=8, new=256)
    overrides = [
        f"model.path={path}", f"model.dtype={'float32' if dry else 'bfloat16'}", f"train.device={device.type}",
        "distributed.strategy=fsdp", f"train.prompts_per_step={w['prompts']}",
        f"train.mini_batch_prompts={w['mini']}", f"sampling.group_size={w['group']}",
        f"sampling.max_new_tokens={w['new']}", "sampling.temperature=1.0", "data.max_prompt_length=1024",
        "checkpoint.every=0", "checkpoint.save_optimizer=false", f"sampling.tensor_parallel={ranks}", *QUIET]
    shape = (f"random Qwen3 {params / 1e6:,.3g}M {'fp32' if dry else 'bf16'} fsdp, {w['prompts']} prompts x "
             f"G={w['group']}, <= {w['new']} new" + (f", {ranks} ranks, rollout tensor-parallel" if ranks > 1 else ""))
    train_rows(part, overrides, 3, ranks, deadline, emit, shape, os.path.join(work, "run"))


PART_FUNCS = {"tests": part_tests, "lm_head": part_lm_head, "decode": part_decode, "train": part_train,
              "paths": part_paths, "sharded": partial(part_train, part="sharded", ranks=2)}


def _driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "no nvidia-smi"


def header(dry: bool, command: str, budget_s: float) -> dict[str, str]:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    cuda = torch.cuda.is_available()
    return {
        "command": command,
        "mode": "dry run (tiny shapes: plumbing only, no figure)" if dry else "GPU check",
        "device": torch.cuda.get_device_name() if cuda else f"CPU: {platform.processor() or platform.machine()}",
        "torch": torch.__version__, "CUDA": str(torch.version.cuda), "triton": triton_version,
        "driver": _driver() if cuda else "none", "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "budget": f"{budget_s:.0f} s",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench --gpu-check", description=__doc__.splitlines()[0])
    p.add_argument("--gpu-check", action="store_true", help=argparse.SUPPRESS)  # when called through bench/run.py
    p.add_argument("--dry-run", action="store_true", help="tiny shapes (the default without CUDA)")
    p.add_argument("--out", default=None, help=f"output folder (default {os.path.relpath(DEFAULT_OUT, ROOT)}; "
                                               "a dry run: a temporary folder)")
    p.add_argument("--budget-s", type=float, default=sum(PARTS.values()), help="total wall-clock budget")
    p.add_argument("--parts", nargs="+", default=list(PARTS), help=f"a subset of {list(PARTS)}")
    args = p.parse_args(argv)
    dry = args.dry_run or not torch.cuda.is_available()
    out = args.out or (tempfile.mkdtemp(prefix="medix_gpu_check_dry_") if dry else DEFAULT_OUT)
    os.makedirs(out, exist_ok=True)
    command = "python -m bench --gpu-check " + " ".join(a for a in (argv if argv is not None else sys.argv[1:])
                                                         if a != "--gpu-check")
    meta = header(dry, command.strip(), args.budget_s)
    from medix_fast.doctor import check  # the environment first: versions against the declared ranges

    # the C++ ops are CPU ops: their build would only spend the budget; the parts run the commands
    # themselves, so the doctor's probe that they import is a second start of every one of them
    env = check(build_cpp=False, imports=False)
    print(env.format(), flush=True)
    with open(os.path.join(out, "doctor.json"), "w") as f:
        json.dump(env.to_dict(), f, indent=2)
    meta["environment"] = "supported" if env.ok else "; ".join(env.problems)
    start, seconds = time.monotonic(), {}
    rows = run_parts(args.parts, PARTS, dry, out, args.budget_s, seconds)
    if any(r.part == "paths" and r.status.startswith("failed") for r in rows):  # it ended early
        rows += [Row(s, "section", impl="", status="failed: not reached, the paths part ended (see paths.log)")
                 for s in SECTIONS if s not in {r.part for r in rows}]
    meta.update((f"{name} part", f"{seconds[name]:.0f} s") for name in args.parts if name in seconds)
    meta["total"] = f"{time.monotonic() - start:.0f} s"
    csv_path, md_path = write_report(out, rows, meta)
    with open(os.path.join(out, "command.txt"), "w") as f:
        f.write(meta["command"] + "\n")
    print(open(md_path).read())
    print(f"[gpu-check] wrote {md_path} and {csv_path}", flush=True)
    broken = [r for r in rows if r.status.startswith("failed") and r.impl in (SUBJECT, "pytest", "")]
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(child(PART_FUNCS, PARTS, sys.argv[1:]))
