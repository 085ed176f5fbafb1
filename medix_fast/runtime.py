"""Process set-up every command shares: logging on rank 0 only, and intra-op CPU threads.

    setup_logging(rank)                       # INFO on rank 0; errors only on the other ranks
    set_cuda_allocator(cfg.train.device)      # expandable segments on CUDA unless the user chose
    threads, why = set_cpu_threads(0)         # cores this process may use / local ranks

Under torchrun every rank runs the same code, so every warning would be printed once per rank:
rank 0 alone prints logs and Python warnings (routed through logging; each shown once per
place, Python's default). torch's default thread count is the machine's cores, which
oversubscribes the CPU when several ranks share a node or the process is pinned to fewer cores
(``taskset``, a container's CPU quota); here it is the cores available to this process (its
CPU affinity, capped by a cgroup quota) divided by the ranks on this node (``LOCAL_WORLD_SIZE``),
unless ``OMP_NUM_THREADS`` or an explicit count says otherwise.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .errors import ConfigError

CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


def setup_logging(rank: int) -> None:
    """Log INFO and above on rank 0 and only errors elsewhere; Python warnings go through logging;
    no Hugging Face progress bars (loading and saving a checkpoint take no time worth a bar)."""
    from transformers.utils import logging as hf_logging

    logging.basicConfig(level=logging.INFO if rank == 0 else logging.ERROR,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.captureWarnings(True)
    hf_logging.disable_progress_bar()


ALLOC_CONF = "expandable_segments:True"


def set_cuda_allocator(device: str) -> str | None:
    """On CUDA (``device`` "cuda", or "auto" with a GPU visible), before the allocator starts:
    ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` unless the user set the variable, so the
    rollout's pool, the update's activations and the old log-probs reuse one another's memory
    instead of fragmenting it (the plan leaves 10 %). Returns the setting in force, None off CUDA."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return None
    return os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOC_CONF)


def cgroup_cores(path: Path | None = None) -> int | None:
    """Whole cores allowed by a cgroup v2 CPU quota (``path``, default ``CPU_MAX``; at least 1), or
    None without a quota."""
    try:
        quota, period = (path or CPU_MAX).read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, int(quota) // int(period))


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cores()
    return max(1, min(cores, quota) if quota else cores)


def set_cpu_threads(requested: int = 0, setting: str = "threads") -> tuple[int, str]:
    """Set torch's intra-op threads; returns (threads, why). ``requested`` > 0 (the value of
    ``setting``) wins, then ``OMP_NUM_THREADS``, then :func:`available_cores` divided by
    ``LOCAL_WORLD_SIZE``."""
    if requested < 0:
        raise ConfigError(f"{setting}: must be >= 0 (0: automatic), got {requested}")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if requested:
        threads, why = requested, f"{setting}={requested}"
    elif omp.isdigit() and int(omp) > 0:
        threads, why = int(omp), "OMP_NUM_THREADS"
    else:
        cores = available_cores()
        threads = max(1, cores // local)
        why = f"{cores} core{'s' * (cores != 1)} available" + (f" / {local} ranks on this node" if local > 1 else "")
    torch.set_num_threads(threads)
    return threads, why
