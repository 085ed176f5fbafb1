"""The sampler's one-token decode step on fixed-shape buffers, padded to batch buckets, and on CUDA
captured once per shape as a CUDA graph and replayed (nano-vllm style).

Each decode forward reads its inputs from static buffers: token ids, position ids, the completion
column, the (prompts, group) grid and row slots of the prefix-shared attention, and validity masks
over all ``max_seq_len`` columns of both cache regions, so the captured kernels replay with new
values and no host work. The live rows are padded up to a batch bucket and the live prompts up
to a prompt bucket; padded rows and prompts carry stale but finite data whose outputs are dropped.
A graph is keyed by (row bucket, prompt bucket, group size). With ``capture=False`` the same
fixed-shape step runs eagerly: the path the CPU tests use to check it against the eager decode.

A graph holds the addresses of the weights and of the cache buffers: the optimizer's in-place
updates are seen at replay, but new parameter storage (e.g. FSDP re-sharding) needs ``reset()``
(the sampler checks the parameter addresses before each call), and a reallocated cache region
resets the graphs by itself.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .kv_cache import StaticKVCache

Forward = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]  # (ids, mask, pos) -> logits


def batch_buckets(max_batch_size: int) -> list[int]:
    """Sizes with a captured graph: 1, 2, 4, 8, then every 16, and max_batch_size."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch_size] + list(range(16, max_batch_size, 16))
    return sizes + [max_batch_size]


class StaticDecoder:
    """Fixed-shape decode step: ``set_prompts(valid)`` when the live prompts change, then
    ``decoder(tokens, pos, col, grid, slot)`` returns the next-token logits (b, V)."""

    def __init__(self, forward: Forward, cache: StaticKVCache, device: torch.device, capture: bool):
        self.forward, self.cache, self.capture, self.device = forward, cache, capture, device
        rows, width = cache.max_batch_size, cache.max_seq_len
        self.buckets = batch_buckets(rows)
        self.ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.col = torch.zeros(1, dtype=torch.long, device=device)
        self.slot = torch.zeros(rows, dtype=torch.long, device=device)
        self.comp_valid = torch.zeros(rows, width, dtype=torch.bool, device=device)
        self.columns = torch.arange(width, device=device)
        self.prompt_valid = torch.zeros(0, width, dtype=torch.bool, device=device)
        self.grids: dict[tuple[int, int], torch.Tensor] = {}
        self.graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.generation = cache.generation

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def reset(self) -> None:
        """Drop the captured graphs (captured again on next use)."""
        self.graphs.clear()
        self.pool = None

    def set_prompts(self, valid: torch.Tensor) -> None:
        """valid (P, T) bool: the live prompts' columns; padded prompts see column 0 only."""
        if self.prompt_valid.shape[0] < self.cache.prompt_rows:
            self.prompt_valid = torch.zeros(self.cache.prompt_rows, self.cache.max_seq_len, dtype=torch.bool, device=self.device)
            self.reset()
        self.prompt_valid.zero_()
        self.prompt_valid[:, 0] = True
        self.prompt_valid[: valid.shape[0], : valid.shape[1]] = valid

    def __call__(self, tokens: torch.Tensor, pos: torch.Tensor, col: torch.Tensor,
                 grid: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """tokens, pos (b,); col (1,) completion column; grid (P, G) and slot (b,) as in StaticKVCache."""
        if self.cache.generation != self.generation:
            self.generation = self.cache.generation
            self.reset()
        b, width = tokens.numel(), self.cache.max_seq_len
        rows, prompts, group = self.bucket(b), self.bucket(grid.shape[0]), grid.shape[1]
        self.ids[:b, 0] = tokens
        self.pos[:b, 0] = pos
        self.col.copy_(col)
        self.slot[:b] = slot
        self.slot[b:rows] = 0
        self.comp_valid[:rows] = self.columns[None, :] <= col
        static_grid = self.grids.setdefault((prompts, group), torch.zeros(prompts, group, dtype=torch.long, device=self.device))
        static_grid[: grid.shape[0]] = grid
        static_grid[grid.shape[0]:] = 0
        self.cache.set_prompts(self.prompt_valid[:prompts])
        self.cache.decode(rows, self.col, static_grid, self.slot[:rows], width, self.comp_valid[:rows])
        args = (self.ids[:rows], None, self.pos[:rows])
        if not self.capture:
            return self.forward(*args)[:b]
        key = (rows, prompts, group)
        if key not in self.graphs:
            self.graphs[key] = self._capture(args)
        graph, logits = self.graphs[key]
        graph.replay()
        return logits[:b]

    def _capture(self, args: tuple) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm-up and capture write the same K/V at the same column as the replay that follows.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.forward(*args)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.forward(*args)
        self.pool = graph.pool()
        return graph, logits
