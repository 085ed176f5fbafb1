"""A killed rank under ``torchrun --max-restarts 1 ... --resume``: two gloo ranks, rank 1 killed
(SIGKILL) right after step 2's checkpoint (tests/restart_worker.py); torchrun restarts both, the
run resumes at step 2 and finishes with the uninterrupted run's weights, optimizer state and metrics
(that run: the two-rank job ``uninterrupted``).

Run: pytest tests/test_restart.py
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from test_distributed import torchrun
from test_train import comparable

from medix_fast import checkpoint as C
from medix_fast import train
from medix_fast.metrics import read_metrics

ARGS = ["train.steps=3", "train.prompts_per_step=4", "train.mini_batch_prompts=2", "sampling.group_size=4",
        "sampling.max_new_tokens=8", "algorithm.chunk_prompts=4", "algorithm.max_tries=2", "eval.every=0",
        "checkpoint.every=2", "checkpoint.async_save=false", "logging.progress=false", "logging.tensorboard=false",
        "logging.plot=false", "logging.rollouts_every=0"]


def final_state(out: Path, tmp_path: Path) -> dict:
    path = C.latest_checkpoint(out)
    assert path.name == "step_00000003"
    dcp_to_torch_save(path / C.STATE, tmp_path / f"{out.name}.pt")
    return torch.load(tmp_path / f"{out.name}.pt", weights_only=False)


def uninterrupted(out: Path, info) -> None:
    """A two-rank job (tests/two_rank_jobs.py): the training command with ``ARGS``, into ``out/whole``."""
    assert train.main([*ARGS, f"train.output_dir={out / 'whole'}"]) == 0


def test_a_rank_killed_after_a_checkpoint_is_restarted_and_finishes_the_same(tmp_path, two_ranks):
    whole, killed = two_ranks.folder("restart_whole") / "whole", tmp_path / "killed"
    mark = tmp_path / "killed_once"
    done = torchrun([str(Path(__file__).parent / "restart_worker.py"), str(mark), *ARGS,
                     f"train.output_dir={killed}", "--resume"], tmp_path, launcher=["--max-restarts=1"])
    assert mark.exists()  # rank 1 was killed, and the restart ran through
    assert "resumed from " in done.stderr and "at step 2 (written by 2 ranks, now 2)" in done.stderr
    assert comparable(read_metrics(killed / "metrics.jsonl")) == comparable(read_metrics(whole / "metrics.jsonl"))
    want, got = final_state(whole, tmp_path), final_state(killed, tmp_path)
    assert got.keys() == want.keys() and {"model", "optimizer"} <= want.keys()

    def same(a, b, key):
        if isinstance(a, dict):
            assert a.keys() == b.keys(), key
            for k in a:
                same(a[k], b[k], f"{key}.{k}")
        else:
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, key

    same(got, want, "state")
