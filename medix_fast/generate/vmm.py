"""Sleepable device memory: a range of device addresses reserved once, whose physical pages are
released while the sampler sleeps (the update) and mapped again, at the same addresses, before
the next rollout (vLLM's "sleep mode"), so CUDA graphs captured on it stay valid for the run.

    driver = vmm.driver_for(device)               # None: no VMM here, allocate as before
    memory = SleepableMemory(driver, nbytes, device)   # reserved and awake (pages mapped)
    kv = memory.tensor()[:n].view(torch.bfloat16)  # torch views of the range, made once
    memory.sleep()                                # device synchronized, pages unmapped and released
    memory.wake()                                 # new pages at the same addresses: contents undefined

Built on the CUDA driver's virtual memory management API through ctypes on libcuda (no
compiler): ``cuMemAddressReserve`` once, then ``cuMemCreate`` (pinned, on the device) +
``cuMemMap`` + ``cuMemSetAccess`` (read/write) at each wake, ``cuCtxSynchronize`` (kernels still
queued may read the range) + ``cuMemUnmap`` + ``cuMemRelease`` at each sleep, ``cuMemAddressFree``
when the object dies. Sizes are rounded up to the allocation granularity. The bytes are exposed as
one uint8 tensor through ``__cuda_array_interface__`` (its data_ptr is the reserved address).
Pages are outside PyTorch's caching allocator: ``torch.cuda.mem_get_info`` sees them,
``memory_allocated`` does not.

Whether it is used is decided in one place, :func:`driver_for`: CUDA, libcuda loadable and the
device's ``CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED``; else None and the sampler
allocates as before. ``OVERRIDE`` (tests) forces a driver (a fake libcuda) or none (False).
"""
from __future__ import annotations

import contextlib
import ctypes

import torch

VMM_SUPPORTED = 102  # CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED
PINNED, ON_DEVICE, READ_WRITE, RECOMMENDED = 1, 1, 3, 1  # CUmemAllocationType, CUmemLocationType, ...
OVERRIDE = None  # tests: a Driver to use on any device, or False for none


class VMMError(RuntimeError):
    """A driver call failed: names the call and its CUresult."""


class Location(ctypes.Structure):  # CUmemLocation
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class AllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class AllocationProp(ctypes.Structure):  # CUmemAllocationProp
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int), ("location", Location),
                ("win32HandleMetaData", ctypes.c_void_p), ("allocFlags", AllocFlags)]


class AccessDesc(ctypes.Structure):  # CUmemAccessDesc
    _fields_ = [("location", Location), ("flags", ctypes.c_int)]


def _prop(device: int) -> AllocationProp:
    return AllocationProp(type=PINNED, location=Location(ON_DEVICE, device))


class Driver:
    """The libcuda functions this file calls, each checked (``lib``: the loaded library or a fake)."""

    def __init__(self, lib):
        self.lib = lib

    def call(self, name: str, *args) -> None:
        result = getattr(self.lib, name)(*args)
        if result != 0:
            text = ctypes.c_char_p()
            self.lib.cuGetErrorName(result, ctypes.byref(text))
            raise VMMError(f"{name} failed: CUresult {result} ({(text.value or b'unknown').decode()})")

    def supported(self, device: int) -> bool:
        handle, flag = ctypes.c_int(), ctypes.c_int()
        self.call("cuDeviceGet", ctypes.byref(handle), device)
        self.call("cuDeviceGetAttribute", ctypes.byref(flag), VMM_SUPPORTED, handle)
        return bool(flag.value)

    def granularity(self, device: int) -> int:
        size = ctypes.c_size_t()
        self.call("cuMemGetAllocationGranularity", ctypes.byref(size), ctypes.byref(_prop(device)), RECOMMENDED)
        return size.value

    def reserve(self, size: int, alignment: int) -> int:
        va = ctypes.c_uint64()
        self.call("cuMemAddressReserve", ctypes.byref(va), ctypes.c_size_t(size), ctypes.c_size_t(alignment),
                  ctypes.c_uint64(0), ctypes.c_uint64(0))
        return va.value

    def map(self, va: int, size: int, device: int) -> int:
        """Physical pages for ``[va, va + size)``, mapped read/write for ``device``; their handle."""
        handle = ctypes.c_uint64()
        self.call("cuMemCreate", ctypes.byref(handle), ctypes.c_size_t(size), ctypes.byref(_prop(device)),
                  ctypes.c_uint64(0))
        try:
            self.call("cuMemMap", ctypes.c_uint64(va), ctypes.c_size_t(size), ctypes.c_size_t(0), handle,
                      ctypes.c_uint64(0))
        except VMMError:
            self.call("cuMemRelease", handle)  # no leaked pages
            raise
        try:
            access = AccessDesc(location=Location(ON_DEVICE, device), flags=READ_WRITE)
            self.call("cuMemSetAccess", ctypes.c_uint64(va), ctypes.c_size_t(size), ctypes.byref(access),
                      ctypes.c_size_t(1))
        except VMMError:
            self.call("cuMemUnmap", ctypes.c_uint64(va), ctypes.c_size_t(size))
            self.call("cuMemRelease", handle)
            raise
        return handle.value

    def unmap(self, va: int, size: int, handle: int) -> None:
        """Wait for the device's queued work, then unmap and release the pages."""
        self.call("cuCtxSynchronize")
        self.call("cuMemUnmap", ctypes.c_uint64(va), ctypes.c_size_t(size))
        self.call("cuMemRelease", ctypes.c_uint64(handle))

    def free(self, va: int, size: int) -> None:
        self.call("cuMemAddressFree", ctypes.c_uint64(va), ctypes.c_size_t(size))


