"""The host-device syncs of one whole training step (``Trainer.train_step`` on the embedded tiny
model), counted on the CPU by ``tests/syncs.py``: beyond the sampler's one read per decode step,
a step makes a fixed number of reads (the reductions, the filter, transformers' mask checks),
whatever its number of rows. A sync per row or per group comes back as a failure here.

Run: pytest tests/test_step_syncs.py
"""
from __future__ import annotations

import collections

import pytest

from medix_fast.config import load_config
from medix_fast.train import Trainer
from syncs import count_syncs

BOUND = 16  # today 6 reductions read (rollout 2, plan 2, one per optimizer step) + transformers' mask checks (3-6)


def trainer(tmp_path, prompts: int, overrides: tuple = ()) -> Trainer:
    return Trainer(load_config(None, [
        f"train.output_dir={tmp_path}", "eval.every=0", f"train.prompts_per_step={prompts}",
        f"train.mini_batch_prompts={prompts // 2}", "sampling.group_size=4", "sampling.max_new_tokens=12",
        "algorithm.dynamic_sampling=false", "checkpoint.every=0", "logging.tensorboard=false",
        "logging.plot=false", "logging.progress=false", *overrides]))


@pytest.mark.parametrize("prompts", [2, 8])
def test_a_training_step_syncs_a_fixed_number_of_times_beyond_decoding(tmp_path, prompts):
    """8 rows and 32: the syncs outside the decode loop do not depend on the batch."""
    t = trainer(tmp_path, prompts)
    t.train_step()  # first-step work (C++ op builds, lazy state) out of the count
    with count_syncs() as syncs:
        metrics = t.train_step()
    assert metrics["optimizer_steps"] == 2 and metrics["rollout/trained_groups"] == prompts
    decode = t.sampler.stats.syncs  # one per decode step, counted by the engine (tests/test_engine.py)
    rest = syncs.count - decode
    assert decode > 0 and rest <= BOUND, collections.Counter(w.split(" at ")[1] for w in syncs.where)


@pytest.mark.parametrize("prompts", [2, 8])
def test_partial_rollouts_add_no_sync_per_row(tmp_path, prompts):
    """rollout.partial: carried rows (their log-probs kept on the device, concatenated there) and the
    stop add no host read; beyond decoding, the step reads as a synchronous one does per optimizer step."""
    t = Trainer(load_config(None, [
        f"train.output_dir={tmp_path}", "eval.every=0", f"train.prompts_per_step={prompts}",
        f"train.mini_batch_prompts={prompts // 2}", "sampling.group_size=4", "sampling.max_new_tokens=48",
        "algorithm.dynamic_sampling=false", "checkpoint.every=0", "logging.tensorboard=false", "logging.plot=false",
        "logging.progress=false", "rollout.partial=true", "rollout.stop_share=0.5", "algorithm.tis_cap=2.0"]))
    t.train_step()
    with count_syncs() as syncs:
        metrics = t.train_step()
    assert metrics["rollout/offpolicy_token_fraction"] > 0  # rows carried into this step were trained
    rest = syncs.count - t.sampler.stats.syncs
    assert rest - metrics["optimizer_steps"] <= BOUND - 2, collections.Counter(w.split(" at ")[1] for w in syncs.where)


def test_static_decoder_kept_across_steps_samples_as_eager_with_no_sync_added(tmp_path):
    """fp32 weights sampled in bf16 (autocast) with the fixed-shape step of the CUDA graphs
    (decode_mode "static", what a GPU captures and replays): over 3 training steps one decoder
    serves every call (on a GPU: one capture per bucket per run), reading the engine's weights
    refreshed after each optimizer step, and it samples the tokens the eager step does; beyond
    decoding, a step reads the host as often as an eager one."""
    runs = {}
    for mode in ("eager", "static"):
        t = trainer(tmp_path / mode, 2, ["model.dtype=bfloat16"])
        t.sampler.decode_mode = mode
        drawn, generate = [], t.sampler.generate

        def recording(*args, generate=generate, drawn=drawn, **kwargs):
            out = generate(*args, **kwargs)
            drawn.append(out.completion_ids)
            return out
        t.sampler.generate = recording
        t.train_step()
        with count_syncs() as syncs:
            t.train_step()
        t.train_step()
        runs[mode] = (drawn, syncs.count - t.sampler.stats.syncs, t.sampler.decoders_built)
    assert len(runs["static"][0]) == 3 and runs["static"][0] == runs["eager"][0]
    assert runs["static"][2] == 1 and runs["eager"][2] == 0
    assert runs["static"][1] == runs["eager"][1] <= BOUND
