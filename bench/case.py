"""One benchmark case (an implementation at a shape) and the row it produces.

A benchmark module exposes ``cases(smoke: bool, device: torch.device) -> list[Case]``. A case's
``build(device)`` creates the inputs and returns the zero-argument callable that is timed; it is
called lazily, in the process that measures (see bench/isolate.py), so listing cases is cheap.
A case whose work cannot be called one step at a time gives ``measure`` instead.
Cases with the same ``(bench, case, shape)`` form a group: every implementation other than
``medix_fast`` in a group is a baseline the others are compared with (bench/report.py).
"""
from __future__ import annotations

import dataclasses
import math
import traceback
from typing import Callable

import torch

from .device import device_name, peak_for
from .timing import Budget, Timing, measure

SUBJECT = "medix_fast"


class Skip(Exception):
    """Raised by ``build`` when an implementation cannot run here; the message is the reason."""


@dataclasses.dataclass
class Case:
    bench: str  # e.g. "policy_loss"
    case: str  # what is measured, e.g. "grpo fwd+bwd"
    impl: str  # "medix_fast" or a baseline's name
    shape: str  # e.g. "N=8192 H=512 V=50000 fp32"
    tokens: int  # the x axis of the plots
    build: Callable[[torch.device], Callable[[], object]] | None
    flops: float = 0.0  # per call, for TFLOP/s on GPU (0: not a compute-bound case)
    bytes: float = 0.0  # minimal bytes moved per call, for GB/s on GPU (0: not reported)
    work: float = 0.0  # items per call for the throughput column (e.g. generated tokens)
    work_unit: str = ""  # e.g. "tok/s"
    note: str = ""
    # instead of ``build``, for work that cannot be called step by step (another trainer's loop):
    # measure(device, budget) -> (Timing, peak MB)
    measure: Callable[[torch.device, Budget], tuple[Timing, float]] | None = None

    @property
    def key(self) -> str:
        return f"{self.bench}|{self.case}|{self.impl}|{self.shape}"


@dataclasses.dataclass
class Result:
    bench: str
    case: str
    impl: str
    shape: str
    tokens: int
    device: str
    status: str = "ok"  # ok | skipped: why | failed: why | OOM
    median_ms: float = math.nan
    p20_ms: float = math.nan
    p80_ms: float = math.nan
    reps: int = 0
    peak_mb: float = math.nan
    throughput: float = math.nan
    throughput_unit: str = ""
    tflops: float = math.nan
    tflops_pct: float = math.nan
    gbps: float = math.nan
    gbps_pct: float = math.nan
    note: str = ""
    suite: str = ""  # the harness module it came from (bench/run.py's MODULES key)

    @classmethod
    def of(cls, case: Case, device: torch.device, status: str = "ok") -> "Result":
        return cls(case.bench, case.case, case.impl, case.shape, case.tokens, device_name(device),
                   status=status, throughput_unit=case.work_unit, note=case.note)


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:160]}"


def run_case(case: Case, device: torch.device, budget: Budget) -> Result:
    """Build and measure one case; a failure becomes the row's status, never an exception."""
    result = Result.of(case, device)
    try:
        timing, peak_mb = (case.measure(device, budget) if case.measure is not None
                           else measure(case.build(device), device, budget))
    except Skip as exc:
        result.status = f"skipped: {exc}"
        return result
    except torch.cuda.OutOfMemoryError:
        result.status = "OOM"
        return result
    except Exception as exc:  # a baseline that cannot run here is a row, not a crash
        result.status = f"failed: {_short(exc)}"
        if case.impl == SUBJECT:
            traceback.print_exc()
        return result
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result.median_ms, result.p20_ms, result.p80_ms = timing.median_ms, timing.p20_ms, timing.p80_ms
    result.reps, result.peak_mb = timing.reps, peak_mb
    seconds = timing.median_ms / 1e3
    if case.work:
        result.throughput = case.work / seconds
    if device.type != "cuda":
        return result
    peak = peak_for(result.device)
    if case.flops:
        result.tflops = case.flops / seconds / 1e12
        result.tflops_pct = 100 * result.tflops / peak.tflops if peak else math.nan
    if case.bytes:
        result.gbps = case.bytes / seconds / 1e9
        result.gbps_pct = 100 * result.gbps / (1e3 * peak.tbps) if peak else math.nan
    return result
