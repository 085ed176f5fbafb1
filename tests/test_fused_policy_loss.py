"""fused_linear_policy_loss against fp64 logits -> log-probs -> the fp64 policy-loss reference."""
import pytest
import torch

from medix_fast.kernels import fused_linear_policy_loss
from reference import logprobs_entropy
from reference import policy_loss as ref_policy_loss

OPTION_SETS = [
    dict(loss_type="grpo"),
    dict(loss_type="dapo", epsilon_high=0.28, clip_ratio_c=3.0, num_items_in_batch=50.0),
    dict(loss_type="bnpo", beta=0.04, entropy_coef=0.01),
    dict(loss_type="dr_grpo", max_completion_length=13, importance_sampling_level="sequence"),
    dict(loss_type="grpo", importance_sampling_level="sequence_token", epsilon_low=3e-4, epsilon_high=4e-4,
         beta=0.01, entropy_coef=-0.02, clip_ratio_c=3.0),
]


def _batch(b, t, h, v, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h ** 0.5 * 2).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (b, t), generator=g)
    lengths = torch.randint(0, t + 1, (b,), generator=g)
    lengths[0] = t
    lengths[-1] = 1
    mask = (torch.arange(t)[None, :] < lengths[:, None]).float()
    with torch.no_grad():
        lp, _ = logprobs_entropy(hidden, weight, targets)
    old = (lp + torch.randn(b, t, generator=g) * 0.1).float()
    ref = (lp + torch.randn(b, t, generator=g) * 0.2).float()
    adv = torch.randn(b, generator=g)
    return hidden, weight, targets, mask, adv, old, ref


def _reference(hidden, weight, targets, mask, adv, old, ref, temperature, opts, sampling=None):
    hh = hidden.detach().double().requires_grad_()
    ww = weight.detach().double().requires_grad_()
    lp, ent = logprobs_entropy(hh, ww, targets, temperature=temperature)
    loss, _ = ref_policy_loss(lp, old, adv, mask, ref=ref, entropy=ent, sampling=sampling, **opts)
    return [loss, *torch.autograd.grad(loss, (hh, ww))]


@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("shape", [(3, 7, 33, 1001), (2, 13, 16, 97)], ids=lambda s: "x".join(map(str, s)))
def test_fp32_matches_fp64(backend, opts, shape):
    hidden, weight, targets, mask, adv, old, ref = _batch(*shape, torch.float32, seed=sum(shape))
    temperature = 0.9
    loss, metrics = fused_linear_policy_loss(hidden, weight, targets, mask, adv, old, ref,
                                             temperature=temperature, **opts)
    got = [loss, *torch.autograd.grad(loss, (hidden, weight))]
    want = _reference(hidden, weight, targets, mask, adv, old, ref, temperature, opts)
    for name, x, y in zip(["loss", "d_hidden", "d_weight"], got, want):
        err = (x.double() - y).abs().max().item()
        assert err <= 1e-4 * y.abs().max().item() + 1e-7, (name, err)
    assert torch.all(got[1][mask == 0] == 0), "padding positions must get exactly zero gradient"
    assert metrics["entropy"] > 0


@pytest.mark.parametrize("level", ["token", "sequence", "sequence_token"])
@pytest.mark.parametrize("chunk_size", [1, 4, 8, 13, None])
def test_chunks_of_tokens_or_whole_sequences(backend, level, chunk_size, monkeypatch):
    """One pass over chunks (any tokens at token level, whole sequences at the sequence levels,
    several per chunk when they fit); a sequence longer than a chunk takes the two-pass path."""
    import medix_fast.kernels.fused_policy_loss as fpl

    two_pass = []
    real = fpl.fused_linear_logprobs
    monkeypatch.setattr(fpl, "fused_linear_logprobs", lambda *a, **k: two_pass.append(1) or real(*a, **k))
    hidden, weight, targets, mask, adv, old, ref = _batch(4, 7, 33, 1001, torch.float32, seed=9)
    opts = dict(loss_type="dapo", importance_sampling_level=level, clip_ratio_c=3.0, beta=0.02, entropy_coef=0.01)
    loss, _ = fused_linear_policy_loss(hidden, weight, targets, mask, adv, old, ref, temperature=0.8,
                                       chunk_size=chunk_size, **opts)
    got = [loss, *torch.autograd.grad(loss, (hidden, weight))]
    want = _reference(hidden, weight, targets, mask, adv, old, ref, 0.8, opts)
    for name, x, y in zip(["loss", "d_hidden", "d_weight"], got, want):
        err = (x.double() - y).abs().max().item()
        assert err <= 1e-4 * y.abs().max().item() + 1e-7, (name, err)
    longest = int(mask.sum(-1).max())
    assert bool(two_pass) == (level != "token" and chunk_size is not None and chunk_size < longest)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("on_policy", [False, True], ids=["old_logprobs", "on_policy"])
