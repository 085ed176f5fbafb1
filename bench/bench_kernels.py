"""Kernel benchmarks: group advantages, fused-linear log-probs, the fused policy loss.

    python -m bench --only kernels          # all three;  --only logprobs / policy_loss / advantages

Shapes. CPU (fp32): the issue-2 target N=8,192 tokens, H=512, V=50,000, and a sweep of smaller
token counts for the plots; policy-loss rows are sequences of 512 tokens (1,024 on GPU), all
valid, plus one batch with about half of them padding (medix_fast skips padded tokens). GPU (bf16, only when CUDA is present): LM heads of real models,
H 2,048 / 3,584 / 4,096 with V 151,936 / 152,064, at 4K-32K tokens per micro-batch.
FLOPs: 2*N*H*V for a forward, 6*N*H*V for forward+backward (recompute not counted; N counts
valid tokens only).
Baselines: bench/baselines.py. ``--smoke`` shrinks everything to N=64, H=64, V=1,000 and skips
``torch.compile`` (its first compile takes longer than the whole smoke run may).
"""
from __future__ import annotations

import torch

from .baselines import (LOGPROB_BASELINES, LOSS_PRESETS, compiled_policy_loss, liger_policy_loss,
                        naive_group_advantages, naive_policy_loss)
from .case import SUBJECT, Case, Skip

LOSSES = ("grpo", "dapo", "gspo")
CPU_TOKENS = (1024, 2048, 4096, 8192)
CPU_HEAD = (512, 50_000)  # (H, V)
GPU_HEADS = {"2B": (2048, 151_936), "7B": (3584, 152_064), "8B": (4096, 151_936)}  # Qwen-VL LM heads
GPU_TOKENS = (4096, 16_384, 32_768)


def _dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _shape(n: int, h: int, v: int, device: torch.device, label: str = "") -> str:
    dt = "bf16" if device.type == "cuda" else "fp32"
    return f"{label}N={n} H={h} V={v} {dt}".strip()


def _head_shapes(smoke: bool, device: torch.device) -> list[tuple[int, int, int, str]]:
    """(tokens, H, V, label) for the log-prob and loss cases; the first one is the sweep's."""
    if smoke:
        return [(64, 64, 1000, "")]
    if device.type != "cuda":
        return [(n, *CPU_HEAD, "") for n in CPU_TOKENS]
    sweep = [(n, *GPU_HEADS["8B"], "8B ") for n in GPU_TOKENS]
    return sweep + [(16_384, h, v, f"{name} ") for name, (h, v) in GPU_HEADS.items() if name != "8B"]


def _head_inputs(n: int, h: int, v: int, device: torch.device, grad: bool):
    like = dict(device=device, dtype=_dtype(device), generator=torch.Generator(device).manual_seed(0))
    hidden = torch.randn(n, h, **like)  # (N, H)
    weight = torch.randn(v, h, **like).div_(h ** 0.5)  # (V, H)
    targets = torch.randint(0, v, (n,), device=device, generator=like["generator"])  # (N,)
    return hidden.requires_grad_(grad), weight.requires_grad_(grad), targets


# ----------------------------------------------------------------------------- advantages
def _advantage_cases(smoke: bool, device: torch.device) -> list[Case]:
    from medix_fast.kernels import group_advantages

    sizes = (64,) if smoke else ((1 << 16, 1 << 22) if device.type == "cuda" else (1 << 16, 1 << 20))
    impls = {SUBJECT: lambda r, g: group_advantages(r, g), "naive": naive_group_advantages}
    cases = []
    for n in sizes:
        for impl, f in impls.items():
            def build(dev, n=n, f=f):
                rewards = torch.rand(n, device=dev, generator=torch.Generator(dev).manual_seed(0))  # (N,)
                return lambda: f(rewards, 8)
            cases.append(Case("advantages", "grpo, group 8", impl, f"N={n}", n, build, bytes=8.0 * n))
    return cases


# ----------------------------------------------------------------------------- log-probs
def _logprob_fn(impl: str, device: torch.device):
    if impl == SUBJECT:
        from medix_fast.kernels import fused_linear_logprobs
        return fused_linear_logprobs
    return LOGPROB_BASELINES[impl](device)


