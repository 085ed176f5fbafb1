"""Mixture-of-experts decoders (Qwen3-MoE, Qwen3-VL-MoE such as Qwen3-VL-30B-A3B): which experts
implementation runs them, the router's training settings, and its load-balancing loss.

    impl = experts_implementation(config, torch.device("cuda"), torch.bfloat16)   # "grouped_mm"
    set_router_trainable(model, False)
    router = RouterLogits(model)
    with router.recording():
        h = hidden_states(model, ids, mask)
    aux = router.loss([mask])          # the model's Switch-style load-balancing loss over valid tokens

Experts implementations (transformers' ``experts_implementation``): ``eager`` loops over the
experts that received tokens (a host sync per layer: ``nonzero``); ``batched_mm`` gathers one
weight matrix per (token, expert) pair, (tokens x k, 2I, H) bytes, fine for a few decode rows and
prohibitive for training; ``grouped_mm`` sorts the pairs by expert and runs one grouped GEMM
(``torch.nn.functional.grouped_mm``) with no host sync. :func:`experts_implementation` is the one
place that picks: ``grouped_mm`` where the kernel runs (CUDA SM80+ with bf16 weights, which is what
FSDP2's compute copy and the bf16 sampler / eval / reference models are; the CPU when the expert
widths give 16-byte strides), else ``eager``. On the CPU grouped_mm was the fastest of the three
at every measured shape (bench/bench_moe.py); ``model.experts_implementation`` overrides.

Router settings, as MediX-R1 ran Qwen3-VL-30B-A3B (training/examples/medix-r1_30b_dapo.sh on
EasyR1): the router trains with the rest of the model (``freeze_vision_tower: false`` and nothing
frozen), and there is no load-balancing loss: its patched ``qwen3_vl_model_forward`` returns the
logits only and ``output_router_logits`` stays false, so ``router_aux_loss_coef`` (0.001 in the
checkpoint's config) is never applied; veRL's Megatron bridge for Qwen3-MoE likewise sets
``moe_router_load_balancing_type="none"  # default None for RL``. Hence the defaults
``model.train_router: true`` and ``model.router_aux_loss_coef: 0``; a positive coefficient adds
:meth:`RouterLogits.loss` (transformers' own ``load_balancing_loss_func`` of the model, padding
excluded) to the policy loss, token-weighted over the mini-batch.

Checkpoints: :func:`save_pretrained` writes a Qwen3-VL-MoE's expert banks in the layout of its Hub
checkpoints, ``gate_up_proj`` (E, H, 2I) and ``down_proj`` (E, I, H), which vLLM and transformers 4
read. transformers 5 computes with (E, 2I, H) / (E, H, I) and transposes the Hub layout on load
(``Transpose(check_dims=True)``: only when the file's shape differs from its own), but its reverse
on save makes the same comparison with its own shape, never fires, and would write the compute
layout.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os

import torch
from torch import nn

from ..config import EXPERTS_IMPLEMENTATIONS  # the choices, with the config that offers them

log = logging.getLogger(__name__)

HUB_TRANSPOSED = {"qwen3_vl_moe": (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")}  # stored (E, in, out)


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def is_moe(config) -> bool:
    """Whether a model config describes a mixture-of-experts decoder (routed experts > 0)."""
    return (getattr(text_config(config), "num_experts", 0) or 0) > 0


def grouped_mm_runs(device: torch.device, dtype: torch.dtype, widths: tuple[int, ...]) -> bool:
    """Whether ``torch.nn.functional.grouped_mm`` runs the experts natively here: CUDA SM80+ with
    bf16 weights (its documented inputs), or the CPU (torch >= 2.9) when every expert width gives
    16-byte row strides at 2-byte elements (its kernel rejects others)."""
    if not (hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm")):
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and all(w % 8 == 0 for w in widths)


def experts_implementation(config, device: str | torch.device, dtype: torch.dtype, requested: str = "auto") -> str:
    """The experts implementation for a model ``config`` whose weights are computed in ``dtype``
    on ``device``: ``requested`` unless it is ``"auto"``, else ``grouped_mm`` where it runs
    (:func:`grouped_mm_runs`) and ``eager`` elsewhere."""
    if requested not in EXPERTS_IMPLEMENTATIONS:
        raise ValueError(f"experts implementation {requested!r} is not one of {list(EXPERTS_IMPLEMENTATIONS)}")
    if requested != "auto":
        return requested
    text = text_config(config)
    widths = (text.hidden_size, text.moe_intermediate_size)
    return "grouped_mm" if grouped_mm_runs(torch.device(device), dtype, widths) else "eager"


def sparse_blocks(model: nn.Module) -> list[nn.Module]:
    """The sparse MoE blocks (a ``gate`` router beside an ``experts`` bank), in layer order."""
    return [m for m in model.modules() if isinstance(getattr(m, "gate", None), nn.Module)
            and isinstance(getattr(m, "experts", None), nn.Module)]


def set_router_trainable(model: nn.Module, trainable: bool) -> None:
    """Train or freeze the routers of an MoE model (MediX-R1 trains them)."""
    blocks = sparse_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no mixture-of-experts router to freeze or train")
    for block in blocks:
        block.gate.requires_grad_(trainable)


class RouterLogits:
    """Forward hooks on every router that keep its logits (rows, experts) while :meth:`recording`,
    and the model's load-balancing loss over them (:meth:`loss`)."""

    def __init__(self, model: nn.Module):
        blocks = sparse_blocks(model)
        if not blocks:
            raise ValueError(f"{type(model).__name__} has no mixture-of-experts router")
        text = text_config(model.config)
        self.num_experts, self.top_k = text.num_experts, text.num_experts_per_tok
        self.balance = importlib.import_module(type(model).__module__).load_balancing_loss_func
        self.layers = len(blocks)
        self.logits: list[torch.Tensor] = []
        self.active = False
        for block in blocks:
            block.gate.register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        if self.active:  # not in the recomputation of a checkpointed layer during backward
            self.logits.append(output[0])  # (rows, E): the router's logits, before softmax / top-k

    @contextlib.contextmanager
    def recording(self):
        """Record the routers' logits of the forwards run inside (earlier records are dropped)."""
        self.logits, self.active = [], True
        try:
            yield self
        finally:
            self.active = False

    def loss(self, weights: list[torch.Tensor]) -> torch.Tensor:
        """The load-balancing loss of the recorded forwards: ``weights[f]`` gives forward ``f``'s
        tokens (its ``(B, T)`` input, flattened) a weight, 0 for padding; a weight of G counts a
        prompt token run once for its G completions as the G copies it stands for."""
        if len(self.logits) != self.layers * len(weights):
            raise ValueError(f"recorded {len(self.logits)} router calls, expected {self.layers} layers x "
                             f"{len(weights)} forwards")
        per_layer = [torch.cat(self.logits[layer::self.layers]) for layer in range(self.layers)]  # (rows, E) each
        flat = torch.cat([w.reshape(-1).float() for w in weights])  # (rows,)
        self.logits = []
        return self.balance(tuple(per_layer), self.num_experts, self.top_k, flat)


def save_pretrained(model: nn.Module, directory: str | os.PathLike, state_dict: dict | None = None) -> None:
    """``model.save_pretrained(directory, state_dict=state_dict)`` with a Qwen3-VL-MoE's expert banks
    in its Hub layout (every other model as transformers saves it). A bank whose two matrix
    dimensions are equal cannot be told apart by transformers' loader and keeps its layout."""
    suffixes = HUB_TRANSPOSED.get(model.config.model_type)
    state = state_dict if state_dict is not None else model.state_dict()
    banks = [k for k in state if suffixes and k.endswith(suffixes)]
    if not banks:
        model.save_pretrained(directory, state_dict=state_dict)
        return
    if any(state[k].shape[1] == state[k].shape[2] for k in banks):
        log.warning("%s: square expert weights, saved in transformers' layout (no loader can tell the two apart)",
                    model.config.model_type)
        model.save_pretrained(directory, state_dict=state_dict)
        return
    hub = {k: v.transpose(1, 2).contiguous() if k in banks else v for k, v in state.items()}
    model.save_pretrained(directory, state_dict=hub, save_original_format=False)  # the only conversions are these
