"""Worker for tests/test_moe.py: a two-rank job (tests/two_rank_jobs.py; gloo, CPU).

Each rank takes its half of the 4 image groups that test_moe.py builds on the tiny Qwen3-VL-MoE,
wraps the policy with FSDP2 (gloo, CPU, fp32), checks what is sharded (each decoder layer and
vision block a unit of its own; the expert banks split on the expert dimension, 2 of 4 experts
per rank), runs one ``Updater.update`` with the load-balancing loss on (one group per micro-batch,
as in the one process it is compared with: the loss is per micro-batch), and rank 0 saves the
gathered parameters and the metrics to ``OUT/fsdp_moe.pt``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.fsdp import FSDPModule

from test_moe import experts_of, image_sequences, updater_for

from medix_fast import distributed as D
from medix_fast.data.vision import Vision
from medix_fast.demo.cache import resolve_model_path
from medix_fast.model.loading import load_image_processor, load_model
from medix_fast.rl.batch import Sequences
from medix_fast.rl.update import PolicyObjective


def half(seqs: Sequences, rank: int, world: int) -> Sequences:
    per = len(seqs.completion_ids) // world
    rows = slice(rank * per, (rank + 1) * per)
    return Sequences(seqs.prompt_ids[rows], seqs.completion_ids[rows], seqs.sampling_logprobs[rows],
                     seqs.advantages[rows], seqs.group_size, seqs.images[rows])


def run(out: Path, info: D.DistInfo) -> None:
    model, tokenizer = load_model(resolve_model_path("tiny-vl-moe"))
    vision = Vision(load_image_processor(resolve_model_path("tiny-vl-moe")), model.config.image_token_id)
    seqs = half(image_sequences(model, tokenizer, vision, 4, seed=5), info.rank, info.world)
    objective = PolicyObjective(model, temperature=1.0, router_aux_coef=0.1)
    wrapped = D.wrap(objective, model, "fsdp", info, torch.float32)
    units = D.shard_units(model)
    assert len(units) == len(model.model.visual.blocks) + len(model.model.language_model.layers)
    assert all(isinstance(u, FSDPModule) for u in units)
    for bank in experts_of(model):
        assert bank.gate_up_proj.to_local().shape[0] == 4 // info.world, bank.gate_up_proj.to_local().shape
    metrics = updater_for(objective, model, info, wrapped=wrapped, groups=4, micro_batch_tokens=150).update(seqs)
    state = D.full_state_dict(wrapped, model)
    if info.is_main:
        torch.save({"state": state, "metrics": metrics}, out / "fsdp_moe.pt")
