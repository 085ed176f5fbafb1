"""AdamW with its two states in host memory (``optim.offload: optimizer``) or in bf16 (``optim.state_dtype``).

    opt = OffloadAdamW(params, lr=1e-6, weight_decay=1e-2, offload=True, state_dtype=torch.bfloat16)
    opt = adamw(params, cfg.optim, fused=True)    # the trainer's: torch's AdamW where that is the same thing
    device_bytes("optimizer", "float32"), host_bytes("optimizer", "float32")    # 4, 8 bytes per parameter

:class:`OffloadAdamW` is a drop-in for ``torch.optim.AdamW`` (decoupled weight decay, no amsgrad): the
fp32 master weights and the gradients stay where they are (on the device), AdamW's ``exp_avg`` and
``exp_avg_sq`` live in one flat buffer each, in host memory (pinned on CUDA) with ``offload`` or on the
parameters' device without, in fp32 or bf16. Each step streams the two buffers through the device in
chunks of ``chunk_elements``: a chunk is copied in on a side stream while the previous one is updated on
the compute stream and the one before is copied back on another, into two staging slots (double
buffering; events order the three streams, nothing waits on the host). The update is torch's own
multi-tensor AdamW (``torch.optim.adam._multi_tensor_adam``: the same ``_foreach`` calls in the same
order, per-parameter step counts and bias corrections), run over the pieces of the parameters a chunk
covers, so with fp32 states the result is bitwise torch's (``foreach=True``, and its for-loop form,
which gives the same bits); the fused kernel rounds differently. bf16 states are widened to fp32 for
the update and rounded back, to nearest or stochastically (``stochastic_rounding``: unbiased, so the
slow decay of ``exp_avg_sq`` at beta2 = 0.999, smaller than half a bf16 step, is not lost; the rounding
noise is seeded from the step count, so a resumed run draws the same).

FSDP2: a parameter is a ``DTensor``; the update works on its local shard, and its states are DTensors
over the same mesh and placements (local tensors in host memory), so the checkpoint path
(``distributed.training_state`` / ``load_training_state``, DCP) saves and re-shards them like torch's,
and a checkpoint written by either optimizer loads into the other (the states and the param-group keys
are torch's AdamW's). The states exist from construction (every parameter's, step 0), and the
host copies are complete once :meth:`state_dict` returns (it waits for the last copy back).

Bytes per parameter (of a rank's shard) for the memory plan: :func:`device_bytes`, :func:`host_bytes`
(fp32 master + the two states), :func:`staging_bytes` (the stream's fixed device buffers).
"""
from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass
from itertools import chain

import torch

log = logging.getLogger(__name__)

STATES = ("exp_avg", "exp_avg_sq")
CHUNK_ELEMENTS = 1 << 23  # 8M: 32 MB per fp32 state and slot, long enough copies for PCIe's full rate
STATE_BYTES = {"float32": 4, "bfloat16": 2}
MASTER_BYTES = 4  # fp32 master weights
# torch.optim.AdamW's param-group keys besides lr / betas / eps / weight_decay: a DCP checkpoint load asks
# for every key of the live optimizer's groups, so each optimizer must carry the other's
TORCH_FLAGS = dict(amsgrad=False, maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
                   decoupled_weight_decay=True)


def device_bytes(offload: str, state_dtype: str) -> int:
    """Bytes per trainable parameter of a rank's shard that the fp32 master weight and AdamW's two
    states keep on the device, for ``optim.offload`` (none / optimizer / params) and ``optim.state_dtype``.
    The gradient shard (4 bytes) stays with the master: on the device but under ``params``."""
    return {"none": MASTER_BYTES + 2 * STATE_BYTES[state_dtype], "optimizer": MASTER_BYTES, "params": 0}[offload]


def host_bytes(offload: str, state_dtype: str) -> int:
    """Bytes per trainable parameter of a rank's shard that the master and the two states keep in host
    memory (pinned on CUDA); a node needs this times the parameters (the sum of its ranks' shards)."""
    states = 2 * STATE_BYTES[state_dtype]
    return {"none": 0, "optimizer": states, "params": MASTER_BYTES + states}[offload]


