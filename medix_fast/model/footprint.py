"""What a policy weighs (parameters in all, active per token, per FSDP unit) and the memory of
the training update on one GPU, for the memory plan of a config.

    counts = parameter_counts(model_config)    # ParameterCounts: total, active, experts, units
    plan = update_plan(cfg, model_config, device_bytes=141e9, world=8, reward_params={...})
    print(plan.table())

The rollout's part (the unsharded weights the sampler runs on, the K/V pool) is the rollout
engine's plan; this is the rest of a training step, per GPU under FSDP2 (the shipped large
configs; DDP holds whole copies and is for small models):
- resident the whole run: fp32 master shards (4 bytes/param / world), AdamW's two fp32 states
  (8 / world), a KL reference's bf16 shards (2 / world, ``algorithm.beta > 0``), the reward
  models in bf16 unless ``rewards.offload``;
- old log-probs (``algorithm.old_logprobs: recompute``): no-grad forwards on the unsharded bf16
  weights (2 bytes/param), one layer's activations at a time;
- the update: the fp32 gradient shards (4 / world, freed when the update ends), the root unit
  and the largest layer unsharded (bf16 parameters, their bf16
  gradients, the fp32 reduce-scatter input; two layers' parameters while the next is
  prefetched), the checkpointed layer inputs of a micro-batch (``train.micro_batch_tokens``
  tokens; a VL model's image patches bounded by merge^2 per token), one layer recomputed with
  its gradients, and the fused LM-head loss (a chunk of fp32 logits and the fp32 dW).
Without ``model.gradient_checkpointing`` every layer's activations stay for the backward.
A mixture-of-experts layer's activations count the ``num_experts_per_tok`` experts each token
runs (its gathered input, gate/up, activation and output), not all of them; its parameters count
every expert, which is why the active count per token (decode reads, FLOPs) is ~10x smaller
than the weights for Qwen3-VL-30B-A3B. The K/V per token does not depend on the experts.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .moe import is_moe, sparse_blocks, text_config

RUNTIME_BYTES = 3 * 2**30  # CUDA context, NCCL buffers, allocator fragmentation
LOGITS_CHUNK_BYTES = 2048 * 2**20  # the fused LM-head loss's fp32 logits chunk on CUDA (kernels/logprobs.py)


@dataclasses.dataclass(frozen=True)
class ParameterCounts:
    total: int
    active: int  # run per token: every parameter but the experts a token is not routed to
    experts: int  # in the expert banks (0 for a dense model)
    units: tuple[int, ...]  # per FSDP2 unit of its own (vision blocks, decoder layers), forward order
    root: int  # the rest: embeddings, LM head, final norm, the vision tower's patch embedding / mergers

    @property
    def largest_unit(self) -> int:
        return max(self.units, default=0)


def meta_model(config) -> nn.Module:
    """The model a transformers config describes, on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if getattr(config, "vision_config", None) is not None else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config)


def parameter_counts(config) -> ParameterCounts:
    """Parameters of the model ``config`` describes, counted on the meta device."""
    from ..distributed import shard_units

    model = meta_model(config)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    total = count(model)
    units = tuple(count(u) for u in shard_units(model))
    experts = sum(count(b.experts) for b in sparse_blocks(model))
    active = total
    if is_moe(config):
        text = text_config(config)
        active -= experts * (text.num_experts - text.num_experts_per_tok) // text.num_experts
    return ParameterCounts(total, active, experts, units, total - sum(units))


def layer_width(config) -> int:
    """Activation elements per token of one decoder layer (inputs of its norms and projections,
    attention output, the MLP's intermediates; MoE: the router's fp32 scores as two elements and
    the k experts each token runs)."""
    t = text_config(config)
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    q, kv = t.num_attention_heads * head_dim, t.num_key_value_heads * head_dim
    attention = 3 * t.hidden_size + 2 * q + 2 * kv
    if is_moe(config):
        k, inter = t.num_experts_per_tok, t.moe_intermediate_size
        return attention + 2 * t.num_experts + k * (2 * t.hidden_size + 3 * inter)
    return attention + 4 * t.intermediate_size


def vision_width(config) -> int:
    """Activation elements per image patch of one vision block (0 for a text model)."""
    v = getattr(config, "vision_config", None)
    return 0 if v is None else 6 * v.hidden_size + 2 * v.intermediate_size