def logprob_cases(smoke: bool, device: torch.device, shapes=None, grads=(False, True)) -> list[Case]:
    """Log-prob cases at ``shapes`` ((tokens, H, V, label); default the harness's), with and/or without grad."""
    cases = []
    for n, h, v, label in shapes or _head_shapes(smoke, device):
        for grad in grads:
            for impl in (SUBJECT, *LOGPROB_BASELINES):
                def build(dev, n=n, h=h, v=v, grad=grad, impl=impl):
                    if smoke and impl == "torch.compile":
                        raise Skip("not compiled under --smoke")
                    f = _logprob_fn(impl, dev)
                    hidden, weight, targets = _head_inputs(n, h, v, dev, grad)
                    if grad:
                        return lambda: torch.autograd.grad(f(hidden, weight, targets).sum(), (hidden, weight))
                    return torch.no_grad()(lambda: f(hidden, weight, targets))
                cases.append(Case("logprobs", "fwd+bwd" if grad else "forward, no grad", impl,
                                  _shape(n, h, v, device, label), n, build,
                                  flops=(6.0 if grad else 2.0) * n * h * v))
    return cases


# ----------------------------------------------------------------------------- policy loss
def _loss_fn(impl: str, loss: str, smoke: bool, lengths: list[int] | None = None):
    if impl == "naive":
        return naive_policy_loss(loss)
    if impl == "torch.compile":
        if smoke:
            raise Skip("not compiled under --smoke")
        return compiled_policy_loss(loss)
    if impl == "liger":
        return liger_policy_loss(loss, compiled=not smoke)
    from medix_fast.kernels import fused_linear_policy_loss

    def fn(hidden, weight, targets, mask, advantages, old_logprobs):  # lengths: host-side, as a trainer has them
        return fused_linear_policy_loss(hidden, weight, targets, mask, advantages, old_logprobs,
                                        valid_lengths=lengths, **LOSS_PRESETS[loss])[0]
    return fn


def _valid_lengths(n: int, device: torch.device, padded: bool) -> list[int]:
    """Completion lengths of the B = n / T rows: all T, or T/B, 2T/B, ..., T (about half padding)."""
    length = min(n // 2, 1024 if device.type == "cuda" else 512)  # at least 2 rows
    batch = n // length
    return [length * (i + 1) // batch if padded else length for i in range(batch)]


def _loss_inputs(n: int, h: int, v: int, device: torch.device, padded: bool):
    lengths = _valid_lengths(n, device, padded)
    batch, length = len(lengths), max(lengths)
    hidden, weight, targets = _head_inputs(n, h, v, device, grad=True)
    gen = torch.Generator(device).manual_seed(1)
    mask = (torch.arange(length, device=device)[None] < torch.tensor(lengths, device=device)[:, None]).float()  # (B, T)
    advantages = torch.randn(batch, device=device, generator=gen)  # (B,)
    old = torch.rand(batch, length, device=device, generator=gen).mul_(-5)  # (B, T)
    return hidden.detach().view(batch, length, h).requires_grad_(), weight, targets.view(batch, length), \
        mask, advantages, old


def loss_cases(smoke: bool, device: torch.device, variants=None) -> list[Case]:
    """Policy-loss cases for ``variants`` ((loss, padded, shapes) triples; default the harness's)."""
    shapes = _head_shapes(smoke, device)
    largest = [max(shapes)]
    # grpo over every shape (the plots' sweep); dapo, gspo and a padded batch at the largest only
    variants = variants or [("grpo", False, shapes), ("dapo", False, largest), ("gspo", False, largest),
                            ("grpo", True, largest)]
    cases = []
    for loss, padded, where in variants:
        for n, h, v, label in where:
            valid = sum(_valid_lengths(n, device, padded))
            name = f"{loss} fwd+bwd" + (f", {100 * valid // n} % valid tokens" if padded else "")
            for impl in (SUBJECT, "naive", "torch.compile", "liger"):
                def build(dev, n=n, h=h, v=v, impl=impl, loss=loss, padded=padded):
                    f = _loss_fn(impl, loss, smoke, _valid_lengths(n, dev, padded))
                    args = _loss_inputs(n, h, v, dev, padded)
                    return lambda: torch.autograd.grad(f(*args), (args[0], args[1]))
                note = "loss math eager under --smoke" if smoke and impl == "liger" else ""
                cases.append(Case("policy_loss", name, impl, _shape(n, h, v, device, label), n, build,
                                  flops=6.0 * valid * h * v, note=note))
    return cases


def cases(smoke: bool, device: torch.device) -> list[Case]:
    return _advantage_cases(smoke, device) + logprob_cases(smoke, device) + loss_cases(smoke, device)
