"""Routing replay for mixtures of experts (R3, ``model/routing.py``) on the tiny Qwen3-MoE: the
sampler's record of each input token's experts (prefill, decode, preempted and recomputed rows)
against the trainer's own routing of the same rows, and the update's forward replaying it: the
trainer's experts equal the sampler's for every token (also after the routers moved), the routing
weights are the router's own at its own choice, and the gradient reaches the routers.

    pytest tests/test_router_replay.py
"""
from __future__ import annotations

import pytest
import torch

from medix_fast.config import DataConfig
from medix_fast.data import build_prompts, load_examples
from medix_fast.generate import Sampler
from medix_fast.generate.memory import kv_bytes_per_token
from medix_fast.model import moe
from medix_fast.demo.cache import resolve_model_path
from medix_fast.model.loading import load_model
from medix_fast.model.routing import routing_dtype
from medix_fast.rl.batch import Sequences, collate
from medix_fast.rl.update import PolicyObjective

G = 3
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    model, tokenizer = load_model(resolve_model_path("tiny-moe"))
    prompts = build_prompts(load_examples(["sample:test"], DataConfig())[:3], tokenizer, 4096)[0]
    return model, [p.ids[:40 + 7 * i] for i, p in enumerate(prompts)]  # three prompt lengths


@pytest.fixture
def objective():
    """PolicyObjective(model, 1.0, ...) whose replay hooks are removed after the test."""
    made = []

    def make(model, **kw):
        made.append(PolicyObjective(model, 1.0, **kw))
        return made[-1]
    yield make
    for o in made:
        if o.replay is not None:
            o.replay.remove()


def sample(model, prompts, **kw):
    """G rows per prompt, their sampler output and Sequences carrying the routing."""
    out = Sampler(model, record_routing=True, **kw).generate(prompts, n=G, max_new_tokens=12, temperature=1.0,
                                                              stop_token_ids=[], seed=3)
    rows = [p for p in prompts for _ in range(G)]
    seqs = Sequences(rows, out.completion_ids, out.logprobs, torch.randn(len(rows)), G, routing=out.routing)
    return out, seqs


class Selections:
    """The experts every router call picked (after any replay), per call in call order."""

    def __init__(self, model):
        self.calls: list[torch.Tensor] = []
        self.layers = len(moe.sparse_blocks(model))
        self.handles = [b.gate.register_forward_hook(lambda m, a, o: self.calls.append(o[2]))
                        for b in moe.sparse_blocks(model)]

    def decoder_calls(self) -> list[torch.Tensor]:
        """(tokens, layers, k) per decoder call."""
        n = self.layers
        return [torch.stack(self.calls[i:i + n], 1) for i in range(0, len(self.calls), n)]

    def remove(self):
        for h in self.handles:
            h.remove()


