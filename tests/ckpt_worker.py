"""Worker for tests/test_checkpoint.py: two two-rank jobs (tests/two_rank_jobs.py; gloo, CPU, FSDP2).

    train(OUT, info)    # 2 steps into OUT/run, checkpoint (async), full state -> OUT/reference.pt,
                        # then step 3 -> OUT/uninterrupted.json
    resume(OUT, info)   # a new Trainer resumes train's latest checkpoint (OUT: resume's folder, beside
                        # train's): full state -> OUT/resumed_2.pt, then step 3 -> OUT/resumed.json; the
                        # shard files each rank verified the checksum of -> OUT/verified_rank<R>.json

The full (gathered) model and optimizer state is what the test compares across world sizes.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from medix_fast import checksums
from medix_fast import distributed as D
from medix_fast.config import load_config
from medix_fast.train import Trainer

TIMING = ("time/", "throughput/", "memory/")


def config(out: Path, strategy: str = "fsdp", *extra: str):
    return load_config(None, [
        "train.prompts_per_step=4", "train.mini_batch_prompts=2", "sampling.group_size=4",
        "sampling.max_new_tokens=12", "algorithm.chunk_prompts=4", "algorithm.max_tries=2", "eval.every=0",
        "checkpoint.every=2", "train.steps=3", "logging.progress=false", "logging.tensorboard=false",
        "logging.plot=false", f"distributed.strategy={strategy}", f"train.output_dir={out}", *extra])


def full_state(trainer: Trainer) -> dict:
    """The model's and the optimizer's whole tensors on CPU (every rank calls; rank 0's are complete),
    the optimizer's keyed by parameter name whatever the strategy."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    model = D.full_state_dict(trainer.wrapped, trainer.model)
    options = StateDictOptions(full_state_dict=True, cpu_offload=torch.distributed.is_initialized())
    optimizer = get_optimizer_state_dict(trainer.wrapped, trainer.optimizer, options=options)
    return {"model": model, "optimizer": optimizer.get("state", {}), "groups": optimizer.get("param_groups"),
            "step": trainer.step}  # {} / None off rank 0


def comparable(metrics: dict) -> dict:
    return {k: None if v != v else v for k, v in metrics.items() if not k.startswith(TIMING)}


@contextlib.contextmanager
def recording_verified():
    """The names of the files whose CRC-32 this process computes inside the block."""
    verified, crc = [], checksums.file_crc

    def recorded(path: Path) -> str:
        verified.append(path.name)
        return crc(path)

    checksums.file_crc = recorded
    try:
        yield verified
    finally:
        checksums.file_crc = crc


def step_3(trainer: Trainer, out: Path, state_file: str, metrics_file: str) -> None:
    """The full state into ``out/state_file``, then step 3's metrics into ``out/metrics_file`` (rank 0)."""
    state = full_state(trainer)  # views of live tensors (the optimizer's step counts): saved before step 3
    if trainer.info.is_main:
        torch.save(state, out / state_file)
    metrics = comparable(trainer.train_step())
    if trainer.info.is_main:
        (out / metrics_file).write_text(json.dumps(metrics))


def train(out: Path, info: D.DistInfo) -> None:
    trainer = Trainer(config(out / "run"))
    for _ in range(2):
        trainer.train_step()
    trainer.save()
    trainer.checkpointer.wait()
    step_3(trainer, out, "reference.pt", "uninterrupted.json")


def resume(out: Path, info: D.DistInfo) -> None:
    with recording_verified() as verified:
        trainer = Trainer(config(out.parent / "ckpt_train" / "run"), resume="latest")
    (out / f"verified_rank{info.rank}.json").write_text(json.dumps(verified))
    step_3(trainer, out, "resumed_2.pt", "resumed.json")
