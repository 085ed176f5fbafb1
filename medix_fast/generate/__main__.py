"""``python -m medix_fast.generate --plan``: the memory plan (and time per step on paper) of a training config.

    python -m medix_fast.generate --plan      # the decode step's memory traffic, every shipped config
    python -m medix_fast.generate --plan --config configs/medix_r1_8b_dapo.yaml --device-memory-gb 80
    python -m medix_fast.generate --plan --config configs/medix_r1_30b_a3b_dapo.yaml --device-memory-gb 80 \\
        --model-config /ckpt/Qwen3-VL-30B-A3B-Thinking --world 8 --host-memory-gb 1024 sampling.tensor_parallel=8

The model comes from ``--model-config`` (a checkpoint directory, a config.json, or a name in
``medix_fast.generate.memory.KNOWN_MODELS``), else from ``model.path`` (a checkpoint, or a known
name as its last component: the shipped configs' placeholder paths). No weights are loaded: the
parameters are counted on the meta device. Dotted overrides after the options change the config;
a ``sampling.tensor_parallel`` the sampler cannot split the model or ``--world`` by is refused (its own rule).
It prints the rollout (``memory.rollout_plan``), the host memory per node of ``--gpus-per-node``
(``model.footprint.host_memory``, against ``--host-memory-gb``), under FSDP the training side
(``model.footprint.update_plan``: old log-probs and the update) and the step's peak, the largest
of the three phases (the sampler gives its pool and copy back before the update, so the phases
never hold each other's memory), and the time per step on paper (``step_time``: an H100 up to 94
GB, an H200 above, at ``--mfu``). Exit status 0 when every phase fits the device and the host
fits its memory, 1 when one does not, 2 on bad arguments (answered before torch is imported, as
is a config error). ``--longest-completion GB...`` (last on the line) prints instead, per GPU
memory, the longest ``sampling.max_new_tokens`` every phase fits (``longest.py``); 0 when one fits
on each, 1 when one does not.

    python -m medix_fast.generate --plan --config configs/medix_r1_8b_dapo.yaml --world 1 model.lora.rank=64 \
        distributed.strategy=ddp sampling.tensor_parallel=1 rewards.offload=true --longest-completion 24 48 80
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import preflight
from ..config import load_config
from ..errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m medix_fast.generate", description=__doc__.splitlines()[0])
    p.add_argument("--plan", action="store_true", required=True, help="print the rollout memory plan")
    p.add_argument("--config", help="training config YAML (without: the decode traffic of every shipped config)")
    p.add_argument("--device-memory-gb", type=float, help="memory of one GPU, GB (1e9 bytes); needed with --config")
    p.add_argument("--world", type=int, default=8, help="GPUs (FSDP shards), default 8")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node, for the host memory (default 8)")
    p.add_argument("--host-memory-gb", type=float, default=2000,
                   help="host memory of one node, GB (default 2000: an 8 x H100 node such as a DGX H100)")
    p.add_argument("--mfu", type=float, default=0.3,
                   help="share of the bf16 dense peak the forwards and backwards reach, for the time on paper "
                        "(default 0.3)")
    p.add_argument("--model-config", default=None, help="checkpoint dir, config.json or known model name")
    p.add_argument("--longest-completion", type=float, nargs="+", metavar="GB",
                   help="instead of the plan: the longest sampling.max_new_tokens (and the train.micro_batch_tokens "
                        "beside it) every phase fits on --world GPUs of each of these memories (longest.py)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. sampling.max_num_seqs=128")
    args = p.parse_args(argv)  # a bad line is answered here, before torch is imported
    if args.config is None:
        from . import decode_traffic

        print(decode_traffic.table())
        return 0
    if args.device_memory_gb is None and not args.longest_completion:
        p.error("--device-memory-gb is needed with --config")
    device_bytes = int((args.device_memory_gb or args.longest_completion[0]) * 1e9)
    try:
        preflight.check_plan(args)
        cfg = load_config(args.config, args.overrides)
        from ..model.footprint import host_memory, lora_counts, parameter_counts, update_plan
        from . import memory
        from .step_time import step_time

        model_config = memory.load_config(args.model_config or cfg.model.path)
        error = memory.tensor_parallel_error(cfg.sampling.tensor_parallel, model_config, args.world)
        if error:
            raise ConfigError(error)
        rewards = memory.reward_model_params(cfg)
        counts = parameter_counts(model_config)
        lora = lora_counts(cfg.model.lora, model_config)
        if args.longest_completion:
            return _longest(cfg, model_config, args, counts, rewards, lora)
        plan = memory.rollout_plan(cfg, model_config, device_bytes, args.world, counts, rewards,
                                   name=Path(args.model_config).name if args.model_config else None, lora=lora)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("rollout (the K/V pool and the sampler's copy are put to sleep, or given back, before the update)")
    print(plan.table())
    host = host_memory(cfg, counts, args.world, args.gpus_per_node, rewards, lora.total if lora else None)
    host_fits = sum(host.values()) <= args.host_memory_gb * 1e9
    print(f"\nhost memory per node ({min(args.world, args.gpus_per_node)} ranks)")
    for name, size in host.items():
        print(f"  {name}: {size / 1e9:.1f} GB")
    print(f"  total {sum(host.values()) / 1e9:.1f} GB of the {args.host_memory_gb:.0f} GB assumed (--host-memory-gb): "
          + ("fits" if host_fits else "does NOT fit"))
    if cfg.distributed.strategy != "fsdp" and not cfg.model.lora.rank:
        print("\nupdate: planned for distributed.strategy=fsdp (or model.lora) only")
        return 0 if plan.fits and host_fits else 1
    update = update_plan(cfg, model_config, device_bytes, args.world, rewards, counts, lora)
    print("\nold log-probs and update")
    print(update.table())
    keep = memory.keep_across_steps(update.update_bytes, plan.held_bytes, device_bytes)
    graphs = memory.graph_pool_bytes(model_config, cfg.sampling.max_num_seqs)
    print(f"\nthrough the update, with the CUDA driver's virtual memory management (generate/vmm.py, where the "
          f"GPU supports it): the sampler's pool and copy ({plan.held_bytes / 1e9:.1f} GB) sleep, their pages "
          f"given back, their addresses kept: CUDA graphs captured once per run; resident: the graphs' outputs "
          f"and activations, about {graphs / 1e9:.1f} GB (update + graphs: "
          f"{(update.update_bytes + graphs) / 1e9:.1f} GB of {device_bytes / 1e9:.1f} GB"
          + ("" if memory.keep_across_steps(update.update_bytes, graphs, device_bytes) else
             ", over the 90% planned for") + ")")
    if cfg.sampling.tensor_parallel == 1 and cfg.distributed.strategy == "fsdp":
        print(f"  the sampler then reads its own bf16 copy of FSDP2's unsharded weights, not in the table above: "
              f"{2 * counts.total / 1e9:.1f} GB more in the rollout, the pool that much smaller (weights.py)")
    print(f"without it: the pool and copy beside the update ({update.update_bytes / 1e9:.1f} GB) " + (
        "fit, kept across steps: CUDA graphs captured once per run" if keep else
        "do not fit, given back before each update: CUDA graphs captured again every rollout"))
    peaks = {"rollout": plan.peak_bytes, "old log-probs": update.logprobs_bytes, "update": update.update_bytes}
    phase = max(peaks, key=peaks.get)
    print(f"\nstep peak: {phase}, {peaks[phase] / 1e9:.1f} GB of {device_bytes / 1e9:.1f} GB "
          f"(max over the phases: {', '.join(f'{k} {v / 1e9:.1f}' for k, v in peaks.items())})")
    gpu = "H100" if args.device_memory_gb <= 94 else "H200"
    print()
    print(step_time(cfg, model_config, counts, plan, args.world, gpu, args.mfu, rewards).table())
    return 0 if plan.fits and update.fits and host_fits else 1


def _longest(cfg, model_config, args, counts, rewards, lora) -> int:
    """``--longest-completion``: one line per GPU memory; 0 when a completion fits on each."""
    from ..model.footprint import TARGET
    from .longest import longest_completion

    s = cfg.sampling
    print(f"the longest completion on {args.world} GPU(s), {cfg.distributed.strategy}, sampling.tensor_parallel "
          f"{s.tensor_parallel}" + (f", model.lora rank {cfg.model.lora.rank}" if lora else "")
          + f": every phase within {TARGET:.0%}, a micro-batch of one group at least ({s.group_size} rows of "
          f"{cfg.data.max_prompt_length:,} prompt + the completion tokens)")
    rows = [longest_completion(cfg, model_config, int(gb * 1e9), args.world, counts, rewards, lora)
            for gb in args.longest_completion]
    for row in rows:
        print(row.line())
    return 0 if all(row.max_new_tokens for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
