"""What bf16 AdamW states cost against fp32, on the CPU (docs/training.md's table): the embedded tiny
Qwen2 (1M parameters) trained from the same start on the same batches (the bundled sample set's
questions and solutions, a language-model loss, 8 rows of <= 64 tokens per step) by torch's AdamW
(fp32 states, the reference) and by ``OffloadAdamW`` with fp32 states offloaded, bf16 states rounded to
nearest, and bf16 states rounded stochastically. Printed at each of ``--at`` steps, per optimizer:
the mean loss of the last 10 steps, the parameters' distance from the reference's relative to how
far the reference moved (``|w - w_ref| / |w_ref - w_0|``), and the median relative error of
``exp_avg_sq`` against the reference's.

    python -m bench.adamw_states                          # lr 1e-4, betas 0.9 / 0.999, 1,000 steps
    python -m bench.adamw_states --lr 1e-6 --steps 300
"""
from __future__ import annotations

import argparse

import torch

from medix_fast.config import DataConfig
from medix_fast.data.loader import load_examples
from medix_fast.demo.cache import resolve_model_path
from medix_fast.model.loading import load_model
from medix_fast.optim.adamw import OffloadAdamW

ROWS, TOKENS = 8, 64


def batches(tokenizer) -> torch.Tensor:
    """(N, ROWS, TOKENS) token ids, padded with the pad id (ignored by the loss)."""
    rows = [tokenizer(f"{e.problem}\n{e.solution}")["input_ids"][:TOKENS]
            for e in load_examples(["sample:train"], DataConfig())]
    ids = torch.full((len(rows) // ROWS * ROWS, TOKENS), tokenizer.pad_token_id, dtype=torch.long)
    for i, row in enumerate(rows[:len(ids)]):
        ids[i, :len(row)] = torch.tensor(row)
    return ids.view(-1, ROWS, TOKENS)


OPTIMIZERS = {
    "fp32 (torch)": lambda p, kw: torch.optim.AdamW(p, **kw),
    "fp32 offloaded": lambda p, kw: OffloadAdamW(p, **kw, offload=True),
    "bf16 nearest": lambda p, kw: OffloadAdamW(p, **kw, offload=True, state_dtype=torch.bfloat16),
    "bf16 stochastic": lambda p, kw: OffloadAdamW(p, **kw, offload=True, state_dtype=torch.bfloat16,
                                                 stochastic_rounding=True),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--at", type=int, nargs="+", default=[10, 100, 300, 1000])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    kw = dict(lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    runs = {}
    for name, make in OPTIMIZERS.items():
        model, tokenizer = load_model(resolve_model_path("tiny"))
        model.train()
        data = batches(tokenizer)
        params = [p for p in model.parameters() if p.requires_grad]
        start = torch.cat([p.detach().flatten() for p in params])
        optimizer, losses, seen = make(params, kw), [], {}
        for step in range(1, args.steps + 1):
            ids = data[(step - 1) % len(data)]
            labels = ids.masked_fill(ids == tokenizer.pad_token_id, -100)
            loss = model(input_ids=ids, attention_mask=ids != tokenizer.pad_token_id, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if step in args.at:
                seen[step] = (sum(losses[-10:]) / len(losses[-10:]),
                              torch.cat([p.detach().flatten() for p in params]),
                              torch.cat([optimizer.state[p]["exp_avg_sq"].float().flatten() for p in params]))
        runs[name] = seen
    reference = runs["fp32 (torch)"]
    print(f"lr {args.lr:g}, weight decay {args.weight_decay:g}, betas 0.9 / 0.999, {ROWS} x {TOKENS} tokens per step")
    print(f"{'step':>5} {'optimizer':<17} {'loss':>8} {'drift':>9} {'v rel err':>10}")
    for step in sorted(reference):
        _, w_ref, v_ref = reference[step]
        moved = (w_ref - start).norm()
        for name, seen in runs.items():
            loss, w, v = seen[step]
            err = ((v - v_ref).abs() / v_ref.abs().clamp_min(1e-30)).median().item()
            print(f"{step:>5} {name:<17} {loss:>8.4f} {((w - w_ref).norm() / moved).item():>9.2e} {err:>10.2e}")


if __name__ == "__main__":
    main()
