"""The longest completion a training config's memory allows, per GPU size:
``python -m medix_fast.generate --plan --config ... --longest-completion 24 48 80``.

    row = longest_completion(cfg, model_config, device_bytes=48e9, world=1, counts, rewards, lora)
    print(row.line())    # a LongestCompletion: max_new_tokens, micro_batch_tokens, the phases' peaks

It searches the largest ``sampling.max_new_tokens`` (by ``STEP`` tokens) with which every phase of
a step plans within ``model.footprint.TARGET`` of the device, as ``--plan`` plans them: the rollout
holds one row's K/V at the longest lengths (``memory.rollout_plan``), and the old log-probs and the
update (``model.footprint.update_plan``) fit a micro-batch of one whole group, ``group_size`` rows
of ``data.max_prompt_length`` + the completion tokens: the update packs whole groups and trains a
group longer than ``train.micro_batch_tokens`` alone (``rl/batch.py`` ``pack``), so no shorter
micro-batch bounds its memory. ``train.micro_batch_tokens`` shrinks with the memory: the row
gives the largest that fits beside that completion, at least one group. Every phase only grows
with the completion and the micro-batch, so bisections find both. Where no completion fits, the
row is refused in one line naming the phase that does not fit at the shortest one.
"""
from __future__ import annotations

import dataclasses

STEP = 64  # completion lengths tried, tokens


@dataclasses.dataclass
class LongestCompletion:
    device_bytes: int
    world: int
    group_size: int
    prompt_tokens: int  # data.max_prompt_length
    max_new_tokens: int  # the longest completion that fits; 0: none
    micro_batch_tokens: int = 0  # the largest train.micro_batch_tokens that fits beside it (>= one group)
    peaks: dict[str, int] = dataclasses.field(default_factory=dict)  # phase -> bytes per GPU at that length
    why_not: str = ""  # when none fits: the phase that does not, at the shortest completion
    utilization: float = 0.0  # the sampling.gpu_memory_utilization planned (the largest that fits, up to the config's)

    @property
    def group_tokens(self) -> int:
        return self.group_size * (self.prompt_tokens + self.max_new_tokens)

    def line(self) -> str:
        head = f"{self.device_bytes / 1e9:.0f} GB x {self.world}"
        if not self.max_new_tokens:
            return f"{head}: no completion fits: {self.why_not}"
        peaks = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in self.peaks.items())
        return (f"{head}: sampling.max_new_tokens={self.max_new_tokens} with train.micro_batch_tokens="
                f"{self.micro_batch_tokens} sampling.gpu_memory_utilization={self.utilization:.2f} (one group: "
                f"{self.group_size} x ({self.prompt_tokens:,} + {self.max_new_tokens:,}) = {self.group_tokens:,} "
                f"tokens); peaks GB: {peaks}")


def _at(cfg, new_tokens: int):
    """``cfg`` with ``sampling.max_new_tokens`` replaced."""
    return dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, max_new_tokens=new_tokens))


def longest_completion(cfg, model_config, device_bytes: int, world: int, counts, reward_params: dict[str, int],
                       lora=None) -> LongestCompletion:
    """The longest completion ``cfg`` fits on ``world`` GPUs of ``device_bytes`` (``counts`` / ``lora``:
    the model's ``ParameterCounts`` and the adapters' ``LoraCounts`` or None)."""
    from ..model.footprint import largest_tokens, update_at
    from .memory import fitting_utilization, rollout_at

    g, prompt = cfg.sampling.group_size, cfg.data.max_prompt_length
    limit = getattr(model_config.get_text_config(), "max_position_embeddings", 2**17) - prompt

    k = cfg.sampling.tensor_parallel
    # the pool as large as the phase allows, up to the config's share (the plan's own remedy)
    utilization = fitting_utilization(_at(cfg, STEP), model_config, device_bytes, world, counts, reward_params, k,
                                      lora) or cfg.sampling.gpu_memory_utilization

    def rollout(n: int):
        return rollout_at(_at(cfg, n), model_config, device_bytes, world, counts, reward_params, None, utilization,
                          k, lora)

    def update(n: int):  # at a micro-batch of one group
        return update_at(cfg, model_config, device_bytes, world, reward_params, counts, g * (prompt + n), lora)

    fits = lambda n: rollout(n).fits and update(n).fits  # noqa: E731
    row = LongestCompletion(int(device_bytes), world, g, prompt, 0, utilization=utilization)
    if limit < STEP or not fits(STEP):
        first = rollout(STEP)
        most = largest_tokens(cfg, model_config, device_bytes, world, reward_params, counts, lora, g * (prompt + STEP))
        row.why_not = (f"rollout {first.misfit()}" if not first.fits else
                       f"one group of {g} x ({prompt:,} + {STEP}) = {g * (prompt + STEP):,} tokens, trained whole, is "
                       f"longer than any micro-batch whose old log-probs and update fit ({most:,} tokens at most)")
        return row
    low, high = 1, limit // STEP + 1  # in steps: fits at low, not at high
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid * STEP) else (low, mid)
    n = low * STEP
    group = g * (prompt + n)
    most = largest_tokens(cfg, model_config, device_bytes, world, reward_params, counts, lora, 2**22)
    tokens = max(group, most // 1024 * 1024)  # a multiple of 1024 where that still holds the group
    final = update_at(cfg, model_config, device_bytes, world, reward_params, counts, tokens, lora)
    row.max_new_tokens, row.micro_batch_tokens = n, tokens
    row.peaks = {"rollout": rollout(n).peak_bytes, "old log-probs": final.logprobs_bytes, "update": final.update_bytes}
    return row
