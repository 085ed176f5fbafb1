"""The files of an eval run: the per-item JSONL (resumable), its settings, the accuracy table.

    out/generations.jsonl   one JSON object a line: task, index, question, solution, gold, response,
                            answer, choice, finish_reason, tokens, scores {component: 0..1}
    out/run.json            the settings the items were generated with (checked on resume)
    out/summary.md / .json  per-task and overall means of every score

A run killed mid-write leaves at most a truncated last line: ``read_records`` drops it (and cuts
it from the file), so the next run appends after the last complete item.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError

SCORE_ORDER = ("accuracy", "format", "modality", "semantic", "overall")


class ResumeError(UserError):
    """The output folder holds an eval run that cannot be continued (other settings, bad lines)."""


def read_records(path: Path) -> list[dict]:
    """Every complete record of ``path`` (none if absent); a truncated last line is removed from the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    records, good = [], 0
    lines = data.split(b"\n")
    for number, line in enumerate(lines, start=1):
        last = number == len(lines)
        if not line.strip():
            if not last:
                good += len(line) + 1
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "task" not in record or "index" not in record:
                raise ValueError("not an eval record")
        except ValueError as err:
            if last:  # killed while writing this line
                break
            raise ResumeError(f"{path}:{number} is not a valid eval record ({err}); only a truncated last line "
                              "is tolerated: delete the file or use another output folder") from None
        if last:  # complete JSON but the newline was never written
            break
        records.append(record)
        good += len(line) + 1
    if good < len(data):
        with path.open("r+b") as f:
            f.truncate(good)
    return records


def check_settings(path: Path, settings: dict) -> None:
    """Write ``settings`` to ``path`` the first time; later, ResumeError naming what differs."""
    if not path.exists():
        path.write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")
        return
    before = json.loads(path.read_text())
    changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
    if changed:
        detail = "; ".join(f"{k}: {before.get(k)!r} -> {settings.get(k)!r}" for k in changed)
        raise ResumeError(f"{path.parent} holds an eval run with other settings ({detail}): give another "
                          f"--out, or add --overwrite to move it aside to {path.parent.name}.old-N and start again")


def summarize(records: list[dict], task_sizes: dict[str, int]) -> dict:
    """Means of every score per task (in ``task_sizes`` order), over tasks (macro) and over items (micro)."""
    per_task: dict[str, dict] = {}
    present = {k for r in records for k in r["scores"]}
    keys = [k for k in SCORE_ORDER if k in present] + sorted(present - set(SCORE_ORDER))
    for name, size in task_sizes.items():
        rows = [r["scores"] for r in records if r["task"] == name]
        means = {k: sum(s[k] for s in rows if k in s) / max(1, sum(k in s for s in rows)) for k in keys}
        per_task[name] = {"n": len(rows), "total": size, **means}
    done = [t for t in per_task.values() if t["n"]]
    macro = {k: sum(t[k] for t in done) / max(1, len(done)) for k in keys}
    micro = {k: sum(r["scores"][k] for r in records if k in r["scores"]) /
             max(1, sum(k in r["scores"] for r in records)) for k in keys}
    return {"tasks": per_task, "keys": keys, "macro": {"n": sum(t["n"] for t in done), **macro},
            "micro": {"n": len(records), **micro}}


def markdown_table(summary: dict) -> str:
    """The summary as a Markdown table, scores in percent; the two mean rows only when there are
    several tasks (with one they repeat its row)."""
    keys = summary["keys"]
    head = "| task | n | " + " | ".join(keys) + " |\n|---|---:|" + "---:|" * len(keys) + "\n"

    def row(name: str, n: str, values: dict) -> str:
        return f"| {name} | {n} | " + " | ".join(f"{100 * values[k]:.1f}" for k in keys) + " |\n"

    body = "".join(row(name, f"{t['n']}/{t['total']}" if t["n"] < t["total"] else str(t["n"]), t)
                   for name, t in summary["tasks"].items())
    if len(summary["tasks"]) > 1:
        body += row("**mean over tasks**", str(summary["macro"]["n"]), summary["macro"])
        body += row("**all items**", str(summary["micro"]["n"]), summary["micro"])
    return head + body


def write_summary(out: Path, summary: dict) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(markdown_table(summary))


def to_metrics(summary: dict) -> dict[str, float]:
    """Training-log metrics: ``eval/<score>`` (every score's mean over all items: overall,
    accuracy, format, ...), ``eval/<task>/accuracy`` and ``eval/mean_accuracy`` (over tasks)."""
    out = {f"eval/{k}": summary["micro"][k] for k in summary["keys"]} if summary["micro"]["n"] else {}
    out.update({f"eval/{name}/accuracy": t["accuracy"] for name, t in summary["tasks"].items() if t["n"]})
    out["eval/mean_accuracy"] = summary["macro"].get("accuracy", float("nan"))
    return out
