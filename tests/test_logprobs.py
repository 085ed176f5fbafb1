"""fused_linear_logprobs (and its entropy) against fp64 materialised logits, both back-ends.

bf16 follows the rule "the kernel's error against fp64 is at most twice PyTorch's own bf16 error"
(PyTorch's bf16 path: bf16 logits GEMM, then log_softmax in fp32, gradients by autograd).
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medix_fast.kernels import force_backend, fused_linear_logprobs
from reference import logprobs_entropy

SHAPES = [  # (lead shape, H, V)
    ((3, 7), 33, 1001),
    ((1,), 16, 64),
    ((2, 5), 24, 300),
]


def _inputs(lead, hidden, vocab, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(*lead, hidden, generator=g)).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) / hidden ** 0.5 * 3).to(dtype).requires_grad_()
    b = torch.randn(vocab, generator=g).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, vocab, lead, generator=g)
    return h, w, b, t


def _run(h, w, b, t, temperature, g_lp, g_ent, **kw):
    params = [x for x in (h, w, b) if x is not None]
    lp, ent = fused_linear_logprobs(h, w, t, bias=b, temperature=temperature, return_entropy=True, **kw)
    grads = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), params)
    return [lp, ent, *grads]


def _reference(h, w, b, t, temperature, g_lp, g_ent):
    leaves = [x.detach().double().requires_grad_() for x in (h, w, b) if x is not None]
    hh, ww, bb = (leaves + [None])[:3]
    lp, ent = logprobs_entropy(hh, ww, t, bb, temperature)
    grads = torch.autograd.grad((lp * g_lp.double()).sum() + (ent * g_ent.double()).sum(), leaves)
    return [lp, ent, *grads]


def _torch_bf16(h, w, b, t, temperature, g_lp, g_ent):
    """PyTorch's own bf16 computation, the yardstick for the bf16 tolerance."""
    params = [x for x in (h, w, b) if x is not None]
    logits = h @ w.t() + (b if b is not None else 0)
    logsm = torch.log_softmax(logits.float() / temperature, -1)
    lp = logsm.gather(-1, t.unsqueeze(-1)).squeeze(-1)
    ent = -(logsm.exp() * logsm).sum(-1)
    grads = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), params)
    return [lp, ent, *grads]


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _assert_fp32_close(x, y, name, rel=1e-4):
    """Max error within ``rel`` of the reference's largest magnitude (fp32 sums over V terms)."""
    assert _max_err(x, y) <= rel * y.abs().max().item() + 1e-6, (name, _max_err(x, y))


