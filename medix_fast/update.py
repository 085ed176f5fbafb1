"""Policy updates: micro-batches packed by token budget, old / reference log-probs, PPO epochs.

For one rollout (this rank's sequences with their advantages) :meth:`Updater.update` runs
``ppo_epochs`` passes over mini-batches of whole groups; each mini-batch is one optimizer step,
its gradient accumulated over micro-batches of at most ``micro_batch_tokens`` padded tokens
(sequences sorted by length, so little padding). Every loss is normalised over the whole
mini-batch as if it were one batch: ``dapo`` by the mini-batch's valid-token count over all
micro-batches and ranks (``num_items_in_batch``), ``grpo`` / ``dr_grpo`` by its global sequence
count, ``bnpo`` by this rank's token count (TRL's "local batch"). Ranks pad to the same number
of micro-batches with zero-weight ones, so DDP / FSDP collectives always line up.

Old log-probs (``algorithm.old_logprobs``): ``recompute`` trains the first mini-batch of a
single epoch on-policy (``old=None``: ratio 1, exactly the policy that sampled, no extra
forward) and recomputes the others under ``no_grad`` before the first optimizer step;
``sampler`` uses the sampler's log-probs for every mini-batch (no extra forward at all).
With ``beta > 0`` the reference log-probs come from the frozen copy of the initial policy.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from . import distributed as D
from .kernels import fused_linear_logprobs, fused_linear_policy_loss
from .models import hidden_states, lm_head

LOSS_METRICS = ("ratio_mean", "clip_low", "clip_high", "clip_dual", "kl", "entropy")


@dataclass
class Sequences:
    """This rank's training sequences, group-major (group g's responses are rows g*G .. g*G+G-1)."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]  # the stop token, when sampled, is part of the completion
    sampling_logprobs: list[torch.Tensor]  # (len(completion),) fp32 each
    advantages: torch.Tensor  # (N,) float32
    group_size: int


@dataclass
class MicroBatch:
    rows: list[int]  # indices into Sequences
    input_ids: torch.Tensor  # (B, T) prompt + completion, right-padded
    attention_mask: torch.Tensor  # (B, T)
    gather: torch.Tensor  # (B, C) position of the hidden state that predicts each completion token
    targets: torch.Tensor  # (B, C) completion tokens, right-padded
    mask: torch.Tensor  # (B, C) float, 1 on completion tokens
    advantages: torch.Tensor  # (B,)
    sampling: torch.Tensor  # (B, C) sampler log-probs
    old: torch.Tensor | None = None  # (B, C)
    ref: torch.Tensor | None = None  # (B, C)
    tokens: int = 0  # completion tokens (mask sum)
    weight: float = 1.0  # 0 for the padding micro-batches that keep the ranks in step

    @property
    def n_tokens(self) -> int:
        return self.tokens if self.weight else 0

    @property
    def n_seqs(self) -> int:
        return len(self.rows) if self.weight else 0


