"""Count host-device synchronisations in a block of code, on the CPU as well as on a GPU.

    from syncs import count_syncs

    with count_syncs() as c:
        loss, _ = fused_linear_policy_loss(...)
        loss.backward()
    assert c.count == 0, c.where

A sync is an operation after which the host must wait for the device: reading a value
(``.item()``, ``int(t)``, ``bool(t)``, ``if t:``, printing a tensor, ``.tolist()``, ``.numpy()``),
or an op whose output size depends on tensor values (``nonzero``, boolean-mask indexing and
assignment, ``masked_select``, ``repeat_interleave`` with tensor repeats and no ``output_size``,
``unique``, ``bincount``, ``equal``). On a CPU none of these waits, so they are observed where they
are issued: a ``TorchDispatchMode`` sees every ATen op (autograd's backward included), and
``Tensor.tolist`` / ``Tensor.numpy``, which read CPU memory without dispatching, are wrapped for
the duration. A copy from a CUDA tensor to the host is counted too, and on a CUDA machine
``torch.cuda.set_sync_debug_mode("warn")`` reports what the driver itself sees (e.g. a host-to-device
copy from pageable memory); each such warning counts. ``nonzero_static`` and ``repeat_interleave``
with ``output_size`` are sync-free and not counted.

``c.count`` is the number of syncs, ``c.where`` one line per sync: the op and the first caller
frame outside torch and this file (``file:line``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import traceback
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_VALUE_READS = {aten._local_scalar_dense, aten.equal}
_DATA_DEPENDENT = {aten.nonzero, aten.masked_select, aten.unique_dim, aten._unique, aten._unique2,
                   aten.unique_consecutive, aten.unique_dim_consecutive, aten.bincount}
_INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
_HERE = os.path.abspath(__file__)
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))


def _caller() -> str:
    """The innermost frame that is neither torch nor this file, as ``path:line``."""
    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if path != _HERE and not path.startswith(_TORCH) and "/triton/" not in path:
            return f"{os.path.relpath(path)}:{frame.lineno}"
    return "?"


def _bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _is_sync(func, args, kwargs) -> bool:
    packet = func._overloadpacket
    if packet in _VALUE_READS or packet in _DATA_DEPENDENT:
        return True
    if packet in _INDEXING:
        return _bool_index(args[1] if len(args) > 1 else kwargs.get("indices"))
    if packet is aten.repeat_interleave and func is not aten.repeat_interleave.self_int:
        return kwargs.get("output_size") is None
    if packet in (aten._to_copy, aten.copy_):  # device -> host
        src = args[1] if packet is aten.copy_ else args[0]
        dst_device = args[0].device if packet is aten.copy_ else kwargs.get("device")
        return src.device.type == "cuda" and dst_device is not None and torch.device(dst_device).type == "cpu"
    return False


@dataclasses.dataclass
class SyncCount:
    where: list[str] = dataclasses.field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.where)

    def add(self, what: str) -> None:
        self.where.append(f"{what} at {_caller()}")


class _Mode(TorchDispatchMode):
    def __init__(self, record: SyncCount):
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_sync(func, args, kwargs):
            self.record.add(str(func))
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_syncs():
    """Context manager yielding a :class:`SyncCount` of the syncs issued inside it (see module doc)."""
    record = SyncCount()
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def wrap(name, original):
        def method(self, *args, **kwargs):
            record.add(f"Tensor.{name}")
            return original(self, *args, **kwargs)
        return method

    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    previous_mode = torch.cuda.get_sync_debug_mode() if cuda else 0
    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        with warnings.catch_warnings(record=True) as caught, _Mode(record):
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            yield record
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(previous_mode)
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    for w in caught:
        if "synchronizing" in str(w.message):
            record.where.append(f"CUDA sync: {w.message} ({os.path.relpath(w.filename)}:{w.lineno})")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def count_decode_loop(monkeypatch) -> dict:
    """Count the host syncs of ``Sampler._loop`` (the decode loop) from now on: the returned dict
    holds the last call's :class:`SyncCount` under ``"syncs"``."""
    from medix_fast.generate import Sampler

    original, counted = Sampler._loop, {}

    def counting(self, *args):
        with count_syncs() as c:
            result = original(self, *args)
        counted["syncs"] = c
        return result

    monkeypatch.setattr(Sampler, "_loop", counting)
    return counted