def test_truncated_importance_sampling(backend, level, on_policy):
    """tis_cap weights each token by min(exp(old - sampling), cap); on-policy (old=None) old is the
    current log-prob, so no old-log-prob pass is needed."""
    hidden, weight, targets, mask, adv, old, _ = _batch(3, 7, 33, 1001, torch.float32, seed=5)
    sampling = old + 0.3 * torch.randn(old.shape, generator=torch.Generator().manual_seed(6))  # some above the cap
    old = None if on_policy else old
    opts = dict(loss_type="dapo", importance_sampling_level=level, clip_ratio_c=3.0, tis_cap=1.2)
    loss, _ = fused_linear_policy_loss(hidden, weight, targets, mask, adv, old, temperature=0.9,
                                       sampling_logprobs=sampling, **opts)
    got = [loss, *torch.autograd.grad(loss, (hidden, weight))]
    want = _reference(hidden, weight, targets, mask, adv, old, None, 0.9, opts, sampling=sampling)
    for name, x, y in zip(["loss", "d_hidden", "d_weight"], got, want):
        err = (x.double() - y).abs().max().item()
        assert err <= 1e-4 * y.abs().max().item() + 1e-7, (name, err)


def _torch_bf16(hidden, weight, targets, mask, adv, old, ref, opts):
    """PyTorch's own bf16 computation, the yardstick for the bf16 tolerance: bf16 logits GEMM,
    fp32 log_softmax, the reference loss on those log-probs, gradients by autograd."""
    logp = torch.log_softmax((hidden @ weight.t()).float(), -1).gather(-1, targets[..., None])[..., 0]
    loss, _ = ref_policy_loss(logp, old, adv, mask, ref=ref, **opts)
    return [loss, *torch.autograd.grad(loss, (hidden, weight))]


def test_bf16_within_twice_torch_error(backend):
    """The README's rule: the error against fp64 is at most twice PyTorch's own bf16 error."""
    hidden, weight, targets, mask, adv, old, ref = _batch(2, 6, 32, 301, torch.bfloat16, seed=5)
    opts = dict(loss_type="dapo", epsilon_high=0.28, clip_ratio_c=3.0)
    loss, _ = fused_linear_policy_loss(hidden, weight, targets, mask, adv, old, ref, **opts)
    d_hidden, d_weight = torch.autograd.grad(loss, (hidden, weight))
    want = _reference(hidden, weight, targets, mask, adv, old, ref, 1.0, opts)
    yardstick = _torch_bf16(hidden, weight, targets, mask, adv, old, ref, opts)
    assert d_hidden.dtype == torch.bfloat16 and d_weight.dtype == torch.bfloat16
    for name, x, y, z in zip(["loss", "d_hidden", "d_weight"], [loss, d_hidden, d_weight], want, yardstick):
        assert (x.double() - y).abs().max() <= 2 * (z.double() - y).abs().max() + 1e-6, name


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_no_grad_path_matches_grad_path(backend, level):
    """The one-pass (gradient) and two-pass (no_grad) paths agree on loss and metrics."""
    hidden, weight, targets, mask, adv, old, ref = _batch(2, 6, 16, 97, torch.float32, seed=9)
    opts = dict(loss_type="dapo", importance_sampling_level=level, beta=0.02, clip_ratio_c=3.0)
    loss, metrics = fused_linear_policy_loss(hidden, weight, targets, mask, adv, old, ref, **opts)
    with torch.no_grad():
        loss2, metrics2 = fused_linear_policy_loss(hidden, weight, targets, mask, adv, old, ref, **opts)
    torch.testing.assert_close(loss.detach(), loss2, rtol=1e-5, atol=1e-6)
    for key in metrics:
        torch.testing.assert_close(metrics[key], metrics2[key], rtol=1e-5, atol=1e-6)


