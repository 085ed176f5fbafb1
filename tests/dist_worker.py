"""Worker for tests/test_distributed.py, a two-rank job (tests/two_rank_jobs.py: ``run``).

Each rank takes its half of the groups of the batch that test_update.py builds, runs one
``Updater.update`` under DDP and under FSDP2 (gloo, CPU; the KL reference sharded too), and rank 0 saves the full
parameters to ``OUT/<strategy>_<algorithm>.pt`` for the test to compare with one process. The LoRA case
(:func:`lora_update`, ``OUT/lora_<strategy>.pt``) does the same with adapters on a frozen base, the KL taken to
the base with the adapters off, and saves what DDP reduced and what the optimizer holds.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

sys.path.insert(0, str(Path(__file__).parent))
from test_update import ALGORITHMS, G, MAX_NEW, make_sequences, tiny_model  # noqa: E402

from medix_fast import distributed as D  # noqa: E402
from medix_fast.config import AlgorithmConfig, LoraConfig, SamplingConfig, TrainConfig  # noqa: E402
from medix_fast.model.lora import AdaptersOff, adapter_parameters, add_adapters  # noqa: E402
from medix_fast.rl.batch import Sequences  # noqa: E402
from medix_fast.rl.update import PolicyObjective, Updater  # noqa: E402

GROUPS = 4
LORA = LoraConfig(rank=4, alpha=8)  # the 7 decoder linears of every layer


def half(seqs: Sequences, rank: int, world: int) -> Sequences:
    per = len(seqs.completion_ids) // world
    rows = slice(rank * per, (rank + 1) * per)
    return Sequences(seqs.prompt_ids[rows], seqs.completion_ids[rows], seqs.sampling_logprobs[rows],
                     seqs.advantages[rows], seqs.group_size)


def lora_model():
    """``tiny_model(0)`` with rank-4 adapters, their factors random (a fresh B is zero: no KL, no gradient of A)."""
    model = tiny_model(0)
    add_adapters(model, LORA)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def lora_update(seqs: Sequences, info: D.DistInfo, strategy: str = "ddp", reference=None) -> tuple[dict, dict]:
    """One grpo_kl update (two PPO epochs, two optimizer steps) of :func:`lora_model`, the KL reference
    its adapters-off base (or the model ``reference``), wrapped by ``strategy`` (one process: as is).
    Returns the metrics and ``{"state": full state dict, "reduced": parameter names DDP all-reduced,
    "held": (name, sharded) of what the optimizer holds}`` (the state empty on ranks but 0 under FSDP2)."""
    model = lora_model()
    objective = PolicyObjective(model, temperature=1.0)
    wrapped = D.wrap(objective, model, strategy, info, torch.float32)
    names = {id(p): n for n, p in model.named_parameters()}  # the model's own (under FSDP2 its DTensors)
    reduced = set()
    if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):  # DDP's own averaging, each bucket named

        def named_allreduce(group, bucket):
            reduced.update(names[id(p)] for p in bucket.parameters())
            return allreduce_hook(group, bucket)
        wrapped.register_comm_hook(None, named_allreduce)
    trained = [p for p in wrapped.parameters() if p.requires_grad]  # as the trainer builds AdamW
    opt = torch.optim.SGD(trained, lr=0.5)
    held = [(names[id(p)], p.to_local().numel() < p.numel() if hasattr(p, "to_local") else False) for p in trained]
    a = AlgorithmConfig(old_logprobs="recompute", ppo_epochs=2, **ALGORITHMS["grpo_kl"])
    train = TrainConfig(prompts_per_step=GROUPS, mini_batch_prompts=GROUPS, micro_batch_tokens=40)
    updater = Updater(objective, wrapped, opt, a, train, SamplingConfig(group_size=G, max_new_tokens=MAX_NEW), info,
                      pad_id=0, grad_clip=1.0, ref_objective=AdaptersOff(objective, model) if reference is None
                      else PolicyObjective(reference, 1.0))
    metrics = updater.update(seqs)
    return metrics, {"state": D.full_state_dict(wrapped, model), "reduced": sorted(reduced), "held": held}


def main(out: Path, names: list[str]) -> None:
    info = D.init_distributed("cpu", "gloo")
    base = tiny_model(0)
    seqs = half(make_sequences(GROUPS, model=base), info.rank, info.world)
    for strategy in ("ddp", "fsdp"):
        for name in names:
            model = tiny_model(0)
            objective = PolicyObjective(model, temperature=1.0)
            wrapped = D.wrap(objective, model, strategy, info, torch.float32)
            opt = torch.optim.SGD([p for p in wrapped.parameters()], lr=0.5)
            a = AlgorithmConfig(old_logprobs="recompute", ppo_epochs=2, **ALGORITHMS[name])
            train = TrainConfig(prompts_per_step=GROUPS, mini_batch_prompts=GROUPS, micro_batch_tokens=40)
            ref = None
            if a.beta:  # the KL reference, sharded too under FSDP2
                ref_model = tiny_model(5)
                ref = D.shard_reference(PolicyObjective(ref_model, 1.0), ref_model, strategy, info, torch.float32)
                local = sum(getattr(p, "to_local", lambda p=p: p)().numel() for p in ref.parameters())
                full = sum(p.numel() for p in ref.parameters())
                assert (local < full) == (strategy == "fsdp"), (strategy, local, full)  # 1/world per rank
            updater = Updater(objective, wrapped, opt, a, train, SamplingConfig(group_size=G, max_new_tokens=MAX_NEW),
                              info, pad_id=0, ref_objective=ref, grad_clip=1.0)
            metrics = updater.update(seqs)
            state = D.full_state_dict(wrapped, model)
            if info.is_main:
                torch.save({"state": state, "metrics": metrics}, out / f"{strategy}_{name}.pt")
        metrics, saved = lora_update(seqs, info, strategy)
        if info.is_main:
            torch.save({"metrics": metrics, **saved}, out / f"lora_{strategy}.pt")
    D.close()


def run(out: Path, info: D.DistInfo) -> None:
    """The job: every algorithm test_distributed.py compares (``main`` finds the launch's group)."""
    from test_distributed import NAMES

    main(out, NAMES)
