"""The GPU check's results: one :class:`Row` per measurement, check or skip, and the report they make
(``check.csv``: header comments then one line per row; ``check.md``: one table per section, in the
order the rows came). ``bench/gpu_check.py`` runs the parts that emit them."""
from __future__ import annotations

import csv
import dataclasses
import math
import os

SUBJECT = "medix_fast"


@dataclasses.dataclass
class Row:
    part: str  # the report's section (one table each)
    case: str
    impl: str = SUBJECT
    shape: str = ""
    status: str = "ok"  # ok | skipped: why | failed: why
    ms: float = math.nan
    tflops: float = math.nan  # of the model FLOPs (6·N·H·V)
    tflops_run: float = math.nan  # of the FLOPs executed (recompute included)
    pct_peak: float = math.nan  # of the card's dense bf16 peak
    tok_s: float = math.nan
    gbps: float = math.nan
    pct_hbm: float = math.nan
    peak_gb: float = math.nan
    note: str = ""


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else (f"{value:,.1f}" if abs(value) >= 10 else f"{value:,.3g}")
    return str(value).replace("|", "/")


def write_report(out: str, rows: list[Row], meta: dict[str, str]) -> tuple[str, str]:
    """``out/check.csv`` (header comments, then one line per row) and ``out/check.md`` (a table per part)."""
    fields = [f.name for f in dataclasses.fields(Row)]
    csv_path, md_path = os.path.join(out, "check.csv"), os.path.join(out, "check.md")
    with open(csv_path, "w", newline="") as f:
        f.writelines(f"# {k}: {v}\n" for k, v in meta.items())
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(dataclasses.asdict(r) for r in rows)
    lines = ["# GPU check", ""] + [f"**{k}**: `{v}`  " if k == "command" else f"**{k}**: {v}  " for k, v in meta.items()]
    lines += ["", "_ms: median after warm-up (lm_head: triton.testing.do_bench); TFLOP/s of 6·N·H·V, "
              "TFLOP/s run: recompute included; % peak: of the card's dense bf16 peak, % HBM: of its bandwidth "
              "(bench/device.py's data-sheet table: H200 989 TFLOP/s, 4.8 TB/s; H100 SXM 989, 3.35); "
              "peak GB over the inputs_", ""]
    for part in dict.fromkeys(r.part for r in rows):
        section = [r for r in rows if r.part == part]
        cols = [c for c in fields[1:] if any(_cell(getattr(r, c)) for r in section)]
        lines += [f"## {part}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_cell(getattr(r, c)) for c in cols) + " |" for r in section] + [""]
    with open(md_path, "w") as f:
        f.write("\n".join(lines))
    return csv_path, md_path
