"""The two ways to sample with LoRA adapters at the shipped shapes, on paper (docs/lora.md, Sampling with adapters).

    python -m medix_fast.generate.lora_traffic            # rank 16, adapters on every decoder linear
    python -m medix_fast.generate.lora_traffic --rank 64  # (and the expert banks of a mixture of experts)

Per decode step of ``rows`` rows (``decode_traffic.step_traffic``'s bytes at its typical lengths,
H100 bandwidth), what each way adds, and what merging costs per ``generate`` call:
- **low-rank add** (``sampling.lora_merge: false``), the static decoder on CUDA (A and B in the
  engine's bf16 copies): per adapted linear of ``in`` -> ``out``, the factors (2 r (in + out) bytes)
  and the activations: A reads x, A x written and read, B writes (rows, out), the scaling reads and
  writes it, the add reads y and it and writes y: rows (2 in + 4 r + 12 out) bytes, 4 launches.
  An expert bank (E, out, in) forms ``bank + s bmm(B, A)`` in every forward: the fp32 product
  written (4 bytes per parameter), scaled in place (8), the bank added (4 + 2 read, 4 written),
  cast to bf16 (4 read, 2 written): 28 bytes per expert parameter and step, 4 launches per bank;
- **merged** (``true``): nothing per step (the decode reads the buffer in place of the base); per
  call the same 28 bytes and 4 launches per adapted parameter and weight, once; the buffers hold 2
  bytes per adapted parameter (bf16) for the rollout.
Hidden-state activations of the base are left out, as in ``decode_traffic.py``.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from .decode_shapes import DecodeShape, shipped
from .decode_traffic import BANDWIDTH, ROWS, TYPICAL, step_traffic

FOLD_BYTES = 28  # per adapted parameter: fp32 B @ A written, scaled, added to the bf16 base, cast to bf16


@dataclass(frozen=True)
class Adapted:
    """The adapted weights of one model: its linears (in, out) and expert banks (E, in, out), all layers."""
    linears: list[tuple[int, int]]
    banks: list[tuple[int, int, int]]

    @property
    def parameters(self) -> int:
        return sum(i * o for i, o in self.linears) + sum(e * i * o for e, i, o in self.banks)


def adapted(model: str) -> Adapted:
    """Every decoder linear (q, k, v, o; gate, up, down of a dense MLP) and a MoE's expert banks."""
    from .memory import load_config

    text = load_config(model).get_text_config()
    h, heads, kv = text.hidden_size, text.num_attention_heads, text.num_key_value_heads
    dim = getattr(text, "head_dim", None) or h // heads
    layer = [(h, heads * dim), (h, kv * dim), (h, kv * dim), (heads * dim, h)]
    banks = []
    experts = getattr(text, "num_experts", None)
    if experts:
        width = text.moe_intermediate_size
        banks = [(experts, h, 2 * width), (experts, width, h)] * text.num_hidden_layers
    else:
        layer += [(h, text.intermediate_size)] * 2 + [(text.intermediate_size, h)]
    return Adapted(layer * text.num_hidden_layers, banks)


@dataclass(frozen=True)
class Cost:
    shape: DecodeShape
    rows: int
    base: int  # bytes of the step without adapters
    add_bytes: int  # the low-rank add's extra bytes per step
    add_launches: int
    merge_bytes: int  # merged: per call
    merge_launches: int
    buffers: int  # merged: the engine buffers' bytes


def cost(shape: DecodeShape, model: Adapted, rows: int, rank: int) -> Cost:
    linear = sum(2 * rank * (i + o) + rows * (2 * i + 4 * rank + 12 * o) for i, o in model.linears)
    banks = sum(FOLD_BYTES * e * i * o + 4 * e * rank * (i + o) for e, i, o in model.banks)
    weights = len(model.linears) + len(model.banks)
    return Cost(shape, rows, step_traffic(shape, rows, *TYPICAL).total, linear + banks, 4 * weights,
                FOLD_BYTES * model.parameters, 4 * weights, 2 * model.parameters)


def table(rank: int) -> str:
    bw = BANDWIDTH["H100"]
    lines = [f"LoRA rank {rank} on every decoder linear (and expert bank), one decode step at {TYPICAL[0]} prompt + "
             f"{TYPICAL[1]} completion tokens, H100 {bw / 1e12:.2f} TB/s",
             f"{'config':<24}{'adapted':>9}{'rows':>5}{'step ms':>8}{'add +GB':>8}{'add +ms':>8}{'add +%':>7}"
             f"{'launches':>9}{'merge ms':>9}{'buffers GB':>11}"]
    for shape in shipped():
        model = adapted(shape.model)
        for rows in ROWS:
            c = cost(shape, model, rows, rank)
            lines.append(f"{shape.name:<24}{model.parameters / 1e9:>8.2f}B{rows:>5}{c.base / bw * 1e3:>8.2f}"
                         f"{c.add_bytes / 1e9:>8.2f}{c.add_bytes / bw * 1e3:>8.2f}{c.add_bytes / c.base:>7.0%}"
                         f"{c.add_launches:>9}{c.merge_bytes / bw * 1e3:>9.1f}{c.buffers / 1e9:>11.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=16)
    print(table(parser.parse_args().rank))
