"""Group tokenised texts into padded batches for the reward models.

A rollout batch of short answers fits in one forward; a few long junk answers must not pad the
whole batch to their length. ``padded_chunks`` sorts the texts by length and starts a new batch
only when adding the next text would make padding more than half of the batch's tokens, or
``rows * longest`` exceed ``max_tokens`` (``None``: no cap). Similar lengths: one forward.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch


def length_buckets(lengths: list[int], max_tokens: int | None) -> list[list[int]]:
    """Row indices grouped as described above, shortest first."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    chunks: list[list[int]] = []
    real = 0
    for i in order:
        padded = (len(chunks[-1]) + 1) * lengths[i] if chunks else 0
        if not chunks or padded > 2 * (real + lengths[i]) or (max_tokens is not None and padded > max_tokens):
            chunks.append([])
            real = 0
        chunks[-1].append(i)
        real += lengths[i]
    return chunks


def padded_chunks(tokenizer, ids: list[list[int]], max_tokens: int | None,
                  device: str | torch.device) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """Yield (row indices, padded batch on ``device``); padding side is the tokenizer's."""
    for rows in length_buckets([len(x) for x in ids], max_tokens):
        batch = tokenizer.pad({"input_ids": [ids[i] for i in rows]}, return_tensors="pt")
        yield rows, {k: v.to(device) for k, v in batch.items()}
