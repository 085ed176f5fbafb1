"""Partial rollouts against synchronous ones on the long-tail workload, side by side in one run.

    python -m bench --only partial

bench/bench_sampler.py's long-tail workload (its CPU model, prompts, stop set and ``max_num_seqs``)
as a rollout of several steps: each step draws P fresh prompts x G rows. ``synchronous`` decodes
every row of the step to its end; ``medix_fast`` (``rollout.partial``, rl/carry.py: the trainer's
own bookkeeping) stops each call once ``stop_share`` of its rows are done and carries the rest into
the next step's call (their K/V recomputed there, as under updated weights), every group finished
within ``max_staleness`` steps. A third row, ``uniform``, samples the same number of rows per call
at the long tail's mean length with stopping off: the throughput a tail-free call reaches, so
``tail efficiency`` = a mode's sampled tokens per second / uniform's.

The figure that matters for training is trained tokens per second: completion tokens of the
groups finished in a step (the ones the update gets) over the steps' sampling time. Notes give
the decode steps and their mean rows (occupancy of ``max_num_seqs``), trained tokens per decode
step, the carried tokens recomputed, the tokens trained by staleness (steps between drawing and
training) and the share of trained tokens drawn by an older policy. On a CPU a decode step's time
grows with its rows (the maths dominates), so a step with few rows costs little and the tail wastes
little: trained tokens per second show what the recompute costs there. On a GPU a decode step of up
to ``max_num_seqs`` rows costs about the same (the weights are read once), so trained tokens per
decode step is the speed-up, less the recompute's prefill. The weights do not change between calls
here: only the sampler's time is measured.
"""
from __future__ import annotations

import time

import torch

from .bench_sampler import CPU_MODEL, GPU_MODEL, SMOKE_MODEL, STOPS, WORKLOADS, random_model, random_prompts
from .case import SUBJECT
from .timing import PeakMemory

STEPS, STOP_SHARE, MAX_STALENESS = 6, 0.9, 1


def _rollout(sampler, prompts, g: int, new: int, steps: int, share: float | None) -> dict:
    """``steps`` calls of fresh ``len(prompts) / steps`` prompts each (with the carried rows when
    ``share``); totals of time, sampled and trained tokens, decode steps, staleness, peak memory."""
    from medix_fast.rl.carry import Carry, staleness_tokens

    carry, per = Carry(g), len(prompts) // steps
    memory = PeakMemory(next(sampler.model.parameters()).device)
    memory.start()
    out = dict(seconds=0.0, sampled=0, trained=0, decode_steps=0, recomputed=0, stale={})
    for step in range(steps):
        ids = list(range(step * per, (step + 1) * per))
        call = carry.call(ids, step, seed=step, max_staleness=MAX_STALENESS)
        before = sum(len(t) for p, rows in call.entries for t in p.tokens)
        start = time.perf_counter()
        result = sampler.generate([prompts[i] for i in call.prompts], n=call.counts, max_new_tokens=new,
                                  stop_token_ids=STOPS, row_seeds=call.seeds, continued=call.continued,
                                  stop_share=share, required=call.required)
        out["seconds"] += time.perf_counter() - start
        out["sampled"] += sum(len(c) for c in result.completion_ids) - before
        out["recomputed"] += before  # the carried rows' tokens, prefilled again
        out["decode_steps"] += sampler.stats.steps
        done = carry.absorb(call, result, step)
        out["trained"] += sum(len(t) for p in done for t in p.tokens)
        for age, n in staleness_tokens(done, step).items():
            out["stale"][age] = out["stale"].get(age, 0) + n
    out["carried"], out["peak_mb"] = len(carry.pending), memory.stop()
    return out