def driver_for(device: torch.device) -> Driver | None:
    """The driver whose VMM the sampler's memory uses on ``device``, or None (allocate as before)."""
    if OVERRIDE is not None:
        return OVERRIDE or None
    if device.type != "cuda":
        return None
    torch.cuda.init()  # the primary context current, as torch's own allocations use
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    return probe(lib, device.index if device.index is not None else torch.cuda.current_device())


def probe(lib, device: int) -> Driver | None:
    """A driver on ``lib`` when ``device`` supports VMM, else None (an old driver without the calls too)."""
    driver = Driver(lib)
    try:
        return driver if driver.supported(device) else None
    except (AttributeError, VMMError):
        return None


class _Interface:
    """What ``torch.as_tensor`` reads: the range as a (size,) uint8 array; keeps ``memory`` alive
    while a tensor on it lives."""

    def __init__(self, memory: SleepableMemory):
        self.memory = memory
        self.__cuda_array_interface__ = {"shape": (memory.size,), "typestr": "|u1",
                                         "data": (memory.va, False), "version": 2}


class SleepableMemory:
    """``nbytes`` (rounded up to the granularity) at one device address for the object's life;
    awake when made."""

    def __init__(self, driver: Driver, nbytes: int, device: torch.device):
        self.driver, self.device = driver, device
        self.index = device.index if device.index is not None else (
            torch.cuda.current_device() if device.type == "cuda" else 0)
        grain = driver.granularity(self.index)
        self.size = max(1, -(-nbytes // grain)) * grain
        self.va = driver.reserve(self.size, grain)
        self.handle: int | None = None
        self.wake()

    def tensor(self) -> torch.Tensor:
        """The range as a (size,) uint8 tensor, at the reserved address; it and its views keep this
        object (so the reservation) alive, stay valid across sleep and wake, and must not be read
        or written while asleep (an illegal address)."""
        out = _as_tensor(_Interface(self), self.device)
        if out.data_ptr() != self.va:
            raise VMMError(f"torch.as_tensor made a tensor at {out.data_ptr():#x}, not at the reserved "
                           f"address {self.va:#x}")
        return out

    @property
    def awake(self) -> bool:
        return self.handle is not None

    def wake(self) -> bool:
        """Map pages again (no-op when awake); whether it did (their contents are undefined)."""
        if self.awake:
            return False
        self.handle = self.driver.map(self.va, self.size, self.index)
        return True

    def sleep(self) -> None:
        """Give the pages back (no-op when asleep); the addresses stay reserved."""
        if self.awake:
            self.driver.unmap(self.va, self.size, self.handle)
            self.handle = None

    def __del__(self):  # the last tensor on it is gone (they hold it, it holds none of them)
        with contextlib.suppress(Exception):  # interpreter shutdown: libcuda may be gone
            self.sleep()
            self.driver.free(self.va, self.size)


def _as_tensor(interface: _Interface, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.as_tensor(interface, device=device)
    # a fake driver (tests) on the CPU: its addresses are host memory
    memory = interface.memory
    array = (ctypes.c_uint8 * memory.size).from_address(memory.va)
    array._keep = interface  # noqa: SLF001  the tensor holds the array, which holds the region
    return torch.frombuffer(array, dtype=torch.uint8)
