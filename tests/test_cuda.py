"""The CUDA paths on a GPU (marker ``cuda``: skipped without one; ``pytest -m cuda`` or
``python -m bench --gpu-check`` runs them), each against fp64 or the CPU implementation:

- every Triton kernel (LM-head forward, row statistics, row gradient, group advantages) at the
  tiles the GPU runs, in bf16 and in fp32 with tf32 and with ieee products, at odd sizes, and
  the LM head with a logit soft-cap;
- the LM head under ``torch.autocast("cuda")`` with fp32 inputs;
- no host-device sync in the loss path (PyTorch's own sync detector, through tests/syncs.py);
- element offsets past 2^31 on a real 4 GiB operand;
- a one-process NCCL group's all_reduce of a device tensor, directly and through medix_fast.distributed.
"""
import pytest
import torch

import reference
from medix_fast.kernels import (force_backend, fused_linear_logprobs, fused_linear_policy_loss,
                                group_advantages, policy_loss)
from syncs import count_syncs
from test_fused_policy_loss import _batch as loss_batch
from test_fused_policy_loss import _reference as loss_reference
from test_logprobs import _inputs, _max_err, _reference, _reference_capped, _torch_bf16

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")


def _cuda(*tensors):
    return [None if t is None else t.detach().to(CUDA).requires_grad_(t.requires_grad) for t in tensors]


def _run(h, w, b, t, temperature, g_lp, g_ent, **kw):
    lp, ent = fused_linear_logprobs(h, w, t, bias=b, temperature=temperature, return_entropy=True, **kw)
    params = [x for x in (h, w, b) if x is not None]
    return [lp, ent, *torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), params)]


@pytest.mark.parametrize("dtype,precision,rel", [(torch.bfloat16, "tf32", None), (torch.float32, "tf32", 5e-3),
                                                 (torch.float32, "ieee", 1e-4)])
@pytest.mark.parametrize("vocab", [4133, 151_936])
def test_lm_head_kernels_at_gpu_tiles(dtype, precision, rel, vocab):
    """Forward kernel (vocabulary split across SMs), row-gradient kernel and the cuBLAS GEMMs,
    forward and gradients, at odd sizes (201 tokens, H=200): against fp64; bf16 within twice
    PyTorch's own bf16 error on the same GPU."""
    lead = (3, 67) if vocab < 10_000 else (5,)
    h, w, b, t = _cuda(*_inputs(lead, 200, vocab, dtype, bias=True, seed=7))
    t.view(-1)[0] = vocab - 1
    g_lp, g_ent = torch.randn(lead, device=CUDA), torch.randn(lead, device=CUDA)
    with force_backend("triton"):
        ours = _run(h, w, b, t, 0.9, g_lp, g_ent, chunk_size=64, fp32_precision=precision)
    ref = _reference(h, w, b, t, 0.9, g_lp, g_ent)
    yardstick = _torch_bf16(h, w, b, t, 0.9, g_lp, g_ent) if rel is None else None
    for i, (name, x, y) in enumerate(zip(["logp", "entropy", "d_hidden", "d_weight", "d_bias"], ours, ref)):
        assert torch.isfinite(x).all(), name
        bound = 2 * _max_err(yardstick[i], y) + 1e-6 if rel is None else rel * y.abs().max().item() + 1e-5
        assert _max_err(x, y) <= bound, (name, _max_err(x, y), bound)


@pytest.mark.parametrize("precision,rel", [("tf32", 5e-3), ("ieee", 1e-4)])
def test_lm_head_kernels_with_softcap(precision, rel):
    """softcap=2 on logits up to ~10x the cap: the forward kernel's tanh and the row-gradient
    kernel's 1 - tanh^2, compiled, at the GPU tiles and odd sizes, against fp64."""
    h, w, b, t = _inputs((3, 67), 200, 4133, torch.float32, bias=True, seed=7)
    h, w, b, t = _cuda(h, (w.detach() * 8).requires_grad_(), b, t)
    g_lp, g_ent = torch.randn(3, 67, device=CUDA), torch.randn(3, 67, device=CUDA)
    with force_backend("triton"):
        ours = _run(h, w, b, t, 0.9, g_lp, g_ent, chunk_size=64, fp32_precision=precision, softcap=2.0)
    ref = _reference_capped(h, w, b, t, 0.9, 2.0, g_lp, g_ent)
    for name, x, y in zip(["logp", "entropy", "d_hidden", "d_weight", "d_bias"], ours, ref):
        assert _max_err(x, y) <= rel * y.abs().max().item() + 1e-5, (name, _max_err(x, y))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_fused_policy_loss_row_kernels(dtype, level):
    """The one-pass loss: cuBLAS logits, the row-statistics and row-gradient kernels, fp32 dW."""
    hidden, weight, targets, mask, adv, old, ref = loss_batch(3, 70, 96, 4133, dtype, seed=3)
    opts = dict(loss_type="dapo", importance_sampling_level=level, clip_ratio_c=3.0, beta=0.02, entropy_coef=0.01)
    want = loss_reference(hidden, weight, targets, mask, adv, old, ref, 0.9, opts)
    hc, wc = _cuda(hidden, weight)
    lengths = mask.sum(-1).int().tolist()
    loss, _ = fused_linear_policy_loss(hc, wc, *(x.to(CUDA) for x in (targets, mask, adv, old, ref)),
                                       temperature=0.9, chunk_size=128, valid_lengths=lengths, **opts)
    got = [loss, *torch.autograd.grad(loss, (hc, wc))]
    rel = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for name, x, y in zip(["loss", "d_hidden", "d_weight"], got, want):
        assert (x.double().cpu() - y).abs().max() <= rel * y.abs().max() + 1e-6, name


