"""``python -m medix_fast.export``: a Hugging Face model directory from any training checkpoint.

    python -m medix_fast.export --checkpoint runs/8b/checkpoints/step_00000120 --out runs/8b/hf_120
    python -m medix_fast.export --checkpoint ... --out ... --dtype bfloat16    # half the size
    python -m medix_fast.export --checkpoint <a LoRA run's> --out adapter/     # PEFT adapter files
    python -m medix_fast.export --checkpoint <a LoRA run's> --out hf/ --merge  # adapters folded in

One CPU process, whatever world size and strategy wrote the checkpoint: the model is built on
the meta device from the checkpoint's ``hf_config/``, given (uninitialised) CPU storage, and
torch.distributed.checkpoint reads the model's tensors from ``state/`` into it, assembling the
shards (the optimizer state is not read). The directory is written next to ``--out`` and
renamed into place when complete; the tokenizer and a VL model's image processor go with it.
Peak host memory: the model once, at ``--dtype`` (float32: 4 bytes per parameter).

A LoRA run's checkpoint (``model.lora``, docs/lora.md) holds the adapters only, with its base's
path and hash: the base is loaded from that path (refused if its hash differs), the adapters
added and read, and ``--out`` gets PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``
(float32; ``peft.PeftModel.from_pretrained(base, out)``), or with ``--merge`` the Hugging Face
model with the adapters folded into the base (``W + alpha / r * B A``, at ``--dtype``).

``--out`` is never deleted unless an export wrote it: each export lists the files it wrote in
``.medix_fast_export.json``, and a previous export holding nothing else is replaced; any other
non-empty ``--out`` (a run directory, a folder with notes) is refused, or with ``--overwrite``
moved aside to ``<out>.old-<N>``, as ``train --overwrite`` does.

The trainer writes the same directory itself (:func:`save_hf_model`) at the end of the run and
every ``checkpoint.save_hf_every`` steps, as ``checkpoints/step_N/model/``. torch and the
checkpoint code are imported by the functions that use them, so that ``--help`` and a bad line
answer at once.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from . import preflight
from .errors import UserError

if TYPE_CHECKING:  # annotations only: torch is imported by the functions that run
    import torch

MARKER = ".medix_fast_export.json"  # the files an export wrote (relative paths)


def write_hf_files(directory: Path, model, tokenizer, image_processor=None) -> None:
    """Everything of a Hugging Face model directory but the weights: config, generation config,
    tokenizer (with its chat template) and, for a VL model, the image processor."""
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if image_processor is not None:
        image_processor.save_pretrained(directory)


def save_hf_model(directory: Path, model, state_dict: dict | None, tokenizer, image_processor=None) -> None:
    """``model`` as a ``from_pretrained``-able directory (``state_dict``: its full weights, when the
    live ones are sharded), with :func:`write_hf_files`; an MoE's experts in their Hub layout."""
    from .model.moe import save_pretrained

    write_hf_files(directory, model, tokenizer, image_processor)
    save_pretrained(model, directory, state_dict)


def _model_class(config):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from .model.loading import VL_MODEL_TYPES

    return AutoModelForImageTextToText if config.model_type in VL_MODEL_TYPES else AutoModelForCausalLM


def lora_record(checkpoint: Path) -> dict | None:
    """A LoRA run's ``{"base": {"path", "hash"}, "config": model.lora}``, else None."""
    from . import checkpoint as C

    return C.load_trainer_state(checkpoint).get("lora")


def load_lora_model(checkpoint: Path, record: dict, dtype: torch.dtype):
    """A LoRA checkpoint's base (from its recorded path, hash checked) with its adapters read."""
    from . import checkpoint as C
    from .config import LoraConfig
    from .model.loading import load_model
    from .model.lora import add_adapters, adapter_state_dict
    from .model.peft_files import base_identity

    base = record["base"]
    if not Path(base["path"]).is_dir() or base_identity(base["path"])["hash"] != base["hash"]:
        raise C.CheckpointError(f"{checkpoint}: its adapters were trained on the base at {base['path']} (hash "
                                f"{base['hash']}), which is {'changed' if Path(base['path']).is_dir() else 'gone'}")
    model, _ = load_model(base["path"], dtype=dtype)
    add_adapters(model, LoraConfig(**record["config"]))
    state = adapter_state_dict(model)
    C.check_model(checkpoint, {k: tuple(v.shape) for k, v in state.items()})
    C.load_state(checkpoint, {"model": state}, no_dist=True)
    return model.eval()


