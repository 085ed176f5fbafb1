"""Worker for tests/test_tensor_parallel.py: two two-rank jobs (tests/two_rank_jobs.py; gloo, CPU).

    engine(OUT, info)    # GroupSampler(k = 2) against one Sampler on the whole policy
    train(OUT, info)     # a training step with sampling.tensor_parallel 1 and 2, a resume across

engine: on tiny (Qwen2: q/k/v biases), tiny-VL (Qwen2.5-VL, images; its attention derives the head size
from hidden / heads), tiny-MoE (with the routing record) and tiny-VL-MoE (images), each rank
samples its own prompts (uneven counts; rank 1 also sits one call out) with the group sampler, and
with a Sampler on the unsharded weights; a pool small enough to preempt on the MoE model (rank 1
given a larger K/V budget: the group must use the smaller). Then tiny-MoE with LoRA adapters on its
linears and experts: the group sampler's greedy tokens (its copy's shares folded, ``W + s B A``)
against a Sampler on the single-process model with the adapters merged, over two calls with the
copy kept and the adapters updated between them.
train: two Trainer steps with sampling.tensor_parallel 1 (FSDP2), a checkpoint after the first; the
second step again by a Trainer with 2 resumed from that checkpoint, then its held-out evaluation.
Rank r writes ``OUT/<part>_rank<r>.pt`` for the test to compare.
"""
from __future__ import annotations

from pathlib import Path

import torch

from medix_fast import distributed as D
from medix_fast.demo.cache import resolve_model_path
from medix_fast.generate import GroupSampler, Sampler

PROMPTS = {0: [[1, 5, 7, 9, 11, 13], [3, 4, 5]], 1: [[8, 9, 10, 11, 12, 13, 14]]}


def samples(sampler, prompts, images, seed, **kw):
    out = sampler.generate(prompts, n=3, max_new_tokens=20, stop_token_ids=[], seed=seed, images=images, **kw)
    return {"tokens": out.completion_ids, "logprobs": [lp.cpu() for lp in out.logprobs],
            "routing": [r.cpu() for r in out.routing] if out.routing is not None else None}


