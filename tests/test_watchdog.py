"""The watchdog (medix_fast/watchdog.py): a rank that stops beating is named by the others within
``dead_after_s``, one that finished is not, a rank waiting in a collective past ``stall_warn_s``
names it (once), and every collective of distributed.py carries its label.

In one process two watchdogs share a HashStore (intervals of tens of milliseconds); across two
processes (tests/watchdog_worker.py) rank 1 hangs (SIGSTOP) and rank 0, waiting in a reduce,
names the reduce, then rank 1, and exits with status 1.

Run: pytest tests/test_watchdog.py
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch.distributed as dist

from medix_fast import distributed as D
from medix_fast.watchdog import FINISHED, Watchdog, waiting, where

BEAT, DEAD = 0.05, 0.6


def pair(on_dead, warn=None, stall_warn_s=60.0) -> list[Watchdog]:
    store = dist.HashStore()
    return [Watchdog(store, r, 2, BEAT, DEAD, stall_warn_s, on_dead=on_dead, warn=warn).start() for r in (0, 1)]


def test_a_silent_rank_is_named_within_dead_after():
    named, lines = threading.Event(), []
    where.enter("update", step=3)
    zero, one = pair(lambda line: (lines.append(line), named.set()))
    time.sleep(4 * BEAT)
    one.stop()  # rank 1 goes silent in the middle of step 3 (the shared `where` is its last position)
    stopped = time.monotonic()
    assert named.wait(20 * DEAD)
    # silence counts from rank 1's last beat, up to one beat before stop(): named DEAD - BEAT after it at the
    # earliest (0.556 s was seen in CI with DEAD = 0.6), a beat late at most on an idle machine
    assert DEAD - BEAT <= time.monotonic() - stopped < DEAD + 10.0
    zero.stop()
    assert len(lines) == 1 and lines[0].startswith("error: rank 1 sent no heartbeat for ")
    assert " s (distributed.dead_after_s=0.6); " in lines[0]
    assert "last seen at step 3 in update" in lines[0] and "torchrun --max-restarts" in lines[0]


def test_a_finished_rank_is_not_named():
    lines = []
    where.enter(FINISHED, step=3)
    zero, one = pair(lines.append)
    one.stop()
    time.sleep(3 * DEAD)
    zero.stop()
    assert lines == []


def test_a_stall_names_the_collective_once():
    lines = []
    where.enter("update", step=4)
    zero, one = pair(lambda line: None, lines.append, stall_warn_s=0.3)
    with waiting("all_reduce(max) of stop"), waiting("all_reduce(max)"):  # the outer label says what for
        deadline = time.monotonic() + 20
        while len(lines) < 2 and time.monotonic() < deadline:  # one line from each watchdog
            time.sleep(BEAT)
        time.sleep(6 * BEAT)  # more beats in the same wait: no more lines
    zero.stop(), one.stop()
    # both watchdogs read this process's `where`: each sees the other in the same collective
    assert len(lines) == 2 and all(" has waited " in line for line in lines)
    assert "in all_reduce(max) of stop at step 4 (update) (distributed.stall_warn_s=0.3): every rank is in it" in lines[0]


def test_every_collective_of_distributed_py_is_labelled(monkeypatch):
    """Each helper's torch.distributed call runs under its own label (one process, a gloo group of one)."""
    seen = {}

    def record(name):
        return lambda *args, **kwargs: seen.setdefault(name, where.collective)

    init = dist.init_process_group
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **kw: (seen.setdefault("timeout", kw["timeout"]),
                                                                      init(*a, **kw)))
    D.init_distributed("cpu", "gloo", "fsdp", timeout_min=7)
    assert seen.pop("timeout").total_seconds() == 7 * 60  # distributed.timeout_min: the hard timeout
    for name in ("all_reduce", "broadcast_object_list", "gather_object", "barrier"):
        monkeypatch.setattr(dist, name, record(name))
    try:
        D.all_reduce([1.0], D.DistInfo().device, "max")
        D.broadcast_object({"a": 1})
        D.gather_objects(1)
        D.barrier()
        assert seen == {"all_reduce": "all_reduce(max)", "broadcast_object_list": "broadcast_object",
                        "gather_object": "gather_objects", "barrier": "barrier"}
        seen.clear()
        D.reduce_scalars({"loss": 1.0, "a": 2.0, "b": 3.0, "c": 4.0}, D.DistInfo().device)
        assert seen == {"all_reduce": "all_reduce(sum) of loss, a, b, ..."} and where.collective is None
    finally:
        D.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_a_hung_rank_is_named_by_the_other_process(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1"}
    worker = [sys.executable, str(Path(__file__).parent / "watchdog_worker.py")]
    ranks = [subprocess.Popen(worker, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE,
                              text=True) for r in (0, 1)]
    try:
        _, err = ranks[0].communicate(timeout=120)
    finally:
        ranks[1].kill()  # stopped: SIGKILL still ends it
        ranks[1].wait()
    assert ranks[0].returncode == 1, err
    stall = next(line for line in err.splitlines() if line.startswith("warning: rank 0 has waited"))
    assert "in all_reduce(sum) of loss, tokens at step 3 (update)" in stall
    assert "rank 1 is at step 3 in update" in stall
    dead = next(line for line in err.splitlines() if line.startswith("error: rank 1 sent no heartbeat for "))
    assert "last seen at step 3 in update" in dead
    assert err.index(stall) < err.index(dead)