def test_fully_masked_batch_is_finite(backend):
    hidden, weight, targets, mask, adv, old, ref = _batch(2, 5, 16, 64, torch.float32, seed=1)
    loss, metrics = fused_linear_policy_loss(hidden, weight, targets, torch.zeros_like(mask), adv, old,
                                             ref, beta=0.1, loss_type="dapo")
    d_hidden, d_weight = torch.autograd.grad(loss, (hidden, weight))
    assert loss.item() == 0 and torch.all(d_hidden == 0) and torch.all(d_weight == 0)
    assert all(torch.isfinite(v) for v in metrics.values())


def test_bad_shapes():
    hidden, weight, targets, mask, adv, *_ = _batch(2, 5, 16, 64, torch.float32, seed=1)
    with pytest.raises(ValueError, match=r"hidden must be \(B, T, H\) with \(B, T\) = targets' \(2, 5\)"):
        fused_linear_policy_loss(hidden[0], weight, targets, mask, adv)
    with pytest.raises(ValueError, match=r"mask must have the shape of targets \(2, 4\), got \(2, 5\)"):
        fused_linear_policy_loss(hidden, weight, targets[:, :4], mask, adv)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        fused_linear_policy_loss(hidden, weight, targets, mask, adv, loss_type="nope")


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("no_grad", [False, True], ids=["one_pass", "no_grad"])
def test_under_cpu_autocast(backend, level, no_grad):
    """bf16 autocast around fp32 inputs (the DDP set-up of train.py): no dtype error, an fp32 loss
    and fp32 gradients within the bf16 tolerance of the fp64 reference."""
    hidden, weight, targets, mask, adv, old, ref = _batch(3, 7, 33, 1001, torch.float32, seed=4)
    opts = dict(loss_type="dapo", importance_sampling_level=level, clip_ratio_c=3.0, beta=0.02, entropy_coef=0.01)
    want = _reference(hidden, weight, targets, mask, adv, old, ref, 0.9, opts)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(not no_grad):
        loss, metrics = fused_linear_policy_loss(hidden, weight, targets, mask, adv, old, ref, temperature=0.9,
                                                 chunk_size=8, **opts)
    assert loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in metrics.values())
    got = [loss] if no_grad else [loss, *torch.autograd.grad(loss, (hidden, weight))]
    for x, y in zip(got, want):
        assert x.dtype == torch.float32
        assert (x.double() - y).abs().max() <= 2e-2 * y.abs().max() + 1e-4


@pytest.mark.parametrize("level", ["token", "sequence_token"])
def test_one_pass_makes_loss_and_metrics_together(backend, level, monkeypatch):
    """With gradients the loss and its metrics come from the one pass over the chunks (no second
    policy_loss over the batch); the metrics are the fp64 reference's masked token means."""
    import medix_fast.kernels.fused_policy_loss as fpl

    monkeypatch.setattr(fpl, "policy_loss", lambda *a, **k: pytest.fail("policy_loss ran a second pass"))
    hidden, weight, targets, mask, adv, old, ref = _batch(3, 7, 33, 1001, torch.float32, seed=12)
    old = old + 0.8 * torch.randn(old.shape, generator=torch.Generator().manual_seed(1))  # some clipped
    opts = dict(loss_type="bnpo", importance_sampling_level=level, clip_ratio_c=1.5, beta=0.1)
    _, metrics = fused_linear_policy_loss(hidden, weight, targets, mask, adv, old, ref, chunk_size=7, **opts)
    lp, ent = logprobs_entropy(hidden.detach(), weight.detach(), targets)
    log_w = lp - old.double()
    if level != "token":
        log_w = ((log_w * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)).expand_as(lp)
    ratio, a = log_w.exp(), adv.double()[:, None].expand_as(lp)
    d = ref.double() - lp
    want = {"ratio_mean": ratio, "clip_low": ((ratio < 0.8) & (a < 0)).double(),
            "clip_high": ((ratio > 1.2) & (a > 0)).double(),
            "clip_dual": ((a < 0) & (-a * torch.clamp(ratio, 0.8, 1.2).maximum(ratio) > -a * 1.5)).double(),
            "kl": d.exp() - d - 1, "entropy": ent}
    for key, value in want.items():
        expected = (value * mask).sum() / mask.sum()
        assert abs(metrics[key].item() - expected.item()) <= 1e-5 + 1e-4 * abs(expected.item()), key
    assert metrics["clip_low"] + metrics["clip_high"] > 0 and metrics["clip_dual"] > 0


