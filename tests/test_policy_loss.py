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
    _assert_loss_and_grads(loss, expected, logp, entropy, mask)
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())


def _assert_loss_and_grads(loss, expected, logp, entropy, mask):
    """Loss and its gradients in the log-probs and entropies equal the fp64 reference's; padding gets 0."""
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad(loss, (logp, entropy), allow_unused=True)
    want = torch.autograd.grad(expected, (logp, entropy), allow_unused=True)
    for x, y in zip(got, want):
        if y is None:
            assert x is None or torch.all(x == 0)
        else:
            torch.testing.assert_close(x.double(), y.double(), rtol=1e-5, atol=1e-7)
    assert torch.all(got[0] * (1 - mask) == 0), "padding must get zero gradient"


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


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"])
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


@pytest.mark.parametrize("loss_type", ["cispo", "sapo", "vespo"])
def test_clip_metrics_of_the_unclipped_terms(backend, loss_type):
    """TRL's clip metrics beyond the clipped objective: cispo reports the ratios above its cap
    epsilon_high with A > 0 as clip_high (TRL's cispo_clip_ratio) and nothing else; sapo and vespo
    clip nothing."""
    from reference import CLIP_ADVANTAGES, CLIP_EDGES, CLIP_RATIOS

    ratio = torch.tensor(CLIP_RATIOS).expand(len(CLIP_ADVANTAGES), -1)  # (4, 12)
    logp = -torch.rand(ratio.shape, generator=torch.Generator().manual_seed(11)) * 3
    adv = torch.tensor(CLIP_ADVANTAGES)
    mask = torch.ones(ratio.shape)
    _, metrics = policy_loss(logp, logp - ratio.log(), adv, mask, loss_type=loss_type, **CLIP_EDGES)
    capped = ((ratio > CLIP_EDGES["epsilon_high"]) & (adv[:, None] > 0)).float().mean().item()
    assert metrics["clip_high"].item() == pytest.approx(capped if loss_type == "cispo" else 0.0)
    assert metrics["clip_low"].item() == 0 and metrics["clip_dual"].item() == 0


@pytest.mark.parametrize("kl_clamp,log_ratio_clamp", [(None, None), (10.0, 20.0), (4.0, None), (None, 3.0)])
def test_kl_and_log_ratio_clamps_match_fp64(backend, kl_clamp, log_ratio_clamp):
    """Reference gaps ref - logp from -5 to 5 nats and log-ratios to +-25: None is the k3 KL and
    exp(log_w) exactly (TRL, Liger), a value veRL/EasyR1's clamps, whose KL gradient vanishes past
    the clamp (k3 = 10 at a gap of ~2.6 nats)."""
    gaps = torch.tensor([0.5, 1.0, 2.5, 2.7, 3.0, 5.0, -5.0, -0.5, 4.0, 0.1, 1.5, -2.0])
    logp = (-torch.rand(4, 12, generator=torch.Generator().manual_seed(5)) * 3).requires_grad_()
    ref = logp.detach() + gaps
    log_ratio = torch.tensor([0.1, -0.1, 2.0, -2.0, 5.0, -5.0, 25.0, -25.0, 0.0, 0.3, -0.3, 1.0])
    old = logp.detach() - log_ratio.roll(1)
    adv = torch.tensor([1.3, -0.7, 0.4, -2.0])
    mask = torch.ones(4, 12)
    mask[3, -3:] = 0
    for level in ("token", "sequence"):
        opts = dict(loss_type="bnpo", importance_sampling_level=level, beta=0.1, kl_clamp=kl_clamp,
                    log_ratio_clamp=log_ratio_clamp)
        behaviour = old if level == "token" else logp.detach() - log_ratio.roll(1) / 5
        loss, metrics = policy_loss(logp, behaviour, adv, mask, ref_logprobs=ref, **opts)
        expected, _ = ref_policy_loss(logp, behaviour, adv, mask, ref=ref, **opts)
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
        grad = torch.autograd.grad(loss, logp)[0]
        torch.testing.assert_close(grad.double(), torch.autograd.grad(expected, logp)[0].double(), rtol=1e-5, atol=1e-7)
        if level == "token":
            token_metrics = metrics
    metrics = token_metrics
    d = gaps.double()
    k3 = torch.exp(d) - d - 1
    kl = k3 if kl_clamp is None else k3.clamp(max=kl_clamp)
    torch.testing.assert_close(metrics["kl"].double(), (kl * mask).sum() / mask.sum(), rtol=1e-5, atol=0)
    if log_ratio_clamp is None and kl_clamp is None:  # the ratio at 25 nats is exp(25), no clamp
        assert metrics["ratio_mean"] > 1e9


