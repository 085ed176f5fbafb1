"""Worker for tests/test_offload_adamw.py: a two-rank job (tests/two_rank_jobs.py; gloo, CPU, FSDP2).

    run(OUT, info)

Each rank takes its half of test_update.py's batch and runs ``Updater.update`` (one mini-batch, two
PPO epochs: two optimizer steps per call) on FSDP2-wrapped copies of one tiny model:
  torch       torch.optim.AdamW (weight decay 0.1), 2 calls, a checkpoint (checkpoint.py, DCP), 1 call
  offload     OffloadAdamW with its states on the host, in pieces of 100 elements: the same
  from_torch  OffloadAdamW resumed from torch's checkpoint, then 1 call
  from_off    torch's AdamW resumed from offload's checkpoint, then 1 call
  params      optim.offload: params (FSDP2's CPUOffloadPolicy) with torch's AdamW, 1 call, against
              one of torch's own from the same start
Rank R writes ``OUT/rank<R>.json``: per run, the largest difference of its local parameter and
AdamW state shards from torch's (0.0: the same bits), the losses, and whether the states are
host DTensors.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from dist_worker import GROUPS, half
from test_update import G, MAX_NEW, make_sequences, tiny_model

from medix_fast import checkpoint as C
from medix_fast import distributed as D
from medix_fast.config import AlgorithmConfig, SamplingConfig, TrainConfig
from medix_fast.optim.adamw import OffloadAdamW
from medix_fast.rl.update import PolicyObjective, Updater

ADAMW = dict(lr=1e-2, weight_decay=0.1)


class Run:
    def __init__(self, info, seqs, offload: bool = False, offload_params: bool = False):
        self.model = tiny_model(0)
        objective = PolicyObjective(self.model, temperature=1.0)
        self.wrapped = D.wrap(objective, self.model, "fsdp", info, torch.float32, offload_params=offload_params)
        params = [p for p in self.wrapped.parameters()]
        self.optimizer = (OffloadAdamW(params, **ADAMW, offload=True, chunk_elements=100) if offload
                          else torch.optim.AdamW(params, **ADAMW))
        a = AlgorithmConfig(old_logprobs="recompute", ppo_epochs=2, loss_type="dapo", epsilon_high=0.28)
        train = TrainConfig(prompts_per_step=GROUPS, mini_batch_prompts=GROUPS, micro_batch_tokens=40)
        self.updater = Updater(objective, self.wrapped, self.optimizer, a, train,
                               SamplingConfig(group_size=G, max_new_tokens=MAX_NEW), info, pad_id=0, grad_clip=1.0)
        self.seqs, self.losses = seqs, []

    def update(self, calls: int = 1) -> "Run":
        for _ in range(calls):
            self.losses.append(self.updater.update(self.seqs)["loss"])
        return self

    def shards(self) -> dict[str, torch.Tensor]:
        """This rank's local parameter and AdamW state shards, by parameter name."""
        out = {}
        for name, p in self.wrapped.named_parameters():
            out[name] = p.to_local()
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"{name}.{key}"] = self.optimizer.state[p][key].to_local()
        return out

    def save(self, out: Path, info) -> Path:
        ckpt = C.Checkpointer(out, info.rank, info.world, "offload", async_save=False)
        path = ckpt.save(1, D.training_state(self.wrapped, self.model, self.optimizer), {}, lambda directory: None)
        ckpt.wait()
        return path

    def resume(self, path: Path) -> "Run":
        tensors = D.training_state(self.wrapped, self.model, self.optimizer)
        C.load_state(path, tensors)
        D.load_training_state(self.wrapped, self.model, self.optimizer, tensors)
        return self


def largest_difference(run: Run, reference: Run) -> float:
    got, want = run.shards(), reference.shards()
    assert got.keys() == want.keys()
    return max((got[k].double() - want[k].double()).abs().max().item() if want[k].numel() else 0.0 for k in want)


def run(out: Path, info: D.DistInfo) -> None:
    seqs = half(make_sequences(GROUPS, model=tiny_model(0)), info.rank, info.world)
    torch_run, offload_run = Run(info, seqs).update(2), Run(info, seqs, offload=True).update(2)
    report = {"after_2": largest_difference(offload_run, torch_run)}
    saved_torch, saved_offload = torch_run.save(out / "torch", info), offload_run.save(out / "offload", info)
    from_torch = Run(info, seqs, offload=True).resume(saved_torch)
    from_off = Run(info, seqs).resume(saved_offload)
    report["resumed"] = {"from_torch": largest_difference(from_torch, torch_run),
                         "from_off": largest_difference(from_off, torch_run)}
    for run in (torch_run, offload_run, from_torch, from_off):
        run.update()
    report["after_3"] = {name: largest_difference(run, torch_run)
                         for name, run in (("offload", offload_run), ("from_torch", from_torch),
                                           ("from_off", from_off))}
    report["losses"] = {"torch": torch_run.losses, "offload": offload_run.losses,
                        "from_torch": from_torch.losses, "from_off": from_off.losses}
    state = offload_run.optimizer.state[next(offload_run.wrapped.parameters())]["exp_avg"]
    report["offload_state"] = {"type": type(state).__name__, "device": str(state.to_local().device),
                               "placements": str(state.placements)}
    params, plain = Run(info, seqs, offload_params=True).update(), Run(info, seqs).update()
    report["params"] = {"loss": params.losses[0], "reference_loss": plain.losses[0],
                        "difference": largest_difference(params, plain),
                        "policies": sorted({type(m._get_fsdp_state()._fsdp_param_group.offload_policy).__name__
                                            for m in D._fsdp_modules(params.wrapped)})}
    (out / f"rank{info.rank}.json").write_text(json.dumps(report))
