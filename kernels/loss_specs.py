"""The loss types, one row each: what every ``loss_type`` branch of the kernels and the trainer reads.

    LOSS_SPECS["dapo"] == LossSpec("dapo", term="clip", normaliser="num_items", cpp_id=3)

``term``: the policy term of the formula in kernels/policy_loss.py (:data:`TERMS`: its clip
metrics, whether it reads whole sequences). ``normaliser``: how the token losses are aggregated
(:data:`NORMALISERS`). ``cpp_id``: the loss type's id in the C++ op's ``enum LossType``
(csrc/policy_loss.h), or None where the op lacks it (kernels/dispatch.py then runs it on PyTorch).

Derived from this table: :data:`LOSS_TYPES` (the kernels' choices; ``AlgorithmConfig.loss_type``
and the C++ enum are checked against it by tests/test_loss_specs.py), the C++ op's id and
``num_items_in_batch`` (kernels/cpp.py), the loss types ``dispatch.LACKS`` routes to PyTorch, the
trainer's micro-batch shares (medix_fast/rl/update.py) and the TRL adapter's normalisers and metric
names. Pure Python: the docs' tables and the config's tests read it without torch.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Term:
    """A policy term of the formula (r: the importance ratio, A: the advantage)."""

    formula: str
    clips: tuple[str, ...]  # the clip flags it reports: "low" (r < 1 - eps_low, A < 0), "high" (A > 0)
    whole_rows: bool = False  # its weight reads a whole sequence (the fused loss chunks whole rows)


TERMS = {
    "clip": Term("max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)); dual clip, delta", ("low", "high")),
    "cispo": Term("-sg[min(r, eps_high)] A logp", ("high",)),  # "high": r above its cap eps_high
    "sapo": Term("-4 / tau sigmoid(tau (r - 1)) A", ()),
    "vespo": Term("-sg[phi(w)] A logp, w the sequence's ratio", (), whole_rows=True),
}
NORMALISERS = {  # the aggregation of loss_t over the valid tokens of a batch of B sequences
    "sequence_mean": "mean over sequences of each sequence's token mean",
    "batch_tokens": "sum / valid tokens of this batch",
    "max_length": "sum / (B * max_completion_length)",
    "num_items": "sum / num_items_in_batch (default: this batch's valid tokens)",
    "sequences": "sum / B (each sequence's token sum)",
}


@dataclass(frozen=True)
class LossSpec:
    """One loss type (see the module docstring)."""

    name: str
    term: str  # a key of TERMS
    normaliser: str  # a key of NORMALISERS
    cpp_id: int | None  # csrc/policy_loss.h LossType; None: PyTorch only

    @property
    def clips(self) -> tuple[str, ...]:
        return TERMS[self.term].clips

    @property
    def whole_rows(self) -> bool:
        return TERMS[self.term].whole_rows


LOSS_SPECS = {s.name: s for s in (
    LossSpec("grpo", "clip", "sequence_mean", 0),
    LossSpec("bnpo", "clip", "batch_tokens", 1),
    LossSpec("dr_grpo", "clip", "max_length", 2),
    LossSpec("dapo", "clip", "num_items", 3),
    LossSpec("cispo", "cispo", "num_items", 4),
    LossSpec("sapo", "sapo", "sequence_mean", 5),
    LossSpec("luspo", "clip", "sequences", 6),
    LossSpec("vespo", "vespo", "num_items", None),
)}
LOSS_TYPES = tuple(LOSS_SPECS)


def loss_types_table() -> str:
    """Markdown: one row per loss type, then the terms and normalisers (docs/losses.md holds it;
    tests/test_loss_options.py checks)."""
    rows = ["| loss_type | policy term | normaliser | C++ `LossType` id |", "|---|---|---|---|"]
    rows += [f"| `{s.name}` | {s.term} | {s.normaliser} | "
             f"{'none: PyTorch (`dispatch.LACKS`)' if s.cpp_id is None else s.cpp_id} |" for s in LOSS_SPECS.values()]
    rows += ["", "Policy terms (r: the importance ratio, A: the advantage):", ""]
    rows += [f"- {name}: `{term.formula}`" for name, term in TERMS.items()]
    rows += ["", "Normalisers (over the valid tokens of a batch of B sequences):", ""]
    rows += [f"- {name}: {text}" for name, text in NORMALISERS.items()]
    return "\n".join(rows) + "\n"
