"""MediX-R1's judge phase (``--protocol medix_r1``): the three rounds of every item batched
through the rollout engine against one request per item, the way the reference kit's HTTP
workers ask (each item's three rounds one after the other, one conversation per call).

    python bench/bench_judge.py [--smoke] [--items N] [--reply-tokens T]   # prints a table
    python -m bench --only judge                 # through the bench harness

Both rows run the same judge (``medix_fast.eval.medix_r1_judge``: prompts, chat template,
``Sampler``, greedy) on the same items; only the batching differs, and the baseline's HTTP
round trips and server-side batching of concurrent workers are not counted. Items: N
(question, answer, response) triples from the bundled sample (16 on CPU, 256 on GPU; under ``--smoke``
2 items, 4 tokens a reply). Judge: the random models of bench_rewards.py (GPU: Qwen3-4B's shape in bf16; the
reference judges with Qwen3-14B), each reply capped at 16 new tokens, about what Qwen3 writes
for ``{"score": 1}`` with an empty thinking block (a random model never stops by itself).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):  # python bench/bench_judge.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.bench_rewards import judge_path  # noqa: E402
from bench.case import SUBJECT, Case, run_case  # noqa: E402
from bench.device import default_device  # noqa: E402
from bench.timing import SMOKE_BUDGET, Budget  # noqa: E402

BASELINE = "one request per item"
REPLY_TOKENS = 16


def make_items(n: int) -> tuple[list[str], list[str], list[str]]:
    """(questions, answers, responses): sample questions, their answers, a reasoned reply."""
    from medix_fast.data.loader import sample_path

    rows = [json.loads(line) for line in sample_path("test").read_text().splitlines()]
    rows = [rows[i % len(rows)] for i in range(n)]
    responses = [f"<think>The findings fit.</think>The answer is {r['solution'].split('>', 1)[1].strip()}."
                 for r in rows]
    return [r["problem"] for r in rows], [r["solution"] for r in rows], responses


def cases(smoke: bool, device: torch.device, items: int = 0, reply_tokens: int = 0) -> list[Case]:
    gpu = device.type == "cuda"
    n = items or (2 if smoke else (256 if gpu else 16))
    reply = reply_tokens or (4 if smoke else REPLY_TOKENS)
    shape = "tiny" if smoke else ("Qwen3-4B" if gpu else "small")
    dtype = torch.bfloat16 if gpu else torch.float32
    label = f"N={n} items x 3 rounds judge={shape} {'bf16' if gpu else 'fp32'} <= {reply} tokens/reply"

    def build(dev: torch.device, one_at_a_time: bool):
        from medix_fast.eval.medix_r1_judge import ChatJudge, judge_items
        from medix_fast.generate import Sampler
        from medix_fast.model.loading import load_model

        model, tokenizer = load_model(judge_path(shape, dtype, dev), dtype=dtype, device=dev)
        chat = ChatJudge(model, tokenizer, Sampler(model, max_num_seqs=n, dtype=dtype), reply)
        questions, answers, responses = make_items(n)
        rubric = [False] * n
        if one_at_a_time:
            return lambda: [judge_items(chat, [q], [a], [r], [False]) for q, a, r in zip(questions, answers, responses)]
        return lambda: judge_items(chat, questions, answers, responses, rubric)

    return [Case("judge", "medix_r1 judge phase", impl, label, n,
                 lambda dev, b=(impl == BASELINE): build(dev, b), work=float(n), work_unit="items/s")
            for impl in (SUBJECT, BASELINE)]


def run(smoke: bool = False, items: int = 0, reply_tokens: int = 0) -> list[dict]:
    """Measure both implementations in this process; one dict per row."""
    device = default_device()
    budget = SMOKE_BUDGET if smoke else Budget(min_reps=2, budget_s=5.0)
    return [vars(run_case(case, device, budget)) for case in cases(smoke, device, items, reply_tokens)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="2 items and a tiny judge")
    parser.add_argument("--items", type=int, default=0, help="items (default: see above)")
    parser.add_argument("--reply-tokens", type=int, default=0, help="new tokens per reply (default: see above)")
    args = parser.parse_args()
    rows = run(args.smoke, args.items, args.reply_tokens)
    base = next((r["median_ms"] for r in rows if r["impl"] == BASELINE), float("nan"))
    print(f"device: {rows[0]['device']}   shape: {rows[0]['shape']}")
    print(f"{'implementation':<22}{'median ms':>12}{'items/s':>10}{'speed-up':>10}  status")
    for r in rows:
        print(f"{r['impl']:<22}{r['median_ms']:>12.1f}{r['throughput']:>10.1f}{base / r['median_ms']:>9.1f}x"
              f"  {r['status']}")


if __name__ == "__main__":
    main()