def staging_bytes(offload: str, state_dtype: str, chunk_elements: int = CHUNK_ELEMENTS) -> int:
    """Device bytes an :class:`OffloadAdamW` step needs besides the masters and resident states, whatever
    the model's size: the two slots of both states (offload), their fp32 widening (bf16) and one chunk's
    ``sqrt(exp_avg_sq)`` (stochastic rounding's noise comes after it, no larger). 0 where the trainer
    uses torch's AdamW, whose foreach step holds a whole ``sqrt(exp_avg_sq)`` (4 bytes per parameter)."""
    if offload == "params" or (offload == "none" and state_dtype == "float32"):
        return 0
    per = 4  # one chunk's denominator
    per += 2 * 2 * STATE_BYTES[state_dtype] if offload == "optimizer" else 0
    per += 2 * 4 if state_dtype == "bfloat16" else 0
    return per * chunk_elements


def adamw(params, optim, fused: bool) -> torch.optim.Optimizer:
    """The trainer's AdamW for ``optim`` (``config.OptimConfig``): torch's own where its states are fp32
    next to the parameters (``offload`` none, or params: FSDP2 has put the parameters on the host;
    ``fused``: its one-kernel form), an :class:`OffloadAdamW` otherwise."""
    kwargs = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)
    if optim.offload != "optimizer" and optim.state_dtype == "float32":
        return torch.optim.AdamW(params, **kwargs, fused=fused)
    return OffloadAdamW(params, **kwargs, offload=optim.offload == "optimizer",
                        state_dtype=getattr(torch, optim.state_dtype),
                        stochastic_rounding=optim.state_rounding == "stochastic")


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2), a tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _pinned(host: torch.Tensor, owner) -> torch.Tensor:
    """``host`` page-locked for asynchronous copies, until ``owner`` goes: registered with
    ``cudaHostRegister`` at its exact size (torch's pinned allocator rounds each block up to a power of
    two: 20 GB of states would hold 32), or a pinned copy where registering fails."""
    cudart = torch.cuda.cudart()
    if not host.nbytes:
        return host
    error = cudart.cudaHostRegister(host.data_ptr(), host.nbytes, 0)
    if int(error) != 0:
        log.warning("cudaHostRegister of %d bytes failed (%s): the AdamW states go to torch's pinned memory, "
                    "rounded up to a power of two", host.nbytes, error)
        return host.pin_memory()
    weakref.finalize(owner, cudart.cudaHostUnregister, host.data_ptr())
    return host


