"""The engine's host-side records: a prompt (``Group``) and one of its samples (``Row``).

K/V layout (cascade): a prompt's tokens except its last are prefilled once into the group's
blocks, shared read-only by its samples (each running sample holds a reference). A row's own
sequence starts with the prompt's last token: x_0 = prompt[-1], x_i = completion[i - 1], and its
K/V goes to the row's private blocks. So nothing ever writes into a shared block (no
copy-on-write needed), and a row's first decode step produces its first completion token.
A row with ``computed`` private tokens cached feeds x_computed next, at position
``group.last_pos + computed``; its decode step index (for the noise) is ``computed``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class Group:
    index: int  # prompt index in the call
    tokens: list[int]
    last_pos: int  # position of the prompt's last token (text: len - 1; VL: its mrope position)
    prefix_pos: torch.Tensor | None = None  # VL: mrope positions (3, len - 1) of the prefilled tokens
    image: object = None  # medix_fast.data.vision.PixelBatch or None
    blocks: list[int] = field(default_factory=list)  # K/V of tokens[:-1]; [] while not resident
    resident: bool = False
    slot: int = -1  # row of the device group table while resident
    fresh: int = 0  # samples never admitted yet
    running: int = 0  # samples running now
    holders: int = 0  # references to the blocks: running samples, + 1 while ``held``
    held: bool = False  # the group keeps its blocks for its fresh samples

    @property
    def prefix_len(self) -> int:
        return len(self.tokens) - 1


@dataclass(eq=False)
class Row:
    index: int  # output row: prompt * n + sample
    group: Group
    key: int  # noise key (medix_fast.generate.tokens.row_key)
    tokens: list[int] = field(default_factory=list)  # completion so far
    flat: list[int] = field(default_factory=list)  # where each token's log-prob is in the call's log-prob log
    blocks: list[int] = field(default_factory=list)  # private K/V blocks
    computed: int = 0  # private tokens whose K/V is cached
    slot: int = -1  # row of the device row table while running
    started: bool = False  # admitted at least once
    finish: str | None = None  # "stop" | "length" once done

    def next_input(self) -> int:
        return self.tokens[self.computed - 1] if self.computed else self.group.tokens[-1]

    def private_inputs(self) -> list[int]:
        """x_0 .. x_{n-1} for the n = len(tokens) private tokens a recompute fills."""
        return [self.group.tokens[-1]] + self.tokens[:-1] if self.tokens else []
