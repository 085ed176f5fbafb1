"""The decode step on fixed-shape buffers, padded to batch buckets, and on CUDA captured once per
bucket as a CUDA graph and replayed (nano-vllm style).

A step's per-row values (input id, position, private length, K/V slot, row slot, noise key, step),
the groups' table slots, prompt lengths and row grid are copied into static buffers sized for
``max_num_seqs`` rows; the block tables are the engine's own device tables (gathered inside the
step), and the attention reads only each item's live length, so one graph per batch bucket
serves every sequence length: lengths and block tables are graph inputs, not shapes. Padded rows
feed token 0 at position 0 and write their K/V into the reserved block 0; padded groups have
length 0. With ``capture=False`` the same fixed-shape step runs eagerly (the CPU tests' path),
its outputs written into the same tensors at each step of a bucket, as a graph's replays are.

A graph holds the addresses of the weights, the K/V pool, the tables and its own buffers, so
nothing it reads may be freed or moved while it is kept: the weights it reads are the engine's
(``weights.py``: compute-dtype buffers refreshed in place at the start of each call, for fp32
masters under autocast and FSDP2's unsharded parameters) or parameters the optimizer updates in
place, so one decoder serves every call and step of a run. New weight storage or a new pool
(``fits`` says no) needs new graphs: the sampler builds a new decoder, after dropping the old one.
Autocast's cache is off during a capture, so a weight autocast still casts (a bias) is cast inside
the graph at each replay, never read from a per-call copy. The tables are allocated at a power of
two of blocks wide, so a call with a somewhat longer prompt than the last fits the same decoder.
With a routing record on (``routing.py``) the step's routing ids are stacked inside the step, in
the graph's buffer, and copied out after each replay. Every graph writes its logits into one
(max_rows, V) fp32 buffer (one copy of them per step): a graph's own output would live as long as
the graph, the sum of the buckets' logits (31.7 GB at the 30B's 1,280 rows) where one maximum does.
"""
from __future__ import annotations

import logging

import torch

from .runner import META_ROWS, DecodeInputs, Runner

log = logging.getLogger(__name__)
PAD = (0, 0, 1, 0, 0, 0, 0)  # META_ROWS of a padded row: token 0 at position 0, one token, slot 0 (block 0)


def batch_buckets(max_rows: int) -> list[int]:
    """Batch sizes with a graph: 1, 2, 4, 8, then every 16, and max_rows."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_rows] + list(range(16, max_rows, 16))
    return sizes + [max_rows]


def _pow2(width: int) -> int:
    return 1 << max(0, width - 1).bit_length()


def _weights(model) -> tuple[int, ...]:
    return tuple(p.data_ptr() for p in model.parameters())


class StaticDecoder:
    """``decoder(inputs)`` -> logits (b, V) of a decode step (``runner.DecodeInputs``)."""

    def __init__(self, runner: Runner, max_rows: int, group: int, capture: bool):
        device = runner.device
        self.max_rows, self.group, self.capture = max_rows, group, capture
        self.buckets = batch_buckets(max_rows)
        self.meta = torch.zeros(len(META_ROWS), max_rows, dtype=torch.long, device=device)
        self.pad = torch.tensor(PAD, dtype=torch.long, device=device)[:, None]  # (7, 1)
        self.group_slots = torch.zeros(max_rows, dtype=torch.long, device=device)
        self.group_lens = torch.zeros(max_rows, dtype=torch.int32, device=device)
        self.group_rows = torch.zeros(max_rows, group, dtype=torch.long, device=device)
        self.row_table = torch.zeros(runner.row_table.shape[0], _pow2(runner.row_table.shape[1]), dtype=torch.int32,
                                     device=device)
        self.group_table = torch.zeros(runner.group_table.shape[0], _pow2(runner.group_table.shape[1]),
                                       dtype=torch.int32, device=device)
        self.pool = runner.pool
        self.weights = _weights(runner.model)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor | None]] = {}
        self.graph_pool = None
        self.logits: torch.Tensor | None = None  # (max_rows, V) fp32: every graph's logits, made at the first capture
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}  # capture=False: a bucket's outputs
        self.runner = runner

    def fits(self, runner: Runner, group: int) -> bool:
        """Whether this decoder (its buffers and graphs) serves ``runner``'s call: the same pool and
        weights, tables and groups no wider (an evaluation's single rows in a rollout's decoder)."""
        return (group <= self.group and runner.pool is self.pool and _weights(runner.model) == self.weights
                and runner.row_table.shape[1] <= self.row_table.shape[1]
                and runner.group_table.shape[1] <= self.group_table.shape[1])

    def bind(self, runner: Runner) -> None:
        """Make ``runner`` (a new call's, before it writes a block id) write into this decoder's tables."""
        runner.row_table, runner.group_table = self.row_table, self.group_table
        self.runner = runner

    def bucket(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows)

    def __call__(self, inputs: DecodeInputs) -> torch.Tensor:
        b, groups = inputs.meta.shape[1], inputs.group_slots.shape[0]
        size = self.bucket(b)
        self.meta[:, :b] = inputs.meta
        self.meta[:, b:size] = self.pad
        self.group_slots[:groups] = inputs.group_slots
        self.group_slots[groups:size] = 0
        self.group_lens[:groups] = inputs.group_lens
        self.group_lens[groups:size] = 0
        grid = inputs.group_rows  # (P, Gm), padded with b: the static step's dummy row is `size`
        self.group_rows[:size] = size
        self.group_rows[:groups, :grid.shape[1]] = grid.masked_fill(grid == b, size)
        if self.capture and size not in self.graphs:
            try:
                self.graphs[size] = self._capture(size)
            except RuntimeError as err:  # e.g. a module hook that cannot be captured: run eagerly instead
                log.warning("decode step not capturable as a CUDA graph (%s); running it eagerly", err)
                self.capture = False
        if self.capture:
            graph, logits, routed = self.graphs[size]
            graph.replay()
        else:  # written into one set of outputs per bucket, as a graph's replays are
            step = self._step(size)
            outputs = self.outputs.setdefault(size, step)
            for kept, new in zip(outputs, step):
                if kept is not None and kept is not new:
                    kept.copy_(new)
            logits, routed = outputs
        if routed is not None:  # (size, layers, k): the next replay writes over the graph's buffer
            self.runner.routed = routed[:b].clone()
        return logits[:b]

    def _step(self, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fixed-shape step: logits (size, V) and, with a routing record, its ids (size, layers, k)."""
        static = DecodeInputs(self.meta[:, :size], self.group_slots[:size], self.group_lens[:size],
                              self.group_rows[:size], self.row_table.shape[1], self.group_table.shape[1])
        return self.runner.decode(static), self.runner.routed if self.runner.record is not None else None

    def _capture(self, size: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor | None]:
        # Warm-up and capture write the same K/V at the same slots as the replay that follows.
        # Autocast's cache off: its copies die with the call, the graph outlives it.
        cache = torch.is_autocast_cache_enabled()
        torch.set_autocast_cache_enabled(False)
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._step(size)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.graph_pool):
                logits, routed = self._step(size)
                if self.logits is None:
                    self.logits = torch.empty(self.max_rows, logits.shape[1], dtype=logits.dtype, device=logits.device)
                self.logits[:size].copy_(logits)  # the step's own logits die with the capture: the next reuses them
        finally:
            torch.set_autocast_cache_enabled(cache)
        self.graph_pool = graph.pool()
        return graph, self.logits[:size], routed