def _like(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """``local`` as ``param`` is held: a DTensor of the same mesh, placements and global shape, or itself.
    Built as FSDP2 builds its CPU-offloaded shards (``DTensor.from_local`` would copy a host tensor to
    the mesh's device)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

    if not isinstance(param, DTensor):
        return local
    meta = TensorMeta(param.shape, param.stride(), local.dtype)
    return DTensor(local, DTensorSpec(param.device_mesh, param.placements, tensor_meta=meta), requires_grad=False)


@dataclass(frozen=True)
class _Piece:
    index: int  # the parameter (position in the optimizer's parameters)
    lo: int  # its elements [lo, hi) (flat local shard)
    hi: int
    at: int  # where they start in the chunk


@dataclass(frozen=True)
class _Chunk:
    start: int  # the elements [start, end) of the flat state buffers
    end: int
    pieces: tuple[_Piece, ...]


def _chunks(sizes: list[int], chunk_elements: int) -> list[_Chunk]:
    """The flat buffers of parameters of ``sizes`` elements, in order, cut every ``chunk_elements``."""
    out, pieces, start, at = [], [], 0, 0
    for index, n in enumerate(sizes):
        lo = 0
        while lo < n:
            take = min(n - lo, chunk_elements - at)
            pieces.append(_Piece(index, lo, lo + take, at))
            lo, at = lo + take, at + take
            if at == chunk_elements:
                out.append(_Chunk(start, start + at, tuple(pieces)))
                pieces, start, at = [], start + at, 0
    if pieces:
        out.append(_Chunk(start, start + at, tuple(pieces)))
    return out


def _adamw(params, grads, exp_avgs, exp_avg_sqs, step_sizes, bias_correction2_sqrts, *, lr, beta1, beta2, eps,
           weight_decay) -> None:
    """torch.optim.adam._multi_tensor_adam without capturable, amsgrad, maximize: the same calls, in order."""
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrts)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, step_sizes)


def _round_stochastic(value: torch.Tensor, out: torch.Tensor, generator: torch.Generator) -> None:
    """fp32 ``value`` into bf16 ``out``, up or down with the probabilities of its distance to each (the
    low 16 bits plus uniform noise, truncated); ``value`` is overwritten."""
    bits = value.view(torch.int32)
    bits.add_(torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator))
    bits.bitwise_and_(-(1 << 16))  # 0xFFFF0000: what is left is exactly a bf16
    out.copy_(value)


class OffloadAdamW(torch.optim.Optimizer):
    """AdamW whose ``exp_avg`` / ``exp_avg_sq`` live in host memory (``offload``) and / or in bf16
    (``state_dtype``), streamed through the device in chunks of ``chunk_elements`` for each step.

    Takes ``torch.optim.AdamW``'s arguments (``lr``, ``betas``, ``eps``, ``weight_decay``); the
    parameters are fp32 (the master weights), contiguous, on one device, plain tensors or FSDP2
    DTensors. ``stochastic_rounding`` (bf16 states only) rounds the states stochastically instead of
    to nearest. Its ``state`` is torch's AdamW's (``step``, ``exp_avg``, ``exp_avg_sq`` per
    parameter), created for every parameter at construction; parameter groups are fixed then."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 *, offload: bool = True, state_dtype: torch.dtype = torch.float32, stochastic_rounding: bool = False,
                 chunk_elements: int = CHUNK_ELEMENTS):
        if state_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"state_dtype: float32 or bfloat16, got {state_dtype}")
        if stochastic_rounding and state_dtype != torch.bfloat16:
            raise ValueError("stochastic_rounding: only for bfloat16 states")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **TORCH_FLAGS))
        self.offload, self.state_dtype, self.stochastic_rounding = offload, state_dtype, stochastic_rounding
        self._params = [p for group in self.param_groups for p in group["params"]]
        local = [_local(p) for p in self._params]
        devices = {t.device for t in local}
        if len(devices) > 1 or any(t.dtype != torch.float32 or not t.is_contiguous() for t in local):
            raise ValueError(f"OffloadAdamW: the parameters must be contiguous fp32 tensors on one device, got "
                             f"{sorted({(str(t.device), str(t.dtype)) for t in local})}")
        self.device = devices.pop() if devices else torch.device("cpu")
        sizes = [t.numel() for t in local]
        total = sum(sizes)
        where = "cpu" if offload else self.device
        # (total,) the states of every parameter, in order
        self._flat = {name: torch.zeros(total, dtype=state_dtype, device=where) for name in STATES}
        if offload and self.device.type == "cuda":
            self._flat = {name: _pinned(t, self) for name, t in self._flat.items()}
        at = 0
        for p, t, n in zip(self._params, local, sizes):
            self.state[p] = {"step": torch.tensor(0.0),
                             **{name: _like(p, self._flat[name][at:at + n].view(t.shape)) for name in STATES}}
            at += n
        self._chunks = _chunks(sizes, chunk_elements)
        self._chunk_elements = min(chunk_elements, max(total, 1))
        self._buffers: dict | None = None  # the device's staging slots, streams and events, at the first step
        self._stored: torch.cuda.Event | None = None  # the last copy back to the host (CUDA)
        self._generator = torch.Generator(self.device) if stochastic_rounding else None

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scalars = {}  # parameter index -> (group, -lr / bias_correction1, sqrt(bias_correction2), step)
        for index, (group, p) in enumerate((g, p) for g in self.param_groups for p in g["params"]):
            if p.grad is None:
                continue
            step_t = self.state[p]["step"]
            step_t += 1
            step = step_t.item()  # a host tensor: no device sync
            beta1, beta2 = group["betas"]
            scalars[index] = (group, (group["lr"] / (1 - beta1 ** step)) * -1, (1 - beta2 ** step) ** 0.5, step)
        chunks = [c for c in self._chunks if any(piece.index in scalars for piece in c.pieces)]
        if chunks:
            self._stream(chunks, scalars)
        return loss

    def _stream(self, chunks: list[_Chunk], scalars: dict) -> None:
        """Every chunk through the update; with ``offload`` each one copied in and out through two
        device slots, the copies on two side streams on CUDA (in order on the CPU)."""
        if not self.offload:
            for c in chunks:
                self._update(c, *(self._flat[name][c.start:c.end] for name in STATES), scalars)
            return
        b = self._staging()
        cuda = self.device.type == "cuda"
        main = torch.cuda.current_stream(self.device) if cuda else None

        def on(stream: str):
            return torch.cuda.stream(b[stream]) if cuda else contextlib.nullcontext()

        def load(k: int) -> None:
            c, slot = chunks[k], k % 2
            with on("h2d"):
                if cuda:
                    b["h2d"].wait_event(b["free"][slot])  # the slot's previous chunk is back on the host
                for name in STATES:
                    b["slots"][slot][name][:c.end - c.start].copy_(self._flat[name][c.start:c.end], non_blocking=True)
                if cuda:
                    b["loaded"][slot].record(b["h2d"])

        if cuda:
            b["h2d"].wait_stream(b["d2h"])  # this step reads what the last one wrote back
        load(0)
        for k, c in enumerate(chunks):
            slot = k % 2
            if k + 1 < len(chunks):
                load(k + 1)  # in flight while chunk k is updated
            if cuda:
                main.wait_event(b["loaded"][slot])
            self._update(c, *(b["slots"][slot][name][:c.end - c.start] for name in STATES), scalars)
            with on("d2h"):
                if cuda:
                    b["computed"][slot].record(main)
                    b["d2h"].wait_event(b["computed"][slot])
                for name in STATES:
                    self._flat[name][c.start:c.end].copy_(b["slots"][slot][name][:c.end - c.start], non_blocking=True)
                if cuda:
                    b["free"][slot].record(b["d2h"])
        if cuda:
            self._stored = torch.cuda.Event()
            self._stored.record(b["d2h"])

    def _staging(self) -> dict:
        """The device buffers of the stream (made once): two slots of both states in their dtype, and the
        CUDA side streams and events."""
        if self._buffers is None:
            n, dev = self._chunk_elements, self.device
            self._buffers = {"slots": [{name: torch.empty(n, dtype=self.state_dtype, device=dev) for name in STATES}
                                       for _ in range(2)]}
            if dev.type == "cuda":
                self._buffers.update(h2d=torch.cuda.Stream(dev), d2h=torch.cuda.Stream(dev),
                                     **{e: [torch.cuda.Event(), torch.cuda.Event()]
                                        for e in ("loaded", "computed", "free")})
        return self._buffers

    def _update(self, chunk: _Chunk, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, scalars: dict) -> None:
        """AdamW on the parameter pieces of ``chunk`` whose gradient exists, with their states ``exp_avg`` /
        ``exp_avg_sq`` (flat, the chunk's, on the device; bf16 ones widened to fp32 and rounded back)."""
        states = (exp_avg, exp_avg_sq)
        if self.state_dtype != torch.float32:
            states = tuple(torch.empty(s.shape, dtype=torch.float32, device=s.device).copy_(s) for s in states)
        groups = {}  # id(group) -> (group, params, grads, exp_avgs, exp_avg_sqs, step sizes, bias corrections)
        step = 0
        for piece in chunk.pieces:
            if piece.index not in scalars:
                continue
            group, step_size, bc2_sqrt, step = scalars[piece.index]
            p = self._params[piece.index]
            lists = groups.setdefault(id(group), (group, [], [], [], [], [], []))
            lists[1].append(_local(p).view(-1)[piece.lo:piece.hi])
            lists[2].append(_local(p.grad).reshape(-1)[piece.lo:piece.hi])
            size = piece.hi - piece.lo
            lists[3].append(states[0][piece.at:piece.at + size])
            lists[4].append(states[1][piece.at:piece.at + size])
            lists[5].append(step_size)
            lists[6].append(bc2_sqrt)
        for group, *lists in groups.values():
            beta1, beta2 = group["betas"]
            _adamw(*lists, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                   weight_decay=group["weight_decay"])
        if self.state_dtype == torch.float32:
            return
        if not self.stochastic_rounding:
            for kept, wide in zip((exp_avg, exp_avg_sq), states):
                kept.copy_(wide)
            return
        self._generator.manual_seed(int(step) * 1_000_003 + chunk.start)  # the same draws on resume
        for kept, wide in zip((exp_avg, exp_avg_sq), states):
            _round_stochastic(wide, kept, self._generator)

    # ------------------------------------------------------------------ state dict
    def _wait(self) -> None:
        """The host copies complete (the last step's copies back, CUDA)."""
        if self._stored is not None:
            self._stored.synchronize()
            self._stored = None

    def state_dict(self) -> dict:
        self._wait()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's AdamW's or this one's state dict (any device, dtype, DTensor or not; DCP's own
        tensors, filled in place, are these states already): copied into the states here, a
        parameter it lacks starting afresh; the param groups' hyper-parameters taken as torch does."""
        self._wait()
        mine = dict(self.state)
        by_key = dict(zip(chain.from_iterable(g["params"] for g in state_dict["param_groups"]), self._params))
        loaded = {by_key[k]: v for k, v in state_dict["state"].items()}
        super().load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
        for p, state in mine.items():
            saved = loaded.get(p, {})
            for name in STATES:
                value = saved.get(name)
                if value is None:
                    _local(state[name]).zero_()
                elif value is not state[name]:
                    _local(state[name]).copy_(_local(value))
            step = saved.get("step", 0.0)
            state["step"].fill_(float(step))
            self.state[p] = state