@pytest.mark.parametrize("lead,hidden,vocab", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fp32_matches_fp64(backend, lead, hidden, vocab, bias, temperature):
    h, w, b, t = _inputs(lead, hidden, vocab, torch.float32, bias)
    g_lp, g_ent = torch.randn(lead), torch.randn(lead)
    ours = _run(h, w, b, t, temperature, g_lp, g_ent, chunk_size=4)
    ref = _reference(h, w, b, t, temperature, g_lp, g_ent)
    for name, x, y in zip(["logp", "entropy", "d_hidden", "d_weight", "d_bias"], ours, ref):
        assert x.dtype == (torch.float32 if name in ("logp", "entropy") else h.dtype), name
        _assert_fp32_close(x, y, name)


@pytest.mark.parametrize("lead,hidden,vocab", SHAPES[:2])
def test_bf16_within_twice_torch_error(backend, lead, hidden, vocab, request):
    if backend == "triton" and lead == (1,):  # seen with seeded upstream gradients: 3 seeds in 30 fail, up to 7.9x
        request.applymarker(pytest.mark.xfail(strict=True, reason="triton bf16 d_weight at one row: up to 7.9x "
                                              "PyTorch's bf16 error (h1-kernels)"))
    h, w, b, t = _inputs(lead, hidden, vocab, torch.bfloat16, bias=True, seed=1)
    g_lp, g_ent = torch.randn(lead), torch.randn(lead)
    ours = _run(h, w, b, t, 1.0, g_lp, g_ent)
    ref = _reference(h, w, b, t, 1.0, g_lp, g_ent)
    yardstick = _torch_bf16(h, w, b, t, 1.0, g_lp, g_ent)
    for name, x, y, z in zip(["logp", "entropy", "d_hidden", "d_weight", "d_bias"], ours, ref, yardstick):
        assert _max_err(x, y) <= 2 * _max_err(z, y) + 1e-6, name


def test_realistic_vocab_few_tokens(backend):
    """Qwen's vocabulary (151,936: not a multiple of any block) at a handful of tokens."""
    h, w, b, t = _inputs((3,), 32, 151_936, torch.float32, bias=False, seed=2)
    t[0] = 151_935  # the last row of the head
    g_lp, g_ent = torch.randn(3), torch.randn(3)
    ours = _run(h, w, b, t, 1.0, g_lp, g_ent)
    ref = _reference(h, w, b, t, 1.0, g_lp, g_ent)
    for name, x, y in zip(["logp", "entropy", "d_hidden", "d_weight"], ours, ref):
        _assert_fp32_close(x, y, name)


def test_extreme_logits_no_nan(backend):
    """Logits of +-1e4: one-hot distributions, log-probs of 0 and -2e4, finite gradients."""
    hidden, vocab = 16, 70
    h = torch.zeros(4, hidden)
    h[:, 0] = 1.0
    w = torch.zeros(vocab, hidden)
    w[:, 0] = -1e4
    w[3, 0] = 1e4
    h.requires_grad_()
    w.requires_grad_()
    t = torch.tensor([3, 0, 69, 3])
    lp, ent = fused_linear_logprobs(h, w, t, return_entropy=True)
    lp.sum().backward()
    torch.testing.assert_close(lp, torch.tensor([0.0, -2e4, -2e4, 0.0]))
    assert torch.all(ent >= 0) and torch.all(ent < 1e-3)
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()


def test_chunking_does_not_change_results():
    h, w, b, t = _inputs((2, 9), 24, 300, torch.float32, bias=True, seed=3)
    g_lp, g_ent = torch.randn(2, 9), torch.randn(2, 9)
    with force_backend("torch"):
        runs = [_run(h, w, b, t, 1.0, g_lp, g_ent, chunk_size=c) for c in (1, 5, 18, 1000)]
    for other in runs[1:]:
        for x, y in zip(runs[0], other):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_row_blocks_of_the_torch_path_match_fp64(monkeypatch):
    """The torch path's scratch in row blocks: one row per block gives the fp64 values too."""
    from medix_fast.kernels import logits_rows

    h, w, b, t = _inputs((3, 7), 33, 1001, torch.float32, bias=True, seed=8)
    g_lp, g_ent = torch.randn(3, 7), torch.randn(3, 7)
    want = _reference(h, w, b, t, 0.7, g_lp, g_ent)
    monkeypatch.setattr(logits_rows, "SCRATCH_MB", 0)  # max(1, 0) = 1 row per block
    assert len(logits_rows._row_blocks(21, 1001)) == 21
    with force_backend("torch"):
        got = _run(h, w, b, t, 0.7, g_lp, g_ent, chunk_size=5)
    for name, x, y in zip(["logp", "entropy", "d_hidden", "d_weight", "d_bias"], got, want):
        _assert_fp32_close(x, y, name)


def test_no_grad_and_logprob_only_path(backend):
    h, w, _, t = _inputs((2, 4), 16, 100, torch.float32, bias=False, seed=4)
    with torch.no_grad():
        lp = fused_linear_logprobs(h, w, t)
    assert not lp.requires_grad and lp.shape == (2, 4)
    ref, _ = logprobs_entropy(h.detach(), w.detach(), t)
    torch.testing.assert_close(lp.double(), ref, rtol=1e-5, atol=1e-5)


def test_weight_cast_to_hidden_dtype_gets_fp32_grad():
    """Autocast-style call: bf16 hidden, fp32 master weight -> bf16 compute, fp32 weight grad."""
    h, _, _, t = _inputs((5,), 16, 50, torch.bfloat16, bias=False)
    w = torch.randn(50, 16, requires_grad=True)
    fused_linear_logprobs(h, w, t).sum().backward()
    assert w.grad.dtype == torch.float32 and h.grad.dtype == torch.bfloat16


def test_weight_cast_to_hidden_dtype_values_within_twice_torch_error(backend):
    """bf16 hidden, fp32 master weight: values and gradients against fp64 of those inputs, within
    twice the error of PyTorch casting the weight to bf16 itself (as autocast does)."""
    h, _, _, t = _inputs((5, 3), 16, 50, torch.bfloat16, bias=False, seed=6)
    w = (torch.randn(50, 16, generator=torch.Generator().manual_seed(7)) * 0.75).requires_grad_()
    g = torch.Generator().manual_seed(8)
    g_lp, g_ent = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    ours = _run(h, w, None, t, 1.0, g_lp, g_ent)
    ref = _reference(h, w, None, t, 1.0, g_lp, g_ent)
    w_cast = w.to(torch.bfloat16)  # PyTorch's own computation: the weight cast to bf16, grads in bf16
    yardstick = _torch_bf16(h, w_cast, None, t, 1.0, g_lp, g_ent)
    assert ours[3].dtype == torch.float32 and ours[2].dtype == torch.bfloat16
    for name, x, y, z in zip(["logp", "entropy", "d_hidden", "d_weight"], ours, ref, yardstick):
        assert _max_err(x, y) <= 2 * _max_err(z, y) + 1e-6, (name, _max_err(x, y), _max_err(z, y))


def test_empty_input():
    h = torch.zeros(0, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    lp = fused_linear_logprobs(h, w, torch.zeros(0, dtype=torch.long))
    lp.sum().backward()
    assert lp.shape == (0,) and torch.all(w.grad == 0)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 12), hidden=st.integers(1, 20), vocab=st.integers(2, 130), seed=st.integers(0, 999),
       temperature=st.floats(0.3, 2.0))
