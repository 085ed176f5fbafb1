"""Which rank is dead, and which collective a rank waits in: heartbeats through the rendezvous store.

    where.enter("rollout", step=3)                 # the trainer, at each phase: host-side assignments only
    with waiting("all_reduce"): dist.all_reduce(t)  # distributed.py, around every collective it issues
    Watchdog(store, rank, world, heartbeat_s=5, dead_after_s=60, stall_warn_s=300).start()

Every ``heartbeat_s`` a daemon thread of each rank writes where it is (``where/<rank>``: step, phase,
collective, seconds in it) and bumps its counter (``beat/<rank>``) in the store every rank reached
the process group through (torchrun's), then reads the other ranks' counters:

* a rank whose counter has not moved for ``dead_after_s`` (timed on this rank's clock, so no clocks
  are compared across hosts) is dead: one line names it and where it was last seen, and this
  process exits with status 1, so that ``torchrun --max-restarts`` restarts the job from the last
  checkpoint instead of every rank waiting out the process group's hard timeout
  (``distributed.timeout_min``) in a collective the dead rank never joins;
* this rank waiting in one collective longer than ``stall_warn_s`` says so once per wait, naming
  the collective and the ranks that are elsewhere (their step and phase) or that every rank is in it.

A rank whose run ended normally enters the phase ``finished`` (the trainer, after its last step), so
the others do not take its silence after :meth:`Watchdog.stop` for a death; one that ends on an
error is named dead by those left waiting for it. Nothing here touches the accelerator: the labels are Python assignments, the thread talks to
the store alone. On CUDA a collective is queued, not waited for: its label covers the host's wait
when the function that issued it reads the result; the phase label covers the rest (the gradient
all-reduce inside backward, under ``update``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)

FINISHED = "finished"


class Where:
    """This rank's position: step, phase and the collective it waits in (None outside one), each
    with the monotonic time it was entered."""

    def __init__(self):
        self.step, self.phase, self.collective = 0, "start", None
        self.phase_since = self.collective_since = time.monotonic()

    def enter(self, phase: str, step: int | None = None) -> None:
        self.step = self.step if step is None else step
        self.phase, self.phase_since = phase, time.monotonic()

    def snapshot(self) -> dict:
        now = time.monotonic()
        return {"step": self.step, "phase": self.phase, "collective": self.collective,
                "phase_s": round(now - self.phase_since, 1),
                "collective_s": round(now - self.collective_since, 1) if self.collective else 0.0}


where = Where()  # this process's; the trainer and distributed.py set it, the watchdog reads it


@contextlib.contextmanager
def waiting(collective: str):
    """Label the enclosed collective; inside another label, that outer one (it says what for) stays."""
    if where.collective is not None:
        yield
        return
    where.collective, where.collective_since = collective, time.monotonic()
    try:
        yield
    finally:
        where.collective = None


def describe(state: dict | None) -> str:
    """A rank's :meth:`Where.snapshot` in words."""
    if state is None:
        return "before its first heartbeat"
    text = f"at step {state['step']} in {state['phase']} ({state['phase_s']:.0f} s)"
    return text + (f", in {state['collective']} for {state['collective_s']:.0f} s" if state["collective"] else "")


def die(line: str) -> None:
    """Print ``line`` and end this process at once with status 1 (the main thread may be stuck in a collective)."""
    print(line, file=sys.stderr, flush=True)
    os._exit(1)


class Watchdog:
    """The heartbeat thread of one rank (see the module docstring). ``on_dead(line)`` is called once
    with the line naming a dead rank (default: :func:`die`); ``warn(line)`` with a stall's line."""

    def __init__(self, store, rank: int, world: int, heartbeat_s: float, dead_after_s: float, stall_warn_s: float,
                 on_dead: Callable[[str], None] = die, warn: Callable[[str], None] | None = None):
        self.store, self.rank, self.world = store, rank, world
        self.heartbeat_s, self.dead_after_s, self.stall_warn_s = heartbeat_s, dead_after_s, stall_warn_s
        self.on_dead = on_dead
        self.warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watchdog-rank{rank}", daemon=True)
        self._warned = None  # the collective wait (its start time) already reported

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating, leaving where this rank is (``finished``, after a normal end) for the others."""
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(Exception):  # the store may be gone already at the end of a job
            self.store.set(f"where/{self.rank}", json.dumps(where.snapshot()))

    def _state(self, rank: int) -> dict | None:
        """Rank ``rank``'s last written position (None before its first beat: a get would block)."""
        return json.loads(self.store.get(f"where/{rank}")) if self.store.add(f"beat/{rank}", 0) else None

    def _run(self) -> None:
        others = [r for r in range(self.world) if r != self.rank]
        seen = {r: (0, time.monotonic()) for r in others}  # rank -> (its counter, when it last moved)
        while True:
            try:
                self.store.set(f"where/{self.rank}", json.dumps(where.snapshot()))
                self.store.add(f"beat/{self.rank}", 1)
                now = time.monotonic()
                for r in others:
                    count = self.store.add(f"beat/{r}", 0)
                    if count != seen[r][0]:
                        seen[r] = (count, now)
                    elif now - seen[r][1] > self.dead_after_s:
                        state = self._state(r)
                        if state is None or state["phase"] != FINISHED:
                            self.on_dead(f"error: rank {r} sent no heartbeat for {now - seen[r][1]:.0f} s "
                                         f"(distributed.dead_after_s={self.dead_after_s:g}); last seen "
                                         f"{describe(state)}: rank {self.rank} exits so that torchrun "
                                         "--max-restarts restarts the job from the last checkpoint")
                            return
                self._check_stall(others)
            except Exception as err:  # the store went away (the launcher ended the job): nothing left to watch
                log.debug("watchdog of rank %d stops: %s", self.rank, err)
                return
            if self._stop.wait(self.heartbeat_s):
                return

    def _check_stall(self, others: list[int]) -> None:
        name, since = where.collective, where.collective_since
        waited = time.monotonic() - since
        if name is None or waited < self.stall_warn_s or self._warned == since:
            return
        self._warned = since
        states = {r: self._state(r) for r in others}
        apart = {r: s for r, s in states.items()
                 if s is None or (s["collective"], s["step"]) != (name, where.step)}
        whom = ("; ".join(f"rank {r} is {describe(s)}" for r, s in apart.items()) if apart
                else "every rank is in it (a hung collective, or a device or network fault)")
        self.warn(f"warning: rank {self.rank} has waited {waited:.0f} s in {name} at step {where.step} "
                  f"({where.phase}) (distributed.stall_warn_s={self.stall_warn_s:g}): {whom}")
