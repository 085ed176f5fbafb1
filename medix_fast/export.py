"""``python -m medix_fast.export``: a Hugging Face model directory from any training checkpoint.

    python -m medix_fast.export --checkpoint runs/8b/checkpoints/step_00000120 --out runs/8b/hf_120
    python -m medix_fast.export --checkpoint ... --out ... --dtype bfloat16    # half the size

One CPU process, whatever world size and strategy wrote the checkpoint: the model is built on
the meta device from the checkpoint's ``hf_config/``, given (uninitialised) CPU storage, and
torch.distributed.checkpoint reads the model's tensors from ``state/`` into it, assembling the
shards (the optimizer state is not read). The directory is written next to ``--out`` and
renamed into place when complete; the tokenizer and a VL model's image processor go with it.
Peak host memory: the model once, at ``--dtype`` (float32: 4 bytes per parameter).

The trainer writes the same directory itself (:func:`save_hf_model`) at the end of the run and
every ``checkpoint.save_hf_every`` steps, as ``checkpoints/step_N/model/``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch

from . import checkpoint as C
from .errors import UserError
from .model.moe import save_pretrained


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
    write_hf_files(directory, model, tokenizer, image_processor)
    save_pretrained(model, directory, state_dict)


def _model_class(config):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from .model.loading import VL_MODEL_TYPES

    return AutoModelForImageTextToText if config.model_type in VL_MODEL_TYPES else AutoModelForCausalLM


def load_checkpoint_model(checkpoint: str | Path, dtype: torch.dtype = torch.float32):
    """The model of a training checkpoint, on the CPU at ``dtype``, in one process."""
    from transformers import AutoConfig

    path = C.check_checkpoint(checkpoint)
    if not (path / C.HF_CONFIG / "config.json").is_file():
        raise C.CheckpointError(f"{path}: incomplete checkpoint: no {C.HF_CONFIG}/config.json")
    config = AutoConfig.from_pretrained(path / C.HF_CONFIG, local_files_only=True)
    with torch.device("meta"):
        model = _model_class(config).from_config(config, dtype=dtype)
    model.to_empty(device="cpu")
    state = model.state_dict()
    C.check_model(path, {k: tuple(v.shape) for k, v in state.items()})
    C.load_state(path, {"model": state}, no_dist=True)  # tied weights share one tensor since to_empty
    return model.eval()


def export(checkpoint: str | Path, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write the Hugging Face model directory of ``checkpoint`` to ``out`` (atomically); returns ``out``."""
    out = Path(out)
    model = load_checkpoint_model(checkpoint, dtype)
    tmp = out.with_name(f".tmp_{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(Path(checkpoint) / C.HF_CONFIG, tmp)  # tokenizer, processor
    save_pretrained(model, tmp)  # an MoE's experts in their Hub layout
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m medix_fast.export", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a training checkpoint (.../checkpoints/step_N)")
    p.add_argument("--out", required=True, help="the Hugging Face model directory to write")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, getattr(torch, args.dtype))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