@pytest.mark.parametrize("level", ["token", "sequence_token"])
def test_every_clip_region_and_advantage_sign_matches_fp64(backend, level):
    """Old log-probs set so that the ratios fall below 1 - eps_low, above 1 + eps_high and above
    the dual clip c, on rows of each advantage sign (per-token weights at sequence_token level)."""
    from reference import CLIP_ADVANTAGES, CLIP_EDGES, CLIP_RATIOS, clip_regions

    b, t = len(CLIP_ADVANTAGES), len(CLIP_RATIOS)
    hidden, weight, targets, mask, _, _, _ = _batch(b, t, 16, 97, torch.float32, seed=12)
    mask = torch.ones(b, t)
    mask[2, -2:] = 0
    ratio = torch.tensor(CLIP_RATIOS).expand(b, -1)
    with torch.no_grad():
        lp, _ = logprobs_entropy(hidden, weight, targets)
    old = (lp - ratio.double().log()).float()
    adv = torch.tensor(CLIP_ADVANTAGES)
    counts = clip_regions(ratio, adv, mask)
    opts = dict(loss_type="dapo", importance_sampling_level=level, **CLIP_EDGES)
    loss, metrics = fused_linear_policy_loss(hidden, weight, targets, mask, adv, old, **opts)
    got = [loss, *torch.autograd.grad(loss, (hidden, weight))]
    want = _reference(hidden, weight, targets, mask, adv, old, None, 1.0, opts)
    for name, x, y in zip(["loss", "d_hidden", "d_weight"], got, want):
        err = (x.double() - y).abs().max().item()
        assert err <= 1e-4 * y.abs().max().item() + 1e-7, (name, err)
    if level == "token":
        assert metrics["clip_dual"].item() == pytest.approx(counts["dual", "-"] / mask.sum().item())


