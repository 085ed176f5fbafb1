"""A sample of the training rollouts: ``<output_dir>/rollouts/step_N.jsonl`` every ``logging.rollouts_every`` steps.

    records = rollout_records(seqs, rewards, tokenizer, rows=8)   # rank 0's first rows, whole groups first
    write_rollouts(out / "rollouts", step, records)
    print(show_rollouts(records, 2))                               # at each held-out evaluation

One JSON line per response (TRL's ``log_completions``): ``group``, the ``prompt`` and the
``completion`` decoded (special tokens dropped), every reward component (``reward/<name>``,
``overall`` included) and the ``advantage``. Only at those steps are the rows' rewards and
advantages read on the host (one copy each), outside the training step itself.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def rollout_records(seqs, rewards: dict[str, torch.Tensor], tokenizer, rows: int) -> list[dict]:
    """The first ``rows`` of ``seqs`` (a :class:`medix_fast.rl.batch.Sequences`) with their rewards
    (``{component: (N,)}``) and advantages, as plain records."""
    n = min(rows, len(seqs.completion_ids))
    values = {f"reward/{k}": v[:n].double().cpu().tolist() for k, v in sorted(rewards.items())}
    advantages = seqs.advantages[:n].double().cpu().tolist()
    return [{"group": i // seqs.group_size,
             "prompt": tokenizer.decode(seqs.prompt_ids[i], skip_special_tokens=True),
             "completion": tokenizer.decode(seqs.completion_ids[i], skip_special_tokens=True),
             **{k: v[i] for k, v in values.items()}, "advantage": advantages[i]} for i in range(n)]


def write_rollouts(directory: Path, step: int, records: list[dict]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step_{step:08d}.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def show_rollouts(records: list[dict], k: int, width: int = 160) -> str:
    """``k`` records as short lines: reward, advantage, the completion's start."""
    def cut(text: str) -> str:
        text = " ".join(text.split())
        return text if len(text) <= width else text[:width - 3] + "..."

    return "\n".join(f"  reward {r.get('reward/overall', float('nan')):.3f}, advantage {r['advantage']:+.3f}: "
                     f"{cut(r['completion'])}" for r in records[:k])
