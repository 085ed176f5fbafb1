"""The rollout engine's memory: the K/V budget at run time and the plan of a training config.

    reserve = activation_reserve(model_config, max_prefill_tokens, max_num_seqs, vocab)
    pool_bytes = kv_budget(free_bytes, gpu_memory_utilization, reserve)
    plan = rollout_plan(cfg, model_config, device_bytes=141e9, world=8)   # a RolloutPlan
    print(plan.table())

``python -m medix_fast.generate --plan`` prints the plan of a config. Per GPU during the rollout,
resident besides the K/V pool:
- the policy's training state (``model.footprint.state_bytes`` of ``optim.offload`` and
  ``optim.state_dtype``): under FSDP2 the fp32 master shards (4 bytes/param / world) and AdamW's
  two states (8 or 4 / world) unless offloaded to the host (the gradients are freed after each
  update); DDP keeps fp32 weights (4), AdamW and its fp32 gradient buckets (4) whole;
- the weights the sampler runs on: with ``sampling.tensor_parallel`` 1 the unsharded bf16
  parameters (2 bytes/param, all of them; DDP: the bf16 copy autocast makes); with k > 1 a bf16
  tensor-parallel copy (``ParameterCounts.per_rank``: the decoder layers' q / o projections, MLP
  and experts / k, max(1, kv_heads / k) K/V heads, the rest replicated), built by gathering one
  parameter at a time (transient: the largest parameter, whole, in bf16);
- a KL reference model when ``algorithm.beta > 0``: bf16, sharded under FSDP;
- with ``model.lora``, instead of the three above: the frozen base in bf16 (the KL reference with
  the adapters off; sampled as it is with ``tensor_parallel`` 1 on one GPU or DDP) and the adapters'
  fp32 weights and AdamW states (``model.footprint.lora_counts``; DDP: their gradients too), FSDP2
  sharding both; the sampler's weights: FSDP2's unsharded base and adapters (bf16) with k = 1, the
  tensor-parallel copy with k > 1 (base-shaped bf16 shares, the adapters merged in; its build
  folds an adapted expert bank through an fp32 product); adapted expert banks sampled as they are
  fold once per layer and forward (``footprint.expert_delta_bytes``), beside the reserve;
- the reward models (LLM judge, sentence encoder), bf16, unsharded, unless ``rewards.offload``;
- CUDA context, NCCL and allocator slack (``RUNTIME_BYTES``).
The pool is ``gpu_memory_utilization`` x what is left, minus ``activation_reserve`` (a prefill of
``max_prefill_tokens`` and a decode step's fp32 logits and sampling buffers for ``max_num_seqs``
rows, which under tensor parallel count a whole group's rows); it holds the K/V heads of its GPU.
Rows fit when the pool holds their K/V at the config's longest lengths: a prompt of
``data.max_prompt_length`` shared by its ``group_size`` samples plus ``max_new_tokens`` each, in
whole blocks. A group of k GPUs decodes its k ranks' rows. The phase fits when one row does and
its peak stays within ``model.footprint.TARGET`` (90 %) of the device; else the plan names the
largest ``gpu_memory_utilization`` and the smallest larger ``tensor_parallel`` that would fit.

Model shapes come from a checkpoint's ``config.json`` (the parameters counted on the meta device,
no weights) or, for the placeholder paths of the shipped configs, from ``KNOWN_MODELS``: the
public ``config.json`` values of the MediX-R1 models and reward models.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

RUNTIME_BYTES = 3 * 2**30  # CUDA context, NCCL buffers, allocator fragmentation

_QWEN3_VL_VISION = dict(hidden_size=1152, intermediate_size=4304, num_heads=16, depth=27, patch_size=16,
                        spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304)
_QWEN3_VL_30B_A3B = dict(
    model_type="qwen3_vl_moe", tie_word_embeddings=False,
    text_config=dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                     num_experts_per_tok=8, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                     head_dim=128, vocab_size=151936, decoder_sparse_step=1),
    vision_config=dict(_QWEN3_VL_VISION, out_hidden_size=2048, deepstack_visual_indexes=[8, 16, 24]))
KNOWN_MODELS: dict[str, dict] = {  # config.json values (text and vision sizes) of the public checkpoints
    "Qwen3-VL-2B-Instruct": dict(
        model_type="qwen3_vl", tie_word_embeddings=True,
        text_config=dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                         num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
        vision_config=dict(_QWEN3_VL_VISION, hidden_size=1024, intermediate_size=4096, depth=24, out_hidden_size=2048,
                           deepstack_visual_indexes=[5, 11, 17])),
    "Qwen3-VL-8B-Instruct": dict(
        model_type="qwen3_vl", tie_word_embeddings=False,
        text_config=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=151936),
        vision_config=dict(_QWEN3_VL_VISION, out_hidden_size=4096, deepstack_visual_indexes=[8, 16, 24])),
    "Qwen2.5-VL-7B-Instruct": dict(
        model_type="qwen2_5_vl", tie_word_embeddings=False,
        text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064),
        vision_config=dict(hidden_size=1280, intermediate_size=3420, num_heads=16, depth=32, out_hidden_size=3584,
                           patch_size=14, spatial_merge_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31])),
    "Qwen3-VL-30B-A3B-Instruct": _QWEN3_VL_30B_A3B,
    "Qwen3-VL-30B-A3B-Thinking": _QWEN3_VL_30B_A3B,  # MediX-R1's 30B run; the Instruct model's shapes
    "Qwen3-4B-Instruct-2507": dict(  # MediX-R1's LLM judge
        model_type="qwen3", hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "MedEmbed-large-v0.1": dict(  # MediX-R1's sentence encoder (a BERT-large)
        model_type="bert", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        vocab_size=30522),
    "all-MiniLM-L6-v2": dict(  # the default encoder (rewards.semantic_model: null)
        model_type="bert", hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=12,
        vocab_size=30522),
}


# ----------------------------------------------------------------------------- model shapes
def load_config(name_or_path: str):
    """A transformers config: a checkpoint directory's config.json, a config.json file, or the
    ``KNOWN_MODELS`` entry whose name is the path's last component."""
    from transformers import AutoConfig

    path = Path(os.path.expanduser(str(name_or_path)))
    if path.is_dir() and (path / "config.json").is_file():
        return AutoConfig.from_pretrained(path, local_files_only=True)
    if path.is_file():
        return AutoConfig.from_pretrained(path.parent, local_files_only=True) if path.name == "config.json" else (
            AutoConfig.from_dict_file(path))
    known = KNOWN_MODELS.get(path.name)
    if known is None:
        raise ValueError(f"model {str(name_or_path)!r}: not a checkpoint directory or config.json, and not one of the "
                         f"known shapes {sorted(KNOWN_MODELS)} (give --model-config)")
    values = dict(known)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def count_parameters(config) -> int:
    """Parameters of the model a config describes, built on the meta device (no memory)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

    auto = (AutoModelForImageTextToText if getattr(config, "vision_config", None) is not None
            else AutoModelForCausalLM if config.model_type != "bert" else AutoModel)
    with torch.device("meta"):
        model = auto.from_config(config)
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- run-time budget
def activation_reserve(config, max_prefill_tokens: int, max_num_seqs: int, vocab: int) -> int:
    """Bytes kept free beside the pool for the forwards: a bf16 prefill of ``max_prefill_tokens``
    through one decoder layer at a time (``model.footprint.layer_width``: hidden states, q/k/v,
    the MLP's intermediates; a mixture of experts' routed experts, ``num_experts_per_tok`` of
    ``moe_intermediate_size`` per token, not its dense ``intermediate_size``) and a decode step's
    fp32 logits and the sampling buffers made from them."""
    from ..model.footprint import layer_width

    return max_prefill_tokens * layer_width(config) * 2 + max_num_seqs * vocab * 4 * 6


def kv_budget(free_bytes: int, utilization: float, reserve: int) -> int:
    """The pool's bytes: ``utilization`` of the free device memory, minus the activation reserve."""
    return max(0, int(utilization * free_bytes) - reserve)


