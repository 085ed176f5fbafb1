"""OffloadAdamW (medix_fast/optim/adamw.py): AdamW with its states in host memory and / or bf16.

One process, plain tensors: with fp32 states it gives torch's AdamW's bits (for-loop and foreach forms)
over several steps with weight decay, two param groups, a parameter without a gradient in one step and
chunks that cut parameters into pieces; bf16 states are bf16 tensors and stay within a stated distance
of fp32 AdamW, stochastic rounding keeps the decay of ``exp_avg_sq`` that rounding to nearest loses; a
state dict goes either way between it and torch's AdamW; the bytes-per-parameter helpers match what it
allocates; the trainer's ``adamw`` picks the optimizer from ``optim``. Two gloo processes
(tests/offload_worker.py, FSDP2 DTensors): the same bits as torch's AdamW, a checkpoint (DCP) written by
either resumes into the other with the same bits afterwards, and ``optim.offload: params`` (FSDP2's
CPUOffloadPolicy) trains to the same loss and parameters as without.
"""
from __future__ import annotations

import json

import pytest
import torch


from medix_fast.config import OptimConfig
from medix_fast.optim.adamw import (OffloadAdamW, STATES, adamw, device_bytes, host_bytes, staging_bytes)

SHAPES = [(7, 5), (13,), (3, 4, 2), (1,), (50,)]
HYPER = dict(lr=1e-2, weight_decay=0.1)


def gradients(steps: int, seed: int = 1) -> list[list[torch.Tensor | None]]:
    """Seeded gradients of SHAPES for each step; parameter 1 gets none at step 3."""
    g = torch.Generator().manual_seed(seed)
    return [[None if (step == 2 and i == 1) else torch.randn(s, generator=g) for i, s in enumerate(SHAPES)]
            for step in range(steps)]


def groups(params: list) -> list[dict]:
    """Two param groups, the second at half the lr without weight decay."""
    return [{"params": params[:3]}, {"params": params[3:], "lr": HYPER["lr"] / 2, "weight_decay": 0.0}]


def run(optimizer, params: list, grads: list) -> None:
    """A step per entry of ``grads``, the lr decayed after each."""
    for step_grads in grads:
        for p, grad in zip(params, step_grads):
            p.grad = grad
        optimizer.step()
        for group in optimizer.param_groups:
            group["lr"] *= 0.9


def train(make, steps: int = 6):
    """Parameters of SHAPES (seeded) trained ``steps`` steps by ``make(groups)``."""
    params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)))
              for i, s in enumerate(SHAPES)]
    optimizer = make(groups(params))
    run(optimizer, params, gradients(steps))
    return params, optimizer


@pytest.fixture(scope="module")
def reference():
    return train(lambda groups: torch.optim.AdamW(groups, **HYPER, foreach=False))


@pytest.mark.parametrize("offload", [True, False])
@pytest.mark.parametrize("chunk", [1, 7, 16, 10_000])
def test_fp32_states_give_torch_adamw_bits(reference, offload, chunk):
    want, torch_opt = reference
    foreach, _ = train(lambda groups: torch.optim.AdamW(groups, **HYPER, foreach=True))
    got, opt = train(lambda groups: OffloadAdamW(groups, **HYPER, offload=offload, chunk_elements=chunk))
    for p, q, r in zip(got, want, foreach):
        assert torch.equal(p, q) and torch.equal(p, r)
        for key in ("step", *STATES):
            assert torch.equal(opt.state[p][key], torch_opt.state[q][key]), key
    assert opt.state[got[1]]["step"].item() == 5  # no gradient at one step: not stepped then, as torch's


def test_bf16_states_are_bf16_and_near_fp32(reference):
    """bf16 states: 2 bytes each, on the host with offload; after 6 steps at lr 1e-2 every parameter is
    within 1e-3 of fp32 AdamW's (its moves are ~6e-2: bf16's 2^-8 relative rounding of m and v)."""
    want, _ = reference
    for offload in (True, False):
        for stochastic in (False, True):
            got, opt = train(lambda groups: OffloadAdamW(groups, **HYPER, offload=offload, state_dtype=torch.bfloat16,
                                                         stochastic_rounding=stochastic, chunk_elements=16))
            for p, q in zip(got, want):
                assert all(opt.state[p][k].dtype == torch.bfloat16 and opt.state[p][k].device.type == "cpu"
                           for k in STATES)
                torch.testing.assert_close(p, q, rtol=0, atol=1e-3)
                assert not torch.equal(p, q) or p.numel() == 1


