"""Every tensor the trainer hands to a collective lives on the training device (NCCL takes no CPU
tensors), checked on the CPU in three parts that together cover a GPU run:

1. statically: only ``medix_fast/distributed.py`` touches torch.distributed, and only its
   ``all_reduce`` calls a tensor collective;
2. the helper puts whatever it is given (host lists, host tensors, named scalars) on the device it is
   given: a real second device, ``meta``, reaches the collective;
3. a real training step (one process, gloo) with the training device declared as ``cpu:0``, a device
   no CPU tensor reports (they say ``cpu``): every collective call comes from the helper, and
   every call site gave the helper exactly ``DistInfo.device``, so none built its own CPU tensor or
   named another device.

Run: pytest tests/test_collectives.py
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from medix_fast import distributed as D

ROOT = Path(__file__).resolve().parent.parent
TENSOR_COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
                      "reduce_scatter_tensor", "broadcast", "reduce", "gather", "scatter", "all_to_all",
                      "all_to_all_single", "send", "recv", "isend", "irecv"}


def _uses_torch_distributed(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        if any(n == "torch.distributed" or n.startswith("torch.distributed.") for n in names):
            return True
        if isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "distributed"
                                                                               for a in node.names):
            return True
    return False


def test_only_the_helper_calls_tensor_collectives():
    files = [*(ROOT / "medix_fast").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]
    users = sorted(str(f.relative_to(ROOT)) for f in files if _uses_torch_distributed(ast.parse(f.read_text())))
    # checksums.py and safe_load.py are DCP's storage layer (a FileSystemWriter, a reader and a load
    # planner), optim/adamw.py builds its states as DTensors of the parameters' mesh: no collective
    assert users == ["medix_fast/checksums.py", "medix_fast/distributed.py", "medix_fast/optim/adamw.py",
                     "medix_fast/safe_load.py"]
    for name in ("checksums.py", "safe_load.py", "optim/adamw.py"):
        storage = ast.parse((ROOT / "medix_fast" / name).read_text())
        assert not [n for n in ast.walk(storage) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                    and n.func.attr in TENSOR_COLLECTIVES], name
    callers = set()
    for fn in ast.walk(ast.parse((ROOT / "medix_fast" / "distributed.py").read_text())):
        if isinstance(fn, ast.FunctionDef):
            for node in ast.walk(fn):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr in TENSOR_COLLECTIVES and isinstance(node.func.value, ast.Name)
                        and node.func.value.id == "dist"):
                    callers.add(fn.name)
    assert callers == {"all_reduce"}


@pytest.fixture
def gloo():
    """A one-process gloo group (so the collectives really run), destroyed afterwards."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


class Reached(Exception):
    """Raised by the fake collective once it has seen its tensor (meta tensors hold no values to read)."""


def test_helper_hands_the_collective_a_tensor_on_the_device_it_is_given(gloo, monkeypatch):
    seen = []

    def collective(t, op=None, group=None):
        seen.append(t.device)
        raise Reached

    monkeypatch.setattr(dist, "all_reduce", collective)
    meta = torch.device("meta")
    calls = [lambda: D.all_reduce([3, 4], meta, "max"), lambda: D.all_reduce(torch.ones(2), meta),
             lambda: D.reduce_scalars({"n": 2, "loss": torch.tensor(0.5), "sums": torch.ones(3)[1]}, meta)]
    for call in calls:
        with pytest.raises(Reached):
            call()
    assert seen == [meta] * len(calls)


def test_reduce_scalars_keeps_the_names_with_their_values(gloo):
    out = D.reduce_scalars({"a": 2, "b": torch.tensor(0.25), "c": 1.5, "d": torch.ones(3).sum()}, torch.device("cpu"))
    assert out == {"a": 2.0, "b": 0.25, "c": 1.5, "d": 3.0}
    assert D.reduce_scalars({"x": 4.0}, torch.device("cpu"), "max") == {"x": 4.0}


def test_a_training_step_reduces_only_on_the_training_device(gloo, monkeypatch, tmp_path):
    """One step of the real trainer (tiny model, DAPO's dynamic sampling, so every call site runs)
    under a one-process gloo group, its training device declared ``cpu:0``."""
    from medix_fast.config import load_config
    from medix_fast.train import Trainer

    cfg = load_config(None, ["train.steps=1", "train.prompts_per_step=2", "train.mini_batch_prompts=1",
                             "sampling.group_size=2", "sampling.max_new_tokens=4", "algorithm.chunk_prompts=2",
                             "algorithm.max_tries=2", "algorithm.filter_low=-1", "eval.every=0",
                             "rewards.weights={format: 1.0}", "data.max_examples=4", "checkpoint.every=0",
                             "logging.progress=false", "logging.tensorboard=false", "logging.plot=false",
                             f"train.output_dir={tmp_path}"])
    trainer = Trainer(cfg)
    trainer.info.device = fake = torch.device("cpu", 0)  # the rollout and the updater share this DistInfo
    given, reached, inside = [], [], []
    helper, collective = D.all_reduce, dist.all_reduce

    def checked_helper(values, device, op="sum", group=None):
        given.append(device)
        inside.append(True)
        try:
            return helper(values, device, op, group)
        finally:
            inside.pop()

    def checked_collective(t, op=None, group=None):
        reached.append((t.device.type, bool(inside)))
        return collective(t, op=op, group=group)

    monkeypatch.setattr(D, "all_reduce", checked_helper)
    monkeypatch.setattr(dist, "all_reduce", checked_collective)
    records = trainer.run()
    assert [r["step"] for r in records] == [1] and records[0]["optimizer_steps"] == 2
    assert len(given) >= 8 and all(d == fake for d in given), given  # exactly DistInfo.device, every time
    assert reached == [("cpu", True)] * len(given)  # every collective from the helper, none around it


def test_full_tensor_gathers_a_sharded_parameter(gloo):
    """The helper the TRL adapter's FSDP2-sharded LM head goes through: a DTensor comes back whole
    (a plain tensor), anything else as it is."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    w = torch.randn(4, 3)
    full = D.full_tensor(distribute_tensor(w, init_device_mesh("cpu", (1,)), [Shard(0)]))
    assert type(full) is torch.Tensor and torch.equal(full, w)
    assert D.full_tensor(w) is w


@pytest.mark.parametrize("op", ["sum", "max", "min"])
def test_reduce_scalars_reduces_with_the_op_it_is_given(monkeypatch, op):
    """(In a one-process group max and min equal sum: the op handed to the collective is checked.)"""
    seen = []
    monkeypatch.setattr(D, "all_reduce", lambda t, device, op="sum": seen.append(op) or t)
    D.reduce_scalars({"a": 2, "b": torch.tensor(0.25)}, torch.device("cpu"), op)
    assert seen == [op]


def test_reduce_scalars_positions_follow_the_names_not_their_types(monkeypatch):
    """Ranks may hold a name as a number on one and a tensor on another: the reduced vector's
    positions follow the names' order alone, so the ranks' values for a name always meet."""
    seen = []
    monkeypatch.setattr(D, "all_reduce", lambda t, device, op="sum": seen.append(t.tolist()) or t)
    D.reduce_scalars({"a": 2, "b": torch.tensor(0.25), "c": 1.5}, torch.device("cpu"))
    D.reduce_scalars({"a": torch.tensor(2.0), "b": 0.25, "c": torch.tensor(1.5)}, torch.device("cpu"))
    assert seen == [[2.0, 0.25, 1.5]] * 2
