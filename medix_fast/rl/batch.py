"""The rollout's sequences and the update's micro-batches, as device tensors.

``Sequences`` holds one rank's sampled groups (group-major: group g's responses are rows
g*G .. g*G+G-1): the completions as one padded ``(N, C)`` token tensor, their lengths, the
sampler's log-probs ``(N, C)`` and the advantages ``(N,)``, all on the training device, plus the
prompts and completions as host token lists (the text side: decoding, rules, counts), and for routing
replay a mixture-of-experts sampler's recorded experts. ``collate``
slices whole groups of it into a ``MicroBatch`` with one row gather on the device (each group's
prompt once, left-padded; its G completions right-padded); ``pack`` groups items under a token
budget; ``padding_batch`` is the zero-weight micro-batch that keeps ranks in step.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..distributed import to_device


def pad_rows(rows: list[torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
    """(len_i,) tensors -> (N, max len) right-padded with zeros, where they are (one device op)."""
    if not rows:
        return torch.zeros((0, 0), device=device)
    return torch.nn.utils.rnn.pad_sequence([r.float() for r in rows], batch_first=True)  # (N, C)


@dataclass
class Sequences:
    """This rank's training sequences, group-major (group g's responses are rows g*G .. g*G+G-1).

    ``sampling_logprobs`` may be given as a list of (len,) tensors (a sampler's rows): it is padded
    where it lies. ``tokens`` (N, C) and ``lengths`` are derived from ``completion_ids``, the tokens
    copied to the advantages' device once."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]  # the stop token, when sampled, is part of the completion
    sampling_logprobs: torch.Tensor  # (N, C) fp32, zeros past each row's length
    advantages: torch.Tensor  # (N,) float32
    group_size: int
    images: list | None = None  # VL: a medix_fast.data.vision.PixelBatch or None per row (its group's prompt image)
    # MoE routing replay: per row the sampler's (len(prompt) + len(completion) - 1, layers, k) expert ids
    # (model/routing.py), padded to (N, W, layers, k) with -1 where it lies
    routing: torch.Tensor | list | None = None
    tokens: torch.Tensor = field(init=False)  # (N, C) completion tokens, 0 past each row's length
    lengths: list[int] = field(init=False)  # completion tokens per row

    def __post_init__(self):
        device = self.advantages.device
        if not isinstance(self.sampling_logprobs, torch.Tensor):
            self.sampling_logprobs = pad_rows(list(self.sampling_logprobs), device)
        self.lengths = [len(c) for c in self.completion_ids]
        if len(self.lengths) != self.advantages.shape[0] or self.sampling_logprobs.shape[0] != len(self.lengths):
            raise ValueError(f"{len(self.lengths)} completions, {self.advantages.shape[0]} advantages and "
                             f"{self.sampling_logprobs.shape[0]} rows of sampling log-probs must agree")
        width = max(self.lengths, default=0)
        if self.sampling_logprobs.shape[1] < width:
            raise ValueError(f"sampling_logprobs has {self.sampling_logprobs.shape[1]} columns, the longest "
                             f"completion {width} tokens")
        if isinstance(self.routing, list):  # no rows (every group filtered out, or none finished yet): none
            self.routing = torch.nn.utils.rnn.pad_sequence(self.routing, batch_first=True, padding_value=-1) \
                if self.routing else None
        if self.routing is not None and self.routing.shape[0] != len(self.lengths):
            raise ValueError(f"routing has {self.routing.shape[0]} rows for {len(self.lengths)} completions")
        host = torch.tensor([c + [0] * (width - len(c)) for c in self.completion_ids], dtype=torch.long)
        self.tokens = to_device(host.reshape(len(self.lengths), width), device)  # (N, C)


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
    lengths: list[int] = field(default_factory=list)  # completion tokens per row (host: the loss needs no sync)
    old: torch.Tensor | None = None  # (B, C)
    ref: torch.Tensor | None = None  # (B, C)
    weight: float = 1.0  # 0 for the padding micro-batches that keep the ranks in step
    pixel_values: torch.Tensor | None = None  # VL: the groups' prompt images' patches, in group order
    image_grid_thw: torch.Tensor | None = None  # (n_images, 3)
    image_patches: list[int] = field(default_factory=list)  # patches per image (host)
    image_rows: torch.Tensor | None = None  # (B,) 1 on the rows whose prompt has an image
    # routing replay (Sequences.routing): the experts each forward position replays, -1 where none
    # was recorded (padding, the last completion token): prompt columns as prompt_ids (per row), and
    # the completion columns as targets (column j: the routing of input targets[j])
    prompt_routing: torch.Tensor | None = None  # (B, P, layers, k)
    completion_routing: torch.Tensor | None = None  # (B, C, layers, k)

    @property
    def tokens(self) -> int:
        """Completion tokens (mask sum)."""
        return sum(self.lengths)

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
    """Groups ``groups`` of ``seqs`` as one micro-batch on ``device``: the prompts built on the
    host (one copy), the completions, log-probs and advantages gathered on the device."""
    g = seqs.group_size
    rows = [k * g + j for k in groups for j in range(g)]
    prompts = [seqs.prompt_ids[k * g] for k in groups]
    if any(seqs.prompt_ids[r] != seqs.prompt_ids[(r // g) * g] for r in rows):
        raise ValueError("every response of a group must share its group's prompt")
    lengths = [seqs.lengths[r] for r in rows]
    plen, clen = max(len(p) for p in prompts), max(lengths)
    host = torch.tensor([[pad_id] * (plen - len(p)) + p for p in prompts] +  # (n_groups, P) left-padded
                        [[0] * (plen - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)  # its mask
    prompt_ids, prompt_mask = to_device(host.reshape(2, len(groups), plen), device).unbind(0)  # (n_groups, P) each
    has_image = [int(seqs.images is not None and seqs.images[r] is not None) for r in rows]
    index, counts, image_rows = to_device(torch.tensor([rows, lengths, has_image], dtype=torch.long),
                                          device).unbind(0)  # (B,) each
    mask = (torch.arange(clen, device=device) < counts[:, None]).float()  # (B, C)
    targets = seqs.tokens.index_select(0, index)[:, :clen].masked_fill(mask == 0, pad_id)  # (B, C)
    sampling = seqs.sampling_logprobs.index_select(0, index)[:, :clen].float() * mask  # (B, C)
    pix = [b for b in (seqs.images[k * g] for k in groups) if b is not None] if seqs.images else []
    routing = _routing(seqs, rows, plen, clen, device) if seqs.routing is not None else (None, None)
    return MicroBatch(rows, prompt_ids, prompt_mask, targets, mask, seqs.advantages.index_select(0, index).float(),
                      sampling, g, lengths, prompt_routing=routing[0], completion_routing=routing[1],
                      pixel_values=to_device(torch.cat([b.pixel_values for b in pix]), device) if pix else None,
                      image_grid_thw=to_device(torch.cat([b.image_grid_thw for b in pix]), device) if pix else None,
                      image_patches=[int(t * h * w) for b in pix for t, h, w in b.image_grid_thw.tolist()],
                      image_rows=image_rows)


def _routing(seqs: Sequences, rows: list[int], plen: int, clen: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' recorded experts in the micro-batch's layout, (B, P, ...) and (B, C, ...): a row's
    record r (its input positions) sits at prompt column P - len(prompt) + i for i < len(prompt)
    and at completion column j for r[len(prompt) + j], j < len(completion) - 1; -1 elsewhere.
    One gather on the device from a host-built index."""
    width = seqs.routing.shape[1]
    index = []
    for r in rows:
        p, c = len(seqs.prompt_ids[r]), seqs.lengths[r]
        base = r * width
        index += [-1] * (plen - p) + [base + i for i in range(p)]
        index += [base + p + j for j in range(c - 1)] + [-1] * (clen - c + 1)
    index = to_device(torch.tensor(index, dtype=torch.long), device)  # (B * (P + C),)
    flat = seqs.routing.reshape(-1, *seqs.routing.shape[2:])  # (N * W, layers, k)
    ids = flat.index_select(0, index.clamp(min=0)).masked_fill((index < 0)[:, None, None], -1)
    ids = ids.view(len(rows), plen + clen, *flat.shape[1:])
    return ids[:, :plen], ids[:, plen:]


def padding_batch(template: MicroBatch | None, pad_id: int, device: torch.device) -> MicroBatch:
    """A zero-weight micro-batch (a copy of ``template``, or one pad token) for ranks with fewer."""
    if template is not None:
        return replace(template, weight=0.0)
    one = torch.ones((1, 1), device=device)
    ids = torch.full((1, 1), pad_id, dtype=torch.long, device=device)
    return MicroBatch([], ids, torch.ones_like(ids), ids.clone(), one, torch.zeros(1, device=device),
                      torch.zeros_like(one), group_size=1, lengths=[1], weight=0.0)
