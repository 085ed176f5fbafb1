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
    """The adapted weights of one model: its linears (in, out) and expert banks (E, out, in), all layers."""
    linears: list[tuple[int, int]]
    banks: list[tuple[int, int, int]]

    @property
    def parameters(self) -> int:
        return sum(i * o for i, o in self.linears) + sum(e * o * i for e, o, i in self.banks)


def adapted(model: str) -> Adapted:
    """The weights ``model.lora``'s default targets adapt (every decoder linear; a MoE's expert banks
    too), found by ``model/lora.py``'s own targeting on the meta device."""
    from ..config import LoraConfig
    from ..model.footprint import meta_model
    from ..model.lora import EXPERT_BANKS, LoraExperts, LoraLinear, add_adapters
    from ..model.moe import is_moe
    from .memory import load_config

    config = load_config(model)
    meta = meta_model(config)
    add_adapters(meta, LoraConfig(rank=1, experts=is_moe(config)))
    modules = list(meta.modules())
    return Adapted([(m.base_layer.in_features, m.base_layer.out_features) for m in modules
                    if isinstance(m, LoraLinear)],
                   [tuple(getattr(m.base_layer, n).shape) for m in modules if isinstance(m, LoraExperts)
                    for n in EXPERT_BANKS])


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
    banks = sum(FOLD_BYTES * e * o * i + 4 * e * rank * (o + i) for e, o, i in model.banks)
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
