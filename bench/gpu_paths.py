"""The GPU check's ``paths`` part: one section per path the performance parts do not run, each on an
embedded tiny model (the path is what is checked, not its speed), all in one process so that torch,
transformers and the trainer are started once:

  ddp         2 steps of ``python -m medix_fast.train`` on ``tiny``, ``distributed.strategy=ddp``,
              ``model.dtype=auto``: fp32 master weights, bf16 autocast compute on CUDA (fp32 on the
              CPU); one rank (one process: no DDP wrapper, as under a 1-rank torchrun), and 2 ranks
              under torchrun (NCCL) when 2 GPUs are there, else skipped with the reason. It is the
              straight run that the next two sections use (a checkpoint at each step).
  checkpoint  resume that run from its step-1 checkpoint into another folder: its step 2 must equal
              the straight run's (the step's metrics but timings, and every saved weight)
  eval        ``python -m medix_fast.eval`` on the straight run's step-2 checkpoint: time, scores, and
              whether they equal the held-out evaluation training logged for the same weights
  vl          2 steps of ``configs/tiny_vl.yaml`` (tiny-vl: the vision tower, images in the rollout)
  preemption  the sampler (its CUDA-graph decode; the same fixed-shape step run eagerly on the CPU)
              with a K/V pool capped far below what the rows need (through its ``agree`` hook, the same
              on every device), so rows are preempted and recomputed: its tokens must equal an
              uncapped call's; then the uncapped sampler, released (asleep with VMM, generate/vmm.py)
              and called again after an in-place weight update: tokens equal the eager decode's, and
              with VMM the pool at the same address and no new decoder
  routing     tiny-moe: one step with ``model.router_replay=true``, and the sampler's routing record
              (each token's experts) under the CUDA-graph decode against the eager one: ids equal

Each section has a share of the part's time (:data:`SECTIONS`; what one leaves goes to the next), a
section that raises is a failed row and the next one runs. ``part_paths`` is the entry point.
"""
from __future__ import annotations

import gc
import json
import math
import os
import tempfile
import time
import traceback
from dataclasses import dataclass, field

import torch

from bench.gpu_report import Row
from bench.gpu_train import QUIET, ROOT, metrics, train_rows

SECTIONS = {"ddp": 35.0, "checkpoint": 20.0, "eval": 15.0, "vl": 25.0, "preemption": 10.0, "routing": 20.0}  # s
TIMING = ("time/", "throughput/", "memory/")  # metrics that differ between equal runs
EVAL_ITEMS = 4
# small steps of the default run's config; the straight run adds a checkpoint (optimizer included) each step and
# the held-out evaluation of the last step's weights that the eval section compares with the command's
SMALL = ["train.prompts_per_step=2", "train.mini_batch_prompts=2", "sampling.group_size=2",
         "sampling.max_new_tokens=16", *QUIET]
STRAIGHT = [*SMALL, "eval.every=2", "eval.at_start=false", f"eval.limit={EVAL_ITEMS}", "eval.samples=0",
            "checkpoint.every=1", "checkpoint.keep_last=2"]


@dataclass
class Context:
    dry: bool
    device: torch.device
    work: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="medix_gpu_check_paths_"))
    straight: str = ""  # the ddp section's 1-rank run, when it finished

    @property
    def graphs(self) -> str:
        """The decode mode of the CUDA graphs: captured on CUDA, the same fixed-shape step eagerly on the CPU."""
        return "cuda_graph" if self.device.type == "cuda" else "static"

    def run_overrides(self, *extra: str) -> list[str]:
        return [f"train.device={self.device.type}", "model.dtype=auto", *extra]

    @property
    def precision(self) -> str:
        return "fp32 master + bf16 autocast" if self.device.type == "cuda" else "fp32"


def _close(a, b, tol: float) -> bool:
    if a == b:
        return True
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    return numbers and abs(a - b) <= tol * max(1.0, abs(a), abs(b))


def comparable(step: dict) -> dict:
    """A step's metrics without timings, NaN as None (NaN never equals itself)."""
    return {k: None if v != v else v for k, v in step.items() if not k.startswith(TIMING)}


