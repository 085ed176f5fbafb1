"""policy_loss against the row-by-row fp64 reference over every option combination."""
import itertools

import pytest
import torch

from medix_fast.kernels import policy_loss
from reference import policy_loss as ref_policy_loss

B, T = 5, 9


def _batch(seed=0, adv_per_token=False):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, T, generator=g) * 3).requires_grad_()
    old = logp.detach() + torch.randn(B, T, generator=g) * 0.3  # ratios on both sides of the clip range
    ref = logp.detach() + torch.randn(B, T, generator=g) * 0.5
    sampling = old + torch.randn(B, T, generator=g) * 0.2
    entropy = (torch.rand(B, T, generator=g) * 2).requires_grad_()
    adv = torch.randn(B, T, generator=g) if adv_per_token else torch.randn(B, generator=g)
    lengths = torch.tensor([9, 4, 1, 0, 6])  # a full row, padded rows, a single token, an empty row
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    return logp, old, adv, mask, ref, entropy, sampling


COMBOS = list(itertools.product(
    ["grpo", "bnpo", "dr_grpo", "dapo"], ["token", "sequence", "sequence_token"],
    [None, 3.0], [0.0, 0.04], [0.0, 0.01], [False, True]))


@pytest.mark.parametrize("loss_type,level,clip_c,beta,ent_coef,on_policy", COMBOS)
def test_matches_fp64_reference(loss_type, level, clip_c, beta, ent_coef, on_policy, backend):
    """On every back-end (the PyTorch loss is the one the fused path and the trainer use)."""
    logp, old, adv, mask, ref, entropy, _ = _batch(seed=len(loss_type) + len(level))
    old = None if on_policy else old
    opts = dict(loss_type=loss_type, importance_sampling_level=level, epsilon_low=0.2, epsilon_high=0.28,
                clip_ratio_c=clip_c, beta=beta, entropy_coef=ent_coef, max_completion_length=T,
                num_items_in_batch=37.0 if loss_type == "dapo" else None)
    loss, metrics = policy_loss(logp, old, adv, mask, ref_logprobs=ref, entropy=entropy, **opts)
    expected, _ = ref_policy_loss(logp, old, adv, mask, ref=ref, entropy=entropy, **opts)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad(loss, (logp, entropy), allow_unused=True)
    want = torch.autograd.grad(expected, (logp, entropy), allow_unused=True)
    for x, y in zip(got, want):
        if y is None:
            assert x is None or torch.all(x == 0)
        else:
            torch.testing.assert_close(x.double(), y.double(), rtol=1e-5, atol=1e-7)
    assert torch.all(got[0] * (1 - mask) == 0), "padding must get zero gradient"
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())


@pytest.mark.parametrize("level", ["token", "sequence", "sequence_token"])
def test_per_token_advantages_and_truncated_importance_sampling(level):
    logp, old, adv, mask, ref, entropy, sampling = _batch(seed=7, adv_per_token=True)
    opts = dict(loss_type="bnpo", importance_sampling_level=level, clip_ratio_c=3.0, tis_cap=1.5)
    for behaviour in (old, None):  # None: on-policy, the TIS weight is exp(logp - sampling), detached
        loss, _ = policy_loss(logp, behaviour, adv, mask, sampling_logprobs=sampling, **opts)
        expected, _ = ref_policy_loss(logp, behaviour, adv, mask, sampling=sampling, **opts)
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.autograd.grad(loss, logp)[0].double(),
                                   torch.autograd.grad(expected, logp)[0].double(), rtol=1e-5, atol=1e-7)


def test_on_policy_gradient_is_advantage_weighted():
    """With old=None the ratio is 1, so dL/dlogp = -A / (tokens) for token-level bnpo."""
    logp, _, adv, mask, *_ = _batch(seed=3)
    loss, metrics = policy_loss(logp, None, adv, mask, loss_type="bnpo")
    grad = torch.autograd.grad(loss, logp)[0]
    torch.testing.assert_close(grad, -adv[:, None] * mask / mask.sum())
    assert metrics["ratio_mean"] == 1 and metrics["clip_low"] == 0 and metrics["clip_high"] == 0