TARGET = 0.9  # of the device's memory the update may plan for (77.3 of 80 GB left no margin)


@dataclasses.dataclass
class UpdatePlan:
    counts: ParameterCounts
    device_bytes: int
    world: int
    resident: dict[str, int]  # the whole run, besides the phases' own
    logprobs: dict[str, int]  # old log-probs: no-grad forwards, parameters unsharded
    update: dict[str, int]  # forward + backward of one micro-batch
    fitting_tokens: int | None = None  # the largest train.micro_batch_tokens that fits (when this does not)

    @property
    def logprobs_bytes(self) -> int:
        return sum(self.resident.values()) + sum(self.logprobs.values())

    @property
    def update_bytes(self) -> int:
        return sum(self.resident.values()) + sum(self.update.values())

    @property
    def fits(self) -> bool:
        """Both phases within ``TARGET`` of the device (fragmentation and what is not counted take the rest)."""
        return max(self.logprobs_bytes, self.update_bytes) <= TARGET * self.device_bytes

    def misfit(self) -> str:
        """Why it does not fit: the larger phase's biggest term, the GPU that would hold it, and only
        the remedies not already applied."""
        phase, terms = (("old log-probs", self.logprobs) if self.logprobs_bytes >= self.update_bytes
                        else ("update", self.update))
        name, size = max({**self.resident, **terms}.items(), key=lambda kv: kv[1])
        need = max(self.logprobs_bytes, self.update_bytes)
        remedies = [f"GPUs of {fitting_gpu(need / TARGET)}"]
        if phase == "old log-probs":
            remedies.append("algorithm.old_logprobs=sampler (no unsharded forward)")
        else:
            if self.fitting_tokens:
                remedies.append(f"train.micro_batch_tokens={self.fitting_tokens} (the largest that fits)")
            if "every layer's activations" in self.update:
                remedies.append("model.gradient_checkpointing=true")
        if any(k.startswith(("judge", "encoder")) for k in self.resident):
            remedies.append("rewards.offload=true")
        if "unsharded" not in name:
            remedies.append("more GPUs")
        return (f"does NOT fit: the {phase} phase needs {_gb(need)}, over the {TARGET:.0%} planned for "
                f"({_gb(TARGET * self.device_bytes)} of {_gb(self.device_bytes)}); its biggest term is {name} "
                f"({_gb(size)}); would fit: {'; '.join(remedies)}")

    def table(self) -> str:
        c = self.counts
        rows = [("parameters", f"{c.total / 1e9:.2f} B, {c.active / 1e9:.2f} B active per token"
                               + (f" (experts {c.experts / 1e9:.2f} B)" if c.experts else "")),
                ("FSDP units", f"{len(c.units)} + root, largest {c.largest_unit / 1e6:.0f} M, "
                               f"root {c.root / 1e6:.0f} M parameters")]
        rows += [(f"resident: {k}", _gb(v)) for k, v in self.resident.items()]
        rows += [(f"old log-probs: {k}", _gb(v)) for k, v in self.logprobs.items()]
        rows += [("old log-probs peak", f"{_gb(self.logprobs_bytes)} of {_gb(self.device_bytes)}")]
        rows += [(f"update: {k}", _gb(v)) for k, v in self.update.items()]
        rows += [("update peak", f"{_gb(self.update_bytes)} of {_gb(self.device_bytes)}"),
                 ("verdict", "fits" if self.fits else self.misfit())]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def routing_ids_bytes(cfg, model_config, world: int = 8) -> int:
    """Bytes per GPU of one step's recorded expert choices for routing replay (R3,
    ``model/routing.py``), as ``Sequences.routing`` holds them: each of the step's rows its prompt
    (at most ``data.max_prompt_length``) and completion (at most ``sampling.max_new_tokens``) times
    the MoE layers times ``num_experts_per_tok`` ids of 1 byte (int8 up to 128 experts, else 2);
    0 for a dense model."""
    if not is_moe(model_config):
        return 0
    t = text_config(model_config)
    rows = -(-cfg.train.prompts_per_step // world) * cfg.sampling.group_size
    tokens = rows * (cfg.data.max_prompt_length + cfg.sampling.max_new_tokens)
    return tokens * t.num_hidden_layers * t.num_experts_per_tok * (1 if t.num_experts <= 128 else 2)


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB"


GPU_GB = (24, 40, 48, 80, 94, 141, 192, 288)  # common accelerator memories (H100 80/94, H200 141, B200 192, B300 288)


def fitting_gpu(need_bytes: float) -> str:
    """The smallest common GPU memory that holds ``need_bytes``, e.g. ``"141 GB"``."""
    size = next((g for g in GPU_GB if g * 1e9 >= need_bytes), None)
    return f"{size} GB" if size else f"more than {GPU_GB[-1]} GB"


def update_plan(cfg, model_config, device_bytes: int, world: int = 8,
                reward_params: dict[str, int] | None = None, counts: ParameterCounts | None = None) -> UpdatePlan:
    """The training update's memory on one of ``world`` GPUs under FSDP2 for config ``cfg``
    (medix_fast.config.Config) and model ``model_config``; ``reward_params``: the reward models'
    parameter counts by name (resident in bf16 unless ``rewards.offload``). When it does not fit,
    ``fitting_tokens`` is the largest ``train.micro_batch_tokens`` with which it would (both
    phases grow with it: a bisection), a multiple of 1024 from 1024 up; None if none would."""
    c = counts or parameter_counts(model_config)
    plan = _plan_at(cfg, model_config, device_bytes, world, reward_params, c, cfg.train.micro_batch_tokens)
    if plan.fits:
        return plan
    low, high = 0, cfg.train.micro_batch_tokens  # fits at low (0: none yet), not at high
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if _plan_at(cfg, model_config, device_bytes, world, reward_params, c, mid).fits \
            else (low, mid)
    plan.fitting_tokens = (low // 1024 * 1024 if low >= 1024 else low) or None
    return plan


def _plan_at(cfg, model_config, device_bytes: int, world: int, reward_params: dict[str, int] | None,
             c: ParameterCounts, tokens: int) -> UpdatePlan:
    """:func:`update_plan` with ``tokens`` tokens per micro-batch."""
    t = text_config(model_config)
    h, vocab = t.hidden_size, t.vocab_size
    resident = {"fp32 master shards": 4 * c.total // world, "AdamW fp32 states": 8 * c.total // world}
    if cfg.algorithm.beta > 0:
        resident["KL reference bf16 shards"] = 2 * c.total // world
    for name, n in ({} if cfg.rewards.offload else reward_params or {}).items():
        resident[f"{name} bf16"] = 2 * n
    resident["CUDA runtime and slack"] = RUNTIME_BYTES
    lm_head = LOGITS_CHUNK_BYTES + 4 * vocab * h + 4 * tokens * h
    logprobs = {}
    if cfg.algorithm.old_logprobs == "recompute":
        logprobs = {"bf16 weights, unsharded": 2 * c.total, "one layer's forward": 2 * tokens * layer_width(model_config),
                    "LM-head logits chunk": LOGITS_CHUNK_BYTES}
    v = getattr(model_config, "vision_config", None)
    patches = tokens * v.spatial_merge_size**2 if v is not None else 0  # at most merge^2 patches per image token
    layers = t.num_hidden_layers
    depth, vision_h = (v.depth, v.hidden_size) if v is not None else (0, 0)
    if cfg.model.gradient_checkpointing:
        saved = 2 * (tokens * h * layers + patches * vision_h * depth)
        working = 2 * 2 * max(tokens * layer_width(model_config), patches * vision_width(model_config))
        activations = {"checkpointed layer inputs": saved, "one layer recomputed + its gradients": working}
    else:
        activations = {"every layer's activations": 2 * (tokens * layer_width(model_config) * layers
                                                          + patches * vision_width(model_config) * depth)}
    update = {"fp32 gradient shards": 4 * c.total // world,
              "root unit unsharded (bf16 + grads + fp32 reduce)": 8 * c.root,
              "two layers gathered, one's grads + fp32 reduce": 10 * c.largest_unit,
              **activations, "fused LM-head loss (fp32 chunk, fp32 dW)": lm_head}
    return UpdatePlan(c, int(device_bytes), world, resident, logprobs, update)
