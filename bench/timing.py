"""Wall time and peak memory of one benchmark call, on GPU or CPU.

Time (after ``warmup`` calls of each implementation, done by bench/case.py)
  GPU: ``triton.testing.do_bench`` (L2 flushed between calls, CUDA events), quantiles 0.5/0.2/0.8.
  CPU: the implementations of one comparison are called round-robin until ``min_reps`` rounds and
       ``budget_s`` seconds per implementation have passed (at most ``max_reps`` rounds), so a
       machine busy with other work slows all of them alike; median and 20th/80th percentiles of
       ``perf_counter`` times.

Peak memory: the extra memory one call needs on top of its already-built inputs, outputs and
gradients included, measured after the timing runs (so compilation and lazy initialisation are
not counted):
  GPU: ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` before the call.
  CPU: resident set size (RSS). The kernel's high-water mark (``VmHWM``) is reset through
       ``/proc/self/clear_refs``; the call's peak is ``VmHWM`` after it minus ``VmRSS`` before it.
       To make RSS follow live tensors, glibc is first told (``mallopt``) to serve every
       allocation above 64 KiB with its own mmap, returned on free, and ``malloc_trim`` hands back
       what earlier calls left in its heaps. The harness runs each case in a fresh process
       (``bench/isolate.py``), so no other case's leftovers count and the timing runs, which come
       first, use the default allocator settings. Without ``/proc`` (not Linux) the peak is NaN.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import gc
import math
import re
import time
from typing import Callable

import numpy as np
import torch

QUANTILES = (0.5, 0.2, 0.8)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameter ids


@dataclasses.dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


@dataclasses.dataclass(frozen=True)
class Budget:
    """How long to time a case on the CPU (the GPU uses do_bench's ``warmup_ms`` / ``rep_ms``)."""

    warmup: int = 1
    min_reps: int = 3
    max_reps: int = 50
    budget_s: float = 10.0
    warmup_ms: float = 25.0
    rep_ms: float = 100.0


SMOKE_BUDGET = Budget(warmup=1, min_reps=1, max_reps=2, budget_s=0.0, warmup_ms=1.0, rep_ms=5.0)


def summarize(times_ms: list[float]) -> Timing:
    med, p20, p80 = np.quantile(times_ms, QUANTILES)
    return Timing(float(med), float(p20), float(p80), len(times_ms))


def time_interleaved(fns: list[Callable[[], object]], device: torch.device, budget: Budget) -> list[Timing]:
    """Timings of already warmed-up ``fns``. CPU: round-robin, each round calls every fn once, until
    ``min_reps`` rounds and ``budget_s`` seconds per fn have passed (at most ``max_reps`` rounds).
    GPU: one ``do_bench`` after another (a GPU is not shared with other work)."""
    if device.type == "cuda":
        return [time_gpu(fn, budget) for fn in fns]
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    while fns and len(times[0]) < budget.max_reps and (
            len(times[0]) < budget.min_reps or time.perf_counter() - start < budget.budget_s * len(fns)):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
    return [summarize(ts) for ts in times]


def time_gpu(fn: Callable[[], object], budget: Budget) -> Timing:
    from triton.testing import do_bench

    med, p20, p80 = do_bench(fn, warmup=budget.warmup_ms, rep=budget.rep_ms, quantiles=list(QUANTILES))
    return Timing(float(med), float(p20), float(p80), reps=0)


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def _release_heap() -> None:
    """Make glibc return freed memory to the OS, now and for every later large free."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    libc = ctypes.CDLL(name)
    if hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


class PeakMemory:
    """Peak extra memory (MB) between :meth:`start` and :meth:`stop` (NaN where it cannot be read).

    For code that cannot be wrapped in one call (a step inside someone else's training loop):
    ``pm = PeakMemory(device); pm.start(); ...; mb = pm.stop()``.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.before = math.nan

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
            return
        gc.collect()
        _release_heap()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.before = _proc_status_kb("VmRSS") * 1024.0
        except OSError:
            self.before = math.nan

    def stop(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.before) / 2**20
        if math.isnan(self.before):
            return math.nan
        return max(0.0, _proc_status_kb("VmHWM") * 1024.0 - self.before) / 2**20


def peak_memory(fn: Callable[[], object], device: torch.device) -> float:
    """Peak extra memory (MB) of one call of ``fn``; its result stays alive until the peak is read."""
    pm = PeakMemory(device)
    pm.start()
    out = fn()  # noqa: F841 (kept alive: outputs count)
    return pm.stop()