# ----------------------------------------------------------------------------- sections
def section_ddp(ctx: Context, deadline: float, emit) -> None:
    shape = f"tiny, ddp, {ctx.precision}, 2 prompts x G=2, <= 16 new"
    out = os.path.join(ctx.work, "straight")
    steps = train_rows("ddp", ctx.run_overrides(*STRAIGHT), 2, 1,
                       deadline, emit, f"{shape}, 1 rank", out, case="1 rank")
    ctx.straight = out if len(steps) == 2 else ""
    gpus = torch.cuda.device_count()
    if ctx.dry or gpus < 2:
        why = "a dry run" if ctx.dry else f"{gpus} GPU"
        emit(Row("ddp", "2 ranks", status=f"skipped: {why}: two DDP ranks need 2 GPUs (one rank is one process "
                                          "without the DDP wrapper, distributed.wrap; the 2-rank launch is the sharded "
                                          "part's; tests/test_distributed.py runs DDP on 2 gloo ranks)"))
        return
    train_rows("ddp", ctx.run_overrides(*SMALL, "checkpoint.every=0", "checkpoint.save_optimizer=false"), 2, 2,
               deadline, emit, f"{shape}, 2 ranks (NCCL)", os.path.join(ctx.work, "ddp2"), case="2 ranks")


def section_checkpoint(ctx: Context, deadline: float, emit) -> None:
    from medix_fast import checkpoint as C
    from safetensors.torch import load_file

    if not ctx.straight:
        emit(Row("checkpoint", "resume", status="skipped: the straight run (ddp section) did not finish"))
        return
    step1 = C.checkpoint_root(ctx.straight) / "step_00000001"
    out = os.path.join(ctx.work, "resumed")
    t0 = time.perf_counter()
    steps = train_rows("checkpoint", ctx.run_overrides(*STRAIGHT), 2, 1,
                       deadline, emit, f"tiny, ddp, {ctx.precision}, from step 1", out, case="resumed",
                       resume=str(step1))
    seconds = time.perf_counter() - t0
    if not steps:
        return
    want = comparable(metrics(ctx.straight)[-1])
    got = comparable(steps[-1])
    # CUDA: a kernel may add in another order from run to run (an attention backward's atomics), so 1e-5 there
    tol = 1e-5 if ctx.device.type == "cuda" else 0.0
    differ = sorted(k for k in want.keys() | got.keys() if not _close(want.get(k), got.get(k), tol))
    weights = [os.path.join(root, "checkpoints", "step_00000002", "model", "model.safetensors")
               for root in (ctx.straight, out)]
    a, b = (load_file(w) for w in weights)
    delta = max((a[k].double() - b[k].double()).abs().max().item() for k in a) if a.keys() == b.keys() else math.inf
    ok = not differ and delta <= tol
    said = "differ: " + ", ".join(differ[:4]) if differ else "equal" if want == got else f"equal within {tol:g}"
    emit(Row("checkpoint", "resumed step 2 = straight step 2", shape=f"{len(a)} tensors, {len(want)} metrics",
             status="ok" if ok else f"failed: {', '.join(differ[:4]) or 'weights'} differ (max |dw| {delta:.3g})",
             ms=1e3 * seconds, note=f"metrics {said}; weights max |dw| {delta:.3g}{' (bitwise)' if delta == 0 else ''}; "
                                    "ms: the resumed run, load included"))


def section_eval(ctx: Context, deadline: float, emit) -> None:
    from medix_fast.eval import main as eval_main

    if not ctx.straight:
        emit(Row("eval", "python -m medix_fast.eval", status="skipped: the straight run (ddp section) did not finish"))
        return
    model = os.path.join(ctx.straight, "checkpoints", "step_00000002", "model")
    out = os.path.join(ctx.work, "eval")
    t0 = time.perf_counter()
    code = eval_main(["--model", model, "--limit", str(EVAL_ITEMS), "--max-new-tokens", "16", "--out", out,
                      "--device", ctx.device.type])
    seconds = time.perf_counter() - t0
    path = os.path.join(out, "summary.json")
    summary = json.load(open(path))["micro"] if os.path.exists(path) else {}
    logged = metrics(ctx.straight)[-1]
    keys = ("accuracy", "format", "overall")
    same = all(abs(summary.get(k, math.nan) - logged.get(f"eval/{k}", math.nan)) <= 1e-9 for k in keys)
    ok = code == 0 and summary.get("n") == EVAL_ITEMS
    emit(Row("eval", "python -m medix_fast.eval", shape=f"step-2 checkpoint, {EVAL_ITEMS} held-out items, greedy",
             status="ok" if ok else f"failed: exit {code}, {summary.get('n', 0)} items scored", ms=1e3 * seconds,
             note=", ".join(f"{k} {summary.get(k, math.nan):.3g}" for k in keys)
             + ("; equal to training's held-out evaluation of the same weights" if same else
                "; differs from training's held-out evaluation: " + ", ".join(
                    f"{k} {logged.get(f'eval/{k}', math.nan):.3g}" for k in keys))))


