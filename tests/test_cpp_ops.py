"""The C++ ops of csrc/ (medix_fast.kernels.cpp) on the CPU against the fp64 references.

The policy-loss option table itself runs on every back-end in test_policy_loss.py; its other
policy-loss tests run here with the ``cpp`` and ``torch`` back-ends forced (``auto`` takes ``cpp``
on the CPU once the extension loads); the advantage tests take ``cpp`` through the conftest
``backend`` fixture. Run: ``pytest tests/test_cpp_ops.py``.
"""
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import test_policy_loss as table
from medix_fast.kernels import LossOptions, cpp, force_backend, group_advantages, policy_loss

needs_ops = pytest.mark.skipif(not cpp.available(), reason=f"C++ ops unavailable: {cpp.unavailable_reason()}")


def test_extension_builds_where_a_compiler_is():
    if not (shutil.which(os.environ.get("CXX", "c++")) and shutil.which("ninja")):
        pytest.skip("no C++ compiler or ninja here")
    assert cpp.available(), cpp.unavailable_reason()


def test_without_a_compiler_the_pytorch_path_runs(tmp_path):
    """A failed build warns once, reports cpp inactive, and every kernel still runs (in PyTorch)."""
    code = """if True:
        import warnings, torch
        from medix_fast.kernels import active_backends, group_advantages, policy_loss
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert active_backends()["cpp"] is False
        assert any("C++ ops unavailable" in str(w.message) for w in caught)
        logp = torch.zeros(2, 3, requires_grad=True)
        loss, _ = policy_loss(logp, None, torch.tensor([1.0, -1.0]), torch.ones(2, 3))
        loss.backward()
        assert group_advantages(torch.tensor([0.0, 1.0]), 2).tolist()[1] > 0
    """
    env = dict(os.environ, CXX=str(tmp_path / "no-compiler"), TORCH_EXTENSIONS_DIR=str(tmp_path),
               MEDIX_FAST_BACKEND="auto")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(params=["cpp", "torch"])
def forced(request):
    if request.param == "cpp" and not cpp.available():
        pytest.skip("C++ ops unavailable")
    with force_backend(request.param):
        yield request.param


# --- policy loss --------------------------------------------------------------------------------

@pytest.mark.parametrize("level", ["token", "sequence", "sequence_token"])
def test_policy_loss_per_token_advantages_and_tis(forced, level):
    table.test_per_token_advantages_and_truncated_importance_sampling(level)


def test_policy_loss_special_cases(forced):
    table.test_on_policy_gradient_is_advantage_weighted()
    table.test_metrics_count_clipped_tokens()
    table.test_all_masked_is_zero_not_nan()


def _random_batch(B, T, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, T, generator=g) * 4).to(dtype).requires_grad_()
    old = logp.detach().float() + torch.randn(B, T, generator=g) * 0.4
    ref = logp.detach().float() + torch.randn(B, T, generator=g) * 0.5
    entropy = (torch.rand(B, T, generator=g) * 3).requires_grad_()
    adv = torch.randn(B, generator=g)
    mask = (torch.arange(T)[None, :] < torch.randint(0, T + 1, (B, 1), generator=g)).float()
    return logp, old, adv, mask, ref, entropy


def _run(backend, batch, **opts):
    logp, old, adv, mask, ref, entropy = batch
    with force_backend(backend):
        loss, metrics = policy_loss(logp, old, adv, mask, ref_logprobs=ref, entropy=entropy, **opts)
    grads = torch.autograd.grad(loss, (logp, entropy), allow_unused=True)
    return loss, grads, metrics


@needs_ops
@pytest.mark.parametrize("level", ["token", "sequence", "sequence_token"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_matches_torch_path_on_many_parallel_rows(level, loss_type):
    """64 x 1024 tokens: several OpenMP tasks; loss, gradients and metrics as the PyTorch path."""
    batch = _random_batch(64, 1024, seed=1)
    opts = dict(loss_type=loss_type, importance_sampling_level=level, epsilon_high=0.28, clip_ratio_c=3.0,
                beta=0.04, entropy_coef=0.01)
    loss, grads, metrics = _run("cpp", batch, **opts)
    want_loss, want_grads, want_metrics = _run("torch", batch, **opts)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-7)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-10)
    for name, value in want_metrics.items():
        torch.testing.assert_close(metrics[name], value, rtol=1e-5, atol=1e-6, msg=name)


