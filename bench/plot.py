"""Time and peak memory against tokens, medix_fast against the baselines, from a harness CSV.

    python bench/plot.py [bench/results/cpu.csv ...]     # default: every non-smoke CSV there

Writes ``<csv stem>.png`` next to each CSV: one row of panels (time, peak memory) per
benchmark case measured at several token counts with the same other dimensions (the
log-prob and policy-loss sweeps). Needs matplotlib (``pip install -e ".[bench]"``).
``python -m bench`` calls it at the end of a run when matplotlib is installed.
"""
from __future__ import annotations

import csv
import glob
import os
import re
import sys
from collections import defaultdict

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def read_rows(path: str) -> tuple[dict[str, str], list[dict[str, str]]]:
    """(header metadata, rows) of a CSV written by bench/report.py."""
    with open(path) as f:
        lines = f.read().splitlines()
    meta = dict(line[2:].split(": ", 1) for line in lines if line.startswith("# ") and ": " in line)
    return meta, list(csv.DictReader(line for line in lines if not line.startswith("#")))


def sweeps(rows: list[dict[str, str]]) -> dict[tuple[str, ...], dict[str, list[tuple[int, float, float]]]]:
    """``{(suite, bench, case, fixed dims): {impl: [(tokens, median_ms, peak_mb), ...]}}``, >= 2 token counts."""
    out: dict = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["status"] != "ok" or not r["tokens"] or int(r["tokens"]) <= 0:
            continue
        fixed = re.sub(r"\bN=\d+\s*", "", r["shape"]).strip()
        out[(r.get("suite", ""), r["bench"], r["case"], fixed)][r["impl"]].append(
            (int(r["tokens"]), float(r["median_ms"]), float(r["peak_mb"])))
    return {k: {impl: sorted(pts) for impl, pts in v.items()} for k, v in out.items()
            if len({t for pts in v.values() for t, _, _ in pts}) >= 2}


def plot(path: str) -> str | None:
    """Write the PNG for the CSV at ``path``; None when it holds no sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta, rows = read_rows(path)
    groups = sweeps(rows)
    if not groups:
        return None
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 3.4 * len(groups)), squeeze=False)
    for key, (time_ax, mem_ax) in zip(groups, axes):
        _, bench, case, fixed = key
        for impl, pts in groups[key].items():
            tokens = [t for t, _, _ in pts]
            style = dict(marker="o", linewidth=2.5 if impl == "medix_fast" else 1.2, label=impl)
            time_ax.plot(tokens, [ms for _, ms, _ in pts], **style)
            mem_ax.plot(tokens, [mb for _, _, mb in pts], **style)
        for ax, what in ((time_ax, "median time (ms)"), (mem_ax, "peak extra memory (MB)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens")
            ax.set_ylabel(what)
            ax.set_title(f"{bench}: {case}, {fixed}", fontsize=9)
            ax.grid(alpha=0.3)
        time_ax.legend(fontsize=8)
    fig.suptitle(f"{meta.get('device', '')}  |  {meta.get('date', '')}  |  torch {meta.get('torch', '')}",
                 fontsize=9)
    fig.tight_layout()
    out = os.path.splitext(path)[0] + ".png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str]) -> int:
    paths = argv or [p for p in sorted(glob.glob(os.path.join(RESULTS, "*.csv"))) if "_smoke" not in p]
    for path in paths:
        out = plot(path)
        print(f"[plot] {path}: {'wrote ' + out if out else 'no token sweep to plot'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
