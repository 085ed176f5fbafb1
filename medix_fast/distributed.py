"""torch.distributed plumbing: process group, DDP / FSDP2 wrapping, unsharded generation, reductions.

Single node, K GPUs (or K CPU processes with gloo):

    torchrun --nproc_per_node=K -m medix_fast.train --config configs/medix_r1_8b_dapo.yaml

Multi-node: the same command on every node with torchrun's rendezvous flags, e.g. on each of
N nodes (node 0's address reachable by the others):

    torchrun --nnodes=N --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=NODE0_HOST:29500 \\
             --rdzv_id=medix_run1 -m medix_fast.train --config configs/medix_r1_8b_dapo.yaml

(set ``NCCL_SOCKET_IFNAME`` / ``NCCL_IB_HCA`` for your network; ``train.output_dir`` must be on
storage every node can read for ``--resume``; rank 0 writes the model and metrics).

Every collective of the trainer goes through this file: tensors through :func:`all_reduce` (or
:func:`reduce_scalars`, a named dict in one call), which puts them on the training device first
(NCCL takes no CPU tensors), and Python objects through :func:`broadcast_object` /
:func:`gather_objects`. Checkpoint I/O (torch.distributed.checkpoint, for checkpoint.py) too:
:func:`save_shards` / :func:`load_shards` over a gloo group of its own (:func:`checkpoint_group`).

Each collective here is labelled for the watchdog (``watchdog.py``: heartbeats through the
rendezvous store, :func:`start_watchdog`), which names a dead rank within
``distributed.dead_after_s`` and a rank waiting in one collective past ``distributed.stall_warn_s``;
the process group's hard timeout is ``distributed.timeout_min``.

Each rank samples and scores its own prompts (whole groups), computes its loss on them, and the
gradients are averaged by DDP or reduce-scattered by FSDP2. With FSDP2 (``fully_shard`` on every
decoder layer, every vision block of a VL model and the root, as MediX-R1 / veRL wrap the model's
``_no_split_modules``; fp32 master shards, bf16 compute on CUDA), the parameters are
all-gathered once for generation (:func:`generation_mode`) and resharded afterwards. The frozen
KL reference model is sharded the same way (:func:`shard_reference`), gathered layer by layer for
its forwards, so no rank holds a whole copy.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

# DCP warns on every single-process save and load; one process is a use here, not a mistake
warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized, assuming")

from .errors import ConfigError
from .watchdog import Watchdog, waiting


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str, backend: str, strategy: str = "ddp", timeout_min: float = 30.0) -> DistInfo:
    """Set up the process group when launched by torchrun (WORLD_SIZE > 1, or FSDP on one
    process, which needs a group of one); pick the device. A collective waiting longer than
    ``timeout_min`` fails the job (above the longest phase one rank may wait for another's)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if (world > 1 or strategy == "fsdp") and not dist.is_initialized():
        name = backend if backend != "auto" else ("nccl" if use_cuda else "gloo")
        store = dist.HashStore() if world == 1 and "MASTER_ADDR" not in os.environ else None
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            store = attempt_store(datetime.timedelta(minutes=timeout_min))
        dist.init_process_group(name, timeout=datetime.timedelta(minutes=timeout_min), store=store,
                                rank=rank if store else -1, world_size=world if store else -1,
                                device_id=dev if use_cuda else None)
    return DistInfo(rank, world, local_rank, dev)


def attempt_store(timeout: datetime.timedelta):
    """A connection of our own to torchrun's store (``MASTER_ADDR:MASTER_PORT``), under a prefix of
    this attempt (``TORCHELASTIC_RESTART_COUNT``). torchrun's agent keeps one store for every restart
    of the job and torch 2.13 adds no prefix of its own, so an attempt restarted by ``--max-restarts``
    would read the previous attempt's keys: its ranks' old addresses, which gloo and NCCL then fail
    to connect to (pytorch/pytorch#135712). Across nodes the count is each agent's own: a node whose
    workers did not fail restarts them under the same count (the same upstream issue), so
    multi-node restarts need ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (a store per attempt)."""
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    return dist.PrefixStore(f"medix_fast/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", base)


_watchdog: Watchdog | None = None  # this process's, between start_watchdog and close


def start_watchdog(info: DistInfo, heartbeat_s: float, dead_after_s: float, stall_warn_s: float) -> Watchdog | None:
    """Start this rank's heartbeat thread (``watchdog.py``) on its own connection to the launcher's
    store (:func:`attempt_store`; the default group's store without ``MASTER_ADDR``): none in one
    process or with ``heartbeat_s`` 0."""
    global _watchdog
    if not info.enabled or heartbeat_s <= 0 or _watchdog is not None:
        return _watchdog
    store = (attempt_store(datetime.timedelta(seconds=max(30.0, dead_after_s))) if "MASTER_ADDR" in os.environ
             else dist.distributed_c10d._get_default_store())
    store = dist.PrefixStore("watchdog/", store)
    _watchdog = Watchdog(store, info.rank, info.world, heartbeat_s, dead_after_s, stall_warn_s).start()
    return _watchdog


def close() -> None:
    """Stop the watchdog (its last position stays in the store for the others), then the process group."""
    global _watchdog
    if _watchdog is not None:
        _watchdog.stop()
        _watchdog = None
    if dist.is_initialized():
        dist.destroy_process_group()


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` in one asynchronous copy (from pinned memory on CUDA): the host
    does not wait for the device, unlike a copy from pageable memory."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def all_reduce(values: torch.Tensor | list, device: torch.device, op: str = "sum", group=None) -> torch.Tensor:
    """``values`` (a tensor, or a list of numbers) reduced over the ranks (``sum`` / ``max`` / ``min``),
    as a tensor on ``device``, the training device (``DistInfo.device``).

    The one caller of torch.distributed's tensor collectives: NCCL takes device tensors only, so
    whatever the caller holds is put on ``device`` here (a host list in one copy; a tensor already
    there is reduced in place). ``group``: a subgroup (:func:`consecutive_groups`), default all ranks."""
    t = torch.as_tensor(values, device=device)
    if dist.is_initialized():
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        with waiting(f"all_reduce({op})"):
            dist.all_reduce(t, op=ops[op], group=group)
    return t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole of an FSDP2-sharded parameter (a ``DTensor``: all-gathered over its mesh, on the
    device its shards live on), ``t`` itself otherwise: for a sharded module whose own forward
    never runs (the TRL adapter's LM head)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return t
    with waiting("all_gather(full_tensor)"):
        return t.full_tensor()


def reduce_scalars(values: dict[str, float | torch.Tensor], device: torch.device, op: str = "sum") -> dict[str, float]:
    """Named scalars (Python numbers or 0-dim tensors) reduced over the ranks in one all-reduce of
    one fp64 tensor on ``device``, read back on the host once. Every rank passes the same names in
    the same order; each name keeps its position whether a rank holds it as a number or a tensor."""
    names = list(values)
    host = torch.tensor([0.0 if isinstance(values[k], torch.Tensor) else float(values[k]) for k in names],
                        dtype=torch.float64, device=device)  # (n,) one copy of the host numbers
    slots = [values[k].reshape(()).to(device, torch.float64) if isinstance(values[k], torch.Tensor) else host[i]
             for i, k in enumerate(names)]
    with waiting(f"all_reduce({op}) of {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"):
        total = all_reduce(torch.stack(slots) if slots else host, device, op)  # (n,)
        return dict(zip(names, total.tolist()))  # the host waits for the result here


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default group; (0, 1) when not distributed."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (as is when not distributed)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    with waiting("broadcast_object"):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj) -> list | None:
    """Every rank's ``obj`` in rank order on rank 0 (None elsewhere); ``[obj]`` when not distributed."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    with waiting("gather_objects"):
        dist.gather_object(obj, out, dst=0)
    return out


def all_gather_objects(obj, group=None) -> list:
    """Every rank's ``obj`` of ``group`` (default all ranks) in group-rank order, on each of them."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size(group)
    with waiting("all_gather_objects"):
        dist.all_gather_object(out, obj, group=group)
    return out


def consecutive_groups(size: int, info: DistInfo):
    """This rank's group among ranks split into groups of ``size`` consecutive ranks (the node's
    GPUs stay together), and its rank in it; every rank must call it (each group is made by all).
    One process, or ``size`` equal to the world size: the default group."""
    if info.world % size:
        raise ConfigError(f"sampling.tensor_parallel={size} does not divide the world size {info.world}")
    if size == info.world:
        return None, info.rank
    groups = [dist.new_group(list(range(g * size, (g + 1) * size))) for g in range(info.world // size)]
    return groups[info.rank // size], info.rank % size


def barrier(group=None) -> None:
    """Every rank (of ``group``, default all) reaches this point; nothing when not distributed."""
    if dist.is_initialized():
        with waiting("barrier"):
            dist.barrier(group=group)


# ----------------------------------------------------------------------------- checkpoint I/O (DCP)
# DCP writes and reads each rank's shards of a state dict in parallel (what and where: checkpoint.py).
# Its own collectives exchange Python objects (plans, metadata, write results), no tensor, over the
# group checkpoint_group() makes: gloo, so a write finishing in a background thread never
# interleaves with the training collectives.
DCP_ERRORS = (Exception, dcp.api.CheckpointException)  # DCP's is a BaseException; .failures: rank -> error


def checkpoint_group():
    """A gloo group of every rank for checkpoint I/O (every rank calls this); None in one process."""
    if not dist.is_initialized():
        return None
    with waiting("new_group(checkpoint)"):
        return dist.new_group(backend="gloo")


def staging_buffers(pinned: bool) -> DefaultStager:
    """An async save's stager that keeps the host copy's buffers from one save to the next."""
    return DefaultStager(StagingOptions(use_pinned_memory=pinned, use_shared_memory=False, use_async_staging=False,
                                        use_non_blocking_copy=False))


def save_shards(state: dict, directory: Path, group, asynchronous: bool, stager=None) -> Future | None:
    """Write this rank's shards of ``state`` to ``directory`` (every rank of ``group``; alone when
    None). ``asynchronous``: copy them to host memory (into ``stager``'s kept buffers, or a fresh copy
    freed once written), return the background write's Future; else return None once on disk."""
    from .checksums import ChecksumWriter

    writer = ChecksumWriter(directory)  # each shard file's CRC-32 into the metadata, computed as written
    with waiting("checkpoint save (plan; async: then written in the background)" if asynchronous
                 else "checkpoint save"):
        if asynchronous:
            return dcp.async_save(state, storage_writer=writer, process_group=group, no_dist=group is None,
                                  async_stager=stager)
        dcp.save(state, storage_writer=writer, process_group=group, no_dist=group is None)
    return None


def load_shards(state: dict, directory: Path, alone: bool = False) -> None:
    """Fill ``state`` (this rank's shards, or whole tensors) from ``directory``, re-sharding as needed;
    ``alone``: one process reads everything it asks for, whatever the process group."""
    from .safe_load import PlainLoadPlanner, PlainReader

    # no pickle of the checkpoint's is unpickled by DCP's own pickle.load / torch.load(weights_only=False)
    with waiting("checkpoint load"):
        dcp.load(state, storage_reader=PlainReader(directory), planner=PlainLoadPlanner(),
                 no_dist=alone or not dist.is_initialized())


def shards_metadata(directory: Path):
    """DCP's metadata of ``directory``: every tensor's global shape and which file holds each piece."""
    from .safe_load import PlainReader

    return PlainReader(directory).read_metadata()  # safe_load.Refused if it names anything but DCP's classes


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of a HF causal LM (``model.model.layers`` for Qwen/Llama)."""
    for path in ("model.layers", "model.language_model.layers", "transformer.h"):
        node = model
        for part in path.split("."):
            node = getattr(node, part, None)
        if isinstance(node, nn.ModuleList):
            return list(node)
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} to shard with FSDP")


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 shards as units of their own, in forward order: a VL model's vision blocks
    (``model.visual.blocks``), then the decoder layers. A mixture-of-experts layer is one unit
    with its experts: FSDP2 splits every parameter on dim 0, for the stacked expert weights
    (experts, out, in) the expert dimension, so each rank keeps experts / world whole experts and
    the unit is all-gathered once per layer."""
    visual = getattr(getattr(model, "model", None), "visual", None)
    blocks = list(visual.blocks) if isinstance(getattr(visual, "blocks", None), nn.ModuleList) else []
    return blocks + decoder_layers(model)


def wrap(objective: nn.Module, model: nn.Module, strategy: str, info: DistInfo, compute_dtype: torch.dtype,
         offload_params: bool = False) -> nn.Module:
    """The training module: ``objective`` as is (one process), in DDP, or with FSDP2 on ``model``.

    ``objective`` holds ``model``; its forward runs the whole loss, so DDP / FSDP see every
    parameter (the LM head included) used inside one forward call. ``offload_params`` (FSDP2 only,
    ``optim.offload: params``): FSDP2's ``CPUOffloadPolicy``, the parameter shards and their gradients
    in host memory (pinned on CUDA), copied to the device per unit for the forward and backward, so
    the optimizer steps on the host.
    """
    if not info.enabled and strategy != "fsdp":
        return objective
    if strategy == "ddp":
        ids = [info.device.index] if info.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(objective, device_ids=ids)
    return _fully_shard(objective, model, compute_dtype, info.device if offload_params else None)


def shard_reference(objective: nn.Module, model: nn.Module, strategy: str, info: DistInfo,
                    compute_dtype: torch.dtype) -> nn.Module:
    """The frozen reference ``objective`` (holding ``model``): FSDP2-sharded like the policy under
    ``strategy="fsdp"`` (1/world of it per rank, all-gathered per layer in each forward, which every
    rank runs in step since micro-batch counts are padded to agree); as is otherwise."""
    if strategy != "fsdp" or not info.enabled:
        return objective
    return _fully_shard(objective, model, compute_dtype)


def _fully_shard(objective: nn.Module, model: nn.Module, compute_dtype: torch.dtype,
                 offload_from: torch.device | None = None) -> nn.Module:
    """FSDP2 on every unit and the root; ``offload_from``: the shards on the host, not on that device."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    offload = OffloadPolicy() if offload_from is None else CPUOffloadPolicy(pin_memory=offload_from.type == "cuda")
    for unit in shard_units(model):
        fully_shard(unit, mp_policy=policy, offload_policy=offload)
    fully_shard(objective, mp_policy=policy, offload_policy=offload)
    # FSDP2 picks its root at the first forward; the sampler runs the inner model first, so
    # make the objective the root now (private hook: there is no public one in torch 2.13)
    objective._get_fsdp_state()._lazy_init()
    return objective


def _fsdp_modules(module: nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def is_sharded(module: nn.Module) -> bool:
    """Whether FSDP2 shards ``module`` or one of its submodules."""
    return bool(_fsdp_modules(module))


@contextlib.contextmanager
def generation_mode(wrapped: nn.Module):
    """Parameters unsharded (FSDP2) for the sampler, which may then run any number of forwards
    per rank without collectives; resharded on exit. A no-op for DDP and single process."""
    shards = _fsdp_modules(wrapped)
    layers = [m for m in shards if m is not wrapped]  # the root never reshards after forward
    with waiting("all_gather(unshard for generation)"):
        for m in shards:
            m.unshard()
    for m in layers:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in shards:
            m.reshard()
        for m in layers:
            m.set_reshard_after_forward(True, recurse=False)


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module, enabled: bool):
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch."""
    if isinstance(wrapped, nn.parallel.DistributedDataParallel) and not enabled:
        with wrapped.no_sync():
            yield
        return
    shards = _fsdp_modules(wrapped)
    for m in shards:
        m.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        for m in shards:
            m.set_requires_gradient_sync(True)


def full_state_dict(wrapped: nn.Module, model: nn.Module) -> dict:
    """The model's full state dict on CPU (gathered on rank 0 under FSDP2, empty on the other
    ranks; every rank must call this). For the Hugging Face copy, not for training checkpoints."""
    if _fsdp_modules(wrapped):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        with waiting("all_gather(full state dict)"):
            return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def full_optimizer_state(wrapped: nn.Module, optimizer) -> dict:
    """The optimizer's full state dict (gathered under FSDP2; every rank must call this): the
    old checkpoint path, kept as the benchmark's baseline and the tests' reference."""
    if _fsdp_modules(wrapped):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(wrapped, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def training_state(wrapped: nn.Module, model: nn.Module, optimizer, with_optimizer: bool = True,
                   trained_only: bool = False) -> dict:
    """What a training checkpoint holds, as this rank's share for torch.distributed.checkpoint:
    ``{"model": ..., "optimizer": ...}``, keyed by parameter names (the model's own, the optimizer's
    relative to the objective), DTensor shards under FSDP2 and whole tensors otherwise, so one
    checkpoint loads under any strategy and world size. Views of the live tensors, not copies;
    a fresh optimizer's state is created (zeros) so that it can be loaded into. ``trained_only``
    (LoRA): the model's trained parameters only, its frozen base is not written."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model)}
    if trained_only:  # by name: a tied LM head is no parameter of its own, its requires_grad is not looked at
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        state["model"] = {k: v for k, v in state["model"].items() if k in trained}
    if with_optimizer:
        state["optimizer"] = get_optimizer_state_dict(wrapped, optimizer)
    return state


def load_training_state(wrapped: nn.Module, model: nn.Module, optimizer, state: dict,
                        trained_only: bool = False) -> None:
    """Put a :func:`training_state` dict, filled from a checkpoint, into the model and optimizer."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=not trained_only))
    if "optimizer" in state:
        set_optimizer_state_dict(wrapped, optimizer, state["optimizer"])
