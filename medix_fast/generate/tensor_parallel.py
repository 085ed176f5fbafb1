"""A tensor-parallel copy of the policy for sampling, made from the weights the ranks already hold.

    copy = TensorParallelCopy(model, k=2, group=tp_group, group_rank=r, dtype=torch.bfloat16)
    with copy.materialized():        # every rank of the group: one bf16 all-gather per parameter
        Sampler(copy.model, ...).generate(...)   # the same prompts on every rank of the group
    # outside: the copy's storage is given back (its modules stay, on the meta device)

The copy is the same Hugging Face class as the policy with a text config of the rank's share:
``num_attention_heads / k`` query heads, ``max(1, num_key_value_heads / k)`` K/V heads (a K/V head is
held by ``k / num_key_value_heads`` ranks when k exceeds their count, as vLLM does), and every
decoder layer's MLP width (``intermediate_size``, a mixture-of-experts layer's
``moe_intermediate_size`` of every expert, a shared expert's) divided by k. So the Hugging Face
forward runs unchanged on the shares (Megatron's column / row split), and two all-reduces per
layer over the group (after the attention's output projection, after the MLP or expert block)
give every rank the full hidden state. Embeddings, the LM head, the norms, the routers and the
vision tower are replicated: every rank computes the same routing, logits and sampled tokens.

Why one scheme for dense and MoE layers (each expert split by width, not experts placed by rank):
the routed tokens need no dispatch or combine (no all-to-all, no capacity, no imbalance between
ranks: every rank runs every token's experts on 1/k of their width), the collectives are those of
a dense layer, and the K/V heads split the same way. It costs narrower expert GEMMs (Qwen3-VL-30B-A3B
at k = 8: 96 columns per expert and rank).

The shares come from the policy's parameters, sharded by FSDP2 (DTensors) or whole (DDP, one
process): each is cast to the copy's dtype on its shard and all-gathered one at a time, sliced and
dropped (transient: the largest parameter in bf16), so no rank ever holds the unsharded policy.

A LoRA policy (``model/lora.py``): the copy is the plain model, its shares folded weights. An adapted
weight's base (``q_proj.base_layer.weight``, ``experts.base_layer.gate_up_proj``) is gathered like any
parameter, its adapter's A and B (small, fp32) too, and the full ``W + scaling * B @ A`` is summed in
fp32 (transient: one fp32 tensor of the weight's shape), rounded once to the copy's dtype and split;
so the copy holds base-shaped merged shares, refilled with the current adapters at every fill.
"""
from __future__ import annotations

import contextlib
import copy as _copy
import re

import torch
from torch import nn

from .. import distributed as D
from ..model.lora import fold
from ..model.moe import text_config

_LAYER = re.compile(r"(^|\.)layers\.\d+\.")  # a decoder layer's parameters (the vision tower's are blocks.N)
_COLUMN = re.compile(r"\.mlp\.(shared_expert\.)?(gate_proj|up_proj)\.(weight|bias)$")
_ROW = re.compile(r"\.(self_attn\.o_proj|mlp\.(shared_expert\.)?down_proj)\.(weight|bias)$")