def test_metrics_count_clipped_tokens():
    logp = torch.zeros(1, 4, requires_grad=True)
    old = torch.log(torch.tensor([[2.0, 1.0, 0.5, 4.0]]))  # ratios 0.5, 1, 2, 0.25
    mask = torch.ones(1, 4)
    _, m = policy_loss(logp, old, torch.tensor([1.0]), mask, epsilon_low=0.2, epsilon_high=0.28)
    assert m["clip_high"] == 0.25 and m["clip_low"] == 0  # only ratio 2 with A > 0
    _, m = policy_loss(logp, -old, torch.tensor([-1.0]), mask, clip_ratio_c=3.0)  # ratios 2, 1, 0.5, 4
    assert m["clip_low"] == 0.25 and m["clip_dual"] == 0.25  # ratio 0.5 below 0.8; ratio 4 above c=3
    torch.testing.assert_close(m["ratio_mean"], torch.tensor(7.5 / 4))


def test_all_masked_is_zero_not_nan():
    logp, old, adv, _, ref, entropy, _ = _batch()
    mask = torch.zeros(B, T)
    for loss_type in ["grpo", "bnpo", "dapo"]:
        loss, metrics = policy_loss(logp, old, adv, mask, ref_logprobs=ref, beta=0.1, loss_type=loss_type)
        assert loss.item() == 0 and all(torch.isfinite(v) for v in metrics.values())
        assert torch.all(torch.autograd.grad(loss, logp)[0] == 0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(loss_type="ppo"), "loss_type must be one of .*grpo.*bnpo.*dr_grpo.*dapo"),
    (dict(importance_sampling_level="seq"), "importance_sampling_level must be one of"),
    (dict(loss_type="dr_grpo"), "max_completion_length"),
    (dict(epsilon=0.2), r"unknown policy-loss option\(s\) \['epsilon'\]"),
    (dict(beta=0.1), "needs ref_logprobs"),
    (dict(entropy_coef=0.1), "needs entropy"),
    (dict(tis_cap=2.0), "needs sampling_logprobs"),
    (dict(clip_ratio_c=0.5), "clip_ratio_c must be > 1"),
    (dict(epsilon_low=1.0), "epsilon_low"),
])
def test_bad_options(kwargs, match):
    logp, old, adv, mask, *_ = _batch()
    with pytest.raises(ValueError, match=match):
        policy_loss(logp, old, adv, mask, **kwargs)


def test_bad_shapes():
    logp, old, adv, mask, *_ = _batch()
    with pytest.raises(ValueError, match=r"mask must have the shape of logprobs \(5, 9\), got \(5, 8\)"):
        policy_loss(logp, old, adv, mask[:, :-1])
    with pytest.raises(ValueError, match=r"advantages must be \(5,\) or \(5, 9\)"):
        policy_loss(logp, old, adv[:-1], mask)
    with pytest.raises(ValueError, match=r"logprobs must be \(B, T\)"):
        policy_loss(logp[0], old[0], adv, mask[0])
    with pytest.raises(ValueError, match="old_logprobs must have the shape"):
        policy_loss(logp, old[:, :3], adv, mask)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_every_clip_region_and_advantage_sign_matches_fp64(backend, loss_type):
    """Ratios below 1 - eps_low, above 1 + eps_high and above the dual clip c, on rows of each
    advantage sign; loss, gradient and clip fractions against the fp64 reference."""
    from reference import CLIP_ADVANTAGES, CLIP_EDGES, CLIP_RATIOS, clip_regions

    ratio = torch.tensor(CLIP_RATIOS).expand(len(CLIP_ADVANTAGES), -1)  # (4, 12)
    logp = (-torch.rand(ratio.shape, generator=torch.Generator().manual_seed(11)) * 3).requires_grad_()
    old = logp.detach() - ratio.log()
    adv = torch.tensor(CLIP_ADVANTAGES)
    mask = torch.ones(ratio.shape)
    mask[2, -2:] = 0
    counts = clip_regions(ratio, adv, mask)
    opts = dict(loss_type=loss_type, max_completion_length=ratio.shape[1], **CLIP_EDGES)
    loss, metrics = policy_loss(logp, old, adv, mask, **opts)
    expected, _ = ref_policy_loss(logp, old, adv, mask, **opts)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(loss, logp)[0].double(),
                               torch.autograd.grad(expected, logp)[0].double(), rtol=1e-5, atol=1e-7)
    n = mask.sum().item()
    assert metrics["clip_dual"].item() == pytest.approx(counts["dual", "-"] / n)
    assert metrics["clip_low"].item() == pytest.approx(counts["low", "-"] / n)
    assert metrics["clip_high"].item() == pytest.approx(counts["high", "+"] / n)
