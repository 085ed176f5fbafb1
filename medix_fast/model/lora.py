"""Low-rank adapters (LoRA) on a loaded model: the ``model.lora`` config made real.

    adapted = add_adapters(model, cfg.model.lora)        # names of the adapted layers; base frozen
    params = adapter_parameters(model)                   # what the optimizer gets
    with adapters_off(model):                            # the base policy (the KL reference)
        ...
    state = merged_state_dict(model)                     # W + scale * B A, Hugging Face names

A targeted ``nn.Linear`` is replaced by :class:`LoraLinear`, ``base_layer(x) + scale *
lora_B(lora_A(dropout(x)))`` with PEFT's names (``q_proj.base_layer.weight``,
``q_proj.lora_A.weight``), so the sampler, which runs the model's own modules, applies the
adapters as a low-rank add beside each decode GEMM: no merge and no weight copy after a step.
An MoE's expert banks (``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I), ``model/moe.py``) get
:class:`LoraExperts`: per-expert factors A (E, r, in) and B (E, out, r), their delta ``bmm(B, A)``
(one grouped low-rank product for all experts) added to the bank for the forward, which the
model's experts implementation (grouped GEMM or eager) then runs unchanged; this is the delta
PEFT's ``target_parameters`` computes. The LM head and embeddings never get adapters
(``config.LORA_NEVER``): the fused log-prob kernels keep their one pass over the head's weight,
with a gradient for the hidden states only.

The adapters are float32 (AdamW's master copy is the parameter itself); the frozen base is in
whatever dtype it was loaded in (the trainer loads it in the compute dtype: bf16 on CUDA). Their
input is cast to float32 and their output back to the base's. Initialisation is PEFT's: A
Kaiming-uniform, B zero, so a fresh adapter leaves the model's output unchanged.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from ..config import LORA_NEVER, LoraConfig
from ..errors import UserError
from .moe import is_moe, sparse_blocks

EXPERT_BANKS = ("gate_up_proj", "down_proj")  # (E, out, in) each, as transformers computes with them


def matches(name: str, targets: list[str]) -> bool:
    """PEFT's rule for a module name: equal to a target, or ending in ``"." + target``."""
    return any(name == t or name.endswith("." + t) for t in targets)


def _kaiming(t: torch.Tensor) -> torch.Tensor:
    """PEFT's (nn.Linear's) initialisation of lora_A, in place on a (rows, in) view."""
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))


class LoraLinear(nn.Module):
    """``base_layer(x) + scaling * lora_B(lora_A(dropout(x)))``, the base frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        device = base.weight.device
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=device, dtype=torch.float32)
        _kaiming(self.lora_A.weight.data)
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.scaling = alpha / rank
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if not self.enabled:
            return y
        low = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))  # (..., out)
        return y + (low * self.scaling).to(y.dtype)


class LoraExperts(nn.Module):
    """An MoE expert bank with per-expert adapters on ``gate_up_proj`` and ``down_proj``: the forward
    runs the base module on ``bank + scaling * bmm(B, A)`` (all experts in one product)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for name in EXPERT_BANKS:
            bank = getattr(base, name)  # (E, out, in)
            experts, out, inp = bank.shape
            a = torch.empty(experts, rank, inp, device=bank.device, dtype=torch.float32)
            _kaiming(a.view(experts * rank, inp))  # PEFT's: one (E * r, in) matrix
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(torch.zeros(experts, out, rank, device=bank.device, dtype=torch.float32))
        self.scaling = alpha / rank
        self.enabled = True

    def forward(self, *args, **kwargs):
        if not self.enabled:
            return self.base_layer(*args, **kwargs)
        banks = {n: getattr(self.base_layer, n) for n in EXPERT_BANKS}
        weights = {n: fold(w, self.lora_B[n], self.lora_A[n], self.scaling) for n, w in banks.items()}
        return torch.func.functional_call(self.base_layer, weights, args, kwargs)


ADAPTERS = (LoraLinear, LoraExperts)