def in_pieces(group, prompts, images, seed) -> tuple[list[list[int]], int]:
    """The call of ``samples`` stopped at half of the group's rows, its unfinished rows continued by
    later calls (one more stopped at half, then one to the end); every rank takes part in each call,
    with no rows when it has none left. Returns the tokens and how many rows the first call left."""
    seeds = [(seed, k) for k in range(3 * len(prompts))]
    out = group.generate(prompts, n=3, max_new_tokens=40, row_seeds=seeds, images=images, stop_share=0.5)
    tokens, logps, reasons = list(out.completion_ids), list(out.logprobs), list(out.finish_reasons)
    cut = reasons.count("partial")
    for share in (0.5, None):
        left = [k for k, r in enumerate(reasons) if r == "partial"]
        nxt = group.generate([prompts[k // 3] for k in left], n=1, max_new_tokens=40,
                             row_seeds=[seeds[k] for k in left], continued=[(tokens[k], logps[k]) for k in left],
                             images=None if images is None else [images[k // 3] for k in left], stop_share=share)
        for j, k in enumerate(left):
            tokens[k], logps[k], reasons[k] = nxt.completion_ids[j], nxt.logprobs[j], nxt.finish_reasons[j]
    return tokens, cut


def engine(out: Path, info: D.DistInfo) -> None:
    from medix_fast.config import DataConfig
    from medix_fast.data.loader import build_prompts, load_examples
    from medix_fast.data.vision import Vision, load_image
    from medix_fast.model.loading import load_image_processor, load_model

    results = {}
    for name in ("tiny", "tiny-vl", "tiny-moe", "tiny-vl-moe"):
        path = resolve_model_path(name)
        model, tokenizer = load_model(path, dtype=torch.float32, device="cpu")
        prompts, images = PROMPTS[info.rank], None
        if name.startswith("tiny-vl"):  # the VL sample's prompts with their images: 2 on rank 0, 1 on rank 1
            vision = Vision(load_image_processor(path), model.config.image_token_id)
            built = build_prompts(load_examples(["sample:train_vl"], DataConfig())[:3], tokenizer, 4096, vision)[0]
            built = built[:2] if info.rank == 0 else built[2:]
            prompts, images = [p.ids for p in built], [vision.encode([load_image(p.image)]) for p in built]
        record = name == "tiny-moe"
        engine_kw = dict(max_num_seqs=4, kv_cache_gb=3.5e-5 if record else 0.01, record_routing=record)
        whole = Sampler(model, **engine_kw)
        if record:  # rank 1's budget is larger: the group must agree on rank 0's pool, or its schedules part
            engine_kw["kv_cache_gb"] *= 1 + 100 * info.rank
        group = GroupSampler(model, 2, info, torch.float32, **engine_kw)
        result = {"alone": samples(whole, prompts, images, 10 + info.rank)}
        result["alone_preemptions"] = whole.stats.preemptions
        result["alone_greedy"] = samples(whole, prompts, images, 0, temperature=0)
        with group.weights():
            result["group"] = samples(group, prompts, images, 10 + info.rank)
            result["preemptions"] = group.stats.preemptions
            result["group_greedy"] = samples(group, prompts, images, 0, temperature=0)
            sat_out = group.generate([] if info.rank == 1 else prompts, n=2, max_new_tokens=4,
                                     images=None if info.rank == 1 or images is None else images)
            result["sat_out"] = sat_out.completion_ids
            if name in ("tiny", "tiny-vl"):  # partial calls (generate/partial.py) over the group's union
                whole_call = group.generate(prompts, n=3, max_new_tokens=40, seed=21, images=images)
                result["pieces"] = (*in_pieces(group, prompts, images, 21), whole_call.completion_ids)
        result["weights_after"] = str(next(group.copy.model.parameters()).device)
        results[name] = result
    results["lora"] = lora(info)
    torch.save(results, out / f"engine_rank{info.rank}.pt")


def lora(info: D.DistInfo) -> dict:
    """tiny-MoE with adapters (linears and experts, B non-zero), the same on both ranks: each call's
    greedy tokens from the group (its copy kept across the in-place update of the adapters between
    the calls) and from a Sampler on the plain model loaded with the merged weights."""
    from medix_fast.config import LoraConfig
    from medix_fast.model.loading import load_model
    from medix_fast.model.lora import adapter_parameters, add_adapters, merged_state_dict

    path = resolve_model_path("tiny-moe")
    model, _ = load_model(path, dtype=torch.float32, device="cpu")
    torch.manual_seed(7)  # A's initialisation: the same on both ranks
    add_adapters(model, LoraConfig(rank=4, alpha=8, experts=True))
    g = torch.Generator().manual_seed(7)
    group = GroupSampler(model, 2, info, torch.float32, max_num_seqs=4, kv_cache_gb=0.01)
    kw = dict(n=2, max_new_tokens=12, temperature=0, stop_token_ids=[])
    result = {}
    for call in range(2):
        with torch.no_grad():  # B random (fresh it is zero), then an update
            for p in adapter_parameters(model):
                p.add_(torch.randn(p.shape, generator=g), alpha=0.1)
        with group.weights(keep=True):
            result[f"group{call}"] = group.generate(PROMPTS[info.rank], **kw).completion_ids
        merged, _ = load_model(path, dtype=torch.float32, device="cpu")
        merged.load_state_dict(merged_state_dict(model))
        result[f"merged{call}"] = Sampler(merged, max_num_seqs=4).generate(PROMPTS[info.rank], **kw).completion_ids
    return result


def train(out: Path, info: D.DistInfo) -> None:
    from medix_fast.config import load_config
    from medix_fast.eval.evaluator import Evaluator
    from medix_fast.trainer import Trainer

    def trainer(k: int, run: str, resume: str | None = None) -> Trainer:
        cfg = load_config(None, [f"sampling.tensor_parallel={k}", "distributed.strategy=fsdp", "train.steps=2",
                                 "train.prompts_per_step=4", "train.mini_batch_prompts=2", "sampling.group_size=4",
                                 "sampling.max_new_tokens=24", "eval.every=0", "checkpoint.every=1",
                                 "checkpoint.async_save=false", "logging.progress=false", "logging.tensorboard=false",
                                 "logging.plot=false", "distributed.heartbeat_s=0", f"train.output_dir={out / run}"])
        return Trainer(cfg, resume=resume)

    def step(t: Trainer) -> dict:
        metrics = t.train_step()
        return {"metrics": {k: v for k, v in metrics.items() if not k.startswith(("time/", "throughput/", "memory/"))},
                "state": D.full_state_dict(t.wrapped, t.model)}

    results = {}
    whole = trainer(1, "tp1")
    results["tp1_step1"] = step(whole)
    whole.save()
    results["tp1_step2"] = step(whole)
    resumed = trainer(2, "tp2", resume=str(out / "tp1" / "checkpoints" / "step_00000001"))
    results["tp2_step2"] = step(resumed)
    # held-out evaluation on the group sampler: 3 items over 2 ranks in batches of 1 per rank (the evaluator's
    # batch is the sampler's max_num_seqs), so rank 1 sits out the last greedy call and the last pass@2 call
    resumed.sampler.max_num_seqs = 1
    resumed.evaluator = Evaluator.from_config(
        load_config(None, ["data.val_files=[sample:test]", "eval.every=1", "eval.limit=3", "eval.samples=2",
                           "sampling.max_new_tokens=12"]), resumed.tokenizer, resumed.info)
    results["tp2_eval"] = resumed.evaluate(2)
    torch.save(results, out / f"train_rank{info.rank}.pt")