def pack(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices grouped so that (rows x longest) <= budget tokens; longest first, a longer-than-
    budget sequence alone."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current = [], []
    for i in order:
        if current and lengths[current[0]] * (len(current) + 1) > budget:
            batches.append(current)
            current = []
        current.append(i)
    return batches + ([current] if current else [])


def collate(seqs: Sequences, rows: list[int], pad_id: int, device: torch.device) -> MicroBatch:
    prompts = [seqs.prompt_ids[r] for r in rows]
    comps = [seqs.completion_ids[r] for r in rows]
    width = max(len(p) + len(c) for p, c in zip(prompts, comps))
    clen = max(len(c) for c in comps)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    attn = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    gather = torch.zeros((len(rows), clen), dtype=torch.long)  # (B, C)
    targets = torch.full((len(rows), clen), pad_id, dtype=torch.long)  # (B, C)
    mask = torch.zeros((len(rows), clen))  # (B, C)
    sampling = torch.zeros((len(rows), clen))  # (B, C)
    for b, (p, c) in enumerate(zip(prompts, comps)):
        ids[b, :len(p) + len(c)] = torch.tensor(p + c)
        attn[b, :len(p) + len(c)] = 1
        gather[b, :len(c)] = torch.arange(len(p) - 1, len(p) + len(c) - 1)
        targets[b, :len(c)] = torch.tensor(c, dtype=torch.long)
        mask[b, :len(c)] = 1.0
        sampling[b, :len(c)] = seqs.sampling_logprobs[rows[b]].float()
    return MicroBatch(list(rows), ids.to(device), attn.to(device), gather.to(device), targets.to(device),
                      mask.to(device), seqs.advantages[rows].float().to(device), sampling.to(device),
                      tokens=sum(len(c) for c in comps))


def padding_batch(template: MicroBatch | None, pad_id: int, device: torch.device) -> MicroBatch:
    """A zero-weight micro-batch (a copy of ``template``, or two pad tokens) for ranks with fewer."""
    if template is not None:
        return replace(template, weight=0.0)
    one = torch.ones((1, 1), device=device)
    ids = torch.full((1, 2), pad_id, dtype=torch.long, device=device)
    return MicroBatch([], ids, torch.ones_like(ids), torch.zeros((1, 1), dtype=torch.long, device=device),
                      ids[:, :1].clone(), one, torch.zeros(1, device=device), torch.zeros_like(one), weight=0.0)


class PolicyObjective(nn.Module):
    """Wraps the causal LM so one forward runs decoder + LM head + loss (what DDP / FSDP wrap)."""

    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        self.model = model
        self.temperature = temperature

    def _hidden(self, mb: MicroBatch) -> torch.Tensor:
        return hidden_states(self.model, mb.input_ids, attention_mask=mb.attention_mask)  # (B, T, H)

    def forward(self, mb: MicroBatch, loss_opts: dict | None = None):
        """(loss, metrics) of ``fused_linear_policy_loss``; with ``loss_opts=None`` the (B, C)
        log-probs of the completion tokens instead (zeros at padding)."""
        hidden = self._hidden(mb)  # (B, T, H)
        weight, bias = lm_head(self.model)
        if loss_opts is None:
            valid = mb.mask.bool()  # (B, C)
            batch_idx = torch.arange(mb.mask.shape[0], device=mb.mask.device)[:, None].expand_as(valid)
            rows = hidden[batch_idx[valid], mb.gather[valid]]  # (n_valid, H)
            logp = fused_linear_logprobs(rows, weight, mb.targets[valid], bias=bias, temperature=self.temperature)
            return torch.zeros_like(mb.mask).masked_scatter(valid, logp)  # (B, C)
        width = hidden.shape[-1]
        h = hidden.gather(1, mb.gather[..., None].expand(-1, -1, width))  # (B, C, H)
        return fused_linear_policy_loss(h, weight, mb.targets, mb.mask, mb.advantages, mb.old, mb.ref,
                                        bias=bias, temperature=self.temperature,
                                        sampling_logprobs=mb.sampling if loss_opts.get("tis_cap") else None,
                                        **loss_opts)


class Updater:
    """Runs the PPO epochs / mini-batches / micro-batches of one training step."""

    def __init__(self, objective: PolicyObjective, wrapped: nn.Module, optimizer, algo, train, sampling,
                 info: D.DistInfo, pad_id: int, ref_objective: PolicyObjective | None = None,
                 autocast_dtype: torch.dtype | None = None, grad_clip: float = 1.0):
        self.objective, self.wrapped, self.optimizer = objective, wrapped, optimizer
        self.algo, self.train, self.sampling, self.info = algo, train, sampling, info
        self.pad_id, self.ref_objective, self.autocast_dtype = pad_id, ref_objective, autocast_dtype
        self.grad_clip = grad_clip
        self.params = [p for p in wrapped.parameters() if p.requires_grad]
        self.nonfinite_in_a_row = 0

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.info.device.type, dtype=self.autocast_dtype)

    def loss_options(self, num_items: float) -> dict:
        a = self.algo
        opts = dict(loss_type=a.loss_type, importance_sampling_level=a.importance_sampling_level,
                    epsilon_low=a.epsilon_low, epsilon_high=a.epsilon_high, clip_ratio_c=a.clip_ratio_c,
                    beta=a.beta, entropy_coef=a.entropy_coef, tis_cap=a.tis_cap)
        if a.loss_type == "dr_grpo":
            opts["max_completion_length"] = self.sampling.max_new_tokens
        if a.loss_type == "dapo":
            opts["num_items_in_batch"] = num_items
        return opts

    def _scale(self, mb: MicroBatch, local_tokens: int, global_tokens: int, global_seqs: int) -> float:
        """This micro-batch's share of the mini-batch loss, times the world size (DDP / FSDP
        average gradients over ranks)."""
        if not mb.weight:
            return 0.0
        t = self.algo.loss_type
        if t == "dapo":
            return float(self.info.world)
        if t == "bnpo":
            return mb.n_tokens / max(local_tokens, 1)
        return self.info.world * mb.n_seqs / max(global_seqs, 1)

    def plan(self, seqs: Sequences) -> list[list[MicroBatch]]:
        """Mini-batches (whole groups) of micro-batches, padded to the same counts on every rank."""
        g = seqs.group_size
        n_groups = len(seqs.completion_ids) // g
        per_mb = max(1, self.train.mini_batch_prompts // self.info.world)
        minis = []
        for start in range(0, n_groups * g, per_mb * g):
            rows = list(range(start, min(start + per_mb * g, n_groups * g)))
            lengths = [len(seqs.prompt_ids[r]) + len(seqs.completion_ids[r]) for r in rows]
            minis.append([collate(seqs, [rows[i] for i in part], self.pad_id, self.info.device)
                          for part in pack(lengths, self.train.micro_batch_tokens)])
        count = D.all_reduce(torch.tensor([len(minis)]), "max").item()
        template = minis[0][0] if minis else None
        minis += [[] for _ in range(count - len(minis))]
        sizes = D.all_reduce(torch.tensor([len(m) for m in minis]), "max").tolist()
        return [m + [padding_batch(template or (m[0] if m else None), self.pad_id, self.info.device)
                     for _ in range(n - len(m))] for m, n in zip(minis, sizes)]

    @torch.no_grad()
    def _logprobs(self, objective: PolicyObjective, mb: MicroBatch) -> torch.Tensor:
        with self._autocast():
            return objective(mb)

    def prepare(self, minis: list[list[MicroBatch]]) -> None:
        """Old and reference log-probs, before any parameter changes (parameters unsharded)."""
        a = self.algo
        with D.generation_mode(self.wrapped):
            for j, mini in enumerate(minis):
                for mb in mini:
                    if self.ref_objective is not None and a.beta > 0:
                        mb.ref = self._logprobs(self.ref_objective, mb)
                    if a.old_logprobs == "sampler":
                        mb.old = mb.sampling
                    elif j > 0 or a.ppo_epochs > 1 or a.tis_cap:
                        mb.old = self._logprobs(self.objective, mb)

    def update(self, seqs: Sequences) -> dict:
        """All optimizer steps of one training step; returns averaged metrics."""
        minis = self.plan(seqs)
        self.prepare(minis)
        totals = {k: 0.0 for k in ("loss", "grad_norm", *LOSS_METRICS)}
        steps = skipped = 0
        tokens = 0.0
        for epoch in range(self.algo.ppo_epochs):
            for j, mini in enumerate(minis):
                local_tokens = sum(mb.n_tokens for mb in mini)
                counts = D.all_reduce(torch.tensor([float(local_tokens), float(sum(mb.n_seqs for mb in mini))]))
                global_tokens, global_seqs = counts.tolist()
                opts = self.loss_options(global_tokens)
                loss_sum = torch.zeros((), device=self.info.device)
                sums = torch.zeros(len(LOSS_METRICS), device=self.info.device)
                self.optimizer.zero_grad(set_to_none=True)
                for i, mb in enumerate(mini):
                    scale = self._scale(mb, local_tokens, global_tokens, global_seqs)
                    with D.gradient_sync(self.wrapped, i == len(mini) - 1), self._autocast():
                        loss, metrics = self.wrapped(mb, opts)
                    (loss * scale).backward()
                    loss_sum += loss.detach() * scale
                    sums += torch.stack([metrics[k] for k in LOSS_METRICS]) * mb.n_tokens
                stats = D.all_reduce(torch.cat([loss_sum[None] / self.info.world, sums]))
                norm = self._clip()
                loss_value = stats[0].item()
                if not (math.isfinite(loss_value) and math.isfinite(norm)):
                    skipped += 1
                    self.nonfinite_in_a_row += 1
                    self.optimizer.zero_grad(set_to_none=True)
                    continue
                self.nonfinite_in_a_row = 0
                self.optimizer.step()
                steps += 1
                totals["loss"] += loss_value
                totals["grad_norm"] += norm
                for k, v in zip(LOSS_METRICS, stats[1:].tolist()):
                    totals[k] += v
                tokens += global_tokens
        # NaN when no update was made (every one skipped, or no group kept)
        out = {"loss": totals["loss"] / steps if steps else math.nan,
               "grad_norm": totals["grad_norm"] / steps if steps else math.nan}
        out.update({k: totals[k] / tokens if tokens else math.nan for k in LOSS_METRICS})
        out.update(optimizer_steps=steps, skipped_updates=skipped, train_tokens=tokens)
        return out

    def _clip(self) -> float:
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
            norm = norm.full_tensor()
        return float(norm)
