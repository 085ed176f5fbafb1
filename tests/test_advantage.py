"""group_advantages against an fp64 loop, for both back-ends, plus properties and errors."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medix_fast.kernels import group_advantages
from reference import group_advantages as ref_advantages


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize("group_size,groups", [(2, 1), (5, 3), (7, 50), (16, 9), (64, 2)])
def test_matches_fp64(backend, estimator, group_size, groups):
    torch.manual_seed(group_size * 100 + groups)
    rewards = torch.rand(group_size * groups)
    rewards[: group_size] = rewards[0]  # one constant group: std 0, advantages 0, no NaN
    adv, stats = group_advantages(rewards, group_size, estimator=estimator, return_stats=True)
    assert adv.dtype == torch.float32 and adv.shape == rewards.shape
    torch.testing.assert_close(adv.double(), ref_advantages(rewards, group_size, estimator), rtol=1e-5, atol=1e-5)
    grouped = rewards.double().view(groups, group_size)
    torch.testing.assert_close(stats.mean.double(), grouped.mean(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.std.double(), grouped.std(1), rtol=1e-5, atol=1e-6)
    assert torch.all(adv[:group_size] == 0) and stats.std[0] == 0


def test_bf16_rewards_and_no_grad(backend):
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5], dtype=torch.bfloat16, requires_grad=True)
    adv = group_advantages(rewards, 2)
    assert adv.dtype == torch.float32 and not adv.requires_grad
    torch.testing.assert_close(adv.double(), ref_advantages(rewards.detach().float(), 2), rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(group_size=st.integers(2, 9), groups=st.integers(1, 6), seed=st.integers(0, 10_000),
       estimator=st.sampled_from(["grpo", "dr_grpo", "rloo"]))
def test_zero_group_mean_and_reward_order(group_size, groups, seed, estimator):
    """Zero mean per group, and (which an all-zero output would not give) the rewards' order within
    each group with a positive spread, unit std under grpo."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(group_size * groups, generator=g) * 3
    adv = group_advantages(rewards, group_size, estimator=estimator)
    grouped, r = adv.view(groups, group_size), rewards.view(groups, group_size)
    assert torch.allclose(grouped.mean(1), torch.zeros(groups), atol=1e-5)
    higher = r[:, :, None] > r[:, None, :]  # (groups, G, G): reward i above reward j
    assert torch.equal(higher, grouped[:, :, None] > grouped[:, None, :])
    assert torch.all(grouped.amax(1) - grouped.amin(1) > 0)
    if estimator == "grpo":
        torch.testing.assert_close(grouped.std(1), torch.ones(groups), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("args,match", [
    ((torch.rand(10), 3), "must divide"),
    ((torch.rand(10), 1), "group_size must be an int >= 2"),
    ((torch.rand(2, 5), 5), "1-D tensor"),
    ((torch.arange(10), 5), "floating-point"),
    ((torch.rand(0), 5), "must divide"),
])
def test_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(*args)


def test_unknown_estimator_lists_valid_ones():
    with pytest.raises(ValueError, match="grpo.*dr_grpo.*rloo"):
        group_advantages(torch.rand(4), 2, estimator="ppo")
