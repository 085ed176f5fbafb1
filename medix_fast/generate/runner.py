"""The engine's model side: packs a scheduler step into tensors and runs the Hugging Face forward.

    runner.apply(sched.table_writes)   # new block ids into the device block tables
    runner.prefill(plan)               # K/V of prompts / recomputed rows, no logits
    logits = runner.decode(rows)       # (b, V) fp32: next-token logits of every running row

Device state: the K/V pool and two block tables, ``row_table`` (max_num_seqs, Wc) indexed by a
running row's slot and ``group_table`` (group slots, Wp) by a resident prompt's slot, written only
where the scheduler changed them. A decode step sends one small (7, b) int64 tensor of per-row
values (input id, position, private length, K/V slot, row slot, noise key, step) and the groups'
(P, Gm) row grid; the rows' block tables are gathered on the device. ``StaticDecoder``
(``cuda_graphs.py``) runs the same step on fixed-shape buffers, and on CUDA replays it as a graph.

Every forward goes through ``_forward`` (the one call into transformers' decoder): ``use_cache=False``
(the K/V goes to the pool through the attention back-end, no transformers cache object), the
step as ``medix_step``, and fp32 logits only where asked, by ``model.forward.head_logits`` (the
LM head in the trainer's cast order: ``mismatch/*`` in bf16 is 3x lower than with transformers'
bf16 logits). (A model whose weights
are not in the compute dtype runs under the sampler's ``torch.autocast``, opened once per call so
the bf16 copies of the weights are made once.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..model.forward import head_logits
from .kv_cache import DecodeStep, KVPool, PrefillStep
from .scheduler import PrefillPlan
from .sequence import Row

META_ROWS = ("ids", "pos", "lens", "slots", "row_slots", "keys", "steps")


@dataclass
class DecodeInputs:
    """A decode step's tensors on the device (b rows, P groups)."""
    meta: torch.Tensor  # (7, b) int64, rows as META_ROWS
    group_slots: torch.Tensor  # (P,) int64
    group_lens: torch.Tensor  # (P,) int32
    group_rows: torch.Tensor  # (P, Gm) int64, padded with b
    row_width: int  # private blocks the widest row uses
    group_width: int  # prompt blocks the widest group uses

    def row(self, name: str) -> torch.Tensor:
        return self.meta[META_ROWS.index(name)]