@needs_ops
def test_bf16_logprobs_and_thread_count_invariance():
    batch = _random_batch(16, 300, seed=2, dtype=torch.bfloat16)
    loss, grads, _ = _run("cpp", batch, importance_sampling_level="sequence", beta=0.04)
    want_loss, want_grads, _ = _run("torch", batch, importance_sampling_level="sequence", beta=0.04)
    assert grads[0].dtype == torch.bfloat16
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[0], want_grads[0])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _run("cpp", _random_batch(64, 1024, seed=3), loss_type="bnpo")
    finally:
        torch.set_num_threads(threads)
    multi = _run("cpp", _random_batch(64, 1024, seed=3), loss_type="bnpo")
    assert torch.equal(single[0], multi[0]) and torch.equal(single[1][0], multi[1][0])


@needs_ops
def test_op_registration_autograd_and_fake():
    """torch.library.opcheck: schema, autograd registration, fake tensors, AOT dispatch."""
    logp, old, adv, mask, ref, entropy = _random_batch(3, 7, seed=4)
    args = (logp.detach().requires_grad_(), old, adv, mask, ref, entropy, None, torch.tensor([11.0]), 3, 1, 0.2,
            0.28, 3.0, 0.04, 0.01, 0, None, 10.0, 20.0, 2.0, True, 1.0, 1.05)
    torch.library.opcheck(torch.ops.medix_fast.policy_loss.default, args)
    torch.library.opcheck(torch.ops.medix_fast.group_advantages.default, (torch.rand(12), 4, 0, 1e-6))
    logits = torch.randn(5, 33)
    torch.library.opcheck(torch.ops.medix_fast.sample_tokens.default, (logits, torch.rand(5), 0.8, 10, 0.9))


@needs_ops
def test_under_torch_compile():
    """The op with its autograd and fake registrations compiles into one graph (fullgraph)."""
    logp, old, adv, mask, ref, entropy = _random_batch(4, 16, seed=5)
    o = LossOptions(loss_type="dapo", beta=0.04, entropy_coef=0.01, num_items_in_batch=40.0)

    def step(logp, entropy):
        loss, metrics = cpp.policy_loss(logp, old, adv, mask, ref, entropy, None, o, 3, 2)
        return loss, metrics["kl"]

    eager = step(logp, entropy)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(logp, entropy)
    torch.testing.assert_close(compiled, eager)
    got = torch.autograd.grad(compiled[0], (logp, entropy))
    for x, y in zip(got, torch.autograd.grad(eager[0], (logp, entropy))):
        torch.testing.assert_close(x, y)


@needs_ops
def test_op_rejects_bad_input():
    logp = torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match="mask must be float32"):
        torch.ops.medix_fast.policy_loss(logp, None, torch.zeros(2), torch.ones(2, 3, dtype=torch.int64), None, None,
                                         None, None, 0, 0, 0.2, 0.2, None, 0.0, 0.0, 0, None, None, None, None, False, 1.0, 1.05)
    with pytest.raises(RuntimeError, match=r"advantages must be \(2,\) or \[2, 3\]"):
        torch.ops.medix_fast.policy_loss(logp, None, torch.zeros(3), torch.ones(2, 3), None, None, None, None, 0, 0,
                                         0.2, 0.2, None, 0.0, 0.0, 0, None, None, None, None, False, 1.0, 1.05)
    with pytest.raises(RuntimeError, match="must divide"):
        torch.ops.medix_fast.group_advantages(torch.rand(10), 3, 0, 1e-6)


@needs_ops
def test_advantages_are_the_reference_through_dispatch():
    """group_advantages under ``auto`` on the CPU takes the C++ op (test_advantage covers the table)."""
    rewards = torch.rand(7 * 50)
    with force_backend("torch"):
        want, want_stats = group_advantages(rewards, 7, estimator="rloo", return_stats=True)
    got, stats = group_advantages(rewards, 7, estimator="rloo", return_stats=True)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(stats.std, want_stats.std)


