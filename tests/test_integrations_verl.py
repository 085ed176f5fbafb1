"""medix_fast.integrations.verl against veRL's own code.

    python -m pytest -q tests/test_integrations_verl.py

Needs veRL, installed without its dependencies (they would replace transformers):
``pip install --no-deps verl==0.9.1`` plus the ``test`` extra (omegaconf, ray, tensordict,
codetiming, orjson), which is what ``.ci/run`` does. The registered losses must equal veRL's own
``vanilla`` and ``gspo`` (loss, gradient, metrics) for every ``loss_agg_mode``, with and without
``global_batch_info`` and ``rollout_is_weights``; ``medix_gspo`` (gradient through the sequence
mean, which veRL does not have) is held to veRL's ``agg_loss`` over an fp64 per-token GSPO loss
(tests/reference.py). The fused kernel must match fp64 full logits, directly and inside veRL's
own fused-kernel forward of a tiny Qwen2.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import reference
from medix_fast.integrations import verl as adapter

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos", reason="pip install --no-deps verl==0.9.1")
from verl.workers.config import ActorConfig  # noqa: E402

B, T = 5, 9
LENGTHS = (9, 4, 0, 6, 1)  # one empty row: veRL's sequence modes count only non-empty rows
BATCH_INFO = {"local": {}, "global": dict(dp_size=2, batch_num_tokens=41, global_batch_size=11, loss_scale_factor=16)}


def actor_config(batch_info: dict, **clip) -> ActorConfig:
    cfg = ActorConfig(strategy="fsdp", rollout_n=2, ppo_micro_batch_size_per_gpu=1,
                      **{**dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0), **clip})
    cfg.global_batch_info.update(batch_info)
    return cfg


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]  # (B, T) bool, as veRL passes it
    old = -torch.rand(B, T, generator=g) * 3
    logp = (old + 0.4 * torch.randn(B, T, generator=g)).clamp(max=0)
    adv = torch.randn(B, generator=g)[:, None].expand(B, T).contiguous()  # veRL: (B, T)
    adv[0, 3] = -abs(adv[0, 3]) - 1.0  # a per-token advantage, as veRL allows
    return old, logp, adv, mask


def run(fn, old, logp, adv, mask, mode, config, weights=None):
    """(loss, dloss/dlogp, metrics) of one veRL policy-loss call."""
    x = logp.clone().requires_grad_()
    loss, metrics = fn(old_log_prob=old, log_prob=x, advantages=adv, response_mask=mask, loss_agg_mode=mode,
                       config=config, rollout_is_weights=weights)
    loss.backward()
    return loss.detach(), x.grad, {k: float(v) for k, v in metrics.items()}


def assert_close(got, expected, metrics=True):
    torch.testing.assert_close(got[0].double(), expected[0].double(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[1].double(), expected[1].double(), rtol=1e-5, atol=1e-7)
    if metrics:
        assert got[2].keys() == expected[2].keys()
        for name, value in expected[2].items():
            assert got[2][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


@pytest.fixture(scope="module", autouse=True)
def registered():
    adapter.register()


@pytest.mark.parametrize("info", sorted(BATCH_INFO))
@pytest.mark.parametrize("mode", adapter.AGG_MODES)
@pytest.mark.parametrize("ours,theirs,clip", [
    ("medix_vanilla", "vanilla", dict(clip_ratio_c=3.0)),
    ("medix_vanilla", "vanilla", dict(clip_ratio_c=1.5, clip_ratio_low=0.1)),
    ("medix_gspo_token", "gspo", dict(clip_ratio_low=0.03, clip_ratio_high=0.04)),
])
def test_losses_equal_verl(ours, theirs, clip, mode, info, backend):
    config = actor_config(BATCH_INFO[info], **clip)
    old, logp, adv, mask = batch()
    expected = run(core_algos.get_policy_loss_fn(theirs), old, logp, adv, mask, mode, config)
    got = run(core_algos.get_policy_loss_fn(ours), old, logp, adv, mask, mode, config)
    assert expected[2]["actor/pg_clipfrac"] > 0
    assert_close(got, expected)
    g = torch.Generator().manual_seed(1)
    weights = 0.2 + 1.6 * torch.rand(B, T, generator=g)  # rollout correction weights
    expected = run(core_algos.get_policy_loss_fn(theirs), old, logp, adv, mask, mode, config, weights)
    assert_close(run(core_algos.get_policy_loss_fn(ours), old, logp, adv, mask, mode, config, weights), expected)
    weights[1, :2] = 0.0  # rejected tokens: loss and gradient still equal; they no longer count as clipped
    expected = run(core_algos.get_policy_loss_fn(theirs), old, logp, adv, mask, mode, config, weights)
    got = run(core_algos.get_policy_loss_fn(ours), old, logp, adv, mask, mode, config, weights)
    assert_close(got, expected, metrics=False)


@pytest.mark.parametrize("info", sorted(BATCH_INFO))
@pytest.mark.parametrize("mode", adapter.AGG_MODES)
def test_gspo_sequence_gradient_against_fp64(mode, info):
    """GSPO with the gradient through the sequence mean: veRL's own ``agg_loss`` over the fp64
    per-token loss of tests/reference.py; in value it equals veRL's ``gspo``."""
    config = actor_config(BATCH_INFO[info], clip_ratio_low=0.03, clip_ratio_high=0.04)
    old, logp, adv, mask = batch(seed=2)
    weights = 0.2 + 1.6 * torch.rand(B, T, generator=torch.Generator().manual_seed(3))
    x = logp.double().requires_grad_()
    _, per_token = reference.policy_loss(x, old, adv * weights, mask, importance_sampling_level="sequence",
                                         epsilon_low=0.03, epsilon_high=0.04)
    exact = core_algos.agg_loss(per_token, mask, mode, **config.global_batch_info)
    exact.backward()
    got = run(core_algos.get_policy_loss_fn("medix_gspo"), old, logp, adv, mask, mode, config, weights)
    assert_close(got, (exact.detach(), x.grad, None), metrics=False)
    verl_value = run(core_algos.get_policy_loss_fn("gspo"), old, logp, adv, mask, mode, config, weights)[0]
    torch.testing.assert_close(got[0], verl_value, rtol=1e-5, atol=1e-7)


