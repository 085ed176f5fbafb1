"""The C++ ops of csrc/ against the PyTorch paths they replace, on the CPU, in one run.

    python -m bench.bench_cpp [--smoke]     # prints the table; bench/run.py can take cases() or run()

Cases (fp32, CPU; the subject ``medix_fast`` forces the ``cpp`` back-end, ``torch`` the PyTorch one):
  policy_loss_logp  the loss from per-token log-probs, forward + backward, B=256 x T=4096 tokens
                    (about 3/5 of them valid): grpo, dapo with dual clip + KL + entropy bonus, gspo
  advantages        group advantages, N = 2^20 rewards in groups of 8
  sample_step       one sampling step, B=64 rows of V=151,936 logits: top-k 50 + top-p 0.9 at T=0.7,
                    top-p 0.9 alone, and plain T=1 (the RL setting); the baseline is the engine's own
                    PyTorch step (medix_fast.generate.tokens.sample_tokens, sampled again over the
                    whole vocabulary when a nucleus outgrows its top-k candidates, as the engine does)
``--smoke`` shrinks every shape (B=4 x T=64, N=64, B=2 x V=1,000).
"""
from __future__ import annotations

import sys

import torch

from bench.case import SUBJECT, Case, Skip, run_case
from bench.timing import SMOKE_BUDGET, Budget

IMPLS = {SUBJECT: "cpp", "torch": "torch"}
LOSSES = {
    "grpo": dict(epsilon_high=0.28),
    "dapo+dual+kl+entropy": dict(loss_type="dapo", epsilon_high=0.28, clip_ratio_c=3.0, beta=0.04,
                                 entropy_coef=0.01),
    "gspo": dict(importance_sampling_level="sequence", epsilon_low=3e-4, epsilon_high=4e-4),
}
SAMPLING = {"top-k 50, top-p 0.9, T=0.7": (0.7, 50, 0.9), "top-p 0.9": (1.0, 0, 0.9), "T=1": (1.0, 0, 1.0)}


def _needs_cpp(impl: str) -> None:
    from medix_fast.kernels import cpp

    if impl == SUBJECT and not cpp.available():
        raise Skip(f"C++ ops unavailable: {cpp.unavailable_reason()}")


def _loss_case(impl: str, name: str, B: int, T: int) -> Case:
    def build(device):
        from medix_fast.kernels import force_backend, policy_loss

        _needs_cpp(impl)
        g = torch.Generator().manual_seed(0)
        logp = (-torch.rand(B, T, generator=g) * 4).requires_grad_()  # (B, T)
        old = logp.detach() + torch.randn(B, T, generator=g) * 0.3  # (B, T)
        ref = logp.detach() + torch.randn(B, T, generator=g) * 0.3  # (B, T)
        entropy = torch.rand(B, T, generator=g).requires_grad_()  # (B, T)
        adv = torch.randn(B, generator=g)  # (B,)
        mask = (torch.arange(T)[None] < torch.randint(T // 4, T + 1, (B, 1), generator=g)).float()  # (B, T)

        def step():
            with force_backend(IMPLS[impl]):
                loss, _ = policy_loss(logp, old, adv, mask, ref_logprobs=ref, entropy=entropy, **LOSSES[name])
            return torch.autograd.grad(loss, (logp, entropy), allow_unused=True)
        return step
    return Case("policy_loss_logp", f"{name} fwd+bwd", impl, f"B={B} T={T} fp32", B * T, build)


def _advantage_case(impl: str, n: int) -> Case:
    def build(device):
        from medix_fast.kernels import force_backend, group_advantages

        _needs_cpp(impl)
        rewards = torch.rand(n, generator=torch.Generator().manual_seed(0))  # (N,)

        def step():
            with force_backend(IMPLS[impl]):
                return group_advantages(rewards, 8, return_stats=True)
        return step
    return Case("advantages", "grpo, group 8", impl, f"N={n}", n, build)


def _sampling_case(impl: str, name: str, B: int, V: int) -> Case:
    temperature, top_k, top_p = SAMPLING[name]

    def build(device):
        _needs_cpp(impl)
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(B, V, generator=g) * 3  # (B, V)
        if impl == SUBJECT:
            from medix_fast.kernels import cpp
            return lambda: cpp.sample_tokens(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=g)
        try:
            from medix_fast.generate.tokens import SamplingParams, sample_tokens
        except ImportError as exc:
            raise Skip(f"medix_fast.generate.tokens unavailable: {exc}") from exc
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
        uniform = torch.rand(B, generator=g)  # (B,)

        def step():
            tokens, logprobs, fits = sample_tokens(logits, params, uniform)
            return sample_tokens(logits, params, uniform, V) if not fits.all() else (tokens, logprobs, fits)
        return step
    return Case("sample_step", name, impl, f"B={B} V={V} fp32", B, build)


def cases(smoke: bool, device: torch.device) -> list[Case]:
    """Every case (CPU only: the GPU ops are compared with the Triton kernels on a GPU machine)."""
    if device.type != "cpu":
        return []
    B, T, n, rows, vocab = (4, 64, 64, 2, 1000) if smoke else (256, 4096, 1 << 20, 64, 151_936)
    out = []
    for impl in IMPLS:
        out += [_loss_case(impl, name, B, T) for name in LOSSES]
        out.append(_advantage_case(impl, n))
        out += [_sampling_case(impl, name, rows, vocab) for name in SAMPLING]
    return out


def run(smoke: bool = False) -> list[dict]:
    """All cases in this process: rows of implementation, shape, device, median/p20/p80 ms, peak MB."""
    device = torch.device("cpu")
    rows = []
    for case in cases(smoke, device):
        r = run_case(case, device, SMOKE_BUDGET if smoke else Budget(max_reps=15, budget_s=5.0))
        rows.append(dict(bench=r.bench, case=r.case, implementation=r.impl, shape=r.shape, device=r.device,
                         median_ms=r.median_ms, p20_ms=r.p20_ms, p80_ms=r.p80_ms, peak_mem_mb=r.peak_mb,
                         status=r.status))
    return rows


def _print(rows: list[dict]) -> None:
    base = {(r["bench"], r["case"], r["shape"]): r["median_ms"] for r in rows if r["implementation"] == "torch"}
    print(f"{'bench':17s} {'case':28s} {'shape':20s} {'impl':10s} {'median ms':>10s} {'p20':>8s} {'p80':>8s} "
          f"{'peak MB':>8s} {'speed-up':>8s}")
    for r in rows:
        ref = base.get((r["bench"], r["case"], r["shape"]), float("nan"))
        print(f"{r['bench']:17s} {r['case']:28s} {r['shape']:20s} {r['implementation']:10s} {r['median_ms']:10.2f} "
              f"{r['p20_ms']:8.2f} {r['p80_ms']:8.2f} {r['peak_mem_mb']:8.1f} {ref / r['median_ms']:7.1f}x"
              + ("" if r["status"] == "ok" else f"  {r['status']}"))


if __name__ == "__main__":
    _print(run(smoke="--smoke" in sys.argv[1:]))
