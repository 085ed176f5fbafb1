"""Partial rollouts (``rollout.partial``, rl/carry.py): groups carried across steps train as
decoupled PPO against their behaviour log-probs, a run without carried groups is the synchronous
one, and a resumed run carries the same groups on.

Run: pytest tests/test_partial_rollout.py
"""
from __future__ import annotations

import pytest
import torch

from test_train import SMALL, comparable
from test_update import ALGORITHMS, G, MAX_NEW, VOCAB, reference_run, run_updater, seq_logprobs, tiny_model

from medix_fast import checkpoint as C
from medix_fast.config import AlgorithmConfig, ConfigError, load_config
from medix_fast.generate import Sampler
from medix_fast.metrics import read_metrics
from medix_fast.rl.batch import Sequences
from medix_fast.train import main

STOPS = list(range(0, VOCAB, 5))  # ~1 in 5 tokens ends a row at random: the rows' lengths differ
PARTIAL = [*SMALL, "rollout.partial=true", "algorithm.tis_cap=2.0", "eval.every=0", "sampling.max_new_tokens=48"]


def test_carried_rows_train_as_fp64_decoupled_ppo():
    """Rows cut at step s (policy 0) and finished at s + 1 (policy 1, the weights after an update):
    each token's behaviour log-prob is the policy that drew it, and the update on them equals the
    fp64 decoupled objective: ratio to the proximal (current) policy, times min(pi_prox / pi_behav, cap)."""
    old_policy, policy = tiny_model(0), tiny_model(0)
    with torch.no_grad():  # "one update later": visibly different weights
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompts = [[5, 9, 2, 7], [11, 3, 8]]
    first = Sampler(old_policy, max_num_seqs=8, kv_cache_gb=0.01).generate(
        prompts, n=G, max_new_tokens=MAX_NEW, stop_token_ids=STOPS, seed=4, stop_share=0.5)
    cut = [len(c) for c in first.completion_ids]
    left = [k for k, r in enumerate(first.finish_reasons) if r == "partial"]
    assert left and any(cut[k] for k in left)  # rows carried with tokens drawn by the old policy
    rest = Sampler(policy, max_num_seqs=8, kv_cache_gb=0.01).generate(
        [prompts[k // G] for k in left], n=1, max_new_tokens=MAX_NEW, stop_token_ids=STOPS,
        row_seeds=[(4, k) for k in left], continued=[(first.completion_ids[k], first.logprobs[k]) for k in left])
    comps, behaviour = list(first.completion_ids), list(first.logprobs)
    for j, k in enumerate(left):
        comps[k], behaviour[k] = rest.completion_ids[j], rest.logprobs[j]
    rows = [prompts[k // G] for k in range(len(comps))]
    for k, (p, c) in enumerate(zip(rows, comps)):  # known staleness: the first cut[k] tokens are policy 0's
        split = cut[k] if k in left else len(c)
        with torch.no_grad():
            want = torch.cat([seq_logprobs(old_policy, p, c)[:split], seq_logprobs(policy, p, c)[split:]])
        torch.testing.assert_close(behaviour[k].double(), want, rtol=0, atol=2e-5)
    adv = torch.randn(len(comps), generator=torch.Generator().manual_seed(0))
    seqs = Sequences(rows, comps, behaviour, adv, G)
    a = AlgorithmConfig(old_logprobs="recompute", tis_cap=1.2, mismatch_metrics=False, **ALGORITHMS["dapo"])
    metrics, trained = run_updater(policy, None, seqs, a, mini_groups=2, micro_tokens=64, lr=0.5)
    want, want_model = reference_run(policy, None, seqs, a, mini_groups=2, lr=0.5)
    assert metrics["loss"] == pytest.approx(want, rel=1e-5, abs=1e-6)
    for p, q in zip(trained.parameters(), want_model.parameters()):
        torch.testing.assert_close(p.double(), q, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        stale = torch.cat([seq_logprobs(policy, rows[k], comps[k])[:cut[k]] - behaviour[k][:cut[k]].double()
                           for k in left])
    assert (stale.exp() > a.tis_cap).any() and (stale.exp() < a.tis_cap).any()  # the cap bites on stale tokens


def test_nothing_carried_is_the_synchronous_run(tmp_path):
    """stop_share 1: every call runs to the end, nothing is carried: the same run as without partial."""
    sync, part = tmp_path / "sync", tmp_path / "partial"
    assert main([*SMALL, *PARTIAL[len(SMALL) + 1:], "train.steps=2", f"train.output_dir={sync}"]) == 0
    assert main([*PARTIAL, "rollout.stop_share=1.0", "train.steps=2", f"train.output_dir={part}"]) == 0
    got = comparable(read_metrics(part / "metrics.jsonl"))
    assert all(r.pop("rollout/carried_groups") == 0 and r.pop("rollout/offpolicy_token_fraction") == 0
               and r.pop("rollout/stale1_tokens") == 0 and r.pop("rollout/stale0_tokens") > 0 for r in got)
    want = comparable(read_metrics(sync / "metrics.jsonl"))
    assert [{k for k in g.keys() | w.keys() if g.get(k) != w.get(k)} for g, w in zip(got, want)] == [set(), set()]


def test_carried_groups_resume_exactly(tmp_path):
    """Groups in flight are saved with the checkpoint: 4 steps straight equal 2 + 2 resumed."""
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    args = [*PARTIAL, "rollout.stop_share=0.5", "checkpoint.every=2"]
    assert main([*args, "train.steps=4", f"train.output_dir={whole}"]) == 0
    expected = comparable(read_metrics(whole / "metrics.jsonl"))
    assert any(r["rollout/carried_groups"] > 0 for r in expected[:2])  # groups were in flight at the save
    assert any(r["rollout/offpolicy_token_fraction"] > 0 for r in expected)
    assert all(r["rollout/stale0_tokens"] + r["rollout/stale1_tokens"] > 0 for r in expected)
    assert main([*args, "train.steps=2", f"train.output_dir={halves}"]) == 0
    assert C.load_trainer_state(C.latest_checkpoint(halves))["carry"][0]  # rank 0's groups in flight
    assert main([*args, "train.steps=4", f"train.output_dir={halves}", "--resume"]) == 0
    assert comparable(read_metrics(halves / "metrics.jsonl")) == expected


@pytest.mark.parametrize("bad, named", [(["algorithm.tis_cap=null"], "algorithm.tis_cap"),
                                        (["algorithm.old_logprobs=sampler"], "old_logprobs: recompute"),
                                        (["rollout.stop_share=0"], "0 < stop_share <= 1"),
                                        (["rollout.max_staleness=0"], "max_staleness >= 1")])
def test_bad_combinations_are_refused_in_one_line(bad, named):
    assert load_config(None, ["rollout.partial=true", "algorithm.tis_cap=2.0"]).rollout.max_staleness == 1
    with pytest.raises(ConfigError, match=named.replace("(", r"\(")) as err:
        load_config(None, ["rollout.partial=true", "algorithm.tis_cap=2.0", *bad])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("staleness", [2])
def test_max_staleness_bounds_every_trained_token(tmp_path, staleness):
    """Calls that stop after a tenth of their rows: groups live up to 1 + max_staleness calls, their
    rows required in the last; none older is trained (rollout.py raises on one)."""
    out = tmp_path / "run"
    assert main([*PARTIAL, "rollout.stop_share=0.1", f"rollout.max_staleness={staleness}", "train.steps=4",
                 f"train.output_dir={out}"]) == 0
    records = read_metrics(out / "metrics.jsonl")
    assert any(r[f"rollout/stale{staleness}_tokens"] > 0 for r in records)
    assert f"rollout/stale{staleness + 1}_tokens" not in records[0]


def test_image_rows_carry_on(tmp_path):
    """Qwen2.5-VL on text and image prompts: carried image rows keep their pixels and are recomputed
    with them, the steps train on tokens of two policies."""
    out = tmp_path / "run"
    assert main(["model.path=tiny-vl", "data.train_files=[sample:train, sample:train_vl]", "data.min_pixels=784",
                 "data.max_pixels=12544", "algorithm.dynamic_sampling=false", "train.prompts_per_step=4",
                 "train.mini_batch_prompts=4", "sampling.group_size=2", "sampling.max_new_tokens=32",
                 "rollout.partial=true", "rollout.stop_share=0.5", "algorithm.tis_cap=2.0", "eval.every=0",
                 "checkpoint.every=0", "logging.progress=false", "train.steps=3", f"train.output_dir={out}"]) == 0
    records = read_metrics(out / "metrics.jsonl")
    assert any(r["rollout/carried_groups"] > 0 for r in records[:2])
    assert any(r["rollout/offpolicy_token_fraction"] > 0 for r in records)
    assert all(r["rollout/trained_groups"] > 0 for r in records[1:]) and any(r["grad_norm"] > 0 for r in records)