def fold(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, scaling: float,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """``w + scaling * b @ a`` summed in fp32 and rounded once to ``w``'s dtype (or written into
    ``out``, in its dtype): (out, in) with (out, r) @ (r, in), or every expert's at once, (E, out, in)
    with (E, out, r) @ (E, r, in) (one batched product). Transient: one fp32 tensor of ``w``'s shape."""
    total = torch.matmul(b.float(), a.float()).mul_(scaling).add_(w)
    return total.to(w.dtype) if out is None else out.copy_(total)


def factors(module: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]]:
    """An adapter's adapted weights, each as (the module holding it, its parameter name, B, A), read
    from the slots now (FSDP2 puts new unsharded parameters in them at each unshard)."""
    if isinstance(module, LoraLinear):
        return [(module.base_layer, "weight", module.lora_B.weight, module.lora_A.weight)]
    return [(module.base_layer, n, module.lora_B[n], module.lora_A[n]) for n in EXPERT_BANKS]


def _vision_prefix(model: nn.Module) -> str | None:
    """The dotted name of a VL model's vision tower, or None."""
    for name, module in model.named_modules():
        if name.endswith("visual") and module is getattr(getattr(model, "model", None), "visual", None):
            return name
    return None


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at ``name``, in the train / eval mode of the module it replaces."""
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    setattr(owner, child, new.train(getattr(owner, child).training))


def add_adapters(model: nn.Module, lora: LoraConfig) -> list[str]:
    """Freeze ``model`` and put adapters on the layers ``lora`` targets; returns their names (a
    UserError naming ``model.lora.target_modules`` when none matches)."""
    model.requires_grad_(False)
    vision = _vision_prefix(model)
    names = []
    for name, module in list(model.named_modules()):
        if not lora.vision and vision and (name == vision or name.startswith(vision + ".")):
            continue
        if isinstance(module, nn.Linear) and matches(name, lora.target_modules) \
                and name.split(".")[-1] not in LORA_NEVER:
            _replace(model, name, LoraLinear(module, lora.rank, lora.alpha, lora.dropout))
            names.append(name)
    if lora.experts:
        if not is_moe(model.config):
            raise UserError(f"model.lora.experts: {model.config.model_type} is not a mixture-of-experts model")
        for block in sparse_blocks(model):
            block.experts = LoraExperts(block.experts, lora.rank, lora.alpha).train(block.experts.training)
        names += [n for n, m in model.named_modules() if isinstance(m, LoraExperts)]
    if not names:
        linear = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise UserError(f"model.lora.target_modules: {lora.target_modules} match no linear layer of "
                        f"{model.config.model_type} (its linear layers: {linear})")
    return names


def adapters(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, ADAPTERS)]


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters (the only ones that train)."""
    return [p for m in adapters(model) for n, p in m.named_parameters() if not n.startswith("base_layer.")]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors by their names in ``model`` (``...q_proj.lora_A.weight``)."""
    return {n: p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """Run ``model`` as its frozen base inside (the reference policy; no second copy)."""
    flags = [(m, m.enabled) for m in adapters(model)]
    for m, _ in flags:
        m.enabled = False
    try:
        yield model
    finally:
        for m, enabled in flags:
            m.enabled = enabled


class AdaptersOff(nn.Module):
    """``objective`` evaluated with ``model``'s adapters off: the KL reference of a LoRA policy."""

    def __init__(self, objective: nn.Module, model: nn.Module):
        super().__init__()
        self.objective, self.base = objective, [model]  # a list: not a second registered copy

    def forward(self, *args, **kwargs):
        with adapters_off(self.base[0]):
            return self.objective(*args, **kwargs)


@torch.no_grad()
def merged_state_dict(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The Hugging Face state dict of ``model`` with every adapter folded into its base weight
    (``W + scale * B A``, in the base's dtype), under the plain model's names. ``state``: the
    model's own state dict to fold (under FSDP2 the gathered one, ``distributed.full_state_dict``;
    default the live tensors, left as they are); empty stays empty (the other ranks of a gather)."""
    state = model.state_dict() if state is None else state
    if not state:
        return {}
    folded = {}
    for name, module in model.named_modules():
        banks = ("weight",) if isinstance(module, LoraLinear) else EXPERT_BANKS if isinstance(module, LoraExperts) \
            else ()
        for bank in banks:
            key = f"{name}.base_layer.{bank}"
            folded[key] = fold(state[key], state[f"{name}.lora_B.{bank}"], state[f"{name}.lora_A.{bank}"],
                               module.scaling)
    return {k.replace(".base_layer.", "."): folded.get(k, v) for k, v in state.items()
            if ".lora_A." not in k and ".lora_B." not in k}
