"""The sampler and the trainer agree on the policy at a sampling temperature other than 1.

The real trainer (embedded tiny text and VL models, fp32 on the CPU) samples at T = 0.6; the
log-probs it then recomputes for those tokens, and the importance ratio of its first update
against the sampler's log-probs, must be those of the sampler: ratio 1 before any parameter
changes. At T = 1 the same tokens get log-probs far outside the tolerance, so the check has teeth.

Run: pytest tests/test_temperature.py
"""
from __future__ import annotations

import pytest
import torch

from medix_fast.config import load_config
from medix_fast.rl.update import PolicyObjective
from medix_fast.train import Trainer

T = 0.6
ATOL = 2e-5  # fp32 on the CPU: the sampler's and the trainer's kernels differ in summation order


@pytest.mark.parametrize("model, data", [("tiny", "sample:train"), ("tiny-vl", "sample:train_vl")])
def test_recomputed_logprobs_and_first_ratio_match_the_sampler_at_temperature(tmp_path, model, data):
    cfg = load_config(None, [f"model.path={model}", f"data.train_files=[{data}]", "data.max_examples=8",
                             f"sampling.temperature={T}", "sampling.group_size=3", "sampling.max_new_tokens=8",
                             "train.prompts_per_step=2", "train.mini_batch_prompts=2", "algorithm.dynamic_sampling=false",
                             "algorithm.old_logprobs=sampler", "rewards.weights={format: 1.0}", "eval.every=0",
                             "logging.progress=false", "logging.tensorboard=false", f"train.output_dir={tmp_path}"])
    trainer = Trainer(cfg)
    seqs, _ = trainer.rollout.collect(1)
    assert len(seqs.completion_ids) == 6 and min(len(c) for c in seqs.completion_ids) > 1
    (mini,) = trainer.updater.plan(seqs).minis
    with torch.no_grad():
        for mb in mini:
            assert (mb.pixel_values is not None) == (model == "tiny-vl")  # VL: the prompts' images go in
            valid = mb.mask.bool()
            recomputed = trainer.objective(mb)[valid]
            torch.testing.assert_close(recomputed, mb.sampling[valid], rtol=0, atol=ATOL)
            at_one = PolicyObjective(trainer.model, 1.0, cfg.train.share_prompt)(mb)[valid]
            # the warm-started tiny model is confident (sampled tokens near probability 1), so T
            # moves their log-probs little; still far beyond the tolerance
            assert (at_one - mb.sampling[valid]).abs().max() > 50 * ATOL
    metrics = trainer.updater.update(seqs)  # old = the sampler's log-probs: ratio 1 at the first step
    assert metrics["optimizer_steps"] == 1
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=2e-5)
    assert metrics["clip_low"] == metrics["clip_high"] == 0
