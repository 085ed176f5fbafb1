"""One AdamW step over a model's worth of fp32 parameters, by where its states live (``optim.offload``).

    python -m bench --only optimizer

Parameters: 32 fp32 matrices of 1,024 x 1,536 (50M parameters, 201 MB; GPU: 64 of 4,096 x 2,048, 537M,
2.1 GB; ``--smoke``: 4 of 64 x 64), random gradients, one step taken before timing (the states exist).
A row times one ``optimizer.step()``; its note gives the resident bytes of the fp32 masters and the two
states on the device and on the host (the tensors counted where they are), and the rows of a case
are timed in the same run, round-robin (CPU) or one after the other (GPU).
  medix_fast    ``OffloadAdamW``: the states in host memory (pinned on CUDA), streamed through the
                device in 8M-element chunks, copies overlapping the update (fp32 states; second case:
                bf16 states, half the bytes over the bus)
  torch_adamw   ``torch.optim.AdamW`` (foreach, as under FSDP2) with everything on the device: the time
                to approach, the device memory to save
  cpu_offload   ``torch.optim.AdamW`` on host parameters, gradients and states: the step of FSDP2's
                ``CPUOffloadPolicy`` (``optim.offload: params``); its parameter and gradient copies
                between host and device happen in the forward and backward, which this does not time
On the CPU every "device" is the host, so the rows show only what the stream's chunking, copies
(memcpy here) and bf16 widening cost over a plain AdamW step: not PCIe overlap, nor device memory
saved; a GPU run of the same cases shows those.
"""
from __future__ import annotations

import torch

from .case import SUBJECT, Case

SIZES = {"smoke": (4, 64, 64), "cpu": (32, 1024, 1536), "cuda": (64, 4096, 2048)}  # (matrices, rows, cols)


def _build(impl: str, state_dtype: torch.dtype, case: Case, size: tuple[int, int, int], device: torch.device):
    from medix_fast.optim.adamw import OffloadAdamW, device_bytes, host_bytes

    count, rows, cols = size
    where = torch.device("cpu") if impl == "cpu_offload" else device
    g = torch.Generator(where).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(rows, cols, device=where, generator=g)) for _ in range(count)]
    for p in params:
        p.grad = torch.randn(rows, cols, device=where, generator=g) * 1e-3
    if impl == SUBJECT:
        optimizer = OffloadAdamW(params, lr=1e-4, offload=True, state_dtype=state_dtype)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    optimizer.step()  # the states exist
    if device.type == "cuda":  # the tensors counted where they are
        resident = {"device": 0, "host": 0}
        for p in params:
            for t in (p, optimizer.state[p]["exp_avg"], optimizer.state[p]["exp_avg_sq"]):
                resident["host" if t.device.type == "cpu" else "device"] += t.nbytes
        case.note = (f"masters + states: device {resident['device'] / 2**20:,.1f} MB, "
                     f"host {resident['host'] / 2**20:,.1f} MB")
    else:  # all of it is in host RAM here: where a GPU run would keep it
        offload = {SUBJECT: "optimizer", "torch_adamw": "none", "cpu_offload": "params"}[impl]
        dtype = str(state_dtype).removeprefix("torch.")
        per = {side: f(offload, dtype) * count * rows * cols / 2**20 for side, f in (("device", device_bytes),
                                                                                    ("host", host_bytes))}
        case.note = f"masters + states on a GPU: device {per['device']:,.1f} MB, host {per['host']:,.1f} MB"
    return optimizer.step


def cases(smoke: bool, device: torch.device) -> list[Case]:
    size = SIZES["smoke" if smoke else device.type if device.type in SIZES else "cpu"]
    count, rows, cols = size
    params = count * rows * cols
    out = []
    for label, state_dtype, impls in (("fp32 states", torch.float32, (SUBJECT, "torch_adamw", "cpu_offload")),
                                      ("bf16 states", torch.bfloat16, (SUBJECT, "torch_adamw"))):
        shape = f"{count} x {rows}x{cols} fp32 ({params / 1e6:,.1f}M params)"
        for impl in impls:
            case = Case("optimizer", f"AdamW step, {label}", impl, shape, params, None, work=float(params),
                        work_unit="param/s")

            def build(dev, impl=impl, case=case, state_dtype=state_dtype):
                return _build(impl, state_dtype if impl == SUBJECT else torch.float32, case, size, dev)

            case.build = build
            out.append(case)
    return out
