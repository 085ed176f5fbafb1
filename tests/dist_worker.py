"""Worker for tests/test_distributed.py, a two-rank job (tests/two_rank_jobs.py: ``run``).

Each rank takes its half of the groups of the batch that test_update.py builds, runs one
``Updater.update`` under DDP and under FSDP2 (gloo, CPU; the KL reference sharded too), and rank 0 saves the full
parameters to ``OUT/<strategy>_<algorithm>.pt`` for the test to compare with one process.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_update import ALGORITHMS, G, MAX_NEW, make_sequences, tiny_model  # noqa: E402

from medix_fast import distributed as D  # noqa: E402
from medix_fast.config import AlgorithmConfig, SamplingConfig, TrainConfig  # noqa: E402
from medix_fast.rl.batch import Sequences  # noqa: E402
from medix_fast.rl.update import PolicyObjective, Updater  # noqa: E402

GROUPS = 4


def half(seqs: Sequences, rank: int, world: int) -> Sequences:
    per = len(seqs.completion_ids) // world
    rows = slice(rank * per, (rank + 1) * per)
    return Sequences(seqs.prompt_ids[rows], seqs.completion_ids[rows], seqs.sampling_logprobs[rows],
                     seqs.advantages[rows], seqs.group_size)


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
    D.close()


def run(out: Path, info: D.DistInfo) -> None:
    """The job: every algorithm test_distributed.py compares (``main`` finds the launch's group)."""
    from test_distributed import NAMES

    main(out, NAMES)
