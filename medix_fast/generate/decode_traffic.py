"""The memory traffic of one decode step on paper, against the minimum a step must move.

    python -m medix_fast.generate --plan            # every shipped config (no --config)

A decode step of ``b`` rows reads the weights once (``decode_shapes.decode_weights``, bf16) and
the live K/V of every row (the prompt part reads each prompt once for its group, the own part each
row's completion so far): that is the minimum, and at the GPU's bandwidth the step's time. On top,
per layer, the split kernel of each cascade part split more than once writes fp32 partials (output,
max, sum) for every (item, query block, kv head, split) the launch makes (``triton_decode.decode_launch``;
the static step's padded groups, of length 0, write none) and the combine kernel reads them back; a
part of one split writes its fp32 output directly; the step writes the new token's K/V and the logits
(bf16 from the LM head, fp32 copy, read by sampling). Hidden-state activations (b x hidden per
op) are left out: under 1 % at these sizes. The ratio total / minimum is the goal's measure
(<= 1.10 at 64 and 320 rows); tokens/s = b x bandwidth / total bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

from .decode_shapes import DecodeShape, shipped

BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}  # HBM bytes/s (SXM)
SMS = 132  # H100 and H200
ROWS = (64, 320)
TYPICAL = (512, 512)  # prompt tokens, completion tokens so far: a MediX-R1 clinical question mid-answer


@dataclass(frozen=True)
class Traffic:
    rows: int
    prompt_len: int
    done_len: int
    weights: int
    kv: int  # live K/V read
    partials: int  # fp32 partials written and read, outputs of the two parts
    other: int  # new K/V written, logits

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.partials + self.other

    @property
    def ratio(self) -> float:
        return self.total / (self.weights + self.kv)

    def tokens_per_s(self, bandwidth: float) -> float:
        return self.rows * bandwidth / self.total


def step_traffic(shape: DecodeShape, rows: int, prompt_len: int, done_len: int, sms: int = SMS) -> Traffic:
    """Bytes one decode step of ``rows`` rows moves at these lengths (``shape.dtype`` K/V)."""
    esize = shape.dtype.itemsize
    per_token = shape.layers * shape.kv_heads * shape.dim * 2 * esize  # K and V of every layer
    groups = -(-rows // shape.group)
    kv = per_token * (groups * prompt_len + rows * done_len)
    bucket = next(b for b in shape.buckets if b >= rows)
    partials = 0
    (_, prompt), (_, own) = shape.launches(bucket, prompt_len, done_len, sms)
    for items, t in ((groups, prompt), (bucket, own)):  # padded groups (length 0) move no partials
        parts = 0 if t.direct else items * t.qchunks * shape.kv_heads * t.splits  # one split: no partials
        partials += 2 * parts * t.block_m * (t.block_d + 2) * 4  # written by the split kernel, read by the combine
    out = rows * shape.heads * shape.dim * 4
    partials = shape.layers * (partials + 4 * out)  # zero-fill, prompt out, read as prior, own out
    other = per_token * rows + rows * shape.vocab * (2 + 2 + 4 + 4)
    return Traffic(rows, prompt_len, done_len, shape.weight_bytes, kv, partials, other)


def table(shapes: list[DecodeShape] | None = None) -> str:
    """The decode traffic of each shipped config at ``ROWS`` rows, typical and longest lengths."""
    lines = ["decode step traffic (GB; H100/H200 tokens/s at 3.35 / 4.8 TB/s; ratio = total / (weights + K/V))",
             f"{'config':<24}{'rows':>5}{'prompt':>7}{'done':>6}{'weights':>9}{'K/V':>8}{'partials':>9}"
             f"{'other':>7}{'ratio':>7}{'H100 tok/s':>12}{'H200 tok/s':>12}"]
    for shape in shapes or shipped():
        for rows in ROWS:
            for prompt_len, done_len in (TYPICAL, (shape.prompt_len, shape.new_len)):
                t = step_traffic(shape, rows, prompt_len, done_len)
                lines.append(f"{shape.name:<24}{rows:>5}{prompt_len:>7}{done_len:>6}{t.weights / 1e9:>9.2f}"
                             f"{t.kv / 1e9:>8.2f}{t.partials / 1e9:>9.2f}{t.other / 1e9:>7.2f}{t.ratio:>7.3f}"
                             f"{t.tokens_per_s(BANDWIDTH['H100']):>12,.0f}{t.tokens_per_s(BANDWIDTH['H200']):>12,.0f}")
    return "\n".join(lines)
