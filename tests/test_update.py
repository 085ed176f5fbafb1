"""Policy updates against an fp64 loop written from first principles, and micro-batching invariance.

The reference runs every sequence alone (no padding) through an fp64 copy of the model with
plain ``log_softmax`` over full logits, applies the clipped objective of each algorithm as
the MediX-R1 recipe / TRL define it, and takes plain SGD steps (so parameters compare gradients
directly; the trainer's optimizer is an argument of ``Updater``); the trainer's ``Updater`` packs
micro-batches, uses the fused kernels in fp32 and accumulates gradients.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from medix_fast.config import AlgorithmConfig, SamplingConfig, TrainConfig
from medix_fast.distributed import DistInfo
from medix_fast.rl.update import PolicyObjective, Updater
from medix_fast.rl.batch import Sequences, pack

VOCAB, G, MAX_NEW = 61, 3, 9

ALGORITHMS = {
    "grpo_kl": dict(loss_type="grpo", epsilon_high=0.3, beta=0.05),
    "dapo": dict(loss_type="dapo", epsilon_high=0.28),
    "bnpo": dict(loss_type="bnpo", epsilon_high=0.28),
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence", epsilon_low=3e-4, epsilon_high=4e-4),
    "gspo_token": dict(loss_type="grpo", importance_sampling_level="sequence_token", epsilon_low=3e-4,
                       epsilon_high=4e-4),
    "dr_grpo": dict(loss_type="dr_grpo", epsilon_high=0.2, clip_ratio_c=None),
    "cispo": dict(loss_type="cispo", epsilon_high=1.05, beta=0.05, use_bias_correction_kl=True),
    "sapo": dict(loss_type="sapo", sapo_temperature_neg=2.0),
    "luspo": dict(loss_type="luspo", importance_sampling_level="sequence", epsilon_low=3e-4, epsilon_high=4e-4,
                  delta=1.0005),
}


def tiny_model(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    return Qwen2ForCausalLM(cfg).float()


def seq_logprobs(model, prompt: list[int], completion: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T) of each completion token, the sequence alone (no padding)."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1]  # (C, V)
    return torch.log_softmax(logits.double() / temperature, -1).gather(1, torch.tensor(completion)[:, None])[:, 0]


def make_sequences(groups: int, seed: int = 1, model=None) -> Sequences:
    g = torch.Generator().manual_seed(seed)
    prompts, comps = [], []
    for _ in range(groups):
        prompt = torch.randint(1, VOCAB, (int(torch.randint(2, 8, (1,), generator=g)),), generator=g).tolist()
        for _ in range(G):
            n = int(torch.randint(1, MAX_NEW + 1, (1,), generator=g))
            prompts.append(prompt)
            comps.append(torch.randint(1, VOCAB, (n,), generator=g).tolist())
    adv = torch.randn(groups * G, generator=g)
    with torch.no_grad():  # "sampler" log-probs: the true ones, perturbed (a behaviour policy that differs)
        sampling = [(seq_logprobs(model, p, c) + 0.1 * torch.randn(len(c), generator=g, dtype=torch.float64)).float()
                    for p, c in zip(prompts, comps)]
    return Sequences(prompts, comps, sampling, adv, G)


def reference_terms(logp, old, adv, ref, a: AlgorithmConfig, sampling=None) -> torch.Tensor:
    """Per-token loss of one sequence (fp64): clipped ratio, dual clip, truncated IS, k3 KL."""
    if a.importance_sampling_level == "token":
        log_w = logp - old
    elif a.importance_sampling_level == "sequence":
        log_w = (logp - old).mean().expand_as(logp)
    else:
        log_w = (logp - old).mean().detach() + logp - logp.detach()
    ratio = torch.exp(log_w)
    clipped = torch.exp(log_w.clamp(math.log(1 - a.epsilon_low), math.log(1 + a.epsilon_high)))
    if a.loss_type == "cispo":  # REINFORCE with the capped ratio as a constant weight
        pg = -ratio.clamp(max=a.epsilon_high).detach() * adv * logp
    elif a.loss_type == "sapo":  # the soft gate
        tau = a.sapo_temperature_pos if adv > 0 else a.sapo_temperature_neg
        pg = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv
    else:
        pg = torch.maximum(-adv * (ratio if a.delta is None else ratio.clamp(max=a.delta)), -adv * clipped)
    if a.clip_ratio_c is not None and adv < 0 and a.loss_type not in ("cispo", "sapo"):
        pg = torch.minimum(pg, -adv * a.clip_ratio_c)
    if a.tis_cap:
        pg = pg * torch.exp(old - sampling.double()).clamp(max=a.tis_cap)
    if a.beta:
        d = ref - logp
        pg = pg + a.beta * (torch.exp(d) - d - 1) * (ratio if a.use_bias_correction_kl else 1)
    return pg


def reference_loss(terms: list[torch.Tensor], a: AlgorithmConfig) -> torch.Tensor:
    if a.loss_type in ("grpo", "sapo"):
        return torch.stack([t.mean() for t in terms]).mean()
    total = torch.cat(terms).sum()
    if a.loss_type == "luspo":
        return total / len(terms)
    if a.loss_type == "dr_grpo":
        return total / (len(terms) * MAX_NEW)
    return total / sum(len(t) for t in terms)  # bnpo and dapo: one process, one local batch


def reference_run(model, ref_model, seqs: Sequences, a: AlgorithmConfig, mini_groups: int, lr: float):
    """The whole update in fp64, one sequence at a time; returns (mean loss, final model)."""
    model = copy.deepcopy(model).double()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    rows = range(len(seqs.completion_ids))
    with torch.no_grad():
        frozen = copy.deepcopy(ref_model).double() if a.beta else None
        ref = [seq_logprobs(frozen, seqs.prompt_ids[r], seqs.completion_ids[r]) if a.beta else None for r in rows]
        if a.old_logprobs == "sampler":
            old = [seqs.sampling_logprobs[r, :seqs.lengths[r]].double() for r in rows]
        else:
            old = [seq_logprobs(model, seqs.prompt_ids[r], seqs.completion_ids[r]) for r in rows]
    losses = []
    for _ in range(a.ppo_epochs):
        for start in range(0, len(rows), mini_groups * G):
            part = rows[start:start + mini_groups * G]
            terms = [reference_terms(seq_logprobs(model, seqs.prompt_ids[r], seqs.completion_ids[r]), old[r],
                                     seqs.advantages[r].double(), ref[r], a,
                                     seqs.sampling_logprobs[r, :seqs.lengths[r]])
                     for r in part]
            loss = reference_loss(terms, a)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
    return sum(losses) / len(losses), model


def run_updater(model, ref_model, seqs, a, mini_groups: int, micro_tokens: int, lr: float, share: bool = True):
    model = copy.deepcopy(model)
    objective = PolicyObjective(model, temperature=1.0, share_prompt=share)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    ref = PolicyObjective(ref_model, 1.0) if ref_model is not None else None
    train = TrainConfig(prompts_per_step=len(seqs.completion_ids) // G, mini_batch_prompts=mini_groups,
                        micro_batch_tokens=micro_tokens)
    updater = Updater(objective, objective, opt, a, train, SamplingConfig(group_size=G, max_new_tokens=MAX_NEW),
                      DistInfo(), pad_id=0, ref_objective=ref, grad_clip=1.0)
    return updater.update(seqs), model


@pytest.fixture(scope="module")
def setup():
    model = tiny_model(0)
    ref_model = tiny_model(5)  # a reference policy visibly different from the current one
    return model, ref_model, make_sequences(4, model=model)


CASES = [(name, "sampler", 1, 4, 40, True) for name in sorted(ALGORITHMS)] + [
    (name, "recompute", 2, 2, 64, share) for name in ("grpo_kl", "dapo", "gspo_token") for share in (True, False)]


@pytest.mark.parametrize("name, old, epochs, mini_groups, micro_tokens, share", CASES)
def test_update_matches_fp64_first_principles(setup, name, old, epochs, mini_groups, micro_tokens, share):
    """One optimizer step with the sampler's log-probs as old; or 2 epochs x 2 mini-batches
    with recomputed old log-probs (the first mini-batch of epoch 1 differs from epoch 2's),
    with each group's prompt run once (share) or once per response."""
    model, ref_model, seqs = setup
    a = AlgorithmConfig(old_logprobs=old, ppo_epochs=epochs, **ALGORITHMS[name])
    metrics, trained = run_updater(model, ref_model if a.beta else None, seqs, a, mini_groups, micro_tokens, lr=0.5,
                                   share=share)
    want, want_model = reference_run(model, ref_model, seqs, a, mini_groups, lr=0.5)
    assert metrics["optimizer_steps"] == epochs * 4 // mini_groups
    assert metrics["loss"] == pytest.approx(want, rel=1e-5, abs=1e-6)
    for p, q in zip(trained.parameters(), want_model.parameters()):
        torch.testing.assert_close(p.double(), q, rtol=1e-5, atol=1e-6)
    if name in ("gspo", "cispo"):
        assert metrics["clip_low"] + metrics["clip_high"] > 0  # the test exercises clipping


def test_on_policy_truncated_importance_sampling_needs_no_old_logprob_pass(setup, monkeypatch):
    """tis_cap on one on-policy mini-batch: old = the current log-probs inside the loss, no extra forward
    (with the mismatch figures off: they take that forward)."""
    model, _, seqs = setup
    a = AlgorithmConfig(old_logprobs="recompute", tis_cap=1.05, mismatch_metrics=False, **ALGORITHMS["dapo"])
    passes = []
    real = Updater._logprobs
    monkeypatch.setattr(Updater, "_logprobs", lambda self, *args: passes.append(1) or real(self, *args))
    metrics, trained = run_updater(model, None, seqs, a, mini_groups=4, micro_tokens=64, lr=0.5)
    want, want_model = reference_run(model, None, seqs, a, mini_groups=4, lr=0.5)
    assert passes == []
    assert metrics["loss"] == pytest.approx(want, rel=1e-5, abs=1e-6)
    for p, q in zip(trained.parameters(), want_model.parameters()):
        torch.testing.assert_close(p.double(), q, rtol=1e-5, atol=1e-6)
    capped = [torch.exp(reference_old - s.double()) > a.tis_cap for reference_old, s in
              zip((seq_logprobs(model, p, c) for p, c in zip(seqs.prompt_ids, seqs.completion_ids)),
                  (seqs.sampling_logprobs[r, :n] for r, n in enumerate(seqs.lengths)))]
    assert 0 < sum(int(c.sum()) for c in capped) < sum(len(c) for c in capped)  # the cap bites on some tokens


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_gradient_accumulation_equals_one_big_batch(setup, name):
    """One micro-batch with shared prompts vs one group per micro-batch, prompts repeated."""
    model, ref_model, seqs = setup
    a = AlgorithmConfig(old_logprobs="sampler", **ALGORITHMS[name])
    ref = ref_model if a.beta else None
    one, big = run_updater(model, ref, seqs, a, mini_groups=4, micro_tokens=10_000, lr=0.5)
    many, small = run_updater(model, ref, seqs, a, mini_groups=4, micro_tokens=20, lr=0.5, share=False)
    assert one["loss"] == pytest.approx(many["loss"], rel=1e-6, abs=1e-7)
    for p, q in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_pack_respects_the_token_budget():
    lengths = [5, 17, 3, 9, 9, 30, 1]
    batches = pack(lengths, budget=20)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 20
    assert [30] in [[lengths[i] for i in b] for b in batches]  # too long for the budget: alone


def test_gradient_checkpointing_gives_the_same_update(setup):
    """Under activation checkpointing (prompt sharing is then off: the decoder drops its cache)."""
    model, _, seqs = setup
    a = AlgorithmConfig(old_logprobs="sampler", **ALGORITHMS["dapo"])
    plain, want = run_updater(model, None, seqs, a, mini_groups=4, micro_tokens=10_000, lr=0.5)
    ckpt = copy.deepcopy(model)
    (getattr(ckpt, "activation_checkpointing_enable", None) or ckpt.gradient_checkpointing_enable)(
        {"use_reentrant": False})
    ckpt.train()
    got, trained = run_updater(ckpt, None, seqs, a, mini_groups=4, micro_tokens=10_000, lr=0.5)
    assert got["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    for p, q in zip(trained.parameters(), want.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