def test_stochastic_rounding_keeps_the_decay_nearest_loses():
    """Zero gradients for 200 steps: fp32 exp_avg_sq decays by 0.999^200 = 0.819; in bf16 rounded to
    nearest each 0.1 % decay is under half a bf16 step and is lost (v stays put), stochastically
    rounded its mean decays as fp32's (within 1 % over 4,096 elements)."""
    def decayed(**kw):
        p = torch.nn.Parameter(torch.zeros(4096))
        opt = OffloadAdamW([p], lr=0.0, weight_decay=0.0, **kw)
        opt.state[p]["exp_avg_sq"].fill_(1.0)
        p.grad = torch.zeros_like(p)
        for _ in range(200):
            opt.step()
        return opt.state[p]["exp_avg_sq"].float()

    assert decayed()[0].item() == pytest.approx(0.999 ** 200, rel=1e-5)
    assert (decayed(state_dtype=torch.bfloat16) == 1.0).all()
    stochastic = decayed(state_dtype=torch.bfloat16, stochastic_rounding=True)
    assert stochastic.mean().item() == pytest.approx(0.999 ** 200, rel=1e-2) and stochastic.std() > 0


def test_stochastic_rounding_is_seeded_by_the_step():
    """The same states and step count draw the same rounding (a resumed run rounds as the uninterrupted one)."""
    runs = [train(lambda g: OffloadAdamW(g, **HYPER, state_dtype=torch.bfloat16, stochastic_rounding=True))
            for _ in range(2)]
    for p, q in zip(runs[0][0], runs[1][0]):
        assert torch.equal(p, q)


@pytest.mark.parametrize("direction", ["torch_to_offload", "offload_to_torch"])
def test_a_state_dict_goes_either_way(direction):
    """3 steps by one, its state dict loaded into the other (fresh, on copies of the parameters), 3 more
    steps: the same bits as 6 steps of torch's AdamW."""
    make = {"torch": lambda g: torch.optim.AdamW(g, **HYPER), "offload": lambda g: OffloadAdamW(g, **HYPER)}
    first, second = direction.split("_to_")
    want, _ = train(make["torch"], steps=6)
    params, optimizer = train(make[first], steps=3)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    other = make[second](groups(copies))
    other.load_state_dict(optimizer.state_dict())
    run(other, copies, gradients(6)[3:])
    for p, q in zip(copies, want):
        assert torch.equal(p, q)
    if isinstance(other, OffloadAdamW):
        assert all(other.state[p][k].device.type == "cpu" for p in copies for k in STATES)


@pytest.mark.parametrize("offload", ["none", "optimizer"])
@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
def test_bytes_per_parameter_are_what_it_allocates(offload, state_dtype):
    """device_bytes + host_bytes: the fp32 master plus the two states the trainer's optimizer holds,
    on the host exactly when offloaded (params: both on the host)."""
    params = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
    opt = adamw(params, OptimConfig(offload=offload, state_dtype=state_dtype), fused=False)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    per = sum(opt.state[p][k].nbytes for p in params for k in STATES) / sum(p.numel() for p in params)
    assert device_bytes(offload, state_dtype) + host_bytes(offload, state_dtype) == 4 + per
    assert host_bytes(offload, state_dtype) == (per if getattr(opt, "offload", False) else 0)
    assert (device_bytes("params", state_dtype), host_bytes("params", state_dtype)) == (0, 4 + per)
    assert (staging_bytes(offload, state_dtype) > 0) == isinstance(opt, OffloadAdamW)


def test_the_trainer_takes_torch_adamw_unless_asked_otherwise():
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert type(adamw(params, OptimConfig(), fused=True)) is torch.optim.AdamW
    assert adamw(params, OptimConfig(), fused=True).defaults["fused"]
    assert type(adamw(params, OptimConfig(offload="params"), fused=False)) is torch.optim.AdamW
    opt = adamw(params, OptimConfig(offload="optimizer", state_dtype="bfloat16", state_rounding="stochastic"), False)
    assert isinstance(opt, OffloadAdamW) and opt.offload and opt.stochastic_rounding
    assert not adamw(params, OptimConfig(state_dtype="bfloat16"), fused=True).offload


def test_parameters_other_than_fp32_are_refused():
    with pytest.raises(ValueError, match="contiguous fp32 tensors on one device"):
        OffloadAdamW([torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))])


