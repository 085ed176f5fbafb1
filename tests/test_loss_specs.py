"""The loss-type table (kernels/loss_specs.py) against what is not derived from it: the C++ op's
enums and schema, the dispatch's routing, the veRL adapter's choices.

Run: pytest tests/test_loss_specs.py
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from medix_fast.kernels import cpp
from medix_fast.kernels.dispatch import LACKS
from medix_fast.kernels.loss_specs import LOSS_SPECS, LOSS_TYPES, NORMALISERS, TERMS
from medix_fast.kernels.policy_loss import LEVELS, LossOptions

HEADER = Path(__file__).resolve().parents[1] / "csrc" / "policy_loss.h"


def snake(name: str) -> str:
    """A C++ constant's name as the table spells it: ``DrGrpo`` -> ``dr_grpo``."""
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


def cpp_enum(name: str) -> dict[str, int]:
    """``enum name : int64_t { kDrGrpo = 2, ... }`` of csrc/policy_loss.h as {"dr_grpo": 2, ...}."""
    body = re.search(rf"enum {name} : int64_t \{{([^}}]*)\}}", HEADER.read_text()).group(1)
    return {snake(key): int(value) for key, value in re.findall(r"k(\w+) = (\d+)", body)}


def cpp_switch(function: str) -> dict[str, str]:
    """The ``case kDrGrpo: return Normaliser::kMaxLength;`` lines of a C++ function of
    csrc/policy_loss.h as {"dr_grpo": "max_length", ...}."""
    body = re.search(rf"inline \w+ {function}\(int64_t loss_type\) \{{(.*?)\n\}}", HEADER.read_text(), re.S).group(1)
    return {snake(case): snake(value) for case, value in re.findall(r"case k(\w+): return \w+::k(\w+);", body)}


def test_every_spec_names_a_known_term_and_normaliser():
    for name, spec in LOSS_SPECS.items():
        assert spec.name == name and spec.term in TERMS and spec.normaliser in NORMALISERS, spec
    assert {s.term for s in LOSS_SPECS.values()} == set(TERMS)  # none unused
    assert {s.normaliser for s in LOSS_SPECS.values()} == set(NORMALISERS)


def test_cpp_enums_are_the_tables_ids():
    """The C++ op's LossType ids are the table's cpp_id (a swapped id fails here, without a build),
    its Level ids the order of LEVELS."""
    assert cpp_enum("LossType") == {n: s.cpp_id for n, s in LOSS_SPECS.items() if s.cpp_id is not None}
    assert cpp_enum("Level") == {name: i for i, name in enumerate(LEVELS)}


def test_cpp_terms_and_normalisers_are_the_tables():
    """csrc/policy_loss.h's term_of / normaliser_of give each C++ loss type its row's term and normaliser."""
    in_cpp = {n: s for n, s in LOSS_SPECS.items() if s.cpp_id is not None}
    assert cpp_switch("term_of") == {n: s.term for n, s in in_cpp.items()}
    assert cpp_switch("normaliser_of") == {n: s.normaliser for n, s in in_cpp.items()}


def test_dispatch_routes_the_loss_types_without_a_cpp_id_to_pytorch():
    lacked = LACKS["policy_loss", "cpp"]
    assert {n for n in LOSS_TYPES if n in lacked} == {n for n, s in LOSS_SPECS.items() if s.cpp_id is None}
    for name, spec in LOSS_SPECS.items():
        if spec.cpp_id is None:
            assert name in LossOptions(loss_type=name).features(), name


def test_cpp_op_takes_loss_options_by_their_field_names():
    """The op's arguments after ``level`` are LossOptions fields (kernels/cpp.py passes them by name)."""
    if not cpp.available():
        pytest.skip("the C++ ops do not build here")
    fields = {f.name for f in dataclasses.fields(LossOptions)}
    assert cpp._OPTIONS and set(cpp._OPTIONS) <= fields, set(cpp._OPTIONS) - fields


@pytest.mark.parametrize("mode", ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm",
                                  "seq-mean-token-mean"])
def test_verl_aggregation_modes_are_clipped_loss_types_with_their_normaliser(mode):
    """veRL's ``agg_loss`` modes map to PPO-clip loss types whose normaliser is the mode's."""
    import torch

    from medix_fast.integrations.verl import aggregation

    expected = {"token-mean": "batch_tokens", "token-sum": "num_items", "seq-mean-token-sum": "num_items",
                "seq-mean-token-sum-norm": "num_items", "seq-mean-token-mean": "sequence_mean"}[mode]
    opts, _ = aggregation(mode, torch.ones(2, 3))
    spec = LOSS_SPECS[opts["loss_type"]]
    assert (spec.term, spec.normaliser) == ("clip", expected)