def test_group_advantages_kernel():
    rewards = torch.rand(4096 * 5, generator=torch.Generator().manual_seed(0))
    for estimator in ("grpo", "dr_grpo", "rloo"):
        with force_backend("triton"):
            adv, stats = group_advantages(rewards.to(CUDA), 5, estimator=estimator, return_stats=True)
        want = reference.group_advantages(rewards, 5, estimator)
        torch.testing.assert_close(adv.double().cpu(), want, rtol=1e-5, atol=1e-5)
        assert stats.std.shape == (4096,)


def test_autocast_on_cuda():
    """fp32 inputs under bf16 autocast (the DDP set-up): bf16 compute, fp32 results and gradients."""
    hidden, weight, targets, mask, adv, old, ref = loss_batch(3, 7, 64, 1001, torch.float32, seed=4)
    opts = dict(loss_type="dapo", clip_ratio_c=3.0)
    want = loss_reference(hidden, weight, targets, mask, adv, old, ref, 1.0, opts)
    hc, wc = _cuda(hidden, weight)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _ = fused_linear_policy_loss(hc, wc, *(x.to(CUDA) for x in (targets, mask, adv, old, ref)), **opts)
        logp = fused_linear_logprobs(hc, wc, targets.to(CUDA))
    got = [loss, *torch.autograd.grad(loss, (hc, wc))]
    assert logp.dtype == torch.float32 and all(x.dtype == torch.float32 for x in got)
    for x, y in zip(got, want):
        assert (x.double().cpu() - y).abs().max() <= 2e-2 * y.abs().max() + 1e-4


def test_loss_path_makes_no_host_sync():
    """PyTorch's CUDA sync detector (and the dispatch-level counter) over the whole loss path."""
    hidden, weight, targets, mask, adv, old, ref = loss_batch(4, 33, 64, 1001, torch.bfloat16, seed=5)
    lengths = mask.sum(-1).int().tolist()
    hc, wc = _cuda(hidden, weight)
    t, m, a, o, r = (x.to(CUDA) for x in (targets, mask, adv, old, ref))
    rewards = torch.rand(40, device=CUDA)

    def step():
        for level in ("token", "sequence"):
            loss, metrics = fused_linear_policy_loss(hc, wc, t, m, a, o, r, beta=0.01, importance_sampling_level=level,
                                                     valid_lengths=lengths, chunk_size=64)
            loss.backward()
        fused_linear_logprobs(hc, wc, t).sum().backward()
        logp = o.clone().requires_grad_()
        policy_loss(logp, o, a, m, ref_logprobs=r, beta=0.04, clip_ratio_c=3.0)[0].backward()
        group_advantages(rewards, 5)

    step()  # compile the kernels first
    torch.cuda.synchronize()
    with count_syncs() as c:
        step()
    assert c.count == 0, c.where


def test_offsets_past_2_31_on_the_gpu():
    """A (3, 4096) bf16 view whose rows are 2^30 elements apart, over a 4 GiB buffer."""
    hidden = 4096
    buffer = torch.zeros(2 * 2**30 + hidden, dtype=torch.bfloat16, device=CUDA)
    h = buffer.as_strided((3, hidden), (2**30, 1))
    h.copy_(torch.randn(3, hidden, device=CUDA))
    w = (torch.randn(37, hidden, device=CUDA) / 64).bfloat16().requires_grad_()
    t = torch.tensor([3, 36, 0], device=CUDA)
    h.requires_grad_()
    with force_backend("triton"):
        lp = fused_linear_logprobs(h, w, t)
        dh, dw = torch.autograd.grad(lp.sum(), (h, w))
    hh, ww = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = torch.log_softmax(hh @ ww.t(), -1).gather(1, t[:, None]).squeeze(1)
    want_dh, want_dw = torch.autograd.grad(want.sum(), (hh, ww))
    assert _max_err(lp, want) < 5e-2 and _max_err(dh, want_dh) < 5e-2 and _max_err(dw, want_dw) < 5e-2


def test_one_process_nccl_group_all_reduce():
    import torch.distributed as dist

    from medix_fast import distributed as D

    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1,
                            device_id=torch.device("cuda", torch.cuda.current_device()))
    try:
        t = torch.arange(4.0, device=CUDA)
        dist.all_reduce(t)
        assert t.tolist() == [0.0, 1.0, 2.0, 3.0]
        assert D.all_reduce(torch.tensor([2.0], device=CUDA), "max").item() == 2.0
    finally:
        dist.destroy_process_group()
