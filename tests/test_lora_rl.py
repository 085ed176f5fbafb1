"""LoRA policies (``model.lora``) with the trainer's RL machinery: MoE routing replay with adapters on
the experts and the linear layers, and partial rollouts whose carried rows cross an update of the
adapters. (DDP and FSDP2 with adapters: ``tests/test_distributed.py``, in its two-rank launch.)

    pytest tests/test_lora_rl.py
"""
from __future__ import annotations

import pytest
import torch

from test_router_replay import CPU, G, assert_rows_match, sample, trainer_selections

from medix_fast import distributed as D
from medix_fast.config import LoraConfig, load_config
from medix_fast.demo.cache import resolve_model_path
from medix_fast.model.loading import load_model
from medix_fast.model.lora import LoraExperts, adapter_parameters, adapters_off, add_adapters
from medix_fast.rl.batch import collate
from medix_fast.rl.update import PolicyObjective
from medix_fast.trainer import Trainer

EXPERTS = LoraConfig(rank=4, alpha=8, experts=True)  # the experts' banks and the 7 decoder linears


def randomise(params, scale: float, seed: int) -> None:
    """Random adapter factors in place (a fresh B is zero: the adapters would change nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def test_routing_replay_with_adapters_follows_the_record():
    """tiny-moe with adapters on its experts and linears: the update's replayed log-probs are the
    sampler's (the bound of ``test_mismatch.assert_agree``); after the adapters moved (an update), the
    trainer routes many tokens elsewhere on its own, and with replay every one as the sampler did."""
    torch.set_num_threads(1)
    model, tokenizer = load_model(resolve_model_path("tiny-moe"))
    add_adapters(model, EXPERTS)
    assert any(isinstance(m, LoraExperts) for m in model.modules())
    randomise(adapter_parameters(model), 0.05, seed=0)
    model.eval()
    prompts = [tokenizer(f"Question {i}: what is {i} + {i}?").input_ids for i in range(3)]
    out, seqs = sample(model, prompts)
    replay = PolicyObjective(model, 1.0, router_replay=True)
    mb = collate(seqs, [0, 1, 2], 0, CPU)
    with torch.no_grad():
        gap = (replay(mb) - mb.sampling).abs()[mb.mask.bool()]
        with adapters_off(model):  # the sampler's log-probs are the adapted model's, not its base's
            assert (replay(mb) - mb.sampling).abs().max() > 0.1
    assert gap.max() <= 1e-5, gap.max()
    randomise(adapter_parameters(model), 0.05, seed=1)  # the adapters an update made
    own = trainer_selections(PolicyObjective(model, 1.0), seqs, [0, 1, 2])
    assert sum(not torch.equal(a, b.long()) for a, b in zip(own, out.routing)) > len(own) // 2
    assert_rows_match(trainer_selections(replay, seqs, [2, 0, 1]), out, collate(seqs, [2, 0, 1], 0, CPU).rows, True)


def test_the_trainer_replays_the_routing_of_an_adapted_moe(tmp_path):
    """``model.router_replay`` with ``model.lora.experts``: the sampler records, the update replays
    and its log-probs agree with the sampler's as without adapters (fp32)."""
    from test_mismatch import SMALL, assert_agree

    trainer = Trainer(load_config(None, [f"train.output_dir={tmp_path}", *SMALL, "model.path=tiny-moe",
                                         "model.router_replay=true", "model.lora.rank=4", "model.lora.alpha=8",
                                         "model.lora.experts=true"]))
    try:
        randomise(adapter_parameters(trainer.model), 0.05, seed=0)
        assert trainer.objective.replay is not None and trainer.sampler.record_routing
        assert_agree([trainer.train_step()])
    finally:
        D.close()


PARTIAL = ["eval.every=0", "train.prompts_per_step=4", "train.mini_batch_prompts=2", "sampling.group_size=4",
           "sampling.max_new_tokens=32", "algorithm.dynamic_sampling=false", "checkpoint.every=0",
           "logging.progress=false", "rollout.partial=true", "rollout.stop_share=0.5", "algorithm.tis_cap=2.0",
           "model.lora.rank=4", "model.lora.alpha=8", "algorithm.beta=0.05", "optim.lr=5e-2",
           "algorithm.ppo_epochs=2"]  # two epochs: every mini-batch's old log-probs recomputed


def test_partial_rollouts_continue_with_the_updated_adapters(tmp_path):
    """Rows cut at step s go on at s + 1 under the adapters the update of step s made: at each step's
    update, every token its sampling call drew (a carried row's continuation too) has as behaviour
    log-prob the adapted policy's of now, which is also the update's old (proximal) log-prob; a carried
    row's earlier tokens keep the log-probs of the adapters that drew them, which the update moved."""
    from test_update import seq_logprobs

    trainer = Trainer(load_config(None, [f"train.output_dir={tmp_path}", *PARTIAL]))
    model, calls, updates = trainer.model, [], []
    sampler_generate, prepare = trainer.sampler.generate, trainer.updater.prepare

    def generate(prompt_ids, n, continued, **kw):  # each call: its rows, what they went on from, its output
        out = sampler_generate(prompt_ids, n=n, continued=continued, **kw)
        rows = [p for p, k in zip(prompt_ids, n) for _ in range(k)]
        calls.append([(p, c[0] if c else [], c[1] if c else None, o, lp, reason) for p, c, o, lp, reason
                      in zip(rows, continued, out.completion_ids, out.logprobs, out.finish_reasons)])
        return out

    def prepared(seqs):  # the policy of now (the proximal one), row by row, before the update moves it
        with torch.no_grad():
            now = [seq_logprobs(model, p, c).float() for p, c in zip(seqs.prompt_ids, seqs.completion_ids)]
        plan = prepare(seqs)
        updates.append((seqs, now, calls[-1], [(mb.rows, mb.old) for mini in plan.minis for mb in mini]))
        return plan

    trainer.sampler.generate, trainer.updater.prepare = generate, prepared
    try:
        randomise(adapter_parameters(model), 0.1, seed=0)  # the adapters act from the first call
        for _ in range(2):
            assert trainer.train_step()["optimizer_steps"] > 0
    finally:
        D.close()
    carried = 0
    for seqs, now, call, olds in updates:
        drew = {(tuple(p), tuple(o)): (len(done), lp, before) for p, done, before, o, lp, reason in call
                if reason != "partial"}
        for r, (p, c) in enumerate(zip(seqs.prompt_ids, seqs.completion_ids)):
            behaviour = seqs.sampling_logprobs[r, :len(c)]
            if (tuple(p), tuple(c)) in drew:  # finished in this step's call: tokens cut: drawn in it
                cut, lp, before = drew[tuple(p), tuple(c)]
                torch.testing.assert_close(behaviour[cut:], now[r][cut:], rtol=0, atol=2e-5)
                if before is not None:  # a carried row: its earlier tokens keep their log-probs
                    assert torch.equal(behaviour[:cut], before) and torch.equal(lp[:cut], before)
                    carried += bool((behaviour[:cut] - now[r][:cut]).abs().max() > 1e-3)  # drawn by other adapters
        checked = 0
        for rows, old in olds:
            for b, r in enumerate(rows):
                torch.testing.assert_close(old[b, :len(now[r])], now[r], rtol=0, atol=2e-5)
                checked += 1
        assert checked == len(seqs.completion_ids)
    assert carried > 0  # rows continued after an update that changed their earlier tokens' log-probs
