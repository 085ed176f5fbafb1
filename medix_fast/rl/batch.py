"""The rollout's sequences and the update's micro-batches.

``Sequences`` holds one rank's sampled groups (group-major: group g's responses are rows
g*G .. g*G+G-1) with their sampling log-probs and advantages; ``collate`` turns whole groups of
it into a ``MicroBatch`` (each group's prompt once, left-padded, its G completions right-padded);
``pack`` groups items under a token budget; ``padding_batch`` is the zero-weight micro-batch that
keeps ranks in step.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class Sequences:
    """This rank's training sequences, group-major (group g's responses are rows g*G .. g*G+G-1)."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]  # the stop token, when sampled, is part of the completion
    sampling_logprobs: list[torch.Tensor]  # (len(completion),) fp32 each
    advantages: torch.Tensor  # (N,) float32
    group_size: int
    images: list | None = None  # VL: a medix_fast.data.vision.PixelBatch or None per row (its group's prompt image)


@dataclass
class MicroBatch:
    """Whole groups: each group's prompt once (left-padded), its G completions (right-padded)."""

    rows: list[int]  # indices into Sequences (B = groups x G, group-major)
    prompt_ids: torch.Tensor  # (n_groups, P) left-padded
    prompt_mask: torch.Tensor  # (n_groups, P)
    targets: torch.Tensor  # (B, C) completion tokens, right-padded
    mask: torch.Tensor  # (B, C) float, 1 on completion tokens
    advantages: torch.Tensor  # (B,)
    sampling: torch.Tensor  # (B, C) sampler log-probs
    group_size: int
    old: torch.Tensor | None = None  # (B, C)
    ref: torch.Tensor | None = None  # (B, C)
    tokens: int = 0  # completion tokens (mask sum)
    weight: float = 1.0  # 0 for the padding micro-batches that keep the ranks in step
    pixel_values: torch.Tensor | None = None  # VL: the groups' prompt images' patches, in group order
    image_grid_thw: torch.Tensor | None = None  # (n_images, 3)

    @property
    def n_tokens(self) -> int:
        return self.tokens if self.weight else 0

    @property
    def n_seqs(self) -> int:
        return len(self.rows) if self.weight else 0


def pack(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices grouped so that (items x longest) <= budget tokens; longest first, an item over
    the budget alone."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current = [], []
    for i in order:
        if current and lengths[current[0]] * (len(current) + 1) > budget:
            batches.append(current)
            current = []
        current.append(i)
    return batches + ([current] if current else [])


def collate(seqs: Sequences, groups: list[int], pad_id: int, device: torch.device) -> MicroBatch:
    g = seqs.group_size
    rows = [k * g + j for k in groups for j in range(g)]
    prompts = [seqs.prompt_ids[k * g] for k in groups]
    if any(seqs.prompt_ids[r] != seqs.prompt_ids[(r // g) * g] for r in rows):
        raise ValueError("every response of a group must share its group's prompt")
    comps = [seqs.completion_ids[r] for r in rows]
    plen, clen = max(len(p) for p in prompts), max(len(c) for c in comps)
    prompt_ids = torch.full((len(groups), plen), pad_id, dtype=torch.long)  # (n_groups, P)
    prompt_mask = torch.zeros((len(groups), plen), dtype=torch.long)  # (n_groups, P)
    targets = torch.full((len(rows), clen), pad_id, dtype=torch.long)  # (B, C)
    mask = torch.zeros((len(rows), clen))  # (B, C)
    sampling = torch.zeros((len(rows), clen))  # (B, C)
    for k, p in enumerate(prompts):
        prompt_ids[k, plen - len(p):] = torch.tensor(p)
        prompt_mask[k, plen - len(p):] = 1
    for b, c in enumerate(comps):
        targets[b, :len(c)] = torch.tensor(c, dtype=torch.long)
        mask[b, :len(c)] = 1.0
        sampling[b, :len(c)] = seqs.sampling_logprobs[rows[b]].float()
    pix = [b for b in (seqs.images[k * g] for k in groups) if b is not None] if seqs.images else []
    return MicroBatch(rows, prompt_ids.to(device), prompt_mask.to(device), targets.to(device), mask.to(device),
                      seqs.advantages[rows].float().to(device), sampling.to(device), g,
                      tokens=sum(len(c) for c in comps),
                      pixel_values=torch.cat([b.pixel_values for b in pix]).to(device) if pix else None,
                      image_grid_thw=torch.cat([b.image_grid_thw for b in pix]).to(device) if pix else None)


def padding_batch(template: MicroBatch | None, pad_id: int, device: torch.device) -> MicroBatch:
    """A zero-weight micro-batch (a copy of ``template``, or one pad token) for ranks with fewer."""
    if template is not None:
        return replace(template, weight=0.0)
    one = torch.ones((1, 1), device=device)
    ids = torch.full((1, 1), pad_id, dtype=torch.long, device=device)
    return MicroBatch([], ids, torch.ones_like(ids), ids.clone(), one, torch.zeros(1, device=device),
                      torch.zeros_like(one), group_size=1, weight=0.0)
