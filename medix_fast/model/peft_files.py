"""PEFT adapter directories in and out, and the identity of a LoRA run's frozen base.

    write_adapter(model, lora, base_path, "out/")   # adapter_config.json + adapter_model.safetensors
    read_adapter(model, "peft_dir/")                # a PEFT LoRA adapter into model's adapters
    base_identity(base_path)                        # {"path": ..., "hash": ...}, kept in checkpoints

The files are what ``peft.PeftModel.from_pretrained(base, directory)`` loads (peft is not needed
to write or read them): tensor names ``base_model.model.<module>.lora_A.weight`` (r, in) and
``lora_B.weight`` (out, r); ``target_modules`` lists the adapted modules' full names, so PEFT
adapts exactly them (a VL model's vision tower only when ``model.lora.vision``). Expert adapters
are PEFT's ``target_parameters`` (``mlp.experts.gate_up_proj``, then ``mlp.experts.down_proj``,
which PEFT nests: gate_up's tensors under ``experts.base_layer.``, down's under ``experts.``), in
its layout: A (E * r, in) expert-major, B (out, r * E) rank-major.

The base's hash reads the config and a sample of each weight file (all of a file under 1 MiB;
else 1 MiB at every 256 MiB and the last MiB, with the file's size), so it takes well under a
second at 8B and tells apart any two bases that differ in their weights as fine-tuning leaves
them (almost every value); it is no checksum of every byte.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from ..config import LoraConfig
from ..errors import UserError
from .lora import EXPERT_BANKS, LoraExperts, LoraLinear

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
EXPERT_KEYS = {"gate_up_proj": "base_layer.", "down_proj": ""}  # PEFT's nesting of the two parameters
CHUNK, STRIDE = 2**20, 2**28


def base_identity(path: str | Path) -> dict[str, str]:
    """``{"path", "hash"}`` of a base checkpoint directory (see the module docstring)."""
    path = Path(path)
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for file in sorted(path.glob("*.safetensors")):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with file.open("rb") as f:
            for offset in [*range(0, size, STRIDE), max(size - CHUNK, 0)]:
                f.seek(offset)
                digest.update(f.read(CHUNK))
    return {"path": str(path), "hash": digest.hexdigest()[:16]}


def peft_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s adapters under PEFT's names and layouts (fp32, contiguous, on the CPU)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            out[f"{PREFIX}{name}.lora_A.weight"] = module.lora_A.weight
            out[f"{PREFIX}{name}.lora_B.weight"] = module.lora_B.weight
        elif isinstance(module, LoraExperts):
            for bank in EXPERT_BANKS:
                a, b = module.lora_A[bank], module.lora_B[bank]  # (E, r, in), (E, out, r)
                key = f"{PREFIX}{name}.{EXPERT_KEYS[bank]}"
                out[key + "lora_A.weight"] = a.reshape(-1, a.shape[-1])  # (E * r, in)
                out[key + "lora_B.weight"] = b.permute(1, 2, 0).reshape(b.shape[1], -1)  # (out, r * E)
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}


def write_adapter(model: nn.Module, lora: LoraConfig, base_path: str, directory: str | Path) -> None:
    """``directory``/adapter_config.json + adapter_model.safetensors of ``model``'s adapters."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    linear = [n for n, m in model.named_modules() if isinstance(m, LoraLinear)]
    experts = any(isinstance(m, LoraExperts) for m in model.modules())
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_path),
              "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "bias": "none",
              "target_modules": linear,
              "target_parameters": [f"mlp.experts.{b}" for b in EXPERT_BANKS] if experts else None,
              "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
              "inference_mode": True}
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    save_file(peft_tensors(model), str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})


@torch.no_grad()
def read_adapter(model: nn.Module, lora: LoraConfig, directory: str | Path) -> None:
    """Copy a PEFT LoRA adapter directory into ``model``'s adapters (made by ``add_adapters`` with
    ``lora``): its rank and alpha must be ``lora``'s and its tensors exactly ``model``'s adapters."""
    from safetensors.torch import load_file

    directory = Path(directory)
    where = f"model.lora.init_from: {directory}"
    try:
        config = json.loads((directory / ADAPTER_CONFIG).read_text())
        saved = load_file(str(directory / ADAPTER_WEIGHTS))
    except (OSError, ValueError) as err:
        raise UserError(f"{where}: not a PEFT adapter directory ({err})") from None
    if config.get("peft_type") != "LORA" or config.get("r") != lora.rank or config.get("lora_alpha") != lora.alpha:
        raise UserError(f"{where}: a {config.get('peft_type')} adapter of r={config.get('r')}, "
                        f"lora_alpha={config.get('lora_alpha')}; model.lora has rank={lora.rank}, alpha={lora.alpha}")
    saved = {k.replace(".default.", "."): v for k, v in saved.items()}  # some writers keep the adapter name
    mine = peft_tensors(model)
    if set(saved) != set(mine):
        missing, extra = sorted(set(mine) - set(saved)), sorted(set(saved) - set(mine))
        raise UserError(f"{where}: its tensors are not this model's adapters (model.lora.target_modules / "
                        f"experts / vision); missing {missing[:3]}, unexpected {extra[:3]}")
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            module.lora_A.weight.copy_(saved[f"{PREFIX}{name}.lora_A.weight"])
            module.lora_B.weight.copy_(saved[f"{PREFIX}{name}.lora_B.weight"])
        elif isinstance(module, LoraExperts):
            for bank in EXPERT_BANKS:
                a, b = module.lora_A[bank], module.lora_B[bank]  # (E, r, in), (E, out, r)
                key = f"{PREFIX}{name}.{EXPERT_KEYS[bank]}"
                a.copy_(saved[key + "lora_A.weight"].view(a.shape))
                b.copy_(saved[key + "lora_B.weight"].view(b.shape[1], b.shape[2], b.shape[0]).permute(2, 0, 1))