def trainer_selections(objective, seqs, groups) -> list[torch.Tensor]:
    """The trainer's experts per row at its input positions (len(prompt) + len(completion) - 1,
    layers, k), read off its forward's layout."""
    mb = collate(seqs, groups, 0, CPU)
    sel = Selections(objective.model)
    try:
        with torch.no_grad():
            objective(mb)
    finally:
        sel.remove()
    calls, plen, clen = sel.decoder_calls(), mb.prompt_ids.shape[1], mb.targets.shape[1]
    per_row = []
    for b, r in enumerate(mb.rows):
        p, c = len(seqs.prompt_ids[r]), seqs.lengths[r]
        if len(calls) == 2:  # shared prompt: each group's prompt once, then the completions
            prompt = calls[0].view(len(groups), plen, *calls[0].shape[1:])[b // G, plen - p:]
            comp = calls[1].view(len(mb.rows), clen, *calls[1].shape[1:])[b, :c - 1]
        else:
            full = calls[0].view(len(mb.rows), plen + clen, *calls[0].shape[1:])[b]
            prompt, comp = full[plen - p:plen], full[plen:plen + c - 1]
        per_row.append(torch.cat([prompt, comp]))
    return per_row


def assert_rows_match(trainer, out, rows, shared: bool):
    """The trainer's experts of each row equal the sampler's record; with a shared prompt, the
    prompt is routed once per group, as the group's first row's record says (the prefix is one
    record for the group, its last token each row's own first decode step)."""
    for b, r in enumerate(rows):
        want = out.routing[r].long().clone()
        if shared:
            p = len(want) - len(out.completion_ids[r]) + 1  # prompt tokens
            want[:p] = out.routing[(r // G) * G][:p].long()
        assert trainer[b].shape == want.shape and torch.equal(trainer[b], want), r


def test_record_layout_dtype_and_fp32_agreement(tiny, objective):
    """Each row's record covers every input position of prompt + completion but the last, as int8
    on the model's device; in fp32 the trainer routes every one of them as the sampler did."""
    model, prompts = tiny
    out, seqs = sample(model, prompts)
    k = model.config.num_experts_per_tok
    for r, ids in enumerate(out.routing):
        assert ids.dtype == torch.int8 and ids.shape == (len(prompts[r // G]) + len(out.completion_ids[r]) - 1, 2, k)
    for share in (True, False):
        sel = trainer_selections(objective(model, share_prompt=share), seqs, [0, 1, 2])
        assert_rows_match(sel, out, list(range(3 * G)), share)
    assert routing_dtype(128) == torch.int8 and routing_dtype(129) == torch.int16


@pytest.mark.parametrize("decode_mode", ["eager", "static"])
def test_preempted_rows_are_overwritten_by_their_recompute(tiny, decode_mode):
    """A pool so small that rows are preempted and recomputed: the same record (shape and ids) as
    an unconstrained eager call; the recompute overwrites, never duplicates. "static": the CUDA
    graphs' fixed-shape step (padded buckets), whose ids come out of the step's own buffers."""
    model, prompts = tiny
    kw = dict(n=G, max_new_tokens=40, temperature=1.0, stop_token_ids=[], seed=3)  # rows cross block boundaries
    free = Sampler(model, record_routing=True).generate(prompts, **kw)
    tight = Sampler(model, record_routing=True, max_num_seqs=G * 3, block_size=16, decode_mode=decode_mode,
                    kv_cache_gb=8 * 16 * kv_bytes_per_token(model.config, model.dtype) / 2**30)  # 8 blocks of 16
    out = tight.generate(prompts, **kw)
    assert tight.stats.preemptions > 0
    assert out.completion_ids == free.completion_ids
    for a, b in zip(out.routing, free.routing):
        assert torch.equal(a, b)


@pytest.mark.parametrize("share", [True, False])
def test_replay_routes_every_token_as_the_sampler_after_the_routers_moved(tiny, share, objective):
    """The routers are perturbed after sampling, so that the trainer's own routing differs for
    many tokens; with replay its experts are the sampler's at every position, without they are not."""
    model, prompts = tiny
    out, seqs = sample(model, prompts)
    gates = [b.gate.weight for b in moe.sparse_blocks(model)]
    saved = [w.detach().clone() for w in gates]
    try:
        with torch.no_grad():
            for w in gates:
                w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
        own = trainer_selections(objective(model, share_prompt=share), seqs, [0, 1, 2])
        assert sum(not torch.equal(a, b.long()) for a, b in zip(own, out.routing)) > 0
        replay = objective(model, share_prompt=share, router_replay=True)
        sel = trainer_selections(replay, seqs, [2, 0, 1])
        rows = collate(seqs, [2, 0, 1], 0, CPU).rows
        assert_rows_match(sel, out, rows, share)
    finally:
        with torch.no_grad():
            for w, s in zip(gates, saved):
                w.copy_(s)


@pytest.mark.parametrize("share", [True, False])
def test_replay_follows_any_record_to_its_position(tiny, share, objective):
    """Random expert ids at every recorded position (each row its own, prompts included): the
    trainer's experts are exactly those, position by position, in both forward layouts."""
    model, prompts = tiny
    out, seqs = sample(model, prompts)
    gen = torch.Generator().manual_seed(1)
    e, k = model.config.num_experts, model.config.num_experts_per_tok
    out.routing = [torch.rand(len(r), 2, e, generator=gen).argsort(-1)[..., :k].to(torch.int8) for r in out.routing]
    seqs = Sequences(seqs.prompt_ids, seqs.completion_ids, seqs.sampling_logprobs, seqs.advantages, G,
                     routing=out.routing)
    sel = trainer_selections(objective(model, share_prompt=share, router_replay=True), seqs, [1, 2, 0])
    assert_rows_match(sel, out, collate(seqs, [1, 2, 0], 0, CPU).rows, share)


def test_replay_of_the_own_choice_changes_nothing_and_trains_the_routers(tiny, objective):
    """Unperturbed fp32: replaying the sampler's (= the trainer's own) experts gives the same
    log-probs (the routing weights recomputed by the router's rule), and the loss's gradient
    reaches every router."""
    model, prompts = tiny
    out, seqs = sample(model, prompts)
    mb = collate(seqs, [0, 1, 2], 0, CPU)
    with torch.no_grad():
        plain = objective(model)(mb)
    replay = objective(model, router_replay=True)
    with torch.no_grad():
        replayed = replay(mb)
    assert (replayed - plain).abs().max() < 1e-6
    model.zero_grad(set_to_none=True)
    loss, _ = replay(mb, dict(loss_type="dapo", num_items_in_batch=float(mb.tokens)))
    loss.backward()
    for block in moe.sparse_blocks(model):
        assert block.gate.weight.grad is not None and block.gate.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_checkpointed_layers_replay_in_their_recompute(tiny, objective):
    """Activation checkpointing recomputes each layer in the backward, outside the forward: it
    replays the same experts, so the routers moved, the gradients equal those of the plain replay
    (a recompute that routed on its own would not)."""
    model, prompts = tiny
    _, seqs = sample(model, prompts)
    mb = collate(seqs, [0, 1, 2], 0, CPU)
    gates = [b.gate.weight for b in moe.sparse_blocks(model)]
    saved = [w.detach().clone() for w in gates]
    opts = dict(loss_type="dapo", num_items_in_batch=float(mb.tokens))
    replay = objective(model, share_prompt=False, router_replay=True)

    def grads():
        model.zero_grad(set_to_none=True)
        replay(mb, opts)[0].backward()
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out
    try:
        with torch.no_grad():
            for w in gates:
                w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
        plain = grads()
        model.activation_checkpointing_enable({"use_reentrant": False})
        model.train()  # transformers checkpoints only in training mode
        try:
            checkpointed = grads()
        finally:
            model.activation_checkpointing_disable()
            model.eval()
    finally:
        with torch.no_grad():
            for w, s in zip(gates, saved):
                w.copy_(s)
    assert plain.keys() == checkpointed.keys()
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_trainer_replays_and_agrees_in_fp32(tmp_path):
    """``model.router_replay: true``: the sampler records, the update replays, fp32 agrees as without."""
    from test_mismatch import assert_agree, steps

    assert_agree(steps(tmp_path, ["model.path=tiny-moe", "model.router_replay=true"], n=1))


def test_vl_moe_trainer_replays_text_and_image_rows_and_agrees_in_fp32(tmp_path):
    """Qwen3-VL-MoE: image tokens are routed (and recorded) in the prefill like any other."""
    from test_mismatch import assert_agree, steps

    assert_agree(steps(tmp_path, ["model.path=tiny-vl-moe", "model.router_replay=true",
                                  "data.train_files=[sample:train, sample:train_vl]", "data.min_pixels=784",
                                  "data.max_pixels=12544", "train.prompts_per_step=8", "train.mini_batch_prompts=8",
                                  "sampling.group_size=2", "train.seed=1"], n=1), ("text", "image"))


def test_router_replay_needs_a_mixture_of_experts(tmp_path):
    from medix_fast.config import load_config
    from medix_fast.errors import ConfigError
    from medix_fast.train import Trainer

    with pytest.raises(ConfigError, match=r"model\.router_replay: tiny is not a mixture-of-experts"):
        Trainer(load_config(None, [f"train.output_dir={tmp_path}", "model.router_replay=true", "eval.every=0"]))


@pytest.mark.parametrize("decode_mode", ["eager", "static"])
def test_recording_adds_no_host_sync_to_the_decode_loop(tiny, monkeypatch, decode_mode):
    """The records stay on the device: still one host read per decode step."""
    from syncs import count_decode_loop

    model, prompts = tiny
    counted = count_decode_loop(monkeypatch)
    sampler = Sampler(model, max_num_seqs=4, record_routing=True, decode_mode=decode_mode)
    sampler.generate(prompts, n=2, max_new_tokens=6, temperature=1.0, stop_token_ids=[], seed=0)
    assert counted["syncs"].count == sampler.stats.steps > 0, counted["syncs"].where[:5]