def kv_bytes_per_token(text_config, dtype: torch.dtype = torch.bfloat16, tensor_parallel: int = 1) -> int:
    """K and V of one token over all layers on one GPU; with ``tensor_parallel`` k > 1 a rank holds
    max(1, kv_heads / k) of the K/V heads (replicated when k exceeds them)."""
    from .kv_cache import kv_shape

    layers, kv_heads, head_dim = kv_shape(text_config)
    return 2 * layers * -(-kv_heads // tensor_parallel) * head_dim * dtype.itemsize


def tensor_parallel_sizes(model_config, world: int) -> list[int]:
    """The ``sampling.tensor_parallel`` values the model and the world allow, by the sampler's own rule
    (``tensor_parallel.tensor_parallel_error``: heads, K/V heads, MLP and expert widths, the world)."""
    from .tensor_parallel import tensor_parallel_error as why_not

    return [k for k in range(1, world + 1) if why_not(model_config, k, world) is None]


def tensor_parallel_error(k: int, model_config, world: int) -> str | None:
    """Why the plan refuses ``sampling.tensor_parallel`` ``k`` for ``model_config`` on ``world`` GPUs, or None."""
    from .tensor_parallel import tensor_parallel_error as why_not

    sizes = tensor_parallel_sizes(model_config, world)
    if k in sizes:
        return None
    heads = model_config.get_text_config().num_attention_heads
    return (f"sampling.tensor_parallel: {k} must divide the {heads} query heads and the world of {world} GPUs "
            f"(one of {sizes}): {why_not(model_config, k, world)}")


# ----------------------------------------------------------------------------- the plan
SAMPLER_COPY = "policy bf16, the sampler's own copy (its CUDA graphs read it)"


def keep_across_steps(update_bytes: int, held_bytes: int, device_bytes: int) -> bool:
    """Whether the sampler may hold its K/V pool, its copy of the weights and its CUDA graphs
    (``held_bytes``) through the update (``update_bytes`` at its peak without them): both within
    ``footprint.TARGET`` of the device. Then its graphs are captured once per run; else it gives
    them back before each update and captures its buckets again in the next rollout (unless they
    sleep, ``vmm.py``: then the trainer does not ask)."""
    from ..model.footprint import TARGET

    return update_bytes + held_bytes <= TARGET * device_bytes


def graph_pool_bytes(config, max_num_seqs: int) -> int:
    """What the decode's CUDA graphs hold between calls, so through the update too when the pool
    and weights sleep (``vmm.py``): their shared fp32 logits (``cuda_graphs.py``) and, in their
    private pool, one step's at the largest bucket and its bf16 activations
    (``model.footprint.layer_width``); their static inputs and tables are a few MB."""
    from ..model.footprint import layer_width

    vocab = config.get_text_config().vocab_size
    return max_num_seqs * (2 * vocab * 4 + layer_width(config) * 2)


@dataclasses.dataclass
class RolloutPlan:
    model: str
    params: int
    device_bytes: int
    world: int
    strategy: str
    resident: dict[str, int]  # what else lives on each GPU during the rollout, bytes
    reserve: int
    pool_bytes: int
    kv_per_token: int  # on one GPU (its share of the K/V heads under tensor parallel)
    block_size: int
    row_tokens: int  # worst-case tokens one row holds (its share of the prompt + max_new_tokens), in blocks
    rows_per_group: int  # rows a sampling group decodes per training step (prompts_per_step / world x G x k)
    max_num_seqs: int  # rows decoded at once per sampling group
    utilization: float = 0.85  # sampling.gpu_memory_utilization
    tensor_parallel: int = 1  # sampling.tensor_parallel: GPUs per sampling group
    build: int = 0  # transient while the tensor-parallel copy is built: one whole parameter in bf16
    expert_delta: int = 0  # LoRA on experts, sampled as is: each forward's folded banks (footprint.expert_delta_bytes)
    folds: bool = False  # the build transient is an adapted expert bank's fold (LoRA on experts, tensor parallel)
    fitting_utilization: float | None = None  # the largest gpu_memory_utilization that fits (when this does not)
    # the smallest larger tensor_parallel that fits, with the largest gpu_memory_utilization it fits at
    fitting_tensor_parallel: tuple[int, float] | None = None
    fitting_gpu: int | None = None  # the smallest common GPU memory (GB, footprint.GPU_GB) it fits as it is

    @property
    def free_bytes(self) -> int:
        return self.device_bytes - sum(self.resident.values())

    @property
    def peak_bytes(self) -> int:
        """The rollout's memory on one GPU: what is resident, then the larger of the copy's build
        transient and the activation reserve with the pool (the pool is sized after the build) and
        the expert adapters' folded banks, which the engine's reserve does not hold."""
        return sum(self.resident.values()) + max(self.build, self.reserve + self.pool_bytes + self.expert_delta)

    @property
    def held_bytes(self) -> int:
        """What the sampler would hold between steps: the pool and its copy of the weights (under
        FSDP2 at tensor_parallel 1 a copy made for it, 2 bytes per parameter, weights.py)."""
        copy = sum(v for name, v in self.resident.items() if name != "CUDA runtime and slack" and (
            name == SAMPLER_COPY or "tensor-parallel copy" in name or "unsharded for sampling" in name))
        return self.pool_bytes + copy

    @property
    def pool_tokens(self) -> int:
        return self.pool_bytes // self.kv_per_token

    @property
    def rows_fit(self) -> int:
        """Rows whose K/V fits at once at the config's longest lengths."""
        return self.pool_tokens // self.row_tokens

    @property
    def fits(self) -> bool:
        """One row's K/V fits the pool, and the phase stays within ``TARGET`` of the device."""
        from ..model.footprint import TARGET

        return self.rows_fit >= 1 and self.peak_bytes <= TARGET * self.device_bytes

    def verdict(self) -> str:
        if not self.fits:
            return self.misfit()
        if self.rows_fit >= self.max_num_seqs:
            return f"fits: all {self.max_num_seqs} decode slots at the longest lengths"
        return (f"fits: {self.rows_fit} of {self.max_num_seqs} decode slots at the longest lengths "
                f"(shorter rows use more; longer ones are preempted and recomputed, never lost)")

    def remedies(self) -> list[str]:
        out = [f"GPUs of {self.fitting_gpu} GB"] if self.fitting_gpu else []
        if self.fitting_utilization is not None:
            out.append(f"sampling.gpu_memory_utilization={self.fitting_utilization:.2f} (the largest that fits)")
        if self.fitting_tensor_parallel is not None:
            k, utilization = self.fitting_tensor_parallel
            out.append(f"sampling.tensor_parallel={k}" + (f" with sampling.gpu_memory_utilization={utilization:.2f}"
                       if utilization < self.utilization else "") + " (the smallest that fits)")
        return out

    def misfit(self) -> str:
        """Why it does not fit: not one row's K/V (the biggest resident term and what would hold it),
        or a peak over ``TARGET`` of the device; the settings that would fit."""
        from ..model.footprint import TARGET

        fits = f"would fit: {'; '.join(self.remedies())}" if self.remedies() else "no setting the plan tries fits"
        if self.rows_fit >= 1:
            return (f"does NOT fit: the rollout needs {_gb(self.peak_bytes)}, over the {TARGET:.0%} planned for "
                    f"({_gb(TARGET * self.device_bytes)} of {_gb(self.device_bytes)}); {fits}")
        name, size = max(self.resident.items(), key=lambda kv: kv[1])
        row = self.row_tokens * self.kv_per_token
        need = sum(self.resident.values()) + (self.reserve + row) / self.utilization
        return (f"does NOT fit: not one row's K/V ({_gb(row)}) fits the {_gb(self.pool_bytes)} pool; the biggest "
                f"term is {name} ({_gb(size)}); one row needs ~{_gb(need)} per GPU; {fits}")

    def table(self) -> str:
        k = self.tensor_parallel
        rows = [("model", f"{self.model}: {self.params / 1e9:.2f} B parameters"),
                ("device", f"{_gb(self.device_bytes)} x {self.world} GPUs, {self.strategy}"),
                ("sampling groups", f"{self.world // k} of {k} GPU{'s' if k > 1 else ''} "
                                    f"(sampling.tensor_parallel {k})")]
        rows += [(f"resident: {name}", _gb(v)) for name, v in self.resident.items()]
        if self.build and self.folds:
            rows.append(("building the copy: one expert bank", f"{_gb(self.build)} (gathered bf16, folded with its "
                                                               f"adapters through an fp32 product, transient)"))
        elif self.build:
            rows.append(("building the copy: one parameter", f"{_gb(self.build)} (the largest, bf16, transient)"))
        if self.expert_delta:
            rows.append(("expert delta bmm(B, A) per forward", f"{_gb(self.expert_delta)} (folded banks bf16 + fp32 "
                                                               f"product, beside the reserve)"))
        rows += [("activation reserve", _gb(self.reserve)),
                 ("K/V pool", f"{_gb(self.pool_bytes)} = {self.pool_tokens:,} tokens"),
                 ("K/V per token per GPU", f"{self.kv_per_token / 1024:.1f} KiB (bf16), blocks of {self.block_size}"),
                 ("one row at most", f"{self.row_tokens:,} tokens = {_gb(self.row_tokens * self.kv_per_token)}"),
                 ("rows per group per step", f"{self.rows_per_group:,}"),
                 ("rows that fit at once", f"{self.rows_fit:,} per group (max_num_seqs {self.max_num_seqs})"),
                 ("rollout peak", f"{_gb(self.peak_bytes)} of {_gb(self.device_bytes)}"),
                 ("verdict", self.verdict())]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {v}" for name, v in rows)


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB"


def rollout_plan(cfg, model_config, device_bytes: int, world: int = 8, counts=None,
                 reward_params: dict[str, int] | None = None, name: str | None = None, lora=None) -> RolloutPlan:
    """The rollout's memory on one GPU for training config ``cfg`` (medix_fast.config.Config)
    and model ``model_config`` (``counts`` / ``lora``: its ``model.footprint.ParameterCounts`` and
    ``LoraCounts``, counted here when None; ``reward_params``: the reward models' parameter counts,
    resident in bf16 unless ``rewards.offload``; ``name``: how to call the model, default
    model.path's last component).
    When it does not fit: the smallest common GPU, the largest ``gpu_memory_utilization`` (by 0.01,
    at most the config's) and the smallest larger ``tensor_parallel`` (with such a utilization)
    with which it would."""
    from ..model.footprint import GPU_GB, lora_counts, parameter_counts

    counts = counts or parameter_counts(model_config)
    lora = lora or lora_counts(cfg.model.lora, model_config)
    plan = rollout_at(cfg, model_config, device_bytes, world, counts, reward_params, name,
                      cfg.sampling.gpu_memory_utilization, cfg.sampling.tensor_parallel, lora)
    if plan.fits:
        return plan
    plan.fitting_gpu = next((gb for gb in GPU_GB if rollout_at(
        cfg, model_config, int(gb * 1e9), world, counts, reward_params, name, plan.utilization, plan.tensor_parallel,
        lora).fits), None)
    plan.fitting_utilization = fitting_utilization(cfg, model_config, device_bytes, world, counts, reward_params,
                                                   plan.tensor_parallel, lora)
    for k in (k for k in tensor_parallel_sizes(model_config, world) if k > plan.tensor_parallel):
        utilization = fitting_utilization(cfg, model_config, device_bytes, world, counts, reward_params, k, lora)
        if utilization is not None:
            plan.fitting_tensor_parallel = (k, utilization)
            break
    return plan


def fitting_utilization(cfg, model_config, device_bytes: int, world: int, counts, reward_params, k: int, lora):
    """The largest ``gpu_memory_utilization`` by 0.01, at most the config's, with which the rollout
    fits at ``tensor_parallel`` ``k``; None if none does."""
    top = round(100 * cfg.sampling.gpu_memory_utilization)
    return next((percent / 100 for percent in range(top, 0, -1) if rollout_at(
        cfg, model_config, device_bytes, world, counts, reward_params, None, percent / 100, k, lora).fits), None)


def rollout_at(cfg, model_config, device_bytes: int, world: int, counts, reward_params: dict[str, int] | None,
               name: str | None, utilization: float, k: int, lora=None) -> RolloutPlan:
    """The rollout plan (:func:`rollout_plan`) at ``gpu_memory_utilization`` ``utilization`` and
    ``tensor_parallel`` ``k`` (``lora``: the adapters' ``model.footprint.LoraCounts``, None without)."""
    from ..model.footprint import expert_delta_bytes, state_bytes

    s, o = cfg.sampling, cfg.optim
    text = model_config.get_text_config()
    params = counts.total
    fsdp = cfg.distributed.strategy == "fsdp"
    shards = world if fsdp else 1
    state = state_bytes(o.offload, o.state_dtype)
    resident = {f"policy {state.name(key, o.state_dtype, fsdp)}": b * params // shards
                for key, b in state.device.items() if key != "grads" or not fsdp}  # FSDP frees its gradients
    if lora:  # the frozen bf16 base (the KL reference with its adapters off), sharded as the adapters' state
        base = "frozen base bf16" + (" shards" if fsdp else " (sampled as is)" if k == 1 else "")
        resident = {base: 2 * params // shards}
        resident |= {f"adapters' {state.name(key, o.state_dtype, fsdp)}": b * lora.total // shards
                     for key, b in state.device.items() if key != "grads" or not fsdp}
        if k > 1:  # base-shaped shares with the adapters merged in: the decode adds no low-rank term
            resident[f"frozen base bf16, tensor-parallel copy (1/{k} of the layers, adapters merged)"] = \
                2 * counts.per_rank(k, text.num_key_value_heads)
        elif fsdp:  # FSDP2's unsharded parameters, the adapters' too (in bf16)
            resident["policy bf16, unsharded for sampling (base and adapters)"] = 2 * (params + lora.total)
    elif k > 1:  # the tensor-parallel copy is the sampler's own: its graphs read it
        resident[f"policy bf16, tensor-parallel copy (1/{k} of the layers)"] = 2 * counts.per_rank(
            k, text.num_key_value_heads)
    else:
        # what the CUDA graphs read (weights.py): FSDP2's unsharded parameters, else the sampler's copy
        resident["policy bf16, unsharded for sampling" if fsdp else SAMPLER_COPY] = 2 * params
    if cfg.algorithm.beta > 0 and not lora:
        resident["reference bf16" + (" shards" if fsdp else "")] = 2 * params // shards
    for what, count in ({} if cfg.rewards.offload else reward_params or {}).items():
        resident[f"{what} bf16"] = 2 * count
    resident["CUDA runtime and slack"] = RUNTIME_BYTES
    vocab = text.vocab_size
    reserve = activation_reserve(model_config, s.max_prefill_tokens, s.max_num_seqs, vocab)
    free = device_bytes - sum(resident.values())
    block = s.block_size or 16
    blocks = lambda n: -(-n // block)  # noqa: E731
    row_tokens = block * (blocks(-(-cfg.data.max_prompt_length // s.group_size)) + blocks(s.max_new_tokens))
    rows_per_gpu = -(-max(cfg.train.prompts_per_step, cfg.algorithm.chunk_prompts) // world) * s.group_size
    build = 0
    if k > 1:  # one parameter gathered whole in bf16; an adapted expert bank is also folded through its fp32 product
        build = max(2 * counts.largest, 10 * max(lora.banks, default=0) if lora else 0)
    return RolloutPlan(model=name or Path(str(cfg.model.path)).name, params=params, device_bytes=device_bytes,
                       world=world, strategy=cfg.distributed.strategy, resident=resident, reserve=reserve,
                       pool_bytes=kv_budget(free, utilization, reserve),
                       kv_per_token=kv_bytes_per_token(text, tensor_parallel=k), block_size=block,
                       row_tokens=row_tokens, rows_per_group=k * rows_per_gpu, max_num_seqs=s.max_num_seqs,
                       utilization=utilization, tensor_parallel=k, build=build,
                       expert_delta=expert_delta_bytes(lora) if k == 1 else 0, folds=build > 2 * counts.largest)


def reward_model_params(cfg) -> dict[str, int]:
    """Parameter counts of the reward models resident on the GPU during the rollout: the judge
    (when accuracy is weighted and a judge is set) and the encoder (when semantic is weighted;
    null is the default all-MiniLM-L6-v2); under ``rewards.offload`` they live on the host between calls."""
    r, out = cfg.rewards, {}
    if r.judge_model and r.active("accuracy"):
        out[f"judge {Path(str(r.judge_model)).name}"] = count_parameters(load_config(r.judge_model))
    if r.active("semantic"):
        encoder = r.semantic_model or "all-MiniLM-L6-v2"
        out[f"encoder {Path(str(encoder)).name}"] = count_parameters(load_config(encoder))
    return out