class Runner:
    def __init__(self, model: nn.Module, pool: KVPool, backend: str, max_num_seqs: int, group_slots: int,
                 row_width: int, group_width: int, vl: bool):
        self.model, self.pool, self.backend, self.vl = model, pool, backend, vl
        self.block_size, device = pool.block_size, pool.device
        self.device = device
        self.row_table = torch.zeros(max_num_seqs, row_width, dtype=torch.int32, device=device)
        self.group_table = torch.zeros(group_slots, group_width, dtype=torch.int32, device=device)
        self.pinned = device.type == "cuda"
        self.record = None  # a model.routing.RoutingRecord while the routing is recorded (routing.py)
        self.routed: torch.Tensor | None = None  # its ids of the last forward: (tokens, layers, k)

    # ------------------------------------------------------------------ host -> device
    def to_device(self, values) -> torch.Tensor:
        """A host list (of lists) of ints as an int64 tensor on the device: one copy, from pinned
        memory on CUDA (asynchronous)."""
        t = torch.tensor(values, dtype=torch.long)
        if not self.pinned:
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def apply(self, writes: list[tuple[str, int, int, list[int]]]) -> None:
        """Write new block ids into the tables: (table, slot, first column, blocks)."""
        if not writes:
            return
        coords = [[], [], []], [[], [], []]
        for table, slot, column, blocks in writes:
            c = coords[table == "group"]
            for j, block in enumerate(blocks):
                c[0].append(slot)
                c[1].append(column + j)
                c[2].append(block)
        for target, c in zip((self.row_table, self.group_table), coords):
            if c[0]:
                slot, col, block = self.to_device(c)
                target.index_put_((slot, col), block.to(torch.int32))
        writes.clear()

    # ------------------------------------------------------------------ forward
    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, step, keep: int, **vision) -> torch.Tensor | None:
        """The one call into the Hugging Face decoder; fp32 logits (1 or b, keep, V) of the last
        ``keep`` positions by ``head_logits`` (the trainer's LM-head cast order), None for 0; the
        routing ids in ``routed`` while a record is on."""
        decoder = self.model.model if self.vl else self.model.get_decoder()
        hidden = decoder(input_ids=ids, position_ids=pos, use_cache=False, medix_step=step, **vision).last_hidden_state
        if self.record is not None:
            self.routed = self.record.take()  # inside the step: a CUDA graph's output like the logits
        return head_logits(self.model, hidden[:, -keep:]) if keep else None

    def prefill(self, plan: PrefillPlan) -> None:
        """Fill the K/V of the plan's prompts (all tokens but the last) and recomputed rows."""
        ids, pos, slots, items, images, start = [], [], [], [], [], 0
        for g in plan.groups:
            ids.append(torch.tensor(g.tokens[:-1]))
            pos.append(g.prefix_pos if self.vl else torch.arange(g.prefix_len))
            slots.append(self._slots(g.blocks, g.prefix_len))
            items.append((start, start + g.prefix_len, None, 0))
            start += g.prefix_len
            if g.image is not None:
                images.append(g.image)
        for r in plan.rows:
            n = len(r.tokens)
            ids.append(torch.tensor(r.private_inputs()))
            p = r.group.last_pos + torch.arange(n)
            pos.append(p.expand(3, n) if self.vl else p)
            slots.append(self._slots(r.blocks, n))
            prefix = torch.tensor(r.group.blocks, device=self.device) if r.group.prefix_len else None
            items.append((start, start + n, prefix, r.group.prefix_len))
            start += n
        vision = {}
        if images:
            vision = {"pixel_values": torch.cat([b.pixel_values for b in images]).to(self.device),
                      "image_grid_thw": torch.cat([b.image_grid_thw for b in images]).to(self.device)}
        ids_t = torch.cat(ids).to(self.device)[None]  # (1, N)
        pos_t = torch.cat(pos, -1).to(self.device)  # (N,) or (3, N)
        pos_t = pos_t[:, None] if self.vl else pos_t[None]  # (3, 1, N) or (1, N)
        step = PrefillStep(self.pool, self.backend, torch.cat(slots).to(self.device), items)
        self._forward(ids_t, pos_t, step, 0, **vision)
        for r in plan.rows:
            r.computed = len(r.tokens)

    def _slots(self, blocks: list[int], n: int) -> torch.Tensor:
        """Token slots (n,) of the first n tokens held in ``blocks``."""
        i = torch.arange(n)
        return torch.tensor(blocks, dtype=torch.long)[i // self.block_size] * self.block_size + i % self.block_size

    def decode_inputs(self, rows: list[Row]) -> DecodeInputs:
        """The step's per-row values and group grid, on the device."""
        bs = self.block_size
        members: dict = {}
        for i, r in enumerate(rows):
            members.setdefault(r.group, []).append(i)
        b, group_max = len(rows), max(len(m) for m in members.values())
        meta = self.to_device([
            [r.next_input() for r in rows],
            [r.group.last_pos + r.computed for r in rows],
            [r.computed + 1 for r in rows],
            [r.blocks[r.computed // bs] * bs + r.computed % bs for r in rows],
            [r.slot for r in rows],
            [r.key for r in rows],
            [r.computed for r in rows],
        ])
        groups = list(members)
        grid = [m + [b] * (group_max - len(m)) for m in members.values()]
        gmeta = self.to_device([[g.slot for g in groups], [g.prefix_len for g in groups]])
        return DecodeInputs(meta, gmeta[0], gmeta[1].to(torch.int32), self.to_device(grid),
                            max(len(r.blocks) for r in rows), max(len(g.blocks) for g in groups) or 1)

    def decode(self, inputs: DecodeInputs) -> torch.Tensor:
        """Next-token logits (b, V) fp32 of the step's rows."""
        step = self.decode_step(inputs, inputs.row_width, inputs.group_width)
        ids, pos = inputs.row("ids")[:, None], inputs.row("pos")[:, None]  # (b, 1)
        return self._forward(ids, pos, step, 1)[:, -1].float()

    def decode_step(self, inputs: DecodeInputs, row_width: int, group_width: int) -> DecodeStep:
        return DecodeStep(
            pool=self.pool, backend=self.backend, slots=inputs.row("slots"),
            row_table=self.row_table[inputs.row("row_slots")][:, :row_width],
            row_lens=inputs.row("lens").to(torch.int32),
            group_table=self.group_table[inputs.group_slots][:, :group_width],
            group_lens=inputs.group_lens, group_rows=inputs.group_rows)