def section_vl(ctx: Context, deadline: float, emit) -> None:
    overrides = ["--config", os.path.join(ROOT, "configs", "tiny_vl.yaml"),
                 *ctx.run_overrides(*SMALL, "checkpoint.every=0", "checkpoint.save_optimizer=false")]
    train_rows("vl", overrides, 2, 1, deadline, emit, f"tiny-vl (Qwen2.5-VL), {ctx.precision}, 2 prompts x G=2",
               os.path.join(ctx.work, "vl"))


def _prompts(tokenizer, count: int) -> list[list[int]]:
    from medix_fast.config import DataConfig
    from medix_fast.data import build_prompts, load_examples

    return [p.ids for p in build_prompts(load_examples(["sample:test"], DataConfig())[:count], tokenizer, 4096)[0]]


def _fp32(name: str, device: torch.device):
    """An embedded tiny model in fp32, eval mode: sampled in fp32 (the sampler's default on CUDA is bf16), its
    tokens do not move with the batch's shapes."""
    from medix_fast.demo.cache import resolve_model_path
    from medix_fast.model.loading import load_model

    model, tokenizer = load_model(resolve_model_path(name), dtype=torch.float32, device=device)
    return model.eval(), tokenizer


def section_preemption(ctx: Context, deadline: float, emit) -> None:
    from medix_fast.generate import Sampler

    model, tokenizer = _fp32("tiny", ctx.device)
    prompts = _prompts(tokenizer, 6)
    # top-k 20: a token sampled from the far tail (p ~ 1e-7) can flip with the last bits of the logits, which
    # move with how the prefill packs its prompts, preempted or not; no top-20 boundary is that close
    kw = dict(n=4, max_new_tokens=32, temperature=1.0, top_k=20, stop_token_ids=[], seed=7)
    free = Sampler(model, max_num_seqs=32, dtype=torch.float32, decode_mode=ctx.graphs)
    t0 = time.perf_counter()
    want = free.generate(prompts, **kw)
    free_ms = 1e3 * (time.perf_counter() - t0)
    size, address = free.pool.block_size, free.pool.kv.data_ptr()
    need = max(-(-(len(p) - 1) // size) for p in prompts) + -(-kw["max_new_tokens"] // size)  # one row alone
    cap = need + 2  # a row alone fits, a few at once do not
    free.release()
    tight = Sampler(model, max_num_seqs=32, dtype=torch.float32, decode_mode=ctx.graphs,
                    agree=lambda blocks: min(blocks, cap))
    t0 = time.perf_counter()
    got = tight.generate(prompts, **kw)
    ms = 1e3 * (time.perf_counter() - t0)
    rows = sum(a == b for a, b in zip(got.completion_ids, want.completion_ids))
    dlogp = max((a - b).abs().max().item() for a, b in zip(got.logprobs, want.logprobs))
    pre = tight.stats.preemptions
    tight.release()
    with torch.no_grad():  # an optimizer step, in place; the released sampler (asleep with VMM) goes on
        for p in model.parameters():
            p.mul_(1.01)
    again = free.generate(prompts, **kw)
    eager = Sampler(model, max_num_seqs=32, dtype=torch.float32, decode_mode="eager").generate(prompts, **kw)
    updated = sum(a == b for a, b in zip(again.completion_ids, eager.completion_ids))
    kept = not free.sleeps or (free.pool.kv.data_ptr() == address and free.decoders_built == 1)
    ok = pre > 0 and rows == len(want.completion_ids)
    status = "ok" if ok else (f"failed: no row preempted at {cap} blocks" if not pre else
                              f"failed: {len(want.completion_ids) - rows} of {len(want.completion_ids)} rows differ")
    if ok and not (kept and updated == len(want.completion_ids)):
        status = "failed: after a release and an update: " + ("the pool moved or the graphs were made again"
                                                             if not kept else "tokens differ from eager")
    emit(Row("preemption", "capped pool = uncapped",
             shape=f"tiny fp32, {len(prompts)} prompts x 4, 32 new, top-k 20, {ctx.graphs}, "
                   f"pool {cap} of {free.stats.peak_blocks} blocks",
             status=status, ms=ms, note=f"{pre} preemptions, {rows}/{len(want.completion_ids)} rows' tokens equal, "
                                        f"max |dlogp| {dlogp:.2g}; uncapped {free_ms:,.0f} ms; after a release "
                                        f"and an update {updated} rows equal eager, VMM "
                                        + ("on: same pool address, one decoder" if free.sleeps else "off")))
    free.release()


def section_routing(ctx: Context, deadline: float, emit) -> None:
    from medix_fast.generate import Sampler

    overrides = ctx.run_overrides("model.path=tiny-moe", "model.router_replay=true", *SMALL, "checkpoint.every=0",
                                  "checkpoint.save_optimizer=false")
    train_rows("routing", overrides, 1, 1, deadline, emit, f"tiny-moe, router_replay, {ctx.precision}",
               os.path.join(ctx.work, "moe"), case="router_replay")
    model, tokenizer = _fp32("tiny-moe", ctx.device)
    prompts = _prompts(tokenizer, 3)
    kw = dict(n=3, max_new_tokens=16, temperature=1.0, stop_token_ids=[], seed=3)
    eager = Sampler(model, record_routing=True, dtype=torch.float32, decode_mode="eager").generate(prompts, **kw)
    shape = f"tiny-moe fp32, {len(prompts)} prompts x 3, 16 new, {ctx.graphs} vs eager"
    graphs = Sampler(model, record_routing=True, dtype=torch.float32, decode_mode=ctx.graphs)
    t0 = time.perf_counter()
    got = graphs.generate(prompts, **kw)
    ms = 1e3 * (time.perf_counter() - t0)
    tokens = sum(r.shape[0] for r in eager.routing)
    same_ids = got.completion_ids == eager.completion_ids
    same = same_ids and all(torch.equal(a, b) for a, b in zip(got.routing, eager.routing))
    emit(Row("routing", "record: graphs = eager", shape=shape, ms=ms,
             status="ok" if same else f"failed: {'tokens' if not same_ids else 'expert ids'} differ",
             note=f"{tokens} tokens x {eager.routing[0].shape[1]} layers x top-{eager.routing[0].shape[2]} ids "
                  f"{'equal' if same else 'differ'}"))


FUNCS = {"ddp": section_ddp, "checkpoint": section_checkpoint, "eval": section_eval, "vl": section_vl,
         "preemption": section_preemption, "routing": section_routing}


def part_paths(dry: bool, deadline: float, emit) -> None:
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    ctx = Context(dry, device)
    names = list(SECTIONS)
    scale = max(0.0, deadline - time.time()) / sum(SECTIONS.values()) if math.isfinite(deadline) else 1.0
    for i, name in enumerate(names):
        later = sum(SECTIONS[n] for n in names[i + 1:]) * scale
        limit = deadline - time.time() - later  # its share plus what earlier sections left
        if limit < 3:
            emit(Row(name, "section", status="skipped: time budget"))
            continue
        print(f"[gpu-check] paths: {name}, up to {limit:.0f} s", flush=True)
        try:
            FUNCS[name](ctx, time.time() + limit, emit)
        except Exception as exc:  # a row, not the end of the part
            traceback.print_exc()
            emit(Row(name, "section", status=f"failed: {type(exc).__name__}: {exc}"[:200]))
        gc.collect()  # the section's trainer and K/V pools, before the next sizes its memory
        if device.type == "cuda":
            torch.cuda.empty_cache()
