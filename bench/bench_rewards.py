"""Reward throughput: the batched in-process MediX reward against scoring one response at a time.

    python bench/bench_rewards.py [--smoke]        # prints a table
    python -m bench --only rewards                 # through the bench harness (uses ``run``)

The batch: 512 responses (16 under ``--smoke``) to the bundled sample questions, a fixed mix of
40 % exact answers, 40 % other or paraphrased answers (these go to the judge and the encoder),
10 % invalid answers and 10 % malformed responses (no tags; 1 in 20 is 3K characters of junk).
Both implementations run medix_fast's reward code; the one-at-a-time row calls it on one
response per call, the reference's way (MediX-R1 sends each response to its judge server and
embeds each pair separately; its HTTP round trip and 4-token generation are not counted here,
so the baseline is a generous one).

Models (no download: random weights, real shapes). Encoder: the bundled all-MiniLM-L6-v2.
Judge: a random Qwen3 causal LM with the MiniLM WordPiece tokenizer and a Qwen chat template;
GPU: Qwen3-4B-Instruct-2507's shape (36 layers, hidden 2,560) in bf16, the reference's judge;
CPU: a 4-layer, hidden-512 model in fp32; ``--smoke``: 2 layers, hidden 64. The random judge is
built once per shape and kept in ``$TMPDIR/medix_bench_judge_<shape>``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile

if __package__ in (None, ""):  # python bench/bench_rewards.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.case import SUBJECT, Case, run_case  # noqa: E402
from bench.device import default_device  # noqa: E402
from bench.timing import SMOKE_BUDGET, Budget  # noqa: E402

BASELINE = "one-at-a-time"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
JUDGE_SHAPES = {  # name -> Qwen3Config fields
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=64),
    "Qwen3-4B": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151_936, tie_word_embeddings=True),
}


def make_batch(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """n (response, solution) pairs in the fixed mix described in the module docstring."""
    from medix_fast.data.prompt import split_solution
    from medix_fast.data.loader import sample_path

    rows = [json.loads(line) for line in sample_path("train").read_text().splitlines()]
    rng = random.Random(seed)
    responses, solutions = [], []
    for i in range(n):
        solution = rows[rng.randrange(len(rows))]["solution"]
        tag, answer = split_solution(solution)
        other = split_solution(rows[rng.randrange(len(rows))]["solution"])[1]
        thinking = " ".join(rng.choice(["the", "lesion", "is", "dense", "and", "well defined", "so"])
                            for _ in range(150))
        kind = i % 10
        final = {4: other, 5: other, 6: f"most likely {answer}", 7: f"{answer} or {other}",
                 8: rng.choice(["B", "Answer: C", "unclear?"])}.get(kind, answer)
        response = f"{tag}\n<thinking>{thinking}</thinking>\n<answer>{final}</answer>"
        if kind == 9:
            response = thinking if i % 20 else " ".join([thinking] * 3)
        responses.append(response)
        solutions.append(solution)
    return responses, solutions


def judge_path(shape: str, dtype: torch.dtype, device: torch.device) -> str:
    """A saved random judge of ``shape`` (built on first use)."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from medix_fast.rewards.semantic import default_model_path

    path = os.path.join(tempfile.gettempdir(), f"medix_bench_judge_{shape}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    tokenizer.chat_template = CHAT_TEMPLATE
    fields = {"vocab_size": len(tokenizer), "max_position_embeddings": 8192, **JUDGE_SHAPES[shape]}
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(Qwen3Config(pad_token_id=tokenizer.pad_token_id, **fields)).to(dtype)
    tmp = tempfile.mkdtemp(dir=tempfile.gettempdir())
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, path)
    return path


def cases(smoke: bool, device: torch.device) -> list[Case]:
    n = 16 if smoke else 512
    gpu = device.type == "cuda"
    shape = "tiny" if smoke else ("Qwen3-4B" if gpu else "small")
    dtype = torch.bfloat16 if gpu else torch.float32
    label = f"N={n} judge={shape} encoder=MiniLM-L6 {'bf16' if gpu else 'fp32'}"

    def build(dev: torch.device, one_at_a_time: bool):
        from medix_fast.rewards import RewardConfig, build_reward

        reward = build_reward(RewardConfig(judge_model=judge_path(shape, dtype, dev)), dev, dtype)
        responses, solutions = make_batch(n)
        if one_at_a_time:
            return lambda: [reward([r], [s]) for r, s in zip(responses, solutions)]
        return lambda: reward(responses, solutions)

    return [Case("rewards", "composite reward", impl, label, n,
                 lambda dev, b=(impl == BASELINE): build(dev, b), work=float(n), work_unit="rewards/s")
            for impl in (SUBJECT, BASELINE)]


def run(smoke: bool = False) -> list[dict]:
    """Measure both implementations in this process; one dict per row."""
    device = default_device()
    budget = SMOKE_BUDGET if smoke else Budget(min_reps=3, budget_s=5.0)
    rows = []
    for case in cases(smoke, device):
        r = run_case(case, device, budget)
        rows.append({"implementation": r.impl, "shape": r.shape, "device": r.device, "median_ms": r.median_ms,
                     "p20_ms": r.p20_ms, "p80_ms": r.p80_ms, "peak_mem_mb": r.peak_mb, "impl": r.impl,
                     "peak_mb": r.peak_mb, "case": r.case, "tokens": r.tokens, "reps": r.reps,
                     "throughput": r.throughput, "throughput_unit": r.throughput_unit, "status": r.status})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="16 responses and a tiny judge")
    rows = run(parser.parse_args().smoke)
    base = next((r["median_ms"] for r in rows if r["implementation"] == BASELINE), float("nan"))
    print(f"device: {rows[0]['device']}   shape: {rows[0]['shape']}")
    print(f"{'implementation':<16}{'median ms':>12}{'p20 ms':>12}{'p80 ms':>12}{'peak MB':>10}"
          f"{'rewards/s':>12}{'speed-up':>10}  status")
    for r in rows:
        print(f"{r['implementation']:<16}{r['median_ms']:>12.1f}{r['p20_ms']:>12.1f}{r['p80_ms']:>12.1f}"
              f"{r['peak_mem_mb']:>10.0f}{r['throughput']:>12.0f}{base / r['median_ms']:>9.1f}x  {r['status']}")


if __name__ == "__main__":
    main()