def tensor_parallel_error(config, k: int, world: int | None = None) -> str | None:
    """Why the model ``config`` describes cannot be split ``k`` ways over groups of ``world`` ranks
    (None when it can)."""
    if k == 1:
        return None
    text = text_config(config)
    heads, kv = text.num_attention_heads, text.num_key_value_heads
    widths = {name: getattr(text, name, None) for name in
              ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size")}
    if heads % k:
        return f"{heads} attention heads are not divisible by {k}"
    if kv % k and k % kv:
        return f"{kv} K/V heads and {k} neither divide the other"
    for name, width in widths.items():
        if width and width % k:
            return f"{name} {width} is not divisible by {k}"
    if world is not None and world % k:
        return f"{k} does not divide the world size {world} (groups of {k} consecutive ranks)"
    return None


def _head_dim(text) -> int:
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def localize_config(config, k: int) -> None:
    """Make ``config``'s text model (in place) describe one rank's share of a ``k``-way split: what
    the K/V pool and the memory plan read. The modules are built from the full config first
    (some architectures derive the head size from hidden / heads) and split by ``_split_modules``."""
    text = text_config(config)
    text.head_dim = _head_dim(text)
    text.num_attention_heads //= k
    text.num_key_value_heads = max(1, text.num_key_value_heads // k)
    for name in ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size"):
        if getattr(text, name, None):
            setattr(text, name, getattr(text, name) // k)


def _linear(old: nn.Linear, out_div: int = 1, in_div: int = 1, out_features: int | None = None) -> nn.Linear:
    """A meta-device Linear like ``old`` with its output / input width divided (or set)."""
    out = out_features or old.out_features // out_div
    return nn.Linear(old.in_features // in_div, out, bias=old.bias is not None, device="meta", dtype=old.weight.dtype)


def _split_modules(model: nn.Module, k: int, kv_local: int, head_dim: int) -> None:
    """Replace each decoder layer's projections, MLP and expert weights (on the meta device) by
    one rank's share, and the head counts the attention keeps."""
    for layer in D.decoder_layers(model):
        attn = layer.self_attn
        heads = attn.q_proj.out_features // head_dim // k
        attn.q_proj = _linear(attn.q_proj, k)
        attn.k_proj = _linear(attn.k_proj, out_features=kv_local * head_dim)
        attn.v_proj = _linear(attn.v_proj, out_features=kv_local * head_dim)
        attn.o_proj = _linear(attn.o_proj, in_div=k)
        for name, value in (("num_heads", heads), ("num_key_value_heads", kv_local),
                            ("num_key_value_groups", heads // kv_local)):
            if hasattr(attn, name):
                setattr(attn, name, value)
        mlps = [layer.mlp] + [m for m in (getattr(layer.mlp, "shared_expert", None),) if m is not None]
        for mlp in mlps:
            if isinstance(getattr(mlp, "down_proj", None), nn.Linear):
                mlp.gate_proj, mlp.up_proj = _linear(mlp.gate_proj, k), _linear(mlp.up_proj, k)
                mlp.down_proj = _linear(mlp.down_proj, in_div=k)
        experts = getattr(layer.mlp, "experts", None)
        if isinstance(getattr(experts, "gate_up_proj", None), nn.Parameter):
            e, two_i, h = experts.gate_up_proj.shape  # (E, 2I, H), (E, H, I)
            meta = dict(device="meta", dtype=experts.gate_up_proj.dtype)
            experts.gate_up_proj = nn.Parameter(torch.empty(e, two_i // k, h, **meta), requires_grad=False)
            experts.down_proj = nn.Parameter(torch.empty(e, h, two_i // 2 // k, **meta), requires_grad=False)
            if hasattr(experts, "intermediate_dim"):
                experts.intermediate_dim = two_i // 2 // k


class TensorParallelCopy:
    """Rank ``group_rank``'s share of a ``k``-way tensor-parallel copy of ``model`` (a Hugging Face
    decoder or VL model, its parameters plain or FSDP2 DTensors) over the process group ``group``
    (None: the default group), in ``dtype`` on ``device``."""

    def __init__(self, model: nn.Module, k: int, group, group_rank: int, dtype: torch.dtype, device: torch.device):
        error = tensor_parallel_error(model.config, k)
        if error:
            raise ValueError(f"sampling.tensor_parallel={k}: {error}")
        self.source, self.k, self.group, self.rank = model, k, group, group_rank
        self.dtype, self.device = dtype, torch.device(device)
        text = text_config(model.config)
        self.head_dim = _head_dim(text)
        self.heads, self.kv_heads = text.num_attention_heads, text.num_key_value_heads
        with torch.device("meta"):
            self.model = type(model)._from_config(_copy.deepcopy(model.config), dtype=dtype)
        _split_modules(self.model, k, max(1, self.kv_heads // k), self.head_dim)
        localize_config(self.model.config, k)
        head = model.get_output_embeddings()
        self.tied = head is not None and head.weight is model.get_input_embeddings().weight
        self.model.eval().requires_grad_(False)
        self.model.generation_config = model.generation_config
        for module in self._reduced_modules():
            module.register_forward_hook(self._all_reduce)
        self.driver = None  # a vmm.Driver: the storage in sleepable memory (the sampler's choice)
        self.memory = None  # its vmm.SleepableMemory, once materialized

    # ------------------------------------------------------------------ weights
    @contextlib.contextmanager
    def materialized(self, keep: bool = False):
        """The copy's weights for the duration (every rank of the whole process group calls it:
        the policy's FSDP2 shards are gathered over it); given back to the meta device after, or
        with ``keep`` held for the next call, which fills the same storage in place (the sampler's
        CUDA graphs read its addresses). With a ``driver`` the storage is one sleepable range
        (``vmm.py``), made once: given back means put to sleep (same addresses at the next wake)."""
        if next(self.model.parameters()).is_meta:
            self._materialize()
        elif self.memory is not None:
            self.memory.wake()
        try:
            with torch.no_grad(), D.waiting("all_gather(tensor-parallel copy)"):
                self._fill()
            yield self.model
        finally:
            if not keep and self.memory is not None:
                self.memory.sleep()
            elif not keep:
                self.model.to("meta")
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def _materialize(self) -> None:
        """Storage for the copy's parameters and buffers: new tensors, or views of one sleepable range."""
        if self.driver is None:
            self.model.to_empty(device=self.device)  # new parameters from the meta device: ties are made again
        else:
            from .vmm import SleepableMemory

            slots = [(m, kind, n, t) for m in self.model.modules() for kind in ("_parameters", "_buffers")
                     for n, t in getattr(m, kind).items() if t is not None]
            starts, end = {}, 0  # a tied parameter: one range for its slots; 256-byte aligned
            for _, _, _, t in slots:
                if id(t) not in starts:
                    starts[id(t)], end = end, end + -(-t.numel() * t.dtype.itemsize // 256) * 256
            self.memory = SleepableMemory(self.driver, end, self.device)
            whole, made = self.memory.tensor(), {}
            for module, kind, name, t in slots:
                if id(t) not in made:
                    view = whole[starts[id(t)]:starts[id(t)] + t.numel() * t.dtype.itemsize].view(t.dtype).view(t.shape)
                    made[id(t)] = nn.Parameter(view, requires_grad=False) if kind == "_parameters" else view
                getattr(module, kind)[name] = made[id(t)]
        if self.tied:
            self.model.get_output_embeddings().weight = self.model.get_input_embeddings().weight

    def _fill(self) -> None:
        params = dict(self.source.named_parameters())
        for name, dst in self.model.named_parameters():
            owner, _, leaf = name.rpartition(".")
            base = f"{owner}.base_layer.{leaf}"  # the weight under a LoRA adapter (model/lora.py)
            if name in params:
                self._copy(name, params[name], dst)
            elif base in params:
                adapter = self.source.get_submodule(owner)
                b, a = (params.get(f"{owner}.lora_{x}.{leaf}") for x in "BA")  # none for a bias
                self._copy(name, params[base], dst, (b, a, adapter.scaling) if b is not None and adapter.enabled
                           else None)
            else:
                raise ValueError(f"tensor-parallel copy: {name} has no counterpart in the policy")
        buffers = dict(self.source.named_buffers())
        for name, dst in self.model.named_buffers():
            self._copy(name, buffers[name], dst)

    def _full(self, src: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The whole of ``src`` on the copy's device: an FSDP2 shard cast on the shard, gathered in ``dtype``."""
        src = src.detach()
        if hasattr(src, "full_tensor"):
            src = src.to(dtype).full_tensor()
        return src.to(self.device)

    def _copy(self, name: str, src: torch.Tensor, dst: torch.Tensor, lora: tuple | None = None) -> None:
        """``dst`` = this rank's share of ``src``, with ``lora`` (B, A, scaling) folded in first."""
        src = self._full(src, self.dtype)
        if lora is not None:
            b, a, scaling = lora
            src = fold(src.to(self.dtype), self._full(b, b.dtype), self._full(a, a.dtype), scaling)
        share = self._share(name, src)
        if share.shape != dst.shape:
            raise ValueError(f"tensor-parallel copy: {name} of shape {tuple(src.shape)} gives a share of "
                             f"{tuple(share.shape)}, the copy expects {tuple(dst.shape)}")
        dst.copy_(share)

    def _share(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of the policy's parameter ``name`` (its full tensor)."""
        if not _LAYER.search(name):
            return full  # replicated: embeddings, LM head, norms, vision tower
        r, k, hd = self.rank, self.k, self.head_dim
        if re.search(r"\.self_attn\.q_proj\.", name):
            q = self.heads // k
            return full[r * q * hd:(r + 1) * q * hd]
        if re.search(r"\.self_attn\.[kv]_proj\.", name):
            kv = max(1, self.kv_heads // k)
            first = r * kv if self.kv_heads >= k else r * self.kv_heads // k
            return full[first * hd:(first + kv) * hd]
        if name.endswith("self_attn.o_proj.weight"):
            q = self.heads // k
            return full[:, r * q * hd:(r + 1) * q * hd]
        if name.endswith(".experts.gate_up_proj"):  # (E, 2I, H): gate rows, then up rows
            width = full.shape[1] // 2 // k
            gate, up = full.chunk(2, dim=1)
            return torch.cat([gate[:, r * width:(r + 1) * width], up[:, r * width:(r + 1) * width]], dim=1)
        if name.endswith(".experts.down_proj"):  # (E, H, I)
            width = full.shape[2] // k
            return full[:, :, r * width:(r + 1) * width]
        if _COLUMN.search(name):
            width = full.shape[0] // k
            return full[r * width:(r + 1) * width]
        if _ROW.search(name):
            if name.endswith(".bias"):  # added once: on the group's first rank
                return full if r == 0 else torch.zeros_like(full)
            width = full.shape[1] // k
            return full[:, r * width:(r + 1) * width]
        return full  # norms, q/k norms, routers

    # ------------------------------------------------------------------ forward
    def _reduced_modules(self) -> list[nn.Module]:
        """Each decoder layer's attention and MLP (or expert block): their outputs are partial sums."""
        return [m for layer in D.decoder_layers(self.model) for m in (layer.self_attn, layer.mlp)]

    def _all_reduce(self, module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        D.all_reduce(out, out.device, "sum", self.group)  # in place: every rank of the group gets the sum
        return output
