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
from .timing import Budget, Timing, peak_memory, time_interleaved

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
    work: float = 0.0  # items per call for the throughput column (e.g. generated tokens; a build may set it)
    work_unit: str = ""  # e.g. "tok/s"
    note: str = ""
    # instead of ``build``, for work that cannot be called step by step (another trainer's loop):
    # measure(device, budget) -> (Timing, peak MB) or (Timing, peak MB, a note for this row)
    measure: Callable[[torch.device, Budget], tuple] | None = None

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


def _status(exc: BaseException, case: Case) -> str:
    if isinstance(exc, Skip):
        return f"skipped: {exc}"
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "OOM"
    if case.impl == SUBJECT:
        traceback.print_exception(exc)
    return f"failed: {_short(exc)}"  # a baseline that cannot run here is a row, not a crash


def _fill(result: Result, case: Case, device: torch.device, timing: Timing | None, peak_mb: float | None) -> None:
    result.note = case.note  # a build may have filled in what it measured (and ``work``)
    if peak_mb is not None:
        result.peak_mb = peak_mb
    if timing is None:
        return
    result.median_ms, result.p20_ms, result.p80_ms, result.reps = (
        timing.median_ms, timing.p20_ms, timing.p80_ms, timing.reps)
    seconds = timing.median_ms / 1e3
    if case.work:
        result.throughput = case.work / seconds
    if device.type != "cuda":
        return
    peak = peak_for(result.device)
    if case.flops:
        result.tflops = case.flops / seconds / 1e12
        result.tflops_pct = 100 * result.tflops / peak.tflops if peak else math.nan
    if case.bytes:
        result.gbps = case.bytes / seconds / 1e9
        result.gbps_pct = 100 * result.gbps / (1e3 * peak.tbps) if peak else math.nan


def _guard(fn: Callable[[], object], errors: list[BaseException]) -> Callable[[], object]:
    """``fn`` that records its first exception and is a no-op afterwards."""
    def call():
        if errors:
            return None
        try:
            return fn()
        except Exception as exc:
            errors.append(exc)
            return None
    return call


def run_group(cases: list[Case], device: torch.device, budget: Budget,
              parts: tuple[str, ...] = ("time", "memory")) -> list[Result]:
    """Measure the implementations of one comparison; failures become row statuses, never exceptions.

    Every case is built and warmed up (compilation happens here, and so does the failure of a
    baseline that cannot run); then they are timed round-robin (each round calls every
    implementation once, so all of them share whatever else the machine is doing, and their
    ratios stay fair on a busy CPU); then each one's peak memory is measured. ``parts`` picks
    "time" and/or "memory". Cases with their own ``measure`` are measured alone.
    """
    results = [Result.of(c, device) for c in cases]
    live: list[tuple[int, Callable[[], object], list[BaseException]]] = []
    for i, case in enumerate(cases):
        if case.measure is not None:
            results[i] = run_case(case, device, budget)
            continue
        try:
            fn = case.build(device)
            for _ in range(max(1, budget.warmup)):
                fn()
        except Exception as exc:
            results[i].status = _status(exc, case)
            continue
        errors: list[BaseException] = []
        live.append((i, _guard(fn, errors), errors))
    timings = time_interleaved([fn for _, fn, _ in live], device, budget) if "time" in parts else [None] * len(live)
    for (i, fn, errors), timing in zip(live, timings):
        peak_mb = peak_memory(fn, device) if "memory" in parts else None
        if errors:
            results[i].status = _status(errors[0], cases[i])
        else:
            _fill(results[i], cases[i], device, timing, peak_mb)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def run_case(case: Case, device: torch.device, budget: Budget) -> Result:
    """Build and measure one case (time, then peak memory); a failure becomes the row's status."""
    if case.measure is None:
        return run_group([case], device, budget)[0]
    result = Result.of(case, device)
    try:
        timing, peak_mb, *note = case.measure(device, budget)
    except Exception as exc:
        result.status = _status(exc, case)
        return result
    _fill(result, case, device, timing, peak_mb)
    result.note = "; ".join(x for x in (result.note, *note) if x)
    return result
