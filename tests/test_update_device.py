"""The training update as a GPU runs it, checked on the CPU: the whole update (reference and old
log-probs, loss, backward, optimizer step) under bf16 autocast against the fp32 update, and the
host-device syncs of one update (``tests/syncs.py``) bounded independently of the batch size.

Run: pytest tests/test_update_device.py
"""
from __future__ import annotations

import pytest
import torch

from syncs import count_syncs
from test_update import ALGORITHMS, G, MAX_NEW, make_sequences, tiny_model

from medix_fast.config import AlgorithmConfig, SamplingConfig, TrainConfig
from medix_fast.distributed import DistInfo
from medix_fast.rl.update import PolicyObjective, Updater


def make_update(groups: int, mini_groups: int, autocast: torch.dtype | None = None):
    """Two mini-batches of one micro-batch each, k3 KL to a reference, recomputed old log-probs
    for the second; SGD so that the parameters carry the gradients. Returns (updater, sequences, model)."""
    model = tiny_model(0)
    seqs = make_sequences(groups, model=model)
    objective = PolicyObjective(model, temperature=0.8)
    a = AlgorithmConfig(old_logprobs="recompute", **ALGORITHMS["grpo_kl"])
    train = TrainConfig(prompts_per_step=groups, mini_batch_prompts=mini_groups, micro_batch_tokens=100_000)
    updater = Updater(objective, objective, torch.optim.SGD(model.parameters(), lr=0.5), a, train,
                      SamplingConfig(group_size=G, max_new_tokens=MAX_NEW), DistInfo(), pad_id=0,
                      ref_objective=PolicyObjective(tiny_model(5), 0.8), autocast_dtype=autocast, grad_clip=1.0)
    return updater, seqs, model


def run_update(groups: int, mini_groups: int, autocast: torch.dtype | None = None):
    updater, seqs, model = make_update(groups, mini_groups, autocast)
    return updater.update(seqs), model


def test_whole_update_under_bf16_autocast_matches_fp32():
    """Per parameter, the bf16 update is within 5 % of the fp32 one (bf16 rounding through two
    layers, forward and backward). The LM-head kernels run inside the autocast region and own their
    dtypes there."""
    want, fp32 = run_update(4, 2)
    got, bf16 = run_update(4, 2, autocast=torch.bfloat16)
    assert got["optimizer_steps"] == want["optimizer_steps"] == 2
    for key in ("loss", "kl", "ratio_mean", "grad_norm"):
        assert got[key] == pytest.approx(want[key], rel=2e-2, abs=1e-4), key
    errors = []
    for (name, p), q, p0 in zip(bf16.named_parameters(), fp32.parameters(), tiny_model(0).parameters()):
        errors.append(((p - q).norm() / (q - p0).norm()).item())
        assert errors[-1] < 5e-2, (name, errors[-1])
    assert max(errors) > 1e-4  # autocast really ran in bf16


BOUND = 16  # syncs of this two-mini-batch update today: 14 (4 reductions read, 10 in transformers' mask builder), whatever the batch size


@pytest.mark.parametrize("groups", [4, 12])
def test_host_syncs_of_one_update_do_not_grow_with_the_batch(groups):
    """4 groups (12 rows) and 12 groups (36 rows): one sync per row, or per group, would pass the bound."""
    updater, seqs, _ = make_update(groups, groups // 2)
    with count_syncs() as syncs:
        metrics = updater.update(seqs)
    assert metrics["optimizer_steps"] == 2
    assert syncs.count <= BOUND, "\n".join(syncs.where)
