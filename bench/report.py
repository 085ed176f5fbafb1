"""Ratios to the baselines measured in the same run, and the CSV + Markdown the harness writes.

Rows with the same ``(suite, bench, case, shape)`` are compared: for every implementation ``X`` in the
group other than medix_fast, each row gets ``time/X`` (its median over X's) and ``mem/X`` (its
peak memory over X's; omitted when X's peak is under 1 MB). Below 1 is better for both.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import math
import os
import platform
import sys
from collections import defaultdict

import torch

from .case import SUBJECT, Result

METHOD = ("time: median [p20-p80] of repeated calls after warm-up (GPU: triton.testing.do_bench); "
          "peak MB: extra memory of one call over its inputs (GPU: max_memory_allocated; CPU: RSS "
          "high-water mark, see bench/timing.py); ratios: this row / the baseline, same run, "
          "below 1 is better")


MEM_FLOOR_MB = 1.0  # below this a CPU peak is page-granular noise: no memory ratio against it


def baselines(rows: list[Result]) -> list[str]:
    """Baseline implementations present in ``rows``, in order of first appearance."""
    return list(dict.fromkeys(r.impl for r in rows if r.impl != SUBJECT))


def ratios(rows: list[Result]) -> dict[int, dict[str, float]]:
    """``{id(row): {"time/X": ..., "mem/X": ...}}`` for each baseline X that ran in the row's group."""
    groups: dict[tuple, list[Result]] = defaultdict(list)
    for r in rows:
        groups[(r.suite, r.bench, r.case, r.shape)].append(r)
    out: dict[int, dict[str, float]] = {}
    for group in groups.values():
        done = {r.impl: r for r in group if r.status == "ok"}
        for r in group:
            out[id(r)] = {}
            if r.status != "ok":
                continue
            for name, base in done.items():
                if name == SUBJECT or base is r:
                    continue
                out[id(r)][f"time/{name}"] = r.median_ms / base.median_ms
                out[id(r)][f"mem/{name}"] = r.peak_mb / base.peak_mb if base.peak_mb >= MEM_FLOOR_MB else math.nan
    return out


def load_average() -> str:
    """The 1-minute load average and the core count: other work on the machine skews CPU timings."""
    try:
        return f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    except OSError:
        return "unknown"


def header(device_name: str, command: str, isolated: bool, load_at_start: str) -> dict[str, str]:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {
        "device": device_name,
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "command": command,
        "cases": ("timed round-robin per comparison in a fresh process; peak memory in a fresh process per case"
                  if isolated else "timed round-robin per comparison, all in one process"),
        "load average": f"{load_at_start} at the start, {load_average()} at the end",
    }


def write_csv(path: str, rows: list[Result], meta: dict[str, str]) -> None:
    rat = ratios(rows)
    ratio_cols = [f"{kind}/{b}" for b in baselines(rows) for kind in ("time", "mem")]
    fields = [f.name for f in dataclasses.fields(Result)] + ratio_cols
    with open(path, "w", newline="") as f:
        for key, value in meta.items():
            f.write(f"# {key}: {value}\n")
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({**dataclasses.asdict(r), **rat[id(r)]})


def _fmt(x: float, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return f"{x:,.{digits}f}" if abs(x) < 1e5 else f"{x:,.0f}"


def _ms(x: float) -> str:
    return _fmt(x, 3 if x < 1 else (2 if x < 100 else 0))


def _table(rows: list[Result], rat: dict[int, dict[str, float]]) -> list[str]:
    cols = {
        "impl": lambda r: f"**{r.impl}**" if r.impl == SUBJECT else r.impl,
        "case": lambda r: r.case,
        "shape": lambda r: r.shape,
        "median ms": lambda r: _ms(r.median_ms),
        "p20-p80 ms": lambda r: "" if math.isnan(r.median_ms) else f"{_ms(r.p20_ms)}-{_ms(r.p80_ms)}",
        "peak MB": lambda r: _fmt(r.peak_mb, 1 if r.peak_mb < 10 else 0),
        "throughput": lambda r: "" if math.isnan(r.throughput) else (
            f"{_fmt(r.throughput, 2 if r.throughput < 10 else 0)} {r.throughput_unit}"),
        "TFLOP/s": lambda r: _fmt(r.tflops, 1),
        "% peak FLOP/s": lambda r: _fmt(r.tflops_pct, 1),
        "GB/s": lambda r: _fmt(r.gbps, 1),
        "% peak GB/s": lambda r: _fmt(r.gbps_pct, 1),
    }
    for b in baselines(rows):
        for kind in ("time", "mem"):
            cols[f"{kind}/{b}"] = lambda r, k=f"{kind}/{b}": _fmt(rat[id(r)].get(k, math.nan), 2)
    cols["status"] = lambda r: "" if r.status == "ok" else r.status
    cols["note"] = lambda r: r.note
    cells = {name: [f(r) for r in rows] for name, f in cols.items()}
    keep = [name for name, values in cells.items() if any(values)]
    lines = ["| " + " | ".join(keep) + " |", "|" + "---|" * len(keep)]
    for i in range(len(rows)):
        lines.append("| " + " | ".join(cells[name][i].replace("|", "/") for name in keep) + " |")
    return lines


def markdown(rows: list[Result], meta: dict[str, str]) -> str:
    rat = ratios(rows)
    lines = [f"**{key}**: `{value}`  " if key == "command" else f"**{key}**: {value}  "
             for key, value in meta.items()]
    lines += ["", f"_{METHOD}._", ""]
    for suite, bench in dict.fromkeys((r.suite, r.bench) for r in rows):
        title = bench if suite in ("", bench) else f"{bench} ({suite})"
        section = [r for r in rows if (r.suite, r.bench) == (suite, bench)]
        lines += [f"### {title}", ""] + _table(section, rat) + [""]
    return "\n".join(lines)


def write(out_dir: str, rows: list[Result], meta: dict[str, str], stem: str) -> tuple[str, str]:
    """Write ``<stem>.csv`` and ``<stem>.md`` into ``out_dir``; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    csv_path, md_path = (os.path.join(out_dir, f"{stem}.{ext}") for ext in ("csv", "md"))
    write_csv(csv_path, rows, meta)
    with open(md_path, "w") as f:
        f.write(markdown(rows, meta))
    return csv_path, md_path


def command_line() -> str:
    return " ".join(["python", *([sys.argv[0]] if not sys.argv[0].endswith("__main__.py") else ["-m", "bench"]),
                     *sys.argv[1:]])
