"""Block accounting of the paged K/V pool: which blocks are free, and how many holders each has.

    pool = BlockPool(num_blocks=1000)
    blocks = pool.allocate(3)      # refcount 1 each
    pool.share(blocks)             # a second holder (another sample of the same prompt)
    pool.release(blocks)           # back to the free list when the last holder releases
    pool.check_idle()              # every block free and no refcount left, else RuntimeError

Host bookkeeping only; the K/V itself lives in ``kv_cache.KVPool``. Block 0 is reserved (never
handed out): padded rows of a fixed-shape decode step write their K/V there.
"""
from __future__ import annotations


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError(f"a pool needs at least 2 blocks (block 0 is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks
        self.free = list(range(num_blocks - 1, 0, -1))  # a stack: low ids first
        self.in_use_peak = 0

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def capacity(self) -> int:
        """Blocks that can ever be handed out (all but the reserved block 0)."""
        return self.num_blocks - 1

    @property
    def in_use(self) -> int:
        return self.capacity - len(self.free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self.free):
            raise RuntimeError(f"K/V pool exhausted: {count} blocks asked, {len(self.free)} free")
        blocks = [self.free.pop() for _ in range(count)]
        for b in blocks:
            self.refs[b] = 1
        self.in_use_peak = max(self.in_use_peak, self.in_use)
        return blocks

    def share(self, blocks: list[int]) -> None:
        for b in blocks:
            if self.refs[b] < 1:
                raise RuntimeError(f"block {b} is free: it cannot be shared")
            self.refs[b] += 1

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            if self.refs[b] < 1:
                raise RuntimeError(f"block {b} released more often than held")
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.free.append(b)

    def check_idle(self) -> None:
        held = [b for b, r in enumerate(self.refs) if r]
        if held or len(self.free) != self.capacity:
            raise RuntimeError(f"K/V blocks leaked: {len(held)} still held (e.g. {held[:5]}), "
                               f"{len(self.free)} of {self.capacity} free")
