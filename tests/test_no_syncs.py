"""The loss path makes no host-device sync (counted on the CPU by tests/syncs.py), on every back-end:
fused_linear_policy_loss forward + backward given ``valid_lengths``, fused_linear_logprobs,
policy_loss and group_advantages. Value checks (MEDIX_FAST_DEBUG=1) are the documented exception."""
import pytest
import torch

from medix_fast.kernels import fused_linear_logprobs, fused_linear_policy_loss, group_advantages, policy_loss
from syncs import count_syncs


def _batch(seed=0, b=4, t=9, h=24, v=301):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g, requires_grad=True)
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).requires_grad_()
    targets = torch.randint(0, v, (b, t), generator=g)
    lengths = [t, 0, 3, 5][:b]
    mask = (torch.arange(t)[None] < torch.tensor(lengths)[:, None]).float()
    mask[0, 2] = 0.0  # a hole: valid tokens need not be a prefix
    lengths[0] -= 1
    old = torch.randn(b, t, generator=g) * 0.1 - 3
    return hidden, weight, targets, mask, torch.randn(b, generator=g), old, lengths


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("MEDIX_FAST_DEBUG", raising=False)


@pytest.mark.parametrize("level,chunk", [("token", 4), ("sequence", 8), ("sequence", 2)],
                         ids=["token", "sequence", "sequence-two-pass"])
def test_fused_policy_loss_with_lengths_makes_no_sync(backend, level, chunk):
    hidden, weight, targets, mask, adv, old, lengths = _batch()
    with count_syncs() as c:
        loss, metrics = fused_linear_policy_loss(hidden, weight, targets, mask, adv, old, importance_sampling_level=level,
                                                 loss_type="dapo", beta=0.0, chunk_size=chunk, valid_lengths=lengths)
        loss.backward()
    assert c.count == 0, c.where
    assert hidden.grad is not None and set(metrics) >= {"ratio_mean", "entropy"}


def test_fused_policy_loss_without_lengths_reads_them_once(backend):
    hidden, weight, targets, mask, adv, old, _ = _batch()
    with count_syncs() as c:
        loss, _ = fused_linear_policy_loss(hidden, weight, targets, mask, adv, old, loss_type="grpo")
        loss.backward()
    assert c.count == 1 and "Tensor.tolist" in c.where[0], c.where


def test_lengths_hint_gives_the_same_loss_and_gradients(backend):
    hidden, weight, targets, mask, adv, old, lengths = _batch(seed=3)
    runs = []
    for hint in (None, lengths):
        loss, metrics = fused_linear_policy_loss(hidden, weight, targets, mask, adv, old, valid_lengths=hint,
                                                 importance_sampling_level="sequence", chunk_size=9)
        runs.append([loss, *torch.autograd.grad(loss, (hidden, weight)), *metrics.values()])
    for x, y in zip(*runs):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_wrong_lengths_hint_is_caught_in_debug_mode(monkeypatch):
    hidden, weight, targets, mask, adv, old, lengths = _batch()
    with pytest.raises(ValueError, match="one count >= 0 per row"):
        fused_linear_policy_loss(hidden, weight, targets, mask, adv, old, valid_lengths=lengths[:-1])
    monkeypatch.setenv("MEDIX_FAST_DEBUG", "1")
    lengths[2] += 1
    with pytest.raises(ValueError, match=r"valid_lengths\[2\] = 4 but mask row 2 has 3 valid tokens"):
        fused_linear_policy_loss(hidden, weight, targets, mask, adv, old, valid_lengths=lengths)


def test_debug_mode_checks_values_with_syncs(monkeypatch):
    monkeypatch.setenv("MEDIX_FAST_DEBUG", "1")
    hidden, weight, targets, *_ = _batch()
    with count_syncs() as c:
        fused_linear_logprobs(hidden, weight, targets)
    assert c.count >= 2, c.where  # targets.min() and .max() read on the host


@pytest.mark.parametrize("entropy", [False, True])
def test_fused_linear_logprobs_makes_no_sync(backend, entropy):
    hidden, weight, targets, *_ = _batch(seed=1)
    with count_syncs() as c:
        out = fused_linear_logprobs(hidden, weight, targets, return_entropy=entropy, chunk_size=7)
        (sum(out) if entropy else out).sum().backward()
    assert c.count == 0, c.where


@pytest.mark.parametrize("level", ["token", "sequence_token"])
def test_policy_loss_makes_no_sync(backend, level):
    _, _, _, mask, adv, old, _ = _batch(seed=2)
    logp = (old + 0.05 * torch.randn(old.shape)).requires_grad_()
    entropy = torch.rand(old.shape, requires_grad=True)
    with count_syncs() as c:
        loss, metrics = policy_loss(logp, old, adv, mask, entropy=entropy, ref_logprobs=old, loss_type="dapo",
                                    importance_sampling_level=level, beta=0.04, entropy_coef=0.01, clip_ratio_c=3.0,
                                    num_items_in_batch=17.0)
        loss.backward()
    assert c.count == 0, c.where


TRL_OPTIONS = dict(loss_type="cispo", epsilon_high=1.2, beta=0.04, use_bias_correction_kl=True, delta=2.0,
                   top_entropy_quantile=0.5, off_policy_mask_threshold=0.0, entropy_coef=0.01,
                   entropy_aggregation="token_mean")


@pytest.mark.parametrize("loss_type", ["cispo", "vespo", "sapo"])
def test_trl_options_make_no_sync(backend, loss_type):
    """TRL 1.16's options, the entropy quantile and the off-policy mask included, in policy_loss and
    in the fused loss (its extra entropy pass too)."""
    hidden, weight, targets, mask, adv, old, lengths = _batch(seed=3)
    opts = {**TRL_OPTIONS, "loss_type": loss_type}
    logp = (old + 0.05 * torch.randn(old.shape)).requires_grad_()
    entropy = torch.rand(old.shape, requires_grad=True)
    with count_syncs() as c:
        loss, _ = policy_loss(logp, old, adv, mask, entropy=entropy, ref_logprobs=old, **opts)
        loss.backward()
        loss, _ = fused_linear_policy_loss(hidden, weight, targets, mask, adv, old, old, valid_lengths=lengths, **opts)
        loss.backward()
    assert c.count == 0, c.where


def test_group_advantages_makes_no_sync(backend):
    rewards = torch.rand(40, generator=torch.Generator().manual_seed(0))
    with count_syncs() as c:
        group_advantages(rewards, 5, return_stats=True)
    assert c.count == 0, c.where
