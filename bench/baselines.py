"""The implementations medix_fast is measured against, each behind the same call signature.

Log-probs, ``fn(hidden (N, H), weight (V, H), targets (N,)) -> logp (N,)``:
  ``naive``          materialised logits, ``log_softmax`` in fp32, ``gather`` (HF / TRL default)
  ``torch.compile``  the same function through ``torch.compile``
  ``liger``          Liger-Kernel's fused linear cross entropy, ``reduction="none"`` (-logp)
  ``cce``            Apple's cut-cross-entropy ``linear_cross_entropy``, ``reduction="none"``
Policy loss, ``fn(hidden (B, T, H), weight, targets, mask, advantages, old_logprobs) -> loss``:
  ``naive``          materialised logits -> log-probs -> medix_fast's ``policy_loss`` formula
  ``torch.compile``  the same function through ``torch.compile`` (the loss traces as one graph)
  ``liger``          Liger's ``LigerFusedLinearGRPOLoss`` (chunked PyTorch, loss math compiled)
Group advantages, ``fn(rewards (N,), group_size) -> (N,)``:
  ``naive``          TRL GRPOTrainer's repeat_interleave formulation

Log-prob baselines are factories ``make(device) -> fn``. A baseline that cannot be imported or
run here raises :class:`bench.case.Skip` with the reason.
"""
from __future__ import annotations

import torch

from .case import Skip

LOSS_PRESETS = {  # loss name -> medix_fast options (TRL names, which Liger shares)
    "grpo": dict(loss_type="grpo", importance_sampling_level="token", epsilon_low=0.2, epsilon_high=0.2),
    "dapo": dict(loss_type="dapo", importance_sampling_level="token", epsilon_low=0.2, epsilon_high=0.28),
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence", epsilon_low=3e-4,
                 epsilon_high=4e-4),
}


def naive_logprobs(hidden, weight, targets):
    logits = hidden @ weight.t()  # (N, V)
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)  # (N,)


def compiled_logprobs(device: torch.device):
    return torch.compile(naive_logprobs)


def _needs_cuda(device: torch.device, what: str) -> None:
    if device.type != "cuda":
        raise Skip(f"{what} is Triton-only, needs a CUDA GPU")


def liger_logprobs(device: torch.device):
    _needs_cuda(device, "Liger's fused linear cross entropy")
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError as exc:
        raise Skip(f"liger-kernel not importable ({exc})") from exc

    def fn(hidden, weight, targets):
        return -liger_fused_linear_cross_entropy(hidden, weight, targets, reduction="none")  # (N,)

    return fn


def cce_logprobs(device: torch.device):
    _needs_cuda(device, "cut-cross-entropy's kernel")
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as exc:
        raise Skip("cut-cross-entropy not installed") from exc

    def fn(hidden, weight, targets):
        return -linear_cross_entropy(hidden, weight, targets, reduction="none")  # (N,)

    return fn


LOGPROB_BASELINES = {"naive": lambda device: naive_logprobs, "torch.compile": compiled_logprobs,
                     "liger": liger_logprobs, "cce": cce_logprobs}


def naive_policy_loss(loss: str):
    from medix_fast.kernels import policy_loss

    def fn(hidden, weight, targets, mask, advantages, old_logprobs):
        logits = hidden @ weight.t()  # (B, T, V)
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)  # (B, T)
        return policy_loss(logp, old_logprobs, advantages, mask, **LOSS_PRESETS[loss])[0]

    return fn


def compiled_policy_loss(loss: str):
    return torch.compile(naive_policy_loss(loss))


def liger_policy_loss(loss: str, compiled: bool = True):
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError as exc:
        raise Skip(f"liger-kernel not importable ({exc})") from exc
    module = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, compiled=compiled, **LOSS_PRESETS[loss])

    def fn(hidden, weight, targets, mask, advantages, old_logprobs):
        return module(hidden, weight, targets, mask, advantages, old_per_token_logps=old_logprobs)[0]

    return fn


def naive_group_advantages(rewards, group_size):
    grouped = rewards.view(-1, group_size)  # (G, S)
    mean = grouped.mean(dim=1).repeat_interleave(group_size)  # (N,)
    std = grouped.std(dim=1).repeat_interleave(group_size)  # (N,)
    return (rewards - mean) / (std + 1e-6)
