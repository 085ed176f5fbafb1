"""The config -> kernels loss mapping (medix_fast/rl/loss_options.py): every LossOptions field carried
once, the config's loss types those of the table, bad values named by their config key, and the
docs' tables (docs/losses.md) the renderings of the code.

Run: pytest tests/test_loss_options.py
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from medix_fast.config import AlgorithmConfig, ConfigError, load_config
from medix_fast.kernels import LossOptions
from medix_fast.kernels.loss_specs import LOSS_TYPES, loss_types_table
from medix_fast.rl import loss_options as L

DOCS = Path(__file__).resolve().parents[1] / "docs" / "losses.md"


def test_config_loss_types_are_the_tables():
    assert typing.get_args(typing.get_type_hints(AlgorithmConfig)["loss_type"]) == LOSS_TYPES


def test_every_loss_option_is_carried_exactly_once():
    """A new LossOptions field fails here until it is a config key (same name or RENAMED), per step,
    or kernel-only with a reason."""
    ways = [set(L.SAME_NAME), set(L.RENAMED), set(L.PER_STEP), set(L.KERNEL_ONLY)]
    fields = [f.name for f in dataclasses.fields(LossOptions)]
    for name in fields:
        carried = sum(name in way for way in ways)
        assert carried == 1, f"LossOptions.{name} is carried {carried} ways"
    assert set().union(*ways) == set(fields)  # nothing stale
    for key in L.RENAMED.values():
        section, field = key.split(".")
        assert field in {f.name for f in dataclasses.fields(type(getattr(load_config(None), section)))}, key


def test_kernel_options_carry_the_config():
    cfg = load_config(None, ["algorithm.loss_type=dr_grpo", "algorithm.kl_clamp=null", "algorithm.delta=4.0",
                             "sampling.max_new_tokens=77"])
    opts = L.kernel_options(cfg.algorithm, cfg.sampling, num_items=12.0)
    o = LossOptions.from_kwargs(opts)
    assert (o.loss_type, o.kl_clamp, o.delta, o.max_completion_length, o.num_items_in_batch) == (
        "dr_grpo", None, 4.0, 77, 12.0)
    assert {k: getattr(o, k) for k in L.SAME_NAME} == {k: getattr(cfg.algorithm, k) for k in L.SAME_NAME}
    assert {k: getattr(o, k) for k in L.KERNEL_ONLY} == {k: getattr(LossOptions(), k) for k in L.KERNEL_ONLY}


@pytest.mark.parametrize("override, named", [
    ("algorithm.clip_ratio_c=0.5", "algorithm.clip_ratio_c"),
    ("algorithm.kl_clamp=0", "algorithm.kl_clamp"),
    ("algorithm.delta=-1", "algorithm.delta"),
    ("algorithm.sapo_temperature_neg=0", "algorithm.sapo_temperature_neg"),
    ("algorithm.epsilon_low=1.5", "algorithm.epsilon_low"),
])
def test_bad_loss_value_names_the_dotted_key(override, named):
    cfg = load_config(None, [override])
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        L.check_config(cfg)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_shipped_configs_pass_the_loss_checks(path):
    L.check_config(load_config(path))


def test_docs_tables_are_the_renderings():
    """docs/losses.md holds the rendered tables: regenerate them with
    ``python -c "from medix_fast.rl.loss_options import defaults_table; print(defaults_table())"``
    (and ``medix_fast.kernels.loss_specs.loss_types_table``)."""
    text = DOCS.read_text()
    assert L.defaults_table() in text
    assert loss_types_table() in text
