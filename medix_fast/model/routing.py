"""Routing replay for mixtures of experts (R3, "Rollout Routing Replay", arXiv 2510.11370): the
sampler records which experts each token was sent to, and the update's forward sends it to the
same ones instead of routing again, so a token's trainer log-prob is computed through the experts
that sampled it.

    record = RoutingRecord(model)          # forward hooks on every router (gate)
    ...                                    # forwards: record.take() -> (tokens, layers, k) int8 ids
    replay = RouterReplay(model)
    with replay.replaying([ids]):          # (rows * T, layers, k) per decoder call, -1: route as usual
        h = hidden_states(model, ...)      # every router's top-k replaced by the recorded ids

A router (transformers' ``Qwen3MoeTopKRouter`` / ``Qwen3VLMoeTextTopKRouter``) returns
``(logits, weights, ids)``. The replay keeps its logits and recomputes the weights at the recorded
experts by the router's own rule: softmax over all experts in fp32, gathered at the ids,
renormalised over the k when ``norm_topk_prob`` (Qwen3-VL-MoE always), cast back to the logits'
dtype. So the gradient still reaches the router through the kept experts' logits (as the paper
does); only the discrete choice is taken from the sampler. Ids are stored as int8 when the model
has at most 128 experts, else int16 (``footprint.routing_ids_bytes`` plans their memory).

A decoder call routes each layer once, in layer order; several calls may share one ``replaying``
(the update's shared-prompt forward: the prompts, then the completions): call ``j`` of a layer
replays the ``j``-th tensor, cyclically, so an activation-checkpointed layer recomputed in the
backward (outside the ``with``: ``keep``) replays what its forward did. Outside, and outside a
backward, the hooks do nothing: the sampler routes the same model on its own.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .moe import sparse_blocks, text_config


def routing_dtype(num_experts: int) -> torch.dtype:
    """The narrowest signed integer that holds an expert id, 0 .. num_experts - 1 (-1 marks "not
    recorded"): int8 up to 128 experts (Qwen3-30B-A3B's), else int16."""
    return torch.int8 if num_experts <= 128 else torch.int16


def _routers(model: nn.Module) -> list[nn.Module]:
    blocks = sparse_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no mixture-of-experts router to record or replay")
    return [b.gate for b in blocks]


class RoutingRecord:
    """Forward hooks that keep every router's selected experts; :meth:`take` stacks one forward's
    (its tokens, layers, k) in the compact dtype, on the model's device (no host read)."""

    def __init__(self, model: nn.Module):
        self.routers = _routers(model)
        self.dtype = routing_dtype(text_config(model.config).num_experts)
        self.pending: list[torch.Tensor] = []
        self.handles = [r.register_forward_hook(self._keep) for r in self.routers]

    def _keep(self, module, args, output) -> None:
        self.pending.append(output[2].to(self.dtype))  # (tokens, k)

    def take(self) -> torch.Tensor:
        """The last forward's ids (tokens, layers, k); one router call per layer expected."""
        if len(self.pending) != len(self.routers):
            raise RuntimeError(f"recorded {len(self.pending)} router calls for {len(self.routers)} layers")
        ids, self.pending = torch.stack(self.pending, 1), []
        return ids

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def replayed_weights(logits: torch.Tensor, ids: torch.Tensor, normalise: bool) -> torch.Tensor:
    """(tokens, k) routing weights of ``ids`` by the router's rule from its (tokens, E) logits."""
    w = torch.softmax(logits, dim=-1, dtype=torch.float).gather(-1, ids)  # (tokens, k)
    if normalise:
        w = w / w.sum(-1, keepdim=True)
    return w.to(logits.dtype)


class RouterReplay:
    """Forward hooks that make every router take the experts of :meth:`replaying` (see the module doc)."""

    def __init__(self, model: nn.Module):
        self.routers = _routers(model)
        self.calls: list[torch.Tensor] = []
        self.count = [0] * len(self.routers)
        self.active = False
        self.handles = [r.register_forward_hook(self._hook(layer)) for layer, r in enumerate(self.routers)]

    @contextlib.contextmanager
    def replaying(self, calls: list[torch.Tensor], keep: bool = False):
        """Replay ``calls`` in the forwards run inside: one (rows * T, layers, k) tensor per decoder
        call (-1: the router's own choice; [] routes as usual). ``keep`` (activation checkpointing)
        keeps them for the layers the backward recomputes; no other forward (the sampler's) sees them."""
        self.calls, self.count, self.active = list(calls), [0] * len(self.routers), True
        try:
            yield
        finally:
            self.active = False
            if not keep:
                self.calls = []

    def _hook(self, layer: int):
        def hook(module, args, output):
            if not self.calls or not (self.active or torch._C._current_graph_task_id() != -1):  # or a recompute
                return None
            recorded = self.calls[self.count[layer] % len(self.calls)][:, layer]  # (tokens, k)
            self.count[layer] += 1
            logits, _, own = output
            if recorded.shape != own.shape:
                raise ValueError(f"router {layer}: recorded ids {tuple(recorded.shape)} for a call routing "
                                 f"{tuple(own.shape)}")
            ids = torch.where(recorded >= 0, recorded.long(), own)  # (tokens, k)
            return logits, replayed_weights(logits, ids, getattr(module, "norm_topk_prob", True)), ids
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