# --- sampling -----------------------------------------------------------------------------------

def _kept(logits, temperature, top_k, top_p):
    """fp64 reference of the kept set (top-k, then top-p over the renormalised rest; ties kept)."""
    s = (logits / temperature).double()  # (V,) the op divides in fp32
    keep = torch.ones_like(s, dtype=torch.bool)
    if 0 < top_k < s.numel():
        keep &= s >= s.topk(top_k).values[-1]
    if top_p < 1:
        p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1)
        asc = p.sort().values
        cum = torch.cumsum(asc.flip(0), 0)  # (V,) mass of the i + 1 most likely
        greater = p.numel() - torch.searchsorted(asc, p, right=True)  # (V,) how many are strictly more likely
        above = torch.where(greater > 0, cum[(greater - 1).clamp(min=0)], torch.zeros_like(p))
        keep &= above < top_p
    return keep


def _inverse_cdf(logits, temperature, keep, u):
    """fp64 reference draw: the first kept token whose cumulative mass exceeds u * total."""
    p = torch.softmax((logits / temperature).double().masked_fill(~keep, float("-inf")), -1)
    return torch.searchsorted(torch.cumsum(p, 0), u.double()[:, None], right=True)[:, 0].clamp(max=p.numel() - 1)


SETTINGS = [(1.0, 0, 1.0), (0.7, 50, 1.0), (1.0, 0, 0.9), (1.3, 20, 0.8), (0.5, 5, 0.5)]


@needs_ops
@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_sampling_inverse_cdf_over_the_kept_set(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(1000, generator=g) * 3  # (V,)
    keep = _kept(logits, temperature, top_k, top_p)
    n = 4000
    u = (torch.arange(n) + 0.5) / n  # stratified: every kept token with mass > 1/n is hit
    tokens, logprobs = cpp.sample_tokens(logits.expand(n, -1).contiguous(), temperature=temperature, top_k=top_k,
                                         top_p=top_p, uniform=u)
    assert keep[tokens].all(), "emitted an excluded token"
    p = torch.softmax((logits / temperature).double().masked_fill(~keep, float("-inf")), -1)
    assert set(tokens.tolist()) >= set(torch.nonzero(p > 1.0 / n)[:, 0].tolist())
    want = _inverse_cdf(logits, temperature, keep, u)
    edge = (torch.cumsum(p, 0)[None, :] - u.double()[:, None]).abs().min(1).values < 1e-5  # fp32 vs fp64 ties
    assert torch.equal(tokens[~edge], want[~edge])
    raw = torch.log_softmax(logits.double() / temperature, -1)
    torch.testing.assert_close(logprobs.double(), raw[tokens], rtol=0, atol=2e-5)


@needs_ops
def test_sampling_frequencies_match_probabilities():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 20, generator=g) * 1.5  # (B, V)
    n = 20_000
    tokens, _ = cpp.sample_tokens(logits.repeat_interleave(n, 0), temperature=0.9, top_k=12, top_p=0.95,
                                  generator=g)
    for row in range(3):
        keep = _kept(logits[row], 0.9, 12, 0.95)
        p = torch.softmax((logits[row] / 0.9).double().masked_fill(~keep, float("-inf")), -1)
        freq = torch.bincount(tokens[row * n:(row + 1) * n], minlength=20).double() / n
        assert torch.all((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-12), (row, freq, p)


@needs_ops
def test_greedy_and_extreme_logits():
    logits = torch.tensor([[1.0, 3.0, 3.0, -2.0], [-1e4, 1e4, float("-inf"), 1e4 - 1]])
    tokens, logprobs = cpp.sample_tokens(logits, temperature=0.0, uniform=torch.rand(2))
    assert tokens.tolist() == [1, 1]  # first index on ties, as torch.argmax
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0])
    for top_k, top_p in [(0, 1.0), (3, 1.0), (0, 0.5), (2, 0.99)]:
        tokens, logprobs = cpp.sample_tokens(logits, temperature=1.0, top_k=top_k, top_p=top_p,
                                             uniform=torch.tensor([0.0, 0.999999]))
        assert torch.isfinite(logprobs).all() and tokens[1] != 2 and (logprobs <= 0).all()


