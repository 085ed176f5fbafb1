"""Sleepable device memory (medix_fast/generate/vmm.py) on a fake libcuda: the driver call sequence
(reserve once, map at each wake, sync + unmap + release at each sleep), the address kept across a
sleep, granularity rounding, named errors, the fallback; and the sampler's pool and weights asleep
between calls with one decoder kept (its tokens those of the eager engine after each update)."""
from __future__ import annotations

import ctypes
from types import SimpleNamespace

import pytest
import torch

from medix_fast.generate import Sampler, vmm
from medix_fast.generate.vmm import Driver, SleepableMemory, VMMError
from test_sampler import make_prompts, tiny_model

GRAIN = 4096
NAMES = {1: b"CUDA_ERROR_INVALID_VALUE", 2: b"CUDA_ERROR_OUT_OF_MEMORY", 208: b"CUDA_ERROR_ALREADY_MAPPED",
         211: b"CUDA_ERROR_NOT_MAPPED"}


class FakeLib:
    """libcuda's VMM calls on host memory: a reservation is a host buffer whose address is the
    "device" address; mapping fills it with 0xFF (pages' contents are undefined: NaN in fp32 and
    bf16), so does unmapping; misuse returns the driver's error codes."""

    def __init__(self, supported: int = 1, fail: str | None = None):
        self.supported, self.fail = supported, fail
        self.calls: list[str] = []
        self.reserved: dict[int, tuple[int, torch.Tensor]] = {}  # va -> (size, backing)
        self.mapped: dict[int, int] = {}  # va -> handle
        self.handles: dict[int, int] = {}  # handle -> size
        self.access: set[int] = set()

    def __getattribute__(self, name):
        attr = object.__getattribute__(self, name)
        if name.startswith("cu") and name != "cuGetErrorName":
            def logged(*args):
                self.calls.append(name)
                return 2 if name == self.fail else attr(*args)
            return logged
        return attr

    def cuGetErrorName(self, result, out):
        out._obj.value = NAMES.get(result, b"CUDA_ERROR_UNKNOWN")
        return 0

    def cuDeviceGet(self, out, ordinal):
        out._obj.value = ordinal
        return 0

    def cuDeviceGetAttribute(self, out, attribute, device):
        out._obj.value = self.supported if attribute == 102 else 0
        return 0

    def cuMemGetAllocationGranularity(self, out, prop, option):
        p = prop._obj
        if (p.type, p.location.type) != (1, 1):  # pinned, on a device
            return 1
        out._obj.value = GRAIN
        return 0

    def cuMemAddressReserve(self, out, size, alignment, addr, flags):
        if size.value % GRAIN or alignment.value % GRAIN:
            return 1
        backing = torch.full((size.value + alignment.value,), 0xFF, dtype=torch.uint8)
        va = -(-backing.data_ptr() // alignment.value) * alignment.value
        self.reserved[va] = (size.value, backing)
        out._obj.value = va
        return 0

    def cuMemCreate(self, out, size, prop, flags):
        if size.value % GRAIN or prop._obj.location.type != 1:
            return 1
        handle = len(self.handles) + 1
        self.handles[handle] = size.value
        out._obj.value = handle
        return 0

    def _fill(self, va: int):
        size = self.reserved[va][0]
        ctypes.memset(va, 0xFF, size)

    def cuMemMap(self, va, size, offset, handle, flags):
        if va.value not in self.reserved or self.reserved[va.value][0] != size.value or handle.value not in self.handles:
            return 1
        if va.value in self.mapped:
            return 208
        self.mapped[va.value] = handle.value
        self._fill(va.value)
        return 0

    def cuMemSetAccess(self, va, size, desc, count):
        d = desc._obj
        if va.value not in self.mapped:
            return 211
        if (d.location.type, d.flags, count.value) != (1, 3, 1):
            return 1
        self.access.add(va.value)
        return 0

    def cuCtxSynchronize(self):
        return 0

    def cuMemUnmap(self, va, size):
        if va.value not in self.mapped:
            return 211
        del self.mapped[va.value]
        self.access.discard(va.value)
        self._fill(va.value)
        return 0

    def cuMemRelease(self, handle):
        if handle.value not in self.handles or handle.value in self.mapped.values():
            return 1
        del self.handles[handle.value]
        return 0

    def cuMemAddressFree(self, va, size):
        if va.value in self.mapped or va.value not in self.reserved:
            return 1
        del self.reserved[va.value]
        return 0


MAP = ["cuMemCreate", "cuMemMap", "cuMemSetAccess"]
SLEEP = ["cuCtxSynchronize", "cuMemUnmap", "cuMemRelease"]


def test_reserve_once_map_at_each_wake_release_at_each_sleep_same_address():
    lib = FakeLib()
    memory = SleepableMemory(Driver(lib), 5000, torch.device("cpu"))
    whole = memory.tensor()
    assert memory.size == 2 * GRAIN and whole.shape == (2 * GRAIN,)
    assert whole.data_ptr() == memory.va and lib.access == {memory.va}
    assert lib.calls == ["cuMemGetAllocationGranularity", "cuMemAddressReserve", *MAP]
    view = whole[16:32].view(torch.float32)  # made once, valid across sleep and wake
    for _ in range(2):
        lib.calls.clear()
        memory.sleep()
        memory.sleep()  # asleep: nothing to do
        assert lib.calls == SLEEP and not lib.mapped and not lib.handles
        lib.calls.clear()
        assert memory.wake() and not memory.wake()
        assert lib.calls == MAP and list(lib.mapped) == [memory.va]
        view.fill_(1.5)
        assert whole.data_ptr() == memory.va and view.data_ptr() == memory.va + 16
    del memory, view, whole
    assert lib.calls[-4:] == [*SLEEP, "cuMemAddressFree"] and not lib.reserved


@pytest.mark.parametrize("call", ["cuMemCreate", "cuMemMap", "cuMemUnmap"])
def test_failing_driver_call_names_itself_and_leaks_no_pages(call):
    lib = FakeLib()
    memory = SleepableMemory(Driver(lib), GRAIN, torch.device("cpu"))
    lib.fail = call
    with pytest.raises(VMMError, match=f"{call} failed: CUresult 2 \\(CUDA_ERROR_OUT_OF_MEMORY\\)"):
        memory.sleep() if call == "cuMemUnmap" else (memory.sleep(), memory.wake())
    assert call == "cuMemUnmap" or not lib.handles  # a failed map gives its pages back


def test_fake_refuses_misuse_with_the_drivers_codes():
    """The fake is strict: mapping a mapped range, unmapping an unmapped one and access to a sleeping one fail."""
    lib = FakeLib()
    driver = Driver(lib)
    memory = SleepableMemory(driver, GRAIN, torch.device("cpu"))
    with pytest.raises(VMMError, match="cuMemMap failed: CUresult 208"):
        driver.map(memory.va, memory.size, 0)
    memory.sleep()
    with pytest.raises(VMMError, match="cuMemUnmap failed: CUresult 211"):
        driver.unmap(memory.va, memory.size, 1)
    with pytest.raises(VMMError, match="cuMemSetAccess failed: CUresult 211"):
        driver.call("cuMemSetAccess", ctypes.c_uint64(memory.va), ctypes.c_size_t(memory.size),
                    ctypes.byref(vmm.AccessDesc(vmm.Location(1, 0), 3)), ctypes.c_size_t(1))


def test_fallback_when_vmm_is_unsupported_or_absent(monkeypatch):
    assert isinstance(vmm.probe(FakeLib(supported=1), 0), Driver)
    assert vmm.probe(FakeLib(supported=0), 0) is None
    assert vmm.probe(SimpleNamespace(), 0) is None  # an old libcuda without the calls
    assert vmm.probe(FakeLib(fail="cuDeviceGetAttribute"), 0) is None
    monkeypatch.setattr(vmm, "OVERRIDE", None)
    assert vmm.driver_for(torch.device("cpu")) is None
    monkeypatch.setattr(vmm, "OVERRIDE", False)
    assert vmm.driver_for(torch.device("cuda", 0)) is None


def test_sampler_sleeps_between_calls_and_keeps_its_decoder(monkeypatch):
    """Static mode on a forced fake driver: release() unmaps the pool's and the weights' pages
    (which come back as NaN bytes), the next call maps them at the same addresses, zeroes the pool
    (a back-end reading a block's tail past a row's length multiplies it by 0) and refreshes the weights; one decoder serves every call, and its tokens are the eager engine's
    after each in-place update."""
    lib = FakeLib()
    monkeypatch.setattr(vmm, "OVERRIDE", Driver(lib))
    model = tiny_model("qwen2", torch.float32)
    static = Sampler(model, max_num_seqs=4, decode_mode="static", dtype=torch.bfloat16)
    eager = Sampler(model, max_num_seqs=4, dtype=torch.bfloat16)
    kwargs = dict(n=2, max_new_tokens=5, temperature=1.0, stop_token_ids=[], seed=3)
    addresses = set()
    for call in range(3):
        if call:
            with torch.no_grad():  # an optimizer step, in place
                for p in model.parameters():
                    p.add_(torch.randn_like(p), alpha=0.1)
        out = static.generate(make_prompts([4, 7]), **kwargs)
        assert out.completion_ids == eager.generate(make_prompts([4, 7]), **kwargs).completion_ids
        addresses.add((static.pool.kv.data_ptr(), static.weights.memory.va))
        assert not static.pool.kv.isnan().any()  # zeroed at the wake: the slots no row wrote are 0, not NaN
        static.release()
        eager.release()
        assert static.pool.memory.va in lib.reserved and not lib.mapped and not lib.handles
    assert static.sleeps and static.decoders_built == 1 and len(addresses) == 1
    assert lib.calls.count("cuMemAddressReserve") == 2  # the pool and the weights, once each
    assert lib.calls.count("cuMemMap") == lib.calls.count("cuMemUnmap") == 6


def test_trainer_lets_a_sleeping_sampler_sleep_through_the_update():
    from medix_fast.trainer import Trainer

    trainer = SimpleNamespace(info=SimpleNamespace(device=torch.device("cuda", 0)), update_peak=1,
                              sampler=SimpleNamespace(sleeps=True))
    assert Trainer._keep_sampler(trainer) is False


def test_tensor_parallel_copy_sleeps_in_place():
    """The group sampler's share in one sleepable range: made once, asleep after each rollout, woken
    and refilled at the same addresses (ties kept); without a driver it goes back to the meta device."""
    from medix_fast.generate.tensor_parallel import TensorParallelCopy

    lib = FakeLib()
    model = tiny_model("qwen2", torch.float32)
    model.lm_head.weight = model.model.embed_tokens.weight
    copy = TensorParallelCopy(model, 1, None, 0, torch.float32, torch.device("cpu"))
    copy.driver = Driver(lib)
    addresses = []
    for _ in range(2):
        with copy.materialized():
            addresses.append([p.data_ptr() for p in copy.model.parameters()])
            assert all(torch.equal(a, b) for a, b in zip(copy.model.parameters(), model.parameters()))
            assert copy.model.lm_head.weight is copy.model.model.embed_tokens.weight
        assert not lib.mapped and copy.memory.va in lib.reserved
        with torch.no_grad():
            model.model.norm.weight.add_(1)
    assert addresses[0] == addresses[1] and lib.calls.count("cuMemAddressReserve") == 1
