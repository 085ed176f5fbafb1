"""The sampler's own compute-dtype copy of the weights its fixed-shape decode step (and so its CUDA
graphs) reads, refreshed in place: captured graphs stay valid for the whole run.

    weights = EngineWeights(model, torch.bfloat16, kept)  # buffers for the slots that need one (maybe none)
    with weights.swapped():                          # refreshed (copy_), then read by every forward
        ...                                          # the model's own forward code, unchanged

A CUDA graph holds the addresses its kernels read. Two kinds of weights would move under it:
- **autocast's cast copies.** fp32 masters (one GPU, DDP) run under ``torch.autocast``, whose bf16
  copy of each weight lives for one autocast context, i.e. one ``generate`` call. So every parameter
  slot autocast would cast (one of at least 2 dimensions outside an ``nn.Embedding``: the linear,
  convolution and expert weights; a tied LM head's slot too, its embedding's slot not) gets a
  bf16 buffer. Autocast then finds them already in bf16 and casts nothing, so the decode computes
  what it did on autocast's copies, bit for bit; the rest (norms, biases, the embedding) are read
  as they are, and a capture turns autocast's cache off so a bias cast is made inside the graph.
- **FSDP2's unsharded parameters**, which land in new storage at each unshard (each rollout): when
  the sampler is kept across steps (``kept``), every slot of an FSDP2 module gets a buffer (in the
  parameters' own dtype, FSDP2's compute dtype), 2 bytes per parameter more in the rollout, beside
  the unsharded parameters; when it is not, its graphs die at the end of the rollout anyway and
  read the unsharded parameters, which stay put for the rollout's calls.
A model whose weights are already in the compute dtype and in storage of their own (one process
or DDP in bf16, the tensor-parallel copy kept across steps) needs none: the graphs read its
parameters, which the optimizer updates in place.

LoRA adapters (``model/lora.py``) are either merged or run as their low-rank add, per kind
(``merged_adapters``, the ``sampling.lora_merge`` setting; measured in docs/lora.md#sampling-with-adapters):
a merged adapter's base slot (a ``LoraLinear``'s ``base_layer.weight``, a ``LoraExperts``' two
expert banks) gets a compute-dtype buffer refreshed as ``W + scaling * B @ A`` (summed in fp32,
rounded once; every expert's in one batched product), and the adapter's own path is off inside
``swapped()``: the decode runs plain GEMMs on fixed addresses, the adapters' delta read once per
call instead of in every step. 2 bytes per adapted parameter (bf16), in every decode mode. A
low-rank adapter reads its A and B in each forward (updated in place by the optimizer).

How the decode reads them: for the duration of ``swapped()`` each slot's ``module._parameters``
entry is a parameter wrapping the buffer, and the original parameter object is put back after
(never altered: no ``.data`` swap, no copy into it). So there is one forward code path, the
training parameters are untouched whatever happens inside, and the graphs see the buffers'
addresses, which never change. The buffers are refreshed (``copy_``) on entry, i.e. at the start
of every ``generate`` call, from whatever the slots hold then: 2 bytes written and 2 or 4 read per
buffered parameter, what autocast's per-call cast cost before (docs/sampler.md, CUDA graphs).
With a ``driver`` (``vmm.py``) the buffers are views of one sleepable range: the sampler's sleep
gives their pages back through the update and its wake maps them again, at the same addresses,
before the refresh writes them.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .. import distributed as D
from ..model.lora import LoraExperts, LoraLinear, adapters, factors, fold

# sampling.lora_merge: auto, per adapter kind: merged (True) or the low-rank add (False), as measured
# on the CPU and on paper at the shipped shapes (docs/lora.md#sampling-with-adapters)
MERGE_AUTO = {LoraLinear: True, LoraExperts: True}


def merged_adapters(model: nn.Module, setting: str | bool) -> list[nn.Module]:
    """The adapters of ``model`` the sampler merges under ``sampling.lora_merge`` = ``setting``
    (true, false or "auto": ``MERGE_AUTO``'s choice for each kind). The one place this is decided."""
    auto = [(m, next(v for kind, v in MERGE_AUTO.items() if isinstance(m, kind))) for m in adapters(model)]
    return [m for m, merge in auto if (merge if setting == "auto" else setting)]


def _buffered(module: nn.Module, param: torch.Tensor, dtype: torch.dtype, fsdp: bool) -> bool:
    """Whether the slot needs an engine buffer (see the module docstring)."""
    if fsdp:
        return True
    return param.dtype != dtype and param.ndim >= 2 and not isinstance(module, nn.Embedding)


class EngineWeights:
    """Compute-dtype buffers for the parameter slots of ``model`` that need one (possibly none);
    ``kept``: the sampler keeps its graphs across steps (FSDP2's slots need buffers then);
    ``merge``: the adapters folded into their base slots' buffers (``merged_adapters``)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, kept: bool, driver=None, merge: list = ()):
        fsdp = self.every = kept and D.is_sharded(model)
        self.merge = list(merge)
        folded = {(id(owner), name) for m in self.merge for owner, name, _, _ in factors(m)}
        unread = {id(p) for m in self.merge for _, _, b, a in factors(m) for p in (b, a)}  # off while merged
        slots = [(module, name, param) for module in model.modules() for name, param in module._parameters.items()
                 if param is not None and id(param) not in unread
                 and ((id(module), name) in folded or _buffered(module, param, dtype, fsdp))]
        sources = {id(param): param for _, _, param in slots}  # a tied parameter: one buffer for its slots
        dtypes = {key: param.dtype if fsdp else dtype for key, param in sources.items()}
        starts, end = {}, 0  # each buffer's byte offset in one sleepable range, 256-byte aligned
        for key, param in sources.items():
            starts[key] = end
            end += -(-param.numel() * dtypes[key].itemsize // 256) * 256
        self.memory = None  # vmm.SleepableMemory holding every buffer, when ``driver`` is given
        if driver is not None and sources:
            from .vmm import SleepableMemory

            self.memory = SleepableMemory(driver, end, next(iter(sources.values())).device)
            self.range = self.memory.tensor()  # (bytes,) uint8: the buffers are views of it
        made = {key: nn.Parameter(self._buffer(param, dtypes[key], starts[key]), requires_grad=False)
                for key, param in sources.items()}
        self.slots: list[tuple[nn.Module, str, nn.Parameter]] = [(m, n, made[id(p)]) for m, n, p in slots]
        # each merged adapter with its base slots' buffers, in ``factors``' order
        self.folded = [(m, [made[id(owner._parameters[name])] for owner, name, _, _ in factors(m)]) for m in self.merge]
        self.nbytes = sum(p.nbytes for p in made.values())
        self.shapes = [tuple(module._parameters[name].shape) for module, name, _ in self.slots]

    def _buffer(self, param: torch.Tensor, dtype: torch.dtype, start: int) -> torch.Tensor:
        if self.memory is None:
            return torch.empty_like(param, dtype=dtype)
        nbytes = param.numel() * dtype.itemsize
        return self.range[start:start + nbytes].view(dtype).view(param.shape)

    def wake(self) -> None:
        """Pages behind sleeping buffers again (undefined until the refresh at the call's start writes them)."""
        self.memory.wake()

    def matches(self, model: nn.Module, kept: bool) -> bool:
        """Made for ``kept`` (FSDP2), and the slots still hold parameters of the buffers' shapes."""
        shapes = [tuple(m._parameters[n].shape) for m, n, _ in self.slots]
        return (kept and D.is_sharded(model)) == self.every and shapes == self.shapes

    @contextlib.contextmanager
    def swapped(self):
        """Refresh the buffers from the slots' parameters (a merged adapter's base slot: folded with
        its A and B), then let the slots hold the buffers and the merged adapters' own path be off for
        the duration; the original parameters and adapter flags are back after."""
        saved = [(module, name, module._parameters[name]) for module, name, _ in self.slots]
        sources = {id(buffer): (buffer, param) for (_, _, param), (_, _, buffer) in zip(saved, self.slots)}
        folded = {id(buffer) for adapter, buffers in self.folded if adapter.enabled for buffer in buffers}
        flags = [(m, m.enabled) for m in self.merge]
        with torch.no_grad():
            for buffer, param in sources.values():  # a tied buffer once; in place: the graphs' addresses stay
                if id(buffer) not in folded:
                    buffer.copy_(param.detach())
            for adapter, buffers in self.folded:  # an adapter switched off (adapters_off) is copied as its base
                for (owner, name, b, a), buffer in zip(factors(adapter), buffers):
                    if adapter.enabled:
                        fold(owner._parameters[name].detach(), b.detach(), a.detach(), adapter.scaling, out=buffer)
        try:
            for module, name, buffer in self.slots:
                module._parameters[name] = buffer
            for m, _ in flags:
                m.enabled = False
            yield
        finally:
            for module, name, param in saved:
                module._parameters[name] = param
            for m, enabled in flags:
                m.enabled = enabled
