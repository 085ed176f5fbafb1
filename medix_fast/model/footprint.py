"""What a policy weighs (parameters in all, active per token, per FSDP unit, per tensor-parallel
rank), where its training state lives, and the memory of the training update on one GPU and of
the host, for the memory plan of a config.

    counts = parameter_counts(model_config)    # ParameterCounts: total, active, experts, units, ...
    plan = update_plan(cfg, model_config, device_bytes=141e9, world=8, reward_params={...})
    print(plan.table())
    host = host_memory(cfg, counts, world=8, gpus_per_node=8)   # {term: bytes per node}

The rollout's part (the weights the sampler runs on, the K/V pool) is the rollout engine's plan
(``generate/memory.py``); this is the rest of a training step, per GPU under FSDP2 (the shipped
large configs; DDP holds whole copies and is for small models):
- resident the whole run: the training state :func:`state_bytes` keeps on the device (fp32
  master shards, 4 bytes/param / world, and AdamW's two states, 8 or 4 / world, unless
  ``optim.offload`` moves them to the host), a KL reference's bf16 shards (2 / world,
  ``algorithm.beta > 0``), the reward models in bf16 unless ``rewards.offload``;
- old / reference log-probs (``algorithm.old_logprobs: recompute`` or ``beta > 0``): no-grad FSDP
  forwards, one unit gathered at a time: the root unit and the two largest units in bf16 (one
  prefetched), one layer's activations of a micro-batch, the LM head's logits chunk;
- the update: the fp32 gradient shards (4 / world, freed when the update ends; on the host under
  ``optim.offload: params``), the root unit and the largest layer unsharded (bf16 parameters,
  their bf16 gradients, the fp32 reduce-scatter input; two layers' parameters while the next is
  prefetched), the checkpointed layer inputs of a micro-batch (``train.micro_batch_tokens``
  tokens; a VL model's image patches bounded by merge^2 per token), one layer recomputed with
  its gradients, the fused LM-head loss (a chunk of fp32 logits and the fp32 dW) and, under
  ``optim.offload: optimizer`` or bf16 states, the chunk buffers of AdamW's step
  (``optim.adamw.staging_bytes``).
Without ``model.gradient_checkpointing`` every layer's activations stay for the backward.
With ``model.lora`` the base is frozen in bf16 (2 bytes/param, no fp32 master, gradient nor AdamW
state; FSDP2 shards it, 2 / world, and gathers its units in bf16 with no gradient nor fp32 reduce
but the adapters'; one GPU or DDP hold it whole and gather nothing), the sampler's weights and,
with its adapters off, the KL reference; the training state is the adapters' (:func:`lora_counts`),
sharded as the base; the fused LM-head loss makes no dW (the head is frozen); a frozen vision tower
saves nothing for a backward. Counted besides: the adapters' own activations (each adapted
linear's input, which lora_A saves, and A x, r values, per token; outside FSDP2 the fp32 cast of
the input) and, with ``model.lora.experts``, each MoE layer's folded banks (:func:`expert_delta_bytes`).
A mixture-of-experts layer's activations count the ``num_experts_per_tok`` experts each token
runs (its gathered input, gate/up, activation and output), not all of them; its parameters count
every expert, which is why the active count per token (decode reads, FLOPs) is ~10x smaller
than the weights for Qwen3-VL-30B-A3B. The K/V per token does not depend on the experts.
"""
from __future__ import annotations