def test_bad_aggregation_raises():
    config = actor_config({"dp_size": 2})
    old, logp, adv, mask = batch()
    for mode, field in (("token-mean", "batch_num_tokens"), ("seq-mean-token-mean", "global_batch_size")):
        with pytest.raises(ValueError, match=field):
            run(core_algos.get_policy_loss_fn("medix_vanilla"), old, logp, adv, mask, mode, config)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        run(core_algos.get_policy_loss_fn("medix_vanilla"), old, logp, adv, mask, "token-max", actor_config({}))


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_fused_kernel_against_fp64(reduction, backend):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 16, generator=g, requires_grad=True)
    weight = torch.randn(300, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 300, (2, 5), generator=g)
    logp, entropy = adapter.linear_cross_entropy(hidden, weight, labels, 0.7, reduction)
    ref_logp, ref_entropy = reference.logprobs_entropy(hidden.reshape(-1, 16), weight, labels.reshape(-1),
                                                       temperature=0.7)
    ref_logp = {"none": ref_logp, "sum": ref_logp.sum(), "mean": ref_logp.mean()}[reduction]
    assert logp.dtype == entropy.dtype == torch.float32 and entropy.shape == (10,)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=1e-5, atol=1e-5)
    dl, de = torch.randn(logp.shape, generator=g), torch.randn(10, generator=g)
    got = torch.autograd.grad((logp * dl).sum() + (entropy * de).sum(), (hidden, weight))
    want = torch.autograd.grad((ref_logp * dl.double()).sum() + (ref_entropy * de.double()).sum(), (hidden, weight))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="dist_process_group"):
        adapter.linear_cross_entropy(hidden, weight, labels, 1.0, "none", dist_process_group=object())


def test_verl_fused_forward_uses_the_kernel():
    """veRL's own ``forward_with_triton_backend`` (what ``impl_backend=triton`` patches in) on a tiny
    Qwen2 now runs medix_fast's kernel and returns the full-logit log-probs and entropy."""
    import verl.utils.kernel.linear_cross_entropy as verl_kernel
    from verl.models.transformers.dense_common import forward_with_triton_backend

    assert verl_kernel.linear_cross_entropy is adapter.linear_cross_entropy
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    ids = torch.randint(0, 300, (2, 6))
    out = forward_with_triton_backend(model, input_ids=ids, return_dict=True, temperature=0.8)
    logits = model(input_ids=ids).logits.double() / 0.8  # (2, 6, V)
    logsm = torch.log_softmax(logits, -1)
    want = logsm.gather(-1, torch.roll(ids, -1, -1)[..., None]).reshape(-1)
    torch.testing.assert_close(out.log_probs.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy.double(), -(logsm.exp() * logsm).sum(-1).reshape(-1), rtol=1e-5, atol=1e-5)


def test_plugin_registers_and_imports_stay_lazy():
    """``verl_plugin`` registers everything; the adapter module imports no veRL; the kernels import
    no adapter (a fresh interpreter each)."""
    code = (
        "import sys; import medix_fast.kernels; import medix_fast.integrations.verl;"
        "assert not any(m.split('.')[0] in ('verl', 'trl') for m in sys.modules), 'imported eagerly';"
        "assert 'medix_fast.integrations.trl' not in sys.modules;"
        "import medix_fast.integrations.verl_plugin; from verl.trainer.ppo import core_algos as c;"
        "import verl.utils.kernel.linear_cross_entropy as k; from medix_fast.integrations import verl as a;"
        "assert all(c.get_policy_loss_fn(n).__name__.startswith('medix_') for n in a.LOSSES);"
        "assert k.linear_cross_entropy is a.linear_cross_entropy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unsupported_verl_version_refused(monkeypatch):
    import verl

    monkeypatch.setattr(verl, "__version__", "0.4.1")
    with pytest.raises(ImportError, match="supports verl"):
        adapter.register()