def run(smoke: bool = False) -> list[dict]:
    from medix_fast.generate import Sampler

    gpu = torch.cuda.is_available() and not smoke
    device = torch.device("cuda" if gpu else "cpu")
    fields = SMOKE_MODEL if smoke else (GPU_MODEL if gpu else CPU_MODEL)
    dtype = torch.bfloat16 if gpu else torch.float32
    prompts_n, g, new, _, max_num_seqs = WORKLOADS["long-tail"]
    steps = 2 if smoke else STEPS
    per, new = (2, 8) if smoke else (prompts_n // 2, 384)  # 32 prompts x 8 per step on the CPU: minutes, not hours
    model = random_model(fields, device, dtype)
    prompts = random_prompts(per * steps, fields["vocab_size"], *((4, 12) if smoke else (32, 128)), low=len(STOPS) + 1)
    sampler = Sampler(model, max_num_seqs=max_num_seqs, kv_cache_gb=4.0)
    sampler.generate(prompts[:per], n=g, max_new_tokens=min(new, 16), stop_token_ids=[], seed=0)  # warm-up
    shape = (f"{'Qwen3-1.7B shape bf16' if gpu else 'Qwen2 ~3M fp32' if not smoke else 'smoke'}, {steps} steps x "
             f"{per} prompts x G={g}, <= {new} new, max_num_seqs {max_num_seqs}")
    runs = {"synchronous": _rollout(sampler, prompts, g, new, steps, None),
            SUBJECT: _rollout(sampler, prompts, g, new, steps, STOP_SHARE)}
    mean_len = max(1, round(runs["synchronous"]["sampled"] / (per * steps * g)))
    start = time.perf_counter()
    uniform_steps = 0
    for step in range(steps):  # the same rows per call at the mean length, nothing stops early: no tail
        sampler.generate(prompts[step * per:(step + 1) * per], n=g, max_new_tokens=mean_len, stop_token_ids=[],
                         seed=step)
        uniform_steps += sampler.stats.steps
    uniform_s = time.perf_counter() - start
    uniform_rate = per * steps * g * mean_len / uniform_s
    sync_rate = runs["synchronous"]["trained"] / runs["synchronous"]["seconds"]
    sync_per_step = runs["synchronous"]["trained"] / max(runs["synchronous"]["decode_steps"], 1)
    rows = [dict(case="long-tail rollout", impl="uniform", shape=shape, tokens=per * steps * g * mean_len,
                 median_ms=uniform_s * 1e3 / steps, p20_ms=uniform_s * 1e3 / steps, p80_ms=uniform_s * 1e3 / steps,
                 throughput=uniform_rate, throughput_unit="sampled tok/s",
                 note=f"every row {mean_len} tokens (the long tail's mean), stopping off; "
                      f"occupancy {per * steps * g * mean_len / uniform_steps / max_num_seqs:.2f}")]
    for impl, r in runs.items():
        trained_rate = r["trained"] / r["seconds"]
        stale = ", ".join(f"{age}: {n}" for age, n in sorted(r["stale"].items()))
        off = sum(n for age, n in r["stale"].items() if age) / max(r["trained"], 1)
        rows.append(dict(
            case="long-tail rollout", impl=impl, shape=shape, tokens=r["trained"], median_ms=r["seconds"] * 1e3 / steps,
            p20_ms=r["seconds"] * 1e3 / steps, p80_ms=r["seconds"] * 1e3 / steps, reps=steps, peak_mb=r["peak_mb"],
            throughput=trained_rate, throughput_unit="trained tok/s",
            note=(f"tail efficiency {r['sampled'] / r['seconds'] / uniform_rate:.2f} (sampled tok/s / uniform's); "
                  f"trained tok/s x{trained_rate / sync_rate:.2f} synchronous; {r['decode_steps']:,} decode steps, "
                  f"occupancy {r['sampled'] / max(r['decode_steps'], 1) / max_num_seqs:.2f}; trained tokens per "
                  f"decode step {r['trained'] / max(r['decode_steps'], 1):.1f} (x"
                  f"{r['trained'] / max(r['decode_steps'], 1) / sync_per_step:.2f} synchronous); "
                  f"{r['recomputed']:,} tokens recomputed; trained tokens by staleness "
                  f"{{{stale}}}, off-policy {off:.3f}; groups in flight at the end {r['carried']}"
                  + (f"; stop_share {STOP_SHARE}, max_staleness {MAX_STALENESS}" if impl == SUBJECT else ""))))
    return rows