@needs_ops
def test_sampling_realistic_vocabulary_nucleus():
    """V = 151,936: the top-p cut (a selection, not a sort) against the fp64 sort-based reference."""
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(151_936, generator=g) * 2.5  # a nucleus of thousands of tokens
    keep = _kept(logits, 1.0, 0, 0.9)
    u = torch.rand(64, generator=g)
    tokens, _ = cpp.sample_tokens(logits.expand(64, -1).contiguous(), top_p=0.9, uniform=u)
    assert keep[tokens].all()
    torch.testing.assert_close(tokens, _inverse_cdf(logits, 1.0, keep, u), rtol=0, atol=0)


# --- CUDA sources: compile only -----------------------------------------------------------------

def test_forcing_cpp_on_a_non_cpu_tensor_is_a_clear_error():
    """The C++ ops are CPU only: CUDA tensors take the Triton kernels and PyTorch."""
    from medix_fast.kernels.dispatch import use_cpp

    with force_backend("torch"):
        assert not use_cpp(torch.zeros(1, device="meta"))
    with force_backend("cpp"), pytest.raises(RuntimeError, match="run on the CPU only, got a meta tensor"):
        use_cpp(torch.zeros(1, device="meta"))


@pytest.mark.parametrize("level", ["token", "sequence_token"])
def test_compiles_as_one_graph(forced, level):
    """policy_loss and group_advantages trace into one torch.compile graph (no break at the dispatch,
    the option check or the op), with the eager values and gradients."""
    torch._dynamo.reset()
    logp, old, adv, mask, ref, entropy, sampling = table._batch(seed=11)
    opts = dict(loss_type="dapo", importance_sampling_level=level, clip_ratio_c=3.0, beta=0.04, tis_cap=2.0)

    def loss_fn(logp):
        return policy_loss(logp, old, adv, mask, ref_logprobs=ref, sampling_logprobs=sampling, **opts)[0]

    compiled = torch.compile(loss_fn, fullgraph=True, backend="eager")
    got, want = compiled(logp), loss_fn(logp)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, logp)[0], torch.autograd.grad(want, logp)[0])
    rewards = torch.rand(32, generator=torch.Generator().manual_seed(0))
    advantages = torch.compile(lambda r: group_advantages(r, 8), fullgraph=True, backend="eager")
    torch.testing.assert_close(advantages(rewards), group_advantages(rewards, 8))



@pytest.mark.parametrize("change", ["torch", "venv", "abi", "compiler", "cflags", "ldflags"])
def test_build_is_keyed_on_what_makes_the_binary(monkeypatch, change):
    """Two virtualenvs with another torch build, compiler or flags keep two builds (no eviction, no
    rebuild at every switch); the same environment names its own build again."""
    base = cpp.extension_name()
    assert cpp.extension_name() == base
    if change == "torch":
        monkeypatch.setattr(torch, "__version__", torch.__version__ + ".other")
    elif change == "venv":  # the same torch in another virtualenv
        monkeypatch.setattr(torch, "__file__", "/elsewhere/site-packages/torch/__init__.py")
    elif change == "abi":
        monkeypatch.setattr(torch, "compiled_with_cxx11_abi", lambda: not torch._C._GLIBCXX_USE_CXX11_ABI)
    elif change == "compiler":
        monkeypatch.setenv("CXX", "another-c++")
    else:
        monkeypatch.setattr(cpp, change.upper(), ["-O1"])
    assert cpp.extension_name() != base


def test_a_lock_left_by_a_killed_build_is_removed_not_waited_on(monkeypatch, tmp_path, caplog):
    """torch's build waits while ``<build dir>/lock`` exists; a killed build leaves it forever."""
    import time

    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    name = cpp.extension_name()
    lock = Path(cpp_extension._get_build_directory(name, verbose=False)) / "lock"
    lock.touch()
    cpp._clear_stale_lock(name)
    assert lock.exists()  # a build in progress holds a fresh one
    old = time.time() - cpp.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    with caplog.at_level(logging.WARNING, logger="medix_fast.kernels"):
        cpp._clear_stale_lock(name)
    assert not lock.exists() and "interrupted build" in caplog.text