# ----------------------------------------------------------------------------- two ranks
@pytest.fixture(scope="module")
def two_ranks_offload(two_ranks):
    out = two_ranks.folder("offload")  # offload_worker.run
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_two_ranks_fsdp_offloaded_states_give_torch_adamw_bits(two_ranks_offload):
    for rank in two_ranks_offload:
        assert rank["after_2"] == 0.0 and rank["after_3"]["offload"] == 0.0
        assert rank["losses"]["offload"] == rank["losses"]["torch"]
        assert rank["offload_state"] == {"type": "DTensor", "device": "cpu", "placements": "(Shard(dim=0),)"}


def test_two_ranks_checkpoint_resumes_across_an_offload_change(two_ranks_offload):
    for rank in two_ranks_offload:
        assert rank["resumed"] == {"from_torch": 0.0, "from_off": 0.0}
        assert rank["after_3"]["from_torch"] == rank["after_3"]["from_off"] == 0.0
        assert rank["losses"]["from_torch"] == rank["losses"]["from_off"] == rank["losses"]["torch"][-1:]


def test_two_ranks_fsdp_cpu_offload_policy_trains_as_without(two_ranks_offload):
    for rank in two_ranks_offload:
        assert rank["params"]["policies"] == ["CPUOffloadPolicy"]
        assert rank["params"]["loss"] == rank["params"]["reference_loss"] and rank["params"]["difference"] == 0.0


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP in one process, on purpose
@pytest.mark.parametrize("saved, resumed", [("float32", "bfloat16"), ("bfloat16", "float32")])
def test_a_checkpoint_resumes_across_a_state_dtype_change(tmp_path, saved, resumed):
    """DCP (distributed.training_state / load_training_state) between fp32 and bf16 states: the
    states cast (bf16's values exactly in fp32), the step counts and the parameters kept."""
    from medix_fast import distributed as D

    def make(state_dtype):
        params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)))
                  for i, s in enumerate(SHAPES)]
        model = torch.nn.ParameterList(params)
        return model, OffloadAdamW(groups(params), **HYPER, state_dtype=getattr(torch, state_dtype))

    model, optimizer = make(saved)
    run(optimizer, list(model), gradients(3))
    D.save_shards(D.training_state(model, model, optimizer), tmp_path, None, asynchronous=False)
    other_model, other = make(resumed)
    tensors = D.training_state(other_model, other_model, other)
    D.load_shards(tensors, tmp_path, alone=True)
    D.load_training_state(other_model, other_model, other, tensors)
    for p, q in zip(model, other_model):
        assert torch.equal(p, q) and other.state[q]["step"].item() == optimizer.state[p]["step"].item()
        for k in STATES:
            assert other.state[q][k].dtype == getattr(torch, resumed)
            torch.testing.assert_close(other.state[q][k].float(), optimizer.state[p][k].float(),
                                       rtol=0 if saved == "bfloat16" else 2 ** -8, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_on_cuda_the_streamed_step_matches_foreach_adamw_without_a_host_wait(state_dtype):
    """On a GPU, 1.4M parameters in chunks of 65,536 (22 through the two slots, copies on the side
    streams): with fp32 states the bits of torch's foreach AdamW on the device, bf16 states within
    1e-3; the states in pinned host memory; no step after the first makes a synchronising CUDA call."""
    dev = torch.device("cuda")
    g = torch.Generator(dev).manual_seed(0)
    want = [torch.nn.Parameter(torch.randn(s, device=dev, generator=g)) for s in [(1024, 1024), (300, 1000), (77,)]]
    got = [torch.nn.Parameter(p.detach().clone()) for p in want]
    reference = torch.optim.AdamW(want, **HYPER, foreach=True)
    optimizer = OffloadAdamW(got, **HYPER, offload=True, state_dtype=state_dtype, chunk_elements=1 << 16)
    for step in range(5):
        for p, q in zip(want, got):
            p.grad = torch.randn(p.shape, device=dev, generator=g)
            q.grad = p.grad.clone()
        reference.step()
        torch.cuda.set_sync_debug_mode("error" if step else "default")
        try:
            optimizer.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    optimizer.state_dict()  # waits for the last copies back
    for p, q in zip(want, got):
        for k in STATES:
            state = optimizer.state[q][k]
            assert state.device.type == "cpu" and state.is_pinned() and state.dtype == state_dtype
            if state_dtype == torch.float32:
                assert torch.equal(state, reference.state[p][k].cpu()), k
        if state_dtype == torch.float32:
            assert torch.equal(p, q)
        else:
            torch.testing.assert_close(q, p, rtol=0, atol=1e-3)