@pytest.mark.parametrize("bias", [False, True])
def test_liger_functional_correctness_case(backend, bias):
    """Liger 0.8.5's ``test_functional_correctness`` inputs (B, T, H, V = 3, 47, 31, 123, fp32, no
    padding, beta 0.04, dapo, reference log-probs from independent hidden states through a head
    0.01 away): many tokens sit past the ~2.6-nat point where a KL clamp would cut the gradient,
    so only the exact k3 KL (kl_clamp=None, the default) agrees with the fp64 reference and with
    Liger's own function; kl_clamp=10 (EasyR1) does not."""
    b, t, h, v = 3, 47, 31, 123
    g = torch.Generator().manual_seed(42)
    hidden = torch.randn(b, t, h, generator=g).requires_grad_()
    weight = torch.randn(v, h, generator=g).requires_grad_()
    head_bias = torch.randn(v, generator=g).requires_grad_() if bias else None
    targets = torch.randint(0, v, (b, t), generator=g)
    mask = torch.ones(b, t)
    adv = torch.rand(b, generator=g)
    ref_hidden = torch.randn(b, t, h, generator=g)
    ref_weight = weight.detach() + torch.randn(v, h, generator=g) * 0.01
    ref_bias = head_bias.detach() + torch.randn(v, generator=g) * 0.01 if bias else None
    with torch.no_grad():
        ref = logprobs_entropy(ref_hidden, ref_weight, targets, bias=ref_bias)[0].float()  # (B, T)
        logp = logprobs_entropy(hidden, weight, targets, bias=head_bias)[0]
    assert int(((ref - logp) > 2.6).sum()) > 20  # Liger's own seed: 41 of 141 tokens
    opts = dict(loss_type="dapo", beta=0.04, epsilon_low=0.2, epsilon_high=0.2)
    params = [x for x in (hidden, weight, head_bias) if x is not None]
    loss, metrics = fused_linear_policy_loss(hidden, weight, targets, mask, adv, None, ref, bias=head_bias, **opts)
    grads = torch.autograd.grad(loss, params)
    pp = [x.detach().double().requires_grad_() for x in params]
    lp64, _ = logprobs_entropy(pp[0], pp[1], targets, bias=pp[2] if bias else None)
    expected, per_token = ref_policy_loss(lp64, None, adv, mask, ref=ref, **opts)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, torch.autograd.grad(expected, pp)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    d = ref.double() - lp64.detach()
    torch.testing.assert_close(metrics["kl"].double(), (d.exp() - d - 1).mean(), rtol=1e-5, atol=0)
    clamped, _ = fused_linear_policy_loss(hidden, weight, targets, mask, adv, None, ref, bias=head_bias,
                                          kl_clamp=10.0, **opts)
    assert not torch.allclose(clamped.double(), expected, rtol=1e-3)  # EasyR1's clamp is another loss here

    liger = pytest.importorskip("liger_kernel.chunked_loss.grpo_loss")
    p2 = [x.detach().clone().requires_grad_() for x in params]
    liger_loss, liger_metrics = liger.LigerFusedLinearGRPOFunction.apply(
        p2[0], p2[1], targets, mask, adv, p2[2] if bias else None, ref, None, None, None, None, 0.04, 0.2, 0.2,
        "dapo", None, "token", 1.0, 1.05, 1.0, False, True, 1)
    torch.testing.assert_close(loss, liger_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["kl"], liger_metrics[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["clip_low"] + metrics["clip_high"], liger_metrics[1], rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, torch.autograd.grad(liger_loss, p2)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


FUSED_TRL_OPTIONS = [
    dict(loss_type="cispo", epsilon_high=1.1, num_items_in_batch=40.0),
    dict(loss_type="sapo", sapo_temperature_pos=2.0, sapo_temperature_neg=0.5),
    dict(loss_type="luspo", delta=1.05, epsilon_high=0.28),
    dict(loss_type="vespo"),
    dict(loss_type="grpo", beta=0.1, use_bias_correction_kl=True),
    dict(loss_type="dapo", off_policy_mask_threshold=0.0, entropy_coef=0.05, entropy_aggregation="token_mean"),
    dict(loss_type="bnpo", top_entropy_quantile=0.4, entropy_coef=0.02, entropy_aggregation="token_mean", beta=0.05),
]


@pytest.mark.parametrize("opts", FUSED_TRL_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("chunk_size", [4, None])
def test_trl_options_fp32_matches_fp64(backend, opts, level, chunk_size, monkeypatch):
    """TRL 1.16's options in the one pass (vespo and the off-policy mask on whole-sequence chunks;
    top_entropy_quantile with its one extra forward pass for the entropies), loss and gradients."""
    import medix_fast.kernels.fused_policy_loss as fpl

    passes = []
    real = fpl.fused_linear_logprobs
    monkeypatch.setattr(fpl, "fused_linear_logprobs", lambda *a, **k: passes.append(1) or real(*a, **k))
    hidden, weight, targets, mask, adv, old, ref = _batch(4, 5, 33, 1001, torch.float32, seed=21)
    ref = ref + 5.0 * (torch.arange(5) % 2)  # every other token 5 nats from the reference
    sampling = old + 0.1 * torch.randn(old.shape, generator=torch.Generator().manual_seed(3))
    opts = dict(importance_sampling_level=level, **opts)
    loss, _ = fused_linear_policy_loss(hidden, weight, targets, mask, adv, old, ref, temperature=0.9,
                                       sampling_logprobs=sampling, chunk_size=chunk_size, **opts)
    got = [loss, *torch.autograd.grad(loss, (hidden, weight))]
    want = _reference(hidden, weight, targets, mask, adv, old, ref, 0.9, opts, sampling=sampling)
    for name, x, y in zip(["loss", "d_hidden", "d_weight"], got, want):
        err = (x.double() - y).abs().max().item()
        assert err <= 1e-4 * y.abs().max().item() + 1e-7, (name, err)
    whole_rows = level != "token" or opts["loss_type"] == "vespo" or "off_policy_mask_threshold" in opts
    two_pass = whole_rows and chunk_size is not None and chunk_size < int(mask.sum(-1).max())  # rows > a chunk
    assert len(passes) == int(two_pass or opts.get("top_entropy_quantile", 1) < 1)  # one pass, +1 for the quantile


@pytest.mark.parametrize("level,chunk_size", [("token", None), ("token", 3), ("sequence", None), ("sequence", 3)],
                         ids=["token", "token-chunks", "sequence", "sequence-two-pass"])
def test_softcap_matches_fp64(backend, level, chunk_size, monkeypatch):
    """softcap=c (Gemma-2's c tanh(z / c), before the temperature) on logits far past the cap
    (|z| >> c): loss, entropy metric and the gradients of hidden, weight and bias against fp64
    materialised capped logits, on the one-pass path, the two-pass path (a sequence longer than a
    chunk) and without gradients."""
    import medix_fast.kernels.fused_policy_loss as fpl

    two_pass = []
    real = fpl.fused_linear_logprobs
    monkeypatch.setattr(fpl, "fused_linear_logprobs", lambda *a, **k: two_pass.append(1) or real(*a, **k))
    hidden, weight, targets, mask, adv, _, _ = _batch(3, 7, 33, 1001, torch.float32, seed=21)
    weight = (weight.detach() * 8).requires_grad_()  # raw logits up to ~80
    bias = torch.randn(1001, generator=torch.Generator().manual_seed(3)).mul(5).requires_grad_()
    cap, temperature = 3.0, 0.8
    noise = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        lp, _ = logprobs_entropy(hidden, weight, targets, bias, temperature, softcap=cap)
    old, ref = (lp + 0.1 * noise[0]).float(), (lp + 0.3 * noise[1]).float()
    opts = dict(loss_type="dapo", importance_sampling_level=level, beta=0.05, entropy_coef=0.02, clip_ratio_c=3.0)
    loss, metrics = fused_linear_policy_loss(hidden, weight, targets, mask, adv, old, ref, bias=bias,
                                             temperature=temperature, softcap=cap, chunk_size=chunk_size, **opts)
    got = [loss, *torch.autograd.grad(loss, (hidden, weight, bias))]
    assert bool(two_pass) == (level == "sequence" and chunk_size is not None)
    leaves = [x.detach().double().requires_grad_() for x in (hidden, weight, bias)]
    lp64, ent64 = logprobs_entropy(*leaves[:2], targets, leaves[2], temperature, softcap=cap)
    want_loss, _ = ref_policy_loss(lp64, old, adv, mask, ref=ref, entropy=ent64, **opts)
    want = [want_loss, *torch.autograd.grad(want_loss, leaves)]
    for name, x, y in zip(["loss", "d_hidden", "d_weight", "d_bias"], got, want):
        err = (x.double() - y).abs().max().item()
        assert err <= 1e-4 * y.abs().max().item() + 1e-7, (name, err)
    entropy = (ent64 * mask).sum() / mask.sum()
    assert abs(metrics["entropy"].item() - entropy.item()) <= 1e-5 * (1 + entropy.item())
    with torch.no_grad():
        loss2, metrics2 = fused_linear_policy_loss(hidden, weight, targets, mask, adv, old, ref, bias=bias,
                                                   temperature=temperature, softcap=cap, **opts)
    assert abs(loss2.item() - want_loss.item()) <= 1e-4 * abs(want_loss.item()) + 1e-7
    torch.testing.assert_close(metrics2["entropy"], metrics["entropy"], rtol=1e-5, atol=1e-6)


def test_bad_softcap():
    hidden, weight, targets, mask, adv, *_ = _batch(2, 5, 16, 64, torch.float32, seed=1)
    with pytest.raises(ValueError, match="softcap must be None or > 0"):
        fused_linear_policy_loss(hidden, weight, targets, mask, adv, softcap=0.0)