def load_checkpoint_model(checkpoint: str | Path, dtype: torch.dtype | None = None):
    """The model of a training checkpoint, on the CPU at ``dtype`` (None: float32), in one process
    (a LoRA run's: its base at ``dtype`` with its float32 adapters)."""
    import torch
    from transformers import AutoConfig

    from . import checkpoint as C

    path = C.check_checkpoint(checkpoint)
    record = lora_record(path)
    if record:
        return load_lora_model(path, record, dtype or torch.float32)
    if not (path / C.HF_CONFIG / "config.json").is_file():
        raise C.CheckpointError(f"{path}: incomplete checkpoint: no {C.HF_CONFIG}/config.json")
    config = AutoConfig.from_pretrained(path / C.HF_CONFIG, local_files_only=True)
    with torch.device("meta"):
        model = _model_class(config).from_config(config, dtype=dtype or torch.float32)
    model.to_empty(device="cpu")
    state = model.state_dict()
    C.check_model(path, {k: tuple(v.shape) for k, v in state.items()})
    C.load_state(path, {"model": state}, no_dist=True)  # tied weights share one tensor since to_empty
    return model.eval()


def _written_by_export(out: Path) -> bool:
    """True when ``out`` holds only the files an earlier export listed in its marker."""
    try:
        listed = set(json.loads((out / MARKER).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return {str(f.relative_to(out)) for f in out.rglob("*") if f.is_file()} <= listed | {MARKER}


def claim_export_dir(out: Path, overwrite: bool) -> Path | None:
    """Check that ``out`` may receive an export: absent, empty, or a previous export (replaced);
    else a :class:`UserError`, or with ``overwrite`` moved aside (returns where it went)."""
    if not out.exists() or (out.is_dir() and (not any(out.iterdir()) or _written_by_export(out))):
        return None
    if overwrite:
        from .run_dir import move_aside

        return move_aside(out)
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    shown = f" ({', '.join(held[:5])}{f' and {len(held) - 5} more' if len(held) > 5 else ''})" if held else ""
    raise UserError(f"--out {out} {'holds files that are not a previous export' if out.is_dir() else 'is a file'}"
                    f"{shown}: add --overwrite to move it aside to {out.name}.old-N, or give another --out")


def export(checkpoint: str | Path, out: str | Path, dtype: torch.dtype | None = None,
           overwrite: bool = False, merge: bool = False) -> Path:
    """Write the Hugging Face model directory of ``checkpoint`` to ``out`` (atomically, at ``dtype``,
    None: float32); returns ``out``. A LoRA run's checkpoint gives its PEFT adapter files, or with
    ``merge`` the model with the adapters folded in. Nothing is deleted but an earlier export's
    files (see the module docstring)."""
    from . import checkpoint as C
    from .config import LoraConfig
    from .model.lora import merged_state_dict
    from .model.moe import save_pretrained
    from .model.peft_files import write_adapter

    out = Path(out)
    record = lora_record(C.check_checkpoint(checkpoint))
    if merge and not record:
        raise UserError(f"--merge: {checkpoint} holds a whole model, no adapters to merge (leave --merge out)")
    if not overwrite:
        claim_export_dir(out, False)  # refused before the model is read
    model = load_checkpoint_model(checkpoint, dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp_{out.name}.", dir=out.parent))  # this export's own
    try:
        if record and not merge:
            write_adapter(model, LoraConfig(**record["config"]), record["base"]["path"], tmp)
        else:
            shutil.copytree(Path(checkpoint) / C.HF_CONFIG, tmp, dirs_exist_ok=True)  # tokenizer, processor
            save_pretrained(model, tmp, merged_state_dict(model) if record else None)  # MoE experts: Hub layout
        files = sorted(str(f.relative_to(tmp)) for f in tmp.rglob("*") if f.is_file())
        (tmp / MARKER).write_text(json.dumps({"checkpoint": str(checkpoint), "files": files}))
        aside = claim_export_dir(out, overwrite)  # checked again: something may have appeared meanwhile
        if aside:
            print(f"--overwrite: {out} was moved to {aside}", file=sys.stderr)
        previous = out.with_name(f"{tmp.name}.previous") if out.exists() else None
        if previous:
            os.replace(out, previous)  # an earlier export (or an empty directory): replaced
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if previous:
        shutil.rmtree(previous)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m medix_fast.export", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a training checkpoint (.../checkpoints/step_N)")
    p.add_argument("--out", required=True, help="the Hugging Face model directory to write")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--overwrite", action="store_true",
                   help="move a non-empty --out that is not a previous export aside to <out>.old-N")
    p.add_argument("--merge", action="store_true",
                   help="a LoRA run's checkpoint: the Hugging Face model with the adapters folded in "
                        "(default: its PEFT adapter files)")
    args = p.parse_args(argv)  # --help and a bad line are answered here, before torch is imported
    try:
        preflight.check_export(args)  # every path, before torch is imported
        import torch

        out = export(args.checkpoint, args.out, getattr(torch, args.dtype), args.overwrite, args.merge)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