TRL_OPTIONS = {  # TRL 1.16's loss options beyond the clipped four, alone and together
    "cispo": dict(loss_type="cispo", epsilon_high=1.2, num_items_in_batch=37.0),
    "sapo": dict(loss_type="sapo"),
    "sapo_temperatures": dict(loss_type="sapo", sapo_temperature_pos=2.0, sapo_temperature_neg=0.5),
    "luspo": dict(loss_type="luspo"),
    "vespo": dict(loss_type="vespo"),
    "vespo_shapes": dict(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_pos=1.0, vespo_k_neg=0.5,
                         vespo_lambda_neg=4.0, num_items_in_batch=50.0),
    "delta": dict(loss_type="bnpo", delta=1.4),
    "delta_below_clip": dict(loss_type="dapo", delta=1.1, epsilon_high=0.28),
    "bias_correction_kl": dict(loss_type="grpo", beta=0.1, use_bias_correction_kl=True),
    "entropy_token_mean": dict(loss_type="dapo", entropy_coef=0.05, entropy_aggregation="token_mean"),
    "top_entropy_quantile": dict(loss_type="bnpo", top_entropy_quantile=0.3, entropy_coef=0.02,
                                 entropy_aggregation="token_mean"),
    "off_policy_mask": dict(loss_type="grpo", off_policy_mask_threshold=0.0),
    "together": dict(loss_type="cispo", epsilon_high=1.2, beta=0.1, use_bias_correction_kl=True,
                     off_policy_mask_threshold=0.0, top_entropy_quantile=0.5, entropy_coef=0.01,
                     entropy_aggregation="token_mean", clip_ratio_c=3.0),
    "together_clipped": dict(loss_type="luspo", delta=1.5, beta=0.05, use_bias_correction_kl=True,
                             off_policy_mask_threshold=0.02, top_entropy_quantile=0.7, entropy_coef=-0.01),
}


@pytest.mark.parametrize("level", ["token", "sequence", "sequence_token"])
@pytest.mark.parametrize("name", sorted(TRL_OPTIONS))
def test_trl_options_match_fp64(backend, name, level):
    """Each option of TRL 1.16's loss against the fp64 reference (TRL's formulation), loss and
    gradients in the log-probs and entropies, near and 5 nats from the reference model."""
    logp, old, adv, mask, ref, entropy, sampling = _batch(seed=len(name))
    opts = dict(importance_sampling_level=level, **TRL_OPTIONS[name])
    for reference_model in (ref, logp.detach() + 5.0):
        loss, metrics = policy_loss(logp, old, adv, mask, ref_logprobs=reference_model, entropy=entropy,
                                    sampling_logprobs=sampling, **opts)
        expected, _ = ref_policy_loss(logp, old, adv, mask, ref=reference_model, entropy=entropy,
                                      sampling=sampling, **opts)
        _assert_loss_and_grads(loss, expected, logp, entropy, mask)


def test_options_the_cpp_op_lacks_route_to_pytorch():
    """One place decides (kernels/dispatch.py LACKS): a call with an option the C++ op lacks runs on
    PyTorch under the cpp back-end; the op's own options stay on it."""
    from medix_fast.kernels import LossOptions
    from medix_fast.kernels.dispatch import LACKS, backend_for, force_backend

    assert LossOptions().features() == frozenset() and LossOptions(kl_clamp=10.0, tis_cap=2.0).features() == set()
    lacked = {"vespo", "entropy_token_mean", "top_entropy_quantile", "off_policy_mask_threshold"}
    assert LACKS["policy_loss", "cpp"] == lacked
    for name, opts in TRL_OPTIONS.items():
        assert LossOptions.from_kwargs(opts).features(), name  # every one is named
    from medix_fast.kernels import cpp
    if not cpp.available():
        pytest.skip("the C++ ops do not build here")
    x = torch.zeros(2, 3)
    with force_backend("cpp"):
        for opts in (dict(), dict(loss_type="sapo"), dict(delta=2.0), dict(loss_type="cispo", beta=0.1,
                                                                          use_bias_correction_kl=True)):
            assert backend_for("policy_loss", x, LossOptions(**opts).features()) == "cpp", opts
        for opts in (dict(loss_type="vespo"), dict(top_entropy_quantile=0.5), dict(off_policy_mask_threshold=0.1),
                     dict(entropy_aggregation="token_mean")):
            assert backend_for("policy_loss", x, LossOptions(**opts).features()) == "torch", opts


def test_masked_quantile_is_torch_quantile_of_the_valid_values():
    from medix_fast.kernels.policy_loss import masked_quantile

    _, _, _, mask, _, entropy, _ = _batch(seed=4)
    for q in (0.0, 0.1, 0.3, 0.5, 0.77, 1.0):
        want = torch.quantile(entropy.detach()[mask.bool()], q)
        torch.testing.assert_close(masked_quantile(entropy.detach(), mask, q), want, rtol=0, atol=1e-6)


def test_off_policy_mask_keeps_a_sequence_at_the_threshold():
    """TRL keeps a sequence whose mean drift equals the threshold (<=): on-policy the drift is 0."""
    logp, _, adv, mask, *_ = _batch(seed=6)
    loss, _ = policy_loss(logp, None, adv, mask, off_policy_mask_threshold=0.0)
    torch.testing.assert_close(loss, policy_loss(logp, None, adv, mask)[0])
    dropped, _ = policy_loss(logp, None, adv, mask, off_policy_mask_threshold=-1e-3)  # A < 0 rows dropped
    expected, _ = ref_policy_loss(logp, None, adv, mask, off_policy_mask_threshold=-1e-3)
    torch.testing.assert_close(dropped.double(), expected)
    assert not torch.allclose(dropped, loss)
