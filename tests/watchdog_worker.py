"""Worker for tests/test_watchdog.py: one of two gloo ranks (RANK, WORLD_SIZE, MASTER_ADDR/PORT set
by the test), heartbeats every 0.2 s. Both reduce once; then rank 1 stops itself (SIGSTOP: hung,
its sockets open, no heartbeat) and rank 0 waits for it in a named reduce until its watchdog
names the collective, then rank 1 as dead, and exits with status 1."""
from __future__ import annotations

import json
import os
import signal
import time

from medix_fast import distributed as D
from medix_fast.watchdog import where

info = D.init_distributed("cpu", "gloo", timeout_min=2)
D.start_watchdog(info, heartbeat_s=0.2, dead_after_s=4, stall_warn_s=1)
where.enter("update", step=3)
D.all_reduce([1.0], info.device)  # both ranks here: each watchdog has seen the other beat
if info.rank == 1:
    while json.loads(D._watchdog.store.get("where/1"))["phase"] != "update":  # its last known position
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGSTOP)
D.reduce_scalars({"loss": 1.0, "tokens": 2.0}, info.device)
raise SystemExit("rank 0 passed a reduce that rank 1 never joined")
