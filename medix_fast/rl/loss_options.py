"""The one mapping from the training config to the kernels' loss keywords, derived from LossOptions.

    opts = kernel_options(cfg.algorithm, cfg.sampling, num_items=tokens)
    loss, metrics = fused_linear_policy_loss(..., **opts)

Every field of :class:`medix_fast.kernels.LossOptions` is carried one way:
  :data:`SAME_NAME`    ``algorithm.<field>`` of the same name and meaning (found by name, never listed)
  :data:`RENAMED`      another config key (``max_completion_length`` <- ``sampling.max_new_tokens``)
  :data:`PER_STEP`     known at each optimizer step only (``num_items_in_batch``: the mini-batch's tokens)
  :data:`KERNEL_ONLY`  not a config key: the kernels' default, with why
tests/test_loss_options.py fails when a field is carried by none (or two) of them.

:func:`check_config` runs the algorithm section through the kernels' own validation (one rule, one
place); :func:`defaults_table` renders the kernels' and the trainer's defaults side by side for
docs/losses.md (checked against it by the same test).
"""
from __future__ import annotations

import dataclasses

from ..config import AlgorithmConfig, Config, SamplingConfig
from ..errors import ConfigError
from ..kernels import LossOptions

RENAMED = {"max_completion_length": "sampling.max_new_tokens"}
PER_STEP = {"num_items_in_batch": "the mini-batch's valid tokens over all ranks"}
KERNEL_ONLY = {  # field -> why it is no config key
    "entropy_aggregation": "the trainer's entropy bonus is aggregated as the loss (veRL); "
                           "TRL's adapter sets token_mean",
    "top_entropy_quantile": "a TRL option: its adapter sets it",
    "off_policy_mask_threshold": "a TRL option: its adapter sets it",
    "vespo_k_pos": "VESPO's shape, the paper's values",
    "vespo_lambda_pos": "VESPO's shape, the paper's values",
    "vespo_k_neg": "VESPO's shape, the paper's values",
    "vespo_lambda_neg": "VESPO's shape, the paper's values",
}
FIELDS = tuple(f.name for f in dataclasses.fields(LossOptions))
SAME_NAME = tuple(name for name in FIELDS if name in {f.name for f in dataclasses.fields(AlgorithmConfig)})


def kernel_options(algo: AlgorithmConfig, sampling: SamplingConfig, num_items=None) -> dict:
    """The loss keywords of ``fused_linear_policy_loss`` / ``policy_loss`` for this config;
    ``num_items``: the step's ``num_items_in_batch`` (used by the ``num_items`` normaliser only)."""
    sections = {"algorithm": algo, "sampling": sampling}
    opts = {name: getattr(algo, name) for name in SAME_NAME}
    for name, key in RENAMED.items():
        section, field = key.split(".")
        opts[name] = getattr(sections[section], field)
    opts["num_items_in_batch"] = num_items
    return opts


def config_key(name: str) -> str:
    """The config key that sets LossOptions field ``name`` ('' for a per-step or kernel-only one)."""
    return f"algorithm.{name}" if name in SAME_NAME else RENAMED.get(name, "")


def check_config(cfg: Config) -> None:
    """The loss options of ``cfg`` through ``LossOptions.from_kwargs``: a bad value raises a
    ConfigError naming the config keys its message names."""
    try:
        LossOptions.from_kwargs(kernel_options(cfg.algorithm, cfg.sampling))
    except ValueError as err:
        named = [config_key(n) for n in FIELDS if config_key(n) and n in str(err)] or ["algorithm"]
        raise ConfigError(f"{' / '.join(named)}: {err}") from None


def defaults_table() -> str:
    """Markdown: each LossOptions field's default in the kernels and in the trainer's config
    (configs/ files may set others), the trainer's in bold where they differ."""
    kernel, trainer = LossOptions(), Config()
    rows = ["| option | kernels (`LossOptions`) | trainer (config key: default) |", "|---|---|---|"]
    for name in FIELDS:
        ours = f"`{getattr(kernel, name)!r}`"
        key = config_key(name)
        if key:
            section, field = key.split(".")
            value = getattr(getattr(trainer, section), field)
            shown = f"`{value!r}`" if key in RENAMED.values() or value == getattr(kernel, name) else f"**`{value!r}`**"
            theirs = f"`{key}`: {shown}"
        else:
            theirs = f"per step: {PER_STEP[name]}" if name in PER_STEP else f"none: the kernels' ({KERNEL_ONLY[name]})"
        rows.append(f"| `{name}` | {ours} | {theirs} |")
    return "\n".join(rows) + "\n"
