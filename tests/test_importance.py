"""Masked importance sampling (``kernels/importance.py``) against fp64, and in the update: a
dropped sequence is one whose advantage is zero (its policy-gradient term goes), and
the mismatch warning of ``old_logprobs: recompute`` comes once, only without a correction.

Run: pytest tests/test_importance.py
"""
from __future__ import annotations

import copy
import logging
import math

import pytest
import torch

from test_update import ALGORITHMS, G, make_sequences, run_updater, seq_logprobs, tiny_model

from medix_fast.config import AlgorithmConfig
from medix_fast.kernels.importance import mis_keep, mis_log_ratio


def reference_log_ratio(old, sampling, lengths, level):
    out = []
    for o, s, n in zip(old.double(), sampling.double(), lengths):
        d = (o[:n] - s[:n]).sum()
        out.append(d / max(n, 1) if level == "geometric" else d)
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("level", ["sequence", "geometric"])
def test_keep_mask_matches_fp64(dtype, level):
    """Odd shapes, empty rows, padding holding garbage (it must not count)."""
    g = torch.Generator().manual_seed(3)
    b, c = 37, 13
    sampling = -torch.rand(b, c, generator=g, dtype=torch.float64) * 4
    old = sampling + torch.randn(b, c, generator=g, dtype=torch.float64) * 0.3
    lengths = torch.randint(0, c + 1, (b,), generator=g).tolist()
    mask = (torch.arange(c) < torch.tensor(lengths)[:, None]).float()
    old = torch.where(mask.bool(), old, torch.full_like(old, 50.0)).to(dtype)  # garbage past the end
    sampling = sampling.to(dtype)
    want = reference_log_ratio(old, sampling, lengths, level)
    got = mis_log_ratio(old, sampling, mask, level)
    assert got.dtype == torch.promote_types(dtype, torch.float32)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6 if dtype != torch.float64 else 1e-12)
    cap = 1.5 if level == "sequence" else 1.1
    keep = mis_keep(old, sampling, mask, cap, level)
    far = (want.abs() - math.log(cap)).abs() > 1e-4  # away from the boundary, rounding cannot flip it
    assert torch.equal(keep[far], (want.abs() <= math.log(cap)).float()[far])
    assert 0 < keep.sum() < b and keep[torch.tensor(lengths) == 0].eq(1).all()


def test_bad_options_are_refused():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="cap must be > 1"):
        mis_keep(x, x, x, 1.0)
    with pytest.raises(ValueError, match="level must be one of"):
        mis_keep(x, x, x, 2.0, "token")


@pytest.mark.parametrize("level, mini_groups", [("sequence", 4), ("geometric", 2)])
def test_dropped_sequences_weigh_like_zero_advantages(level, mini_groups):
    """One on-policy mini-batch (its MIS from the mismatch forward) or two (recomputed old)."""
    model = tiny_model(0)
    seqs = make_sequences(4, model=model)
    cap = 1.1 if level == "sequence" else 1.03
    with torch.no_grad():
        true = [seq_logprobs(model, p, c) for p, c in zip(seqs.prompt_ids, seqs.completion_ids)]
    drop = []
    for r, (t, n) in enumerate(zip(true, seqs.lengths)):
        d = (t - seqs.sampling_logprobs[r, :n].double()).sum()
        drop.append(abs(d / (n if level == "geometric" else 1)) > math.log(cap))
    assert 0 < sum(drop) < len(drop)
    a = AlgorithmConfig(old_logprobs="recompute", mis_level=level, mis_cap=cap, **ALGORITHMS["dapo"])
    got, got_model = run_updater(model, None, seqs, a, mini_groups=mini_groups, micro_tokens=64, lr=0.5)
    zeroed = copy.copy(seqs)
    zeroed.advantages = seqs.advantages * (1 - torch.tensor(drop, dtype=torch.float32))
    b = AlgorithmConfig(old_logprobs="recompute", **ALGORITHMS["dapo"])
    want, want_model = run_updater(model, None, zeroed, b, mini_groups=mini_groups, micro_tokens=64, lr=0.5)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6, abs=1e-7)
    for p, q in zip(got_model.parameters(), want_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    plain, _ = run_updater(model, None, seqs, b, mini_groups=mini_groups, micro_tokens=64, lr=0.5)
    assert plain["loss"] != pytest.approx(got["loss"], rel=1e-4)  # the drop changes the update


@pytest.mark.parametrize("correction", [{}, {"tis_cap": 2.0}, {"mis_level": "geometric", "mis_cap": 3.0}])
def test_mismatch_warning_once_and_only_without_a_correction(caplog, correction):
    """make_sequences' sampler is 0.1 nats off per token: k3 KL ~ 5e-3 > the default 1e-3."""
    model = tiny_model(0)
    seqs = make_sequences(2, model=model)
    a = AlgorithmConfig(old_logprobs="recompute", **ALGORITHMS["dapo"], **correction)
    with caplog.at_level(logging.WARNING, logger="medix_fast.rl.update"):
        from test_update import DistInfo, PolicyObjective, SamplingConfig, TrainConfig, Updater
        objective = PolicyObjective(copy.deepcopy(model), 1.0)
        updater = Updater(objective, objective, torch.optim.SGD(objective.parameters(), lr=0.1), a,
                          TrainConfig(prompts_per_step=2, mini_batch_prompts=2), SamplingConfig(group_size=G),
                          DistInfo(), pad_id=0)
        metrics = [updater.update(seqs) for _ in range(2)]
    assert metrics[0]["mismatch/k3_kl"] > a.mismatch_warn_kl
    warned = [r for r in caplog.records if "mismatch" in r.getMessage()]
    assert len(warned) == (0 if correction else 1)


def test_config_needs_recompute_and_a_cap_above_one():
    from medix_fast.config import ConfigError, load_config

    assert load_config(None, ["algorithm.mis_level=geometric"]).algorithm.mis_cap == 2.0
    for bad in (["algorithm.old_logprobs=sampler"], ["algorithm.mis_cap=1.0"]):
        with pytest.raises(ConfigError, match="algorithm.mis_level"):
            load_config(None, ["algorithm.mis_level=sequence", *bad])
