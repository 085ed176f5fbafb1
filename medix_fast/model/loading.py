"""Load a local Hugging Face decoder checkpoint and expose what the trainer needs.

    model, tokenizer = load_model("/path/to/Qwen2.5-0.5B-Instruct", dtype=torch.bfloat16, device="cuda")

The forward pieces (hidden states, LM head, positions) are in ``forward.py``; log-probs go through
``medix_fast.kernels.fused_linear_logprobs(h, weight, ...)``, so no full (B, T, V) logits tensor is
built in training. Paths are checkpoint directories: the embedded tiny models' names (``"tiny"``,
...) are resolved above this layer, by ``medix_fast.demo.cache.resolve_model_path``, which the
commands call on a config's ``model.path`` (``load_model(resolve_model_path("tiny"))``).

Choices made once, here: the attention back-end is ``flash_attention_2`` when ``flash_attn``
imports and the device is CUDA, else PyTorch ``sdpa`` (pass ``attn_impl`` to force one, e.g.
"eager"); a mixture-of-experts model (``qwen3_moe``, ``qwen3_vl_moe``) runs its experts with the
implementation ``moe.experts_implementation`` picks (grouped GEMM where it runs; pass
``experts_implementation`` to force one); Liger's RMSNorm / SwiGLU / RoPE kernels are patched in
on CUDA when ``liger_kernel`` imports and has the architecture (never its cross-entropy losses:
the trainer has its own fused head). Liger patches the architecture's module functions
process-wide, which is why it is CUDA only.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer,
                          PreTrainedModel, PreTrainedTokenizerBase)
from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

from ..errors import UserError
from .moe import experts_implementation as choose_experts, is_moe

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama", "qwen3_moe", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
VL_MODEL_TYPES = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")  # image-text-to-text; pixel inputs through hidden_states
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def checkpoint_dir(path: str | os.PathLike) -> pathlib.Path:
    """``path`` as an existing Hugging Face checkpoint directory (with its ``config.json``), or a
    UserError saying what it is not."""
    resolved = pathlib.Path(path).expanduser()
    if not resolved.is_dir():
        raise UserError(f"model path {str(path)!r} does not exist or is not a directory "
                         "(give a local Hugging Face checkpoint directory, or 'tiny')")
    if not (resolved / "config.json").is_file():
        raise UserError(f"model path {str(resolved)!r} has no config.json: not a Hugging Face checkpoint")
    return resolved


def attention_backend(device: str | torch.device) -> str:
    """``flash_attention_2`` on CUDA when ``flash_attn`` imports, else ``sdpa``."""
    if torch.device(device).type == "cuda":
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def apply_liger(model: PreTrainedModel) -> bool:
    """Patch Liger's RMSNorm, SwiGLU (dense MLPs only) and RoPE into ``model`` (no loss patches);
    False if not installed or without this architecture."""
    try:
        import liger_kernel.transformers as liger
    except ImportError:
        return False
    patch = getattr(liger, f"apply_liger_kernel_to_{model.config.model_type}", None)
    if patch is None:  # an older liger without this architecture
        return False
    # an MoE's experts are fused (E, ...) banks run by the experts implementation, not SwiGLU modules
    patch(rope=True, rms_norm=True, swiglu=not is_moe(model.config), cross_entropy=False,
          fused_linear_cross_entropy=False, model=model)
    return True


def load_tokenizer(path: pathlib.Path) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer with its chat template (a VL checkpoint may keep it in the
    processor's ``chat_template.json``); pad falls back to eos when unset."""
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"no tokenizer in {str(path)!r}: expected one of {', '.join(TOKENIZER_FILES)}")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not tokenizer.chat_template and (path / "chat_template.json").is_file():
        tokenizer.chat_template = json.loads((path / "chat_template.json").read_text())["chat_template"]
    if not tokenizer.chat_template:
        raise UserError(f"the tokenizer in {str(path)!r} has no chat template (the MediX prompt needs one)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_impl: str | None = None,
    gradient_checkpointing: bool = False,
    liger: bool | None = None,
    experts_implementation: str = "auto",
    compute_dtype: torch.dtype | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a supported causal LM and its tokenizer from a local checkpoint directory.

    ``attn_impl`` None picks :func:`attention_backend`; ``liger`` None means "on CUDA when
    installed". A mixture-of-experts model's experts run with ``experts_implementation``
    (``"auto"``: :func:`medix_fast.model.moe.experts_implementation` for weights computed in
    ``compute_dtype``, default ``dtype``; FSDP2 computes fp32 master weights in bf16).
    Returns the model on ``device`` in eval mode (the trainer calls ``.train()``).
    """
    path = checkpoint_dir(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"model_type {config.model_type!r} in {str(path)!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    tokenizer = load_tokenizer(path)
    attn_impl = attn_impl or attention_backend(device)
    auto = AutoModelForImageTextToText if config.model_type in VL_MODEL_TYPES else AutoModelForCausalLM
    experts = {}
    if is_moe(config):
        experts["experts_implementation"] = choose_experts(config, device, compute_dtype or dtype,
                                                           experts_implementation)
    model = auto.from_pretrained(path, dtype=dtype, attn_implementation=attn_impl, local_files_only=True, **experts)
    use_liger = torch.device(device).type == "cuda" if liger is None else liger
    patched = use_liger and apply_liger(model)
    if gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
        model.config.use_cache = False
    log.info("loaded %s (%s, %s) attention=%s liger=%s%s", path, config.model_type, dtype, attn_impl, patched,
             "".join(f" experts={v}" for v in experts.values()))
    return model.to(device), tokenizer


def is_vl(model: PreTrainedModel) -> bool:
    return model.config.model_type in VL_MODEL_TYPES


def load_image_processor(path: str | os.PathLike):
    """The VL checkpoint's image processor, PIL/numpy back-end (works without torchvision). Both
    supported VL families (Qwen2.5-VL, Qwen3-VL) use the Qwen2-VL image processor, named here
    directly: ``AutoImageProcessor`` needs torchvision before transformers 5.18, even for ``backend="pil"``."""
    path = checkpoint_dir(path)
    if not (path / "preprocessor_config.json").is_file():
        raise UserError(f"no image processor in {str(path)!r}: expected preprocessor_config.json")
    return Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True)


def set_vision_trainable(model: PreTrainedModel, trainable: bool) -> None:
    """Train or freeze a VL model's vision tower (patch embedding, blocks and merger); MediX trains it."""
    if not is_vl(model):
        raise UserError(f"{model.config.model_type!r} is not a vision-language model: it has no vision tower")
    model.model.visual.requires_grad_(trainable)


def image_token_id(model: PreTrainedModel) -> int:
    """The id of the ``<|image_pad|>`` placeholder of a VL model."""
    return model.config.image_token_id


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype a config's ``"auto"`` / dtype name means on ``device``: bf16 on CUDA, fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def stop_ids(model, tokenizer=None) -> list[int]:
    """End-of-sequence ids: the tokenizer's (when given) and the model's generation config's, else
    its config's. The one rule for the trainer, eval and the sampler's default."""
    generation = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if generation is None:
        generation = getattr(getattr(model, "config", None), "eos_token_id", None)
    ids = set()
    for source in (getattr(tokenizer, "eos_token_id", None), generation):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return sorted(ids)