import dataclasses
import re

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
    tp_split: int = 0  # decoder layers' q / o projections, MLP and experts: 1/k of each per tensor-parallel rank
    tp_kv: int = 0  # decoder layers' k / v projections: max(1, kv_heads / k) heads per rank
    largest: int = 0  # the largest single parameter (a whole expert bank for an MoE)
    decode: int = 0  # what a decode step reads: the language model, LM head included, no embedding, no vision

    @property
    def largest_unit(self) -> int:
        return max(self.units, default=0)

    def per_rank(self, k: int, kv_heads: int, part: int | None = None, experts_read: float = 1.0) -> int:
        """Parameters of ``part`` (default: the whole model) one rank holds in a tensor-parallel copy
        of ``k`` ranks (``sampling.tensor_parallel``): the split part / k, the k / v projections
        with max(1, kv_heads / k) heads, the rest replicated. ``experts_read``: the share of the
        experts counted (a decode step's, :func:`experts_read`); ``part=self.decode`` gives what
        a decode step reads."""
        part = self.total if part is None else part
        split = self.tp_split - round(self.experts * (1 - experts_read))
        return part - self.tp_split - self.tp_kv + -(-split // k) + self.tp_kv * -(-kv_heads // k) // kv_heads


_KV = re.compile(r"self_attn\.[kv]_proj\.")
_ROW_BIAS = re.compile(r"(o_proj|down_proj)\.bias$")  # a row-parallel layer's bias is added once, not split
_SPLIT = re.compile(r"self_attn\.(q_proj|o_proj)\.|mlp\.experts\.|mlp\.(.+\.)?(gate_proj|up_proj|down_proj|gate_up_proj)\b")


def tensor_parallel_role(name: str) -> str:
    """How the tensor-parallel sampler copy holds a decoder layer's parameter ``name`` (relative to
    the layer): ``"split"`` (column / row parallel by heads or intermediate size, an expert bank by
    its expert width), ``"kv"`` (by K/V heads, replicated past their count) or ``"replicated"``
    (norms, q / k norms, routers, row-parallel biases)."""
    if _KV.search(name):
        return "kv"
    if _ROW_BIAS.search(name) or not _SPLIT.search(name):
        return "replicated"
    return "split"


def meta_model(config) -> nn.Module:
    """The model a transformers config describes, on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if getattr(config, "vision_config", None) is not None else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config)


def parameter_counts(config) -> ParameterCounts:
    """Parameters of the model ``config`` describes, counted on the meta device."""
    from ..distributed import decoder_layers, shard_units

    model = meta_model(config)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    total = count(model)
    units = tuple(count(u) for u in shard_units(model))
    experts = sum(count(b.experts) for b in sparse_blocks(model))
    active = total
    if is_moe(config):
        text = text_config(config)
        active -= experts * (text.num_experts - text.num_experts_per_tok) // text.num_experts
    roles = {"split": 0, "kv": 0, "replicated": 0}
    for layer in decoder_layers(model):
        for name, p in layer.named_parameters():
            roles[tensor_parallel_role(name)] += p.numel()
    decode = 0
    for name, p in model.named_parameters():  # tied embeddings are listed once: the LM head reads them all
        decode += 0 if "visual" in name or ("embed_tokens" in name and not getattr(config, "tie_word_embeddings",
                                                                                    False)) else p.numel()
    return ParameterCounts(total, active, experts, units, total - sum(units), roles["split"], roles["kv"],
                           max(p.numel() for p in model.parameters()), decode)


@dataclasses.dataclass(frozen=True)
class LoraCounts:
    """What ``model.lora``'s adapters add to a model (:func:`lora_counts`), for the plan."""
    total: int  # adapter parameters: fp32 weights, gradients and AdamW states
    units: tuple[int, ...]  # adapter parameters per FSDP2 unit, ``ParameterCounts.units``' order; the rest in the root
    width: int  # saved per token by one decoder layer's adapters: each adapted linear's input (lora_A's) and A x (r)
    vision_width: int  # the same per image patch of one vision block (``model.lora.vision``; 0: the tower frozen)
    widest: int  # the widest adapted input (its fp32 cast for the fp32 adapters, transient)
    banks: tuple[int, ...] = ()  # one MoE layer's adapted expert banks, E x out x in elements each
    bank_layers: int = 0  # layers whose expert banks carry adapters
    linear_weights: int = 0  # the adapted linears' base weights, elements (what a merged sampler buffers)
    largest_linear: int = 0  # the largest adapted linear's weight, elements (the merge's fp32 transient)

    @property
    def bank_weights(self) -> int:
        """The adapted expert banks' base weights, elements, all layers."""
        return sum(self.banks) * self.bank_layers

    @property
    def root(self) -> int:
        return self.total - sum(self.units)

    def with_units(self, counts: ParameterCounts) -> tuple[int, tuple[int, ...]]:
        """The root and the units of ``counts`` with these adapters in them (what FSDP2 gathers)."""
        return counts.root + self.root, tuple(u + a for u, a in zip(counts.units, self.units))


def lora_counts(lora, model_config) -> LoraCounts | None:
    """The adapters ``lora`` (``cfg.model.lora``) puts on the model ``model_config`` describes, counted
    on the meta device by ``model/lora.py``'s own targeting; None without adapters."""
    if not lora.rank:
        return None
    from ..distributed import decoder_layers, shard_units
    from .lora import EXPERT_BANKS, LoraExperts, LoraLinear, adapter_parameters, add_adapters

    model = meta_model(model_config)
    add_adapters(model, lora)
    count = lambda m: sum(p.numel() for p in adapter_parameters(m))  # noqa: E731
    width = lambda m: sum(a.base_layer.in_features + lora.rank for a in m.modules()  # noqa: E731
                          if isinstance(a, LoraLinear))
    units, decoders = shard_units(model), decoder_layers(model)
    vision = [u for u in units if not any(u is d for d in decoders)]
    banks = [tuple(getattr(e.base_layer, n).numel() for n in EXPERT_BANKS) for e in model.modules()
             if isinstance(e, LoraExperts)]
    linears = [a.base_layer for a in model.modules() if isinstance(a, LoraLinear)]
    weights = [w.weight.numel() for w in linears]
    return LoraCounts(count(model), tuple(count(u) for u in units), max(map(width, decoders), default=0),
                      max(map(width, vision), default=0), max((w.in_features for w in linears), default=0),
                      max(banks, key=sum, default=()), len(banks), sum(weights), max(weights, default=0))


def expert_delta_bytes(lora: LoraCounts | None, backward: bool = False, layers: int = 1) -> int:
    """The transient of ``model/lora.py``'s ``LoraExperts`` in one MoE layer's forward: each adapted bank
    folded, ``bank + scaling * bmm(B, A)``, a whole (E, out, in) bank in bf16 (2 bytes per element of
    both banks; with ``backward`` kept for it, as the grouped GEMM saves its weight, in ``layers``
    layers at once), made through an fp32 product and its scaled copy (8 bytes per element of the
    largest bank); the backward then makes the bank's bf16 gradient and widens it to fp32 twice
    (10 bytes per element of the largest bank, after the forward's 8 are freed). 0 without expert adapters."""
    if not lora or not lora.banks:
        return 0
    return 2 * sum(lora.banks) * layers + (10 if backward else 8) * max(lora.banks)


def experts_read(config, rows: int) -> float:
    """The share of a mixture of experts' experts a decode step of ``rows`` rows reads, every row
    routed to ``num_experts_per_tok`` of ``num_experts`` at random: 1 - (1 - k / E)^rows (98 % at
    64 rows x 8 of 128); 1 for a dense model."""
    if not is_moe(config):
        return 1.0
    t = text_config(config)
    return 1 - (1 - t.num_experts_per_tok / t.num_experts) ** rows


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


TARGET = 0.9  # of the device's memory a phase may plan for (77.3 of 80 GB left no margin)


@dataclasses.dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter of the training state by where it lives: ``device`` and (pinned) ``host``,
    each {"master": fp32 master weights, "grads": fp32 gradients, "states": AdamW's two states}."""
    device: dict[str, int]
    host: dict[str, int]

    @staticmethod
    def name(key: str, state_dtype: str, sharded: bool = True) -> str:
        """How the plan calls term ``key``: FSDP2's shards, or DDP's whole copies (``sharded=False``)."""
        if key == "states":
            return f"AdamW {dict(float32='fp32', bfloat16='bf16')[state_dtype]} states"
        return {"master": "fp32 master shards", "grads": "fp32 gradient shards"}[key] if sharded else {
            "master": "fp32 weights", "grads": "fp32 gradient buckets"}[key]


def state_bytes(offload: str, state_dtype: str) -> StateBytes:
    """What ``optim.offload`` and ``optim.state_dtype`` keep where, per parameter, from the optimizer's
    own table (``optim.adamw``: :func:`device_bytes` / :func:`host_bytes` of the master and the two
    states): ``none`` all on the device; ``optimizer`` AdamW's states on the host, streamed through the
    device each optimizer step; ``params`` (FSDP2's CPUOffloadPolicy) the master weights, gradients and
    states on the host, the device holding only the bf16 units being computed. The fp32 gradient shard
    lives where the master does."""
    from ..optim.adamw import MASTER_BYTES, STATE_BYTES, device_bytes, host_bytes

    terms = {"master": MASTER_BYTES, "grads": MASTER_BYTES, "states": 2 * STATE_BYTES[state_dtype]}
    on_host = {"master": host_bytes(offload, state_dtype) > 2 * STATE_BYTES[state_dtype],
               "states": device_bytes(offload, state_dtype) < MASTER_BYTES + terms["states"]}
    on_host["grads"] = on_host["master"]
    return StateBytes({k: v for k, v in terms.items() if not on_host[k]}, {k: v for k, v in terms.items() if on_host[k]})


@dataclasses.dataclass
class UpdatePlan:
    counts: ParameterCounts
    device_bytes: int
    world: int
    resident: dict[str, int]  # the whole run, besides the phases' own
    logprobs: dict[str, int]  # old / reference log-probs: no-grad FSDP forwards, one unit gathered at a time
    update: dict[str, int]  # forward + backward of one micro-batch
    fitting_tokens: int | None = None  # the largest train.micro_batch_tokens that fits (when this does not)
    offload: str = "none"  # optim.offload
    old_logprobs: str = "recompute"  # algorithm.old_logprobs
    tokens: int = 0  # the micro-batch planned
    group_tokens: int = 0  # one group at the longest lengths: group_size x (max_prompt_length + max_new_tokens)

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
        if phase == "old log-probs" and self.old_logprobs == "recompute":
            remedies.append("algorithm.old_logprobs=sampler (no forward of the old policy)")
        if self.fitting_tokens:
            remedies.append(f"train.micro_batch_tokens={self.fitting_tokens} (the largest that fits)")
        if "every layer's activations" in self.update:
            remedies.append("model.gradient_checkpointing=true")
        if any(k.startswith(("judge", "encoder")) for k in self.resident):
            remedies.append("rewards.offload=true")
        remedies += [f"optim.offload={o}" for o in ("optimizer", "params")[("none", "optimizer", "params").index(
            self.offload):]]
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
        rows += [("old log-probs peak", f"{_gb(self.logprobs_bytes)} of {_gb(self.device_bytes)}"
                  if self.logprobs else "none (algorithm.old_logprobs: sampler, no reference model)")]
        rows += [(f"update: {k}", _gb(v)) for k, v in self.update.items()]
        rows += [("update peak", f"{_gb(self.update_bytes)} of {_gb(self.device_bytes)}"),
                 ("verdict", "fits" if self.fits else self.misfit())]
        if self.group_tokens > self.tokens:  # rl/batch.py's pack trains a group over the budget alone
            rows.append(("but one group", f"at the longest lengths ({self.group_tokens:,} tokens) is longer than the "
                                          f"{self.tokens:,}-token micro-batch planned: trained whole, alone, over this "
                                          f"plan (--longest-completion)"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def host_memory(cfg, counts: ParameterCounts, world: int, gpus_per_node: int = 8,
                reward_params: dict[str, int] | None = None, trained: int | None = None) -> dict[str, int]:
    """Host memory one node of ``gpus_per_node`` GPUs needs for what config ``cfg`` keeps there, by
    term, over its ranks: the offloaded training state (:func:`state_bytes`, pinned), the
    checkpoint's staging copy (``checkpoint.async_save`` with ``keep_staging``: the fp32 master
    weights and, with ``save_optimizer``, AdamW's states, kept between saves) and, under
    ``rewards.offload``, the reward models in bf16 (``reward_params``). ``trained``: the parameters
    with a training state (default all; LoRA: the adapters', :func:`lora_counts`)."""
    ranks = min(world, gpus_per_node)
    shards = world if cfg.distributed.strategy == "fsdp" else 1
    trained = counts.total if trained is None else trained
    b = state_bytes(cfg.optim.offload, cfg.optim.state_dtype)
    out = {f"pinned {b.name(k, cfg.optim.state_dtype, shards > 1)}": v * trained // shards * ranks
           for k, v in b.host.items()}
    ck = cfg.checkpoint
    if ck.async_save and ck.keep_staging:
        per = 4 + ({**b.device, **b.host}["states"] if ck.save_optimizer else 0)
        out["checkpoint staging copy (keep_staging)"] = per * trained // shards * ranks
    for name, n in (reward_params or {}).items() if cfg.rewards.offload else ():
        out[f"{name} bf16 (rewards.offload)"] = 2 * n * ranks
    return out


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


def update_plan(cfg, model_config, device_bytes: int, world: int = 8, reward_params: dict[str, int] | None = None,
                counts: ParameterCounts | None = None, lora: LoraCounts | None = None) -> UpdatePlan:
    """The training update's memory on one of ``world`` GPUs under FSDP2 (or, with ``model.lora``,
    DDP) for config ``cfg`` (medix_fast.config.Config) and model ``model_config``; ``reward_params``:
    the reward models' parameter counts by name (resident in bf16 unless ``rewards.offload``);
    ``counts`` / ``lora``: the model's and the adapters' counts (counted here when None). When it
    does not fit, ``fitting_tokens`` is the largest ``train.micro_batch_tokens`` with which it would
    (both phases grow with it), a multiple of 1024 from 1024 up; None if none would."""
    c = counts or parameter_counts(model_config)
    lora = lora or lora_counts(cfg.model.lora, model_config)
    plan = update_at(cfg, model_config, device_bytes, world, reward_params, c, cfg.train.micro_batch_tokens, lora)
    if plan.fits:
        return plan
    low = largest_tokens(cfg, model_config, device_bytes, world, reward_params, c, lora, cfg.train.micro_batch_tokens)
    plan.fitting_tokens = (low // 1024 * 1024 if low >= 1024 else low) or None
    return plan


def largest_tokens(cfg, model_config, device_bytes: int, world: int, reward_params: dict[str, int] | None,
                   c: ParameterCounts, lora: LoraCounts | None, high: int) -> int:
    """The largest micro-batch below ``high`` tokens whose old log-probs and update fit (both grow with
    it: a bisection); 0 if none does."""
    low = 0  # fits at low (0: none yet), not at high
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if update_at(cfg, model_config, device_bytes, world, reward_params, c, mid, lora).fits \
            else (low, mid)
    return low


def update_at(cfg, model_config, device_bytes: int, world: int, reward_params: dict[str, int] | None,
              c: ParameterCounts, tokens: int, lora: LoraCounts | None = None) -> UpdatePlan:
    """The update plan (:func:`update_plan`) with ``tokens`` tokens per micro-batch (``lora``: the
    adapters' counts)."""
    t = text_config(model_config)
    h, vocab = t.hidden_size, t.vocab_size
    o = cfg.optim
    fsdp = cfg.distributed.strategy == "fsdp"
    shards = world if fsdp else 1
    state = state_bytes(o.offload, o.state_dtype)
    if lora:  # the frozen base: no fp32 master, gradient nor AdamW state; those of the adapters, sharded as the base
        resident = {f"frozen base bf16{' shards' if fsdp else ''} (the KL reference with adapters off)":
                    2 * c.total // shards}
        resident |= {f"adapters' {state.name(k, o.state_dtype, fsdp)}": b * lora.total // shards
                     for k, b in state.device.items() if k != "grads"}
    else:
        resident = {state.name(k, o.state_dtype): b * c.total // world
                    for k, b in state.device.items() if k != "grads"}
    if cfg.algorithm.beta > 0 and not lora:
        resident["KL reference bf16 shards"] = 2 * c.total // world
    for name, n in ({} if cfg.rewards.offload else reward_params or {}).items():
        resident[f"{name} bf16"] = 2 * n
    resident["CUDA runtime and slack"] = RUNTIME_BYTES
    lm_head = LOGITS_CHUNK_BYTES + 4 * vocab * h + 4 * tokens * h
    root, units = lora.with_units(c) if lora else (c.root, c.units)  # FSDP2 gathers a unit with its adapters
    logprobs = {}
    if cfg.algorithm.old_logprobs == "recompute" or cfg.algorithm.beta > 0:
        if fsdp or not lora:
            logprobs = {"root unit bf16": 2 * root,
                        "two largest units bf16 (one prefetched)": 2 * sum(sorted(units)[-2:])}
        logprobs |= {"one layer's forward": 2 * tokens * layer_width(model_config),
                     "LM-head logits chunk": LOGITS_CHUNK_BYTES}
        if expert_delta_bytes(lora):
            logprobs["expert delta bmm(B, A): folded banks bf16 + fp32 product"] = expert_delta_bytes(lora)
    v = getattr(model_config, "vision_config", None)
    patches = tokens * v.spatial_merge_size**2 if v is not None else 0  # at most merge^2 patches per image token
    layers = t.num_hidden_layers
    depth, vision_h = (v.depth, v.hidden_size) if v is not None else (0, 0)
    tower = depth if not lora or lora.vision_width else 0  # blocks that save for a backward (a frozen tower: none)
    if cfg.model.gradient_checkpointing:
        saved = 2 * (tokens * h * layers + patches * vision_h * tower)
        working = 2 * 2 * max(tokens * layer_width(model_config), patches * vision_width(model_config))
        activations = {"checkpointed layer inputs": saved, "one layer recomputed + its gradients": working}
    else:
        activations = {"every layer's activations": 2 * (tokens * layer_width(model_config) * layers
                                                          + patches * vision_width(model_config) * max(tower, 1))}
    if lora:
        update = {f"adapters' fp32 gradient{' shards' if fsdp else 's'}": 4 * lora.total // shards} \
            if "grads" in state.device else {}
        if fsdp:
            big = max(range(len(units)), key=units.__getitem__)  # bf16 weights of two, adapters' grads of one
            update |= {"root unit unsharded bf16 (frozen; its adapters' grads + fp32 reduce)":
                       2 * c.root + 8 * lora.root,
                       "two layers gathered bf16, one's adapters' grads + fp32 reduce":
                       4 * units[big] + 6 * lora.units[big]}
        update |= activations
        if cfg.model.gradient_checkpointing:  # one unit recomputed at a time
            own = 2 * max(tokens * lora.width, patches * lora.vision_width)
        else:
            own = 2 * (tokens * lora.width * layers + patches * lora.vision_width * depth)
        # outside FSDP2 the fp32 adapters cast their input to fp32 (autocast casts it back to bf16 and saves that)
        update["adapters' activations (inputs and A x saved; the fp32 input cast)"] = own + (
            0 if fsdp else 4 * tokens * lora.widest)
        if lora.banks:
            kept = 1 if cfg.model.gradient_checkpointing else lora.bank_layers  # layers whose folded banks are saved
            update["expert delta bmm(B, A): folded banks bf16 (saved) + fp32 product + the bank's gradient"] = \
                expert_delta_bytes(lora, backward=True, layers=kept)
        update["fused LM-head loss (fp32 chunk; frozen head, no dW)"] = lm_head - 4 * vocab * h
    else:
        update = {state.name("grads", o.state_dtype): 4 * c.total // world} if "grads" in state.device else {}
        update |= {"root unit unsharded (bf16 + grads + fp32 reduce)": 8 * c.root,
                   "two layers gathered, one's grads + fp32 reduce": 10 * c.largest_unit,
                   **activations, "fused LM-head loss (fp32 chunk, fp32 dW)": lm_head}
    from ..optim.adamw import staging_bytes

    if staging_bytes(o.offload, o.state_dtype):
        update["AdamW step buffers (chunks streamed / widened)"] = staging_bytes(o.offload, o.state_dtype)
    group = cfg.sampling.group_size * (cfg.data.max_prompt_length + cfg.sampling.max_new_tokens)
    return UpdatePlan(c, int(device_bytes), world, resident, logprobs, update, offload=o.offload,
                      old_logprobs=cfg.algorithm.old_logprobs, tokens=tokens, group_tokens=group)