def test_properties(n, hidden, vocab, seed, temperature):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g) * 4
    w = torch.randn(vocab, hidden, generator=g)
    t = torch.randint(0, vocab, (n,), generator=g)
    lp, ent = fused_linear_logprobs(h, w, t, temperature=temperature, return_entropy=True)
    assert torch.all(lp <= 0) and torch.all(ent >= -1e-6) and torch.all(ent <= torch.log(torch.tensor(vocab)) + 1e-4)


@pytest.mark.parametrize("make,match", [
    (lambda h, w, t: (h, w[:, :-1], t), "disagree"),
    (lambda h, w, t: (h, w, t[:, :-1]), "targets must have shape"),
    (lambda h, w, t: (h, w, t.float()), "integer"),
])
def test_bad_input(make, match):
    h, w, _, t = _inputs((2, 3), 8, 100, torch.float32, bias=False)
    with pytest.raises(ValueError, match=match):
        fused_linear_logprobs(*make(h, w, t))


@pytest.mark.parametrize("shift,match", [(100, r"\[0, V=100\), found 1\d\d at \(0, 0\)"), (-100, r"\[0, V=100\)")])
def test_target_range_checked_in_debug_mode(monkeypatch, shift, match):
    """The value check reads the targets on the host (a sync): only with MEDIX_FAST_DEBUG=1."""
    monkeypatch.setenv("MEDIX_FAST_DEBUG", "1")
    h, w, _, t = _inputs((2, 3), 8, 100, torch.float32, bias=False)
    with pytest.raises(ValueError, match=match):
        fused_linear_logprobs(h, w, t + shift)


def test_target_out_of_range_without_debug_is_nan_on_triton(monkeypatch):
    """Without the check the Triton kernels read nothing out of bounds: that token's log-prob is NaN."""
    monkeypatch.delenv("MEDIX_FAST_DEBUG", raising=False)
    h, w, _, t = _inputs((2, 3), 8, 100, torch.float32, bias=False)
    t[0, 1] = 100
    with force_backend("triton"), torch.no_grad():
        lp = fused_linear_logprobs(h, w, t)
    assert torch.isnan(lp[0, 1]) and torch.isfinite(lp.flatten()[[0, 2, 3, 4, 5]]).all()


