"""Continuous batching: which rows prefill, which decode, and who is preempted when blocks run out.

    sched = Scheduler(pool, block_size, max_num_seqs, max_prefill_tokens, rows)
    while not sched.done:
        plan = sched.admit()          # waiting rows that fit join (their prompts prefilled if needed)
        batch = sched.decode_batch()  # every running row has a block for its next token, or was preempted
        ...                           # run the step, then sched.finish(row, reason) for the rows that ended

Policy (nano-vllm's, with prefix groups): rows wait in prompt-major order; a row is admitted
while fewer than ``max_num_seqs`` rows run, the blocks it needs (its prompt's if not resident,
its own for any tokens to recompute plus the next one) leave the blocks the running rows need in
the next decode step plus a 1 % watermark (so admission does not cause preemption right away),
and the step's prefill stays under
``max_prefill_tokens`` (one item may exceed it alone). Before a decode step each running row,
oldest first, gets a block if its next token starts one; when none is free the newest running
row is preempted: its blocks are released (its prompt's too when no other sample holds them) and
it goes back to the front of the queue, to be recomputed from its tokens when readmitted. A
preempted row is never lost or duplicated: its tokens stay on the host.

The device block tables are written by the runner from ``table_writes`` (row slot or group
slot, first column, block ids), filled here whenever a table row changes.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .blocks import BlockPool
from .sequence import Group, Row


@dataclass
class PrefillPlan:
    groups: list[Group] = field(default_factory=list)  # prompts to prefill (tokens[:-1])
    rows: list[Row] = field(default_factory=list)  # rows whose private tokens are recomputed

    @property
    def empty(self) -> bool:
        return not self.groups and not self.rows


class Scheduler:
    def __init__(self, pool: BlockPool, block_size: int, max_num_seqs: int, max_prefill_tokens: int,
                 rows: list[Row], group_slots: int):
        self.pool, self.block_size = pool, block_size
        self.max_num_seqs, self.max_prefill_tokens = max_num_seqs, max_prefill_tokens
        self.waiting: deque[Row] = deque(rows)
        self.running: list[Row] = []  # admission order: the newest last
        self.free_slots = list(range(max_num_seqs - 1, -1, -1))
        self.free_group_slots = list(range(group_slots - 1, -1, -1))
        self.table_writes: list[tuple[str, int, int, list[int]]] = []  # ("row"|"group", slot, column, blocks)
        self.held: dict[Group, None] = {}  # groups holding their prompt for fresh rows (ordered)
        self.preemptions = 0
        for row in rows:
            row.group.fresh += 1

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # ------------------------------------------------------------------ admission
    def admit(self) -> PrefillPlan:
        """Admit waiting rows while they fit; returns what must be prefilled for them."""
        plan, tokens = PrefillPlan(), 0
        reserve = sum(r.computed >= len(r.blocks) * self.block_size for r in self.running)  # next step's needs
        reserve += self.pool.capacity // 100  # and a 1 % watermark against preempting soon after
        while self.waiting and len(self.running) < self.max_num_seqs:
            row = self.waiting[0]
            group = row.group
            prefill = 0 if group.resident else group.prefix_len
            need = self.blocks_for(prefill) + self.blocks_for(len(row.tokens) + 1)
            fits = need + reserve <= self.pool.num_free and (group.resident or self.free_group_slots)
            if not fits and not self.running and self.held and plan.empty:
                self._drop_idle_holds()  # nothing runs: prompts held for later rows make room
                continue
            if not fits:
                if not self.running and plan.empty:
                    raise RuntimeError(f"row {row.index} does not fit an idle pool: {need} blocks needed, "
                                       f"{self.pool.num_free} free (a scheduler bug)")
                break
            cost = prefill + len(row.tokens)
            if not plan.empty and tokens + cost > self.max_prefill_tokens:
                break
            self.waiting.popleft()
            tokens += cost
            if not group.resident and group.prefix_len:
                plan.groups.append(group)
            self._hold(group)
            group.running += 1
            if not row.started:
                row.started = True
                group.fresh -= 1
            self._update_group_hold(group)
            row.slot = self.free_slots.pop()
            row.blocks = self.pool.allocate(self.blocks_for(len(row.tokens) + 1))
            self.table_writes.append(("row", row.slot, 0, row.blocks))
            row.computed = 0
            if row.tokens:
                plan.rows.append(row)
            self.running.append(row)
        return plan

    # ------------------------------------------------------------------ decode
    def decode_batch(self) -> list[Row]:
        """The running rows, each with a block for its next token; preempts the newest rows when
        the pool runs out."""
        i = 0
        while i < len(self.running):
            row = self.running[i]
            if row.computed < len(row.blocks) * self.block_size:
                i += 1
                continue
            if not self.pool.num_free:
                self._drop_idle_holds()
            if not self.pool.num_free:
                self.preempt(self.running[-1])  # the newest (possibly this row itself)
                continue
            block = self.pool.allocate(1)
            self.table_writes.append(("row", row.slot, len(row.blocks), block))
            row.blocks += block
            i += 1
        return list(self.running)

    def preempt(self, row: Row) -> None:
        """Free a running row's blocks and queue it first; it is recomputed when readmitted."""
        self._leave(row)
        self.waiting.appendleft(row)
        self.preemptions += 1

    def finish(self, row: Row, reason: str) -> None:
        row.finish = reason
        self._leave(row)

    def release_all(self) -> None:
        """Return every block (after an exception): running rows leave, held prompts are released."""
        for row in list(self.running):
            self._leave(row)
        for group in list(self.held):
            self._unhold(group)
            group.held = False
        self.held.clear()

    def _leave(self, row: Row) -> None:
        self.running.remove(row)
        self.pool.release(row.blocks)
        row.blocks, row.computed = [], 0
        self.free_slots.append(row.slot)
        row.slot = -1
        row.group.running -= 1
        self._unhold(row.group)

    # ------------------------------------------------------------------ prompt blocks
    def _hold(self, group: Group) -> None:
        """One more reference to the group's prompt blocks, allocating them (and a group slot)
        when the group is not resident: the caller prefills it."""
        if group.resident:
            self.pool.share(group.blocks)
        else:
            group.blocks = self.pool.allocate(self.blocks_for(group.prefix_len))
            group.resident = True
            group.slot = self.free_group_slots.pop()
            self.table_writes.append(("group", group.slot, 0, group.blocks))
        group.holders += 1

    def _unhold(self, group: Group) -> None:
        self.pool.release(group.blocks)
        group.holders -= 1
        if group.holders == 0:
            group.blocks, group.resident = [], False
            self.free_group_slots.append(group.slot)
            group.slot = -1

    def _update_group_hold(self, group: Group) -> None:
        """The group keeps a reference of its own while it has fresh rows to admit."""
        if group.fresh and not group.held:
            self._hold(group)
            group.held = True
            self.held[group] = None
        elif not group.fresh and group.held:
            group.held = False
            del self.held[group]
            self._unhold(group)

    def _drop_idle_holds(self) -> None:
        """Out of blocks: prompts kept only for rows not yet admitted are released first."""
        for group in [g for g in self.held if g.running == 0]:
            group.held = False
            del self.held[group]
            self._unhold(group)
