"""A training step's time on paper: each phase from the bytes it moves and the FLOPs it runs at a
GPU's peak rates, printed by the memory plan (``python -m medix_fast.generate --plan --config C``).

    t = step_time(cfg, model_config, counts, rollout, world=8, gpu="H100", mfu=0.3)
    print(t.table())

Per GPU, one try of dynamic sampling, every row at the config's longest lengths (a prompt of
``data.max_prompt_length``, ``sampling.max_new_tokens`` generated: an upper bound), nothing
overlapped (a sum of the phases), the reward models' scoring and the host's own work (a
``params``-offloaded AdamW step runs on the CPU) not counted:
- sampler weights: the all-gather of every parameter in bf16 over NVLink that builds the
  tensor-parallel copy (or the unsharded one at ``tensor_parallel`` 1);
- prefill: 2 FLOPs per active parameter and prompt token plus causal attention, each prompt once;
- decode, memory-bound: a step of B rows (``sampling.max_num_seqs``, at most the rows whose K/V fits
  at the longest lengths, at most the group's) reads the GPU's share of the language model's
  weights (``ParameterCounts.per_rank``; a mixture of experts only the experts its B rows are
  routed to, :func:`medix_fast.model.footprint.experts_read`) and the live K/V (each prompt once
  per group, each row's completion at half its length on average) at the HBM bandwidth, then two
  all-reduces per layer of B x hidden bf16 (ring: 2 (k - 1) / k of it sent per GPU) over NVLink,
  each with ``ALLREDUCE_LATENCY``;
- old / reference log-probs and the update: 2 FLOPs per active parameter and token plus causal
  attention per forward, backward 2 forwards, gradient checkpointing one more, at ``mfu`` of the
  bf16 dense peak; the no-grad forwards the config runs (``rl/update.py``: every mini-batch but an
  on-policy first one, unless ``algorithm.mismatch_metrics`` measures it; the reference's);
- offload over PCIe: ``optim.offload: optimizer`` AdamW's states in and out per optimizer step;
  ``params`` the fp32 shards in for every forward and backward of a micro-batch and the fp32
  gradients out, and in once for the sampler's copy; ``rewards.offload`` the reward models in.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .decode_traffic import BANDWIDTH, TYPICAL

ALLREDUCE_LATENCY = 10e-6  # s per small-message NCCL all-reduce on NVLink (an assumption, not measured)


@dataclasses.dataclass(frozen=True)
class Hardware:
    hbm: float  # bytes/s
    flops: float  # bf16 dense peak, FLOP/s
    nvlink: float  # bytes/s per direction per GPU
    pcie: float  # bytes/s host <-> device per GPU, effective


GPUS = {name: Hardware(BANDWIDTH[name], 989e12, 450e9, 25e9) for name in ("H100", "H200")}

# What MediX-R1 ran (github.com/mbzuai-oryx/MediX-R1, training/examples/config.yaml and the
# medix-r1_*.sh scripts, on EasyR1 with vLLM); it publishes no time per step.
_EASYR1 = ("vLLM rollout at gpu_memory_utilization 0.6 (of the whole GPU), max_num_batched_tokens 8,448; "
           "FSDP full shard with parameters and optimizer offloaded to the CPU")
_JUDGE = "the Qwen3-4B judge served by vLLM on 2 GPUs of its own (training/vllm_serve.sh)"
REFERENCE = {
    "Qwen3-VL-30B-A3B-Thinking": f"tensor parallel 8, {_EASYR1}, bf16 weights and AdamW states (adamw_bf16); {_JUDGE}",
    "Qwen3-VL-8B-Instruct": f"tensor parallel 2, {_EASYR1}, fp32 AdamW; {_JUDGE}",
    "Qwen3-VL-2B-Instruct": f"tensor parallel 2, {_EASYR1}, fp32 AdamW; {_JUDGE}",
    "Qwen2.5-VL-7B-Instruct": f"tensor parallel 2, {_EASYR1}, fp32 AdamW; {_JUDGE}",
}


@dataclasses.dataclass
class StepTime:
    gpu: str
    world: int
    mfu: float
    phases: list[tuple[str, float, str]]  # (phase, seconds, how)
    decode_tokens_per_s: list[float]  # the node's, at the longest and at typical lengths
    typical: str  # the typical decode step
    reference: str | None

    @property
    def seconds(self) -> float:
        return sum(s for _, s, _ in self.phases)

    def table(self) -> str:
        hw = GPUS[self.gpu]
        lines = [f"time per step on paper ({self.world} x {self.gpu}: HBM {hw.hbm / 1e12:.2f} TB/s, "
                 f"{hw.flops / 1e12:.0f} TFLOP/s bf16 dense at {self.mfu:.0%} MFU, NVLink {hw.nvlink / 1e9:.0f} GB/s, "
                 f"PCIe {hw.pcie / 1e9:.0f} GB/s; longest lengths, phases summed, rewards not counted)"]
        width = max(len(p) for p, _, _ in self.phases)
        lines += [f"{p:<{width}}  {s:>8.1f} s  {how}" for p, s, how in self.phases]
        lines.append(f"{'step':<{width}}  {self.seconds:>8.1f} s")
        longest, typical = self.decode_tokens_per_s
        lines.append(f"decode tokens/s per node: {longest:,.0f} at the longest lengths, {typical:,.0f} at typical "
                     f"ones: {self.typical}")
        if self.reference:
            lines.append(f"reference (MediX-R1): {self.reference}; its repository publishes no time per step")
        return "\n".join(lines)


def step_time(cfg, model_config, counts, rollout, world: int = 8, gpu: str = "H100", mfu: float = 0.3,
              reward_params: dict[str, int] | None = None) -> StepTime:
    """The phases of one training step of config ``cfg`` on ``world`` GPUs of kind ``gpu`` (a key
    of ``GPUS``): ``counts`` the model's ``ParameterCounts``, ``rollout`` its ``RolloutPlan`` (the
    rows that fit, the K/V per token per GPU), ``mfu`` the share of the bf16 dense peak the
    forwards and backwards reach, ``reward_params`` the reward models' counts (moved in under
    ``rewards.offload``)."""
    from ..model.footprint import experts_read, state_bytes, text_config

    hw, s, a, t, o = GPUS[gpu], cfg.sampling, cfg.algorithm, cfg.train, cfg.optim
    text = text_config(model_config)
    layers, hidden = text.num_hidden_layers, text.hidden_size
    head_dim = getattr(text, "head_dim", None) or hidden // text.num_attention_heads
    q_dim = text.num_attention_heads * head_dim
    k, g, p = rollout.tensor_parallel, s.group_size, counts.total
    prompt, new = cfg.data.max_prompt_length, s.max_new_tokens
    prompts = -(-max(t.prompts_per_step, a.chunk_prompts) // world)  # per GPU
    rows = prompts * g
    flop_params = counts.decode - round(counts.experts * (1 - experts_read(model_config, 1)))  # active per token
    attention = lambda n: 2 * layers * q_dim * n * n  # noqa: E731  causal forward of an n-token row
    compute = hw.flops * mfu
    phases = []

    gathered = 2 * p * (world - 1) / world
    phases.append(("sampler weights", gathered / hw.nvlink,
                   f"all-gather of {gathered / 1e9:.1f} GB bf16 per GPU for the "
                   + ("unsharded copy" if k == 1 else f"tensor-parallel copy (1/{k} kept)")))
    flops = prompts * (2 * flop_params * prompt + attention(prompt))
    phases.append(("prefill", flops / compute,
                   f"{prompts} prompts x {prompt:,} tokens per GPU, {flops / 1e15:.2f} PFLOP"))

    def decode_step(b: int, prompt_len: int, done_len: int) -> tuple[float, str]:
        """Seconds of a decode step of ``b`` rows of a group per GPU, and what it moves."""
        weights = 2 * counts.per_rank(k, text.num_key_value_heads, counts.decode, experts_read(model_config, b))
        kv = rollout.kv_per_token * (-(-b // g) * prompt_len + b * done_len)
        reduced = b * 2 * layers * hidden * 2 * 2 * (k - 1) / k
        seconds = (weights + kv) / hw.hbm + (reduced / hw.nvlink + 2 * layers * ALLREDUCE_LATENCY if k > 1 else 0)
        return seconds, (f"{b:,} rows per group at once: {weights / 1e9:.1f} GB weights + {kv / 1e9:.1f} GB K/V read"
                         + (f", {2 * layers} all-reduces ({reduced / 1e6:.1f} MB sent)" if k > 1 else "")
                         + f" per {seconds * 1e3:.1f} ms step")

    b = min(s.max_num_seqs, rollout.rows_fit, rollout.rows_per_group)
    rates = [0.0, 0.0]  # the node's decode tokens/s at the longest and at typical lengths
    if b < 1:
        phases.append(("decode", float("inf"), "not one row fits"))
    else:
        step, how = decode_step(b, prompt, new // 2)
        rates[0] = world // k * b / step
        phases.append(("decode", rollout.rows_per_group * new / (b / step),
                       f"{how}; {rollout.rows_per_group:,} rows x {new:,} tokens per group"))
        typical = min(s.max_num_seqs, rollout.rows_per_group,
                      rollout.pool_tokens // (TYPICAL[0] // g + TYPICAL[1] + 2 * rollout.block_size))
        step, how = decode_step(typical, *TYPICAL)
        rates[1] = world // k * typical / step
        typical_how = f"{how} ({TYPICAL[0]} prompt + {TYPICAL[1]} completion tokens)"

    checkpointing = cfg.model.gradient_checkpointing
    tokens = rows * (prompt + new) if checkpointing or not t.share_prompt else prompts * prompt + rows * new
    forward = 2 * flop_params * tokens + rows * attention(prompt + new)
    minis = -(-t.prompts_per_step // t.mini_batch_prompts)
    recomputed = 0
    if a.old_logprobs == "recompute":
        recomputed = minis - 1 + (a.ppo_epochs > 1 or a.mismatch_metrics or a.mis_level is not None)
    forwards = recomputed / minis + (a.beta > 0)
    phases.append(("old / reference log-probs", forwards * forward / compute,
                   f"{forwards:.2f} no-grad forwards of {tokens / 1e6:.2f} M tokens per GPU"))
    passes = a.ppo_epochs * (3 + checkpointing)
    phases.append(("update", passes * forward / compute,
                   f"{passes} forwards' FLOPs of {forward / 1e15:.1f} PFLOP (backward 2, "
                   + ("recompute 1" if checkpointing else "no recompute") + f"), {a.ppo_epochs} epoch(s)"))

    state = state_bytes(o.offload, o.state_dtype)
    moved, how = 0.0, []
    if o.offload == "optimizer":
        moved += 2 * state.host["states"] * p / world * minis * a.ppo_epochs
        how.append(f"AdamW states in and out, {minis * a.ppo_epochs} optimizer steps")
    elif o.offload == "params":
        micro = -(-tokens // t.micro_batch_tokens)
        moved += 4 * p / world * (1 + micro * (forwards + 3 * a.ppo_epochs))
        how.append(f"fp32 shards in for the sampler, each forward and backward of {micro} micro-batches, "
                   "gradients out")
    if cfg.rewards.offload and reward_params:
        moved += 2 * sum(reward_params.values())
        how.append("reward models in")
    if moved:
        phases.append(("offload over PCIe", moved / hw.pcie, f"{moved / 1e9:.1f} GB per GPU: " + "; ".join(how)))
    return StepTime(gpu, world, mfu, phases, rates, typical_how if b >= 1 else "not one row fits",
                    REFERENCE.get(Path(str(cfg.model.path)).name))