def test_bad_bias_and_temperature():
    h, w, _, t = _inputs((2,), 8, 10, torch.float32, bias=False)
    with pytest.raises(ValueError, match=r"bias must have shape \(10,\)"):
        fused_linear_logprobs(h, w, t, bias=torch.zeros(9))
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_logprobs(h, w, t, temperature=0.0)


@pytest.mark.parametrize("bias", [False, True])
def test_cpu_autocast_computes_in_bf16_and_returns_input_dtypes(backend, bias):
    """Under torch.autocast (fp32 master weights, as DDP trains) the head computes in autocast's
    bf16, like the GEMM it replaces: the values equal a bf16 call's, the gradients come back fp32
    (dW accumulated in fp32) within the bf16 tolerance of the fp64 reference."""
    h, w, b, t = _inputs((3, 7), 33, 1001, torch.float32, bias=bias, seed=6)
    g_lp, g_ent = torch.randn(3, 7), torch.randn(3, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = _run(h, w, b, t, 0.8, g_lp, g_ent, chunk_size=5)
    low = [x.detach().bfloat16().requires_grad_() if x is not None else None for x in (h, w, b)]
    as_bf16 = _run(*low, t, 0.8, g_lp, g_ent, chunk_size=5)
    ref = _reference(h, w, b, t, 0.8, g_lp, g_ent)
    yardstick = _torch_bf16(*low, t, 0.8, g_lp, g_ent)
    names = ["logp", "entropy", "d_hidden", "d_weight", "d_bias"]
    for name, x, y, z, low_run in zip(names, ours, ref, yardstick, as_bf16):
        assert x.dtype == torch.float32, name
        assert _max_err(x, y) <= 2 * _max_err(z, y) + 1e-6, name
        if name in ("logp", "entropy"):
            torch.testing.assert_close(x, low_run, rtol=0, atol=0)


# ----------------------------------------------------------------------------- GPU configuration
from medix_fast.kernels import logits_rows, logprobs  # noqa: E402
from medix_fast.kernels.logprobs import GPU_TILES, HeadGrads, Tiles, dot_precision, launch_shape  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_tiles_under_the_interpreter(monkeypatch, dtype):
    """The tiles and row-kernel block the GPU runs, at odd sizes (every mask in play: several row
    blocks and vocabulary splits, a partial row block, k-step and vocabulary tile, 2 row-kernel tiles)."""
    monkeypatch.setattr(logprobs, "tiles", lambda dt, vocab, precision, major: GPU_TILES[dt])
    monkeypatch.setattr(logits_rows, "_block_v", logits_rows.gpu_block_v)
    monkeypatch.setattr(logprobs, "sm_count", lambda device: 8)
    splits, _, row_blocks = launch_shape(201, 4133, GPU_TILES[dtype], 8)
    assert splits > 1 and row_blocks > 1
    h, w, b, t = _inputs((3, 67), 70, 4133, dtype, bias=True, seed=7)
    t[0, 0] = 4132
    g_lp, g_ent = torch.randn(3, 67), torch.randn(3, 67)
    with force_backend("triton"):
        ours = _run(h, w, b, t, 0.9, g_lp, g_ent, chunk_size=150)
    ref = _reference(h, w, b, t, 0.9, g_lp, g_ent)
    if dtype == torch.float32:
        for name, x, y in zip(["logp", "entropy", "d_hidden", "d_weight", "d_bias"], ours, ref):
            _assert_fp32_close(x, y, name)
    else:
        yardstick = _torch_bf16(h, w, b, t, 0.9, g_lp, g_ent)
        for name, x, y, z in zip(["logp", "entropy", "d_hidden", "d_weight", "d_bias"], ours, ref, yardstick):
            assert _max_err(x, y) <= 2 * _max_err(z, y) + 1e-6, name


def test_launch_shape_at_the_target_shape():
    """N=16,384, H=4,096, V=151,936 bf16 on an H200 (132 SMs): 128 row blocks, the vocabulary in 2
    splits so every SM gets a program (it holds one: 255 registers, the compile check); splits are
    whole tiles and cover V."""
    assert GPU_TILES[torch.bfloat16].programs_per_sm == 1
    splits, per_split, row_blocks = launch_shape(16_384, 151_936, GPU_TILES[torch.bfloat16], 132)
    assert (splits, row_blocks) == (2, 128)
    assert per_split % 128 == 0 and (splits - 1) * per_split < 151_936 <= splits * per_split
    assert launch_shape(200_000, 151_936, GPU_TILES[torch.bfloat16], 132)[0] == 1  # tokens alone fill it


def test_forward_grid_puts_the_vocabulary_split_on_the_fast_axis(monkeypatch):
    """Grid (splits, row blocks): programs launched together share rows of h (read from L2)."""
    monkeypatch.setattr(logprobs, "sm_count", lambda device: 16)
    grids = []
    kernel = logprobs._forward_kernel

    class Recorder:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(logprobs, "_forward_kernel", Recorder())
    h, w, _, t = _inputs((40,), 24, 1001, torch.float32, bias=False, seed=9)
    with force_backend("triton"), torch.no_grad():
        lp = fused_linear_logprobs(h, w, t)
    splits, _, row_blocks = launch_shape(40, 1001, logprobs.tiles(torch.float32, 1001), 16)
    assert grids == [(splits, row_blocks)] and splits > 1 and row_blocks > 1 and splits != row_blocks
    torch.testing.assert_close(lp.double(), logprobs_entropy(h.detach(), w.detach(), t)[0], rtol=1e-5, atol=1e-5)


def test_fp32_takes_tf32_unless_ieee_is_asked(monkeypatch):
    monkeypatch.setattr(logprobs, "interpreting", lambda: False)
    assert dot_precision(torch.float32, "tf32") == "tf32"
    assert dot_precision(torch.float32, "ieee") == "ieee"
    assert dot_precision(torch.bfloat16, "ieee") == "tf32"  # bf16 operands: the option does not apply
    monkeypatch.setattr(logprobs, "interpreting", lambda: True)
    assert dot_precision(torch.float32, "tf32") == "ieee"  # the interpreter stays exact
    h, w, _, t = _inputs((2,), 8, 10, torch.float32, bias=False)
    with pytest.raises(ValueError, match="fp32_precision"):
        fused_linear_logprobs(h, w, t, fp32_precision="fp16")


@pytest.mark.parametrize("device", ["cpu", "meta"])  # meta: the CUDA branch's calls, without a GPU
@pytest.mark.parametrize("dz_dtype", [torch.float32, torch.bfloat16])
def test_dw_accumulates_in_fp32_with_no_vocab_by_hidden_temporary(device, dz_dtype):
    """dW (V, H) fp32 is the only (V, H) tensor a chunk touches: no bf16 product, no fp32 copy."""
    from torch.utils._python_dispatch import TorchDispatchMode

    vocab, hidden, c = 37, 11, 5
    g = torch.Generator().manual_seed(0)
    h = torch.randn(c, hidden, generator=g).bfloat16()
    w = torch.randn(vocab, hidden, generator=g).bfloat16()
    dz = torch.randn(c, vocab, generator=g).to(dz_dtype)
    h, w, dz = h.to(device), w.to(device), dz.to(device)
    grads = HeadGrads(h, w, (True, True, True))
    outputs = []

    class Outputs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            outputs.extend((func, o) for o in (out if isinstance(out, (tuple, list)) else [out]))
            return out

    with Outputs():
        grads.add(dz, h, w, slice(0, c))
    big = [(func, tuple(o.shape), o.dtype) for func, o in outputs
           if isinstance(o, torch.Tensor) and o.numel() == vocab * hidden and o is not grads.dw]
    assert not big, big
    assert grads.dw.dtype == torch.float32 and grads.db.dtype == torch.float32
    if device == "cpu":
        torch.testing.assert_close(grads.dw.double(), dz.double().t() @ h.double(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grads.dh.double(), (dz.to(w.dtype).double() @ w.double()).bfloat16().double())
        torch.testing.assert_close(grads.db.double(), dz.double().sum(0), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- logit soft-capping
def _reference_capped(h, w, b, t, temperature, softcap, g_lp, g_ent):
    leaves = [x.detach().double().requires_grad_() for x in (h, w, b) if x is not None]
    hh, ww, bb = (leaves + [None])[:3]
    lp, ent = logprobs_entropy(hh, ww, t, bb, temperature, softcap=softcap)
    grads = torch.autograd.grad((lp * g_lp.double()).sum() + (ent * g_ent.double()).sum(), leaves)
    return [lp, ent, *grads]


@pytest.mark.parametrize("lead,hidden,vocab", SHAPES)
@pytest.mark.parametrize("bias,temperature,softcap,scale", [
    (True, 0.7, 2.0, 10.0),  # raw |z| up to ~100: most logits on tanh's flat part (|z| >> c)
    (False, 1.0, 30.0, 1.0),  # Gemma-2's cap, logits mostly inside it (near-linear part, series branch)
], ids=["saturated", "gemma2"])
def test_softcap_matches_fp64(backend, lead, hidden, vocab, bias, temperature, softcap, scale):
    """cap(z) = c tanh(z / c) before the temperature: values and every gradient against fp64
    materialised logits, with chunks of 4 tokens; the cap changes the values a lot (checked)."""
    h, w, b, t = _inputs(lead, hidden, vocab, torch.float32, bias)
    w = (w.detach() * scale).requires_grad_()
    g_lp, g_ent = torch.randn(lead), torch.randn(lead)
    ours = _run(h, w, b, t, temperature, g_lp, g_ent, chunk_size=4, softcap=softcap)
    ref = _reference_capped(h, w, b, t, temperature, softcap, g_lp, g_ent)
    uncapped = _reference(h, w, b, t, temperature, g_lp, g_ent)
    for name, x, y, u in zip(["logp", "entropy", "d_hidden", "d_weight", "d_bias"], ours, ref, uncapped):
        _assert_fp32_close(x, y, name)
        if scale > 1:
            assert _max_err(u, y) > 0.1 * y.abs().max().item(), name
    with torch.no_grad():  # the forward alone (the Triton forward kernel when no gradient is needed)
        lp, ent = fused_linear_logprobs(h, w, t, bias=b, temperature=temperature, return_entropy=True,
                                        softcap=softcap)
    _assert_fp32_close(lp, ref[0], "no_grad logp")
    _assert_fp32_close(ent, ref[1], "no_grad entropy")


def test_softcap_tanh_of_the_triton_kernels():
    """The kernels' exp-based tanh (the interpreter has no libdevice one) within 4 fp32 ulp of
    torch's everywhere: around 0 (series), at the branch point 1/8, and far out (no overflow)."""
    import triton
    import triton.language as tl

    @triton.jit
    def apply(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(y_ptr + i, logprobs._tanh(tl.load(x_ptr + i, mask=i < n, other=0.0)), mask=i < n)

    x = torch.cat([torch.linspace(-0.3, 0.3, 301), torch.tensor([0.1249999, 0.125, -0.125, 1e-30, -1e-8, 0.0]),
                   torch.linspace(-100, 100, 201), torch.tensor([1e4, -1e4, 88.0, -89.0])])
    y = torch.empty_like(x)
    apply[(1,)](x, y, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    want = torch.tanh(x.double())
    rel = (y.double() - want).abs() / want.abs().clamp(min=1e-38)
    assert rel.max() <= 5e-7, (rel.max().item(), x[rel.argmax()].item())


def test_bad_softcap():
    h, w, _, t = _inputs((2,), 8, 10, torch.float32, bias=False)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="softcap must be None or > 0"):
            fused_linear_logprobs(h, w, t, softcap=bad)
