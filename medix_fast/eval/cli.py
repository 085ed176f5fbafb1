"""``python -m medix_fast.eval``: accuracy of a checkpoint on medical QA tasks, graded like MediX-R1.

    python -m medix_fast.eval --model tiny                      # the bundled held-out split
    python -m medix_fast.eval --model DIR --data test.jsonl --judge JUDGE_DIR --out runs/eval/x
    python -m medix_fast.eval --model DIR --tasks tasks.yaml --max-new-tokens 1024 --judge-votes 3 \\
        --judge-temperature 0.7
    torchrun --nproc_per_node=8 -m medix_fast.eval --model DIR --tasks tasks.yaml   # items split by rank
    python -m medix_fast.eval --checkpoint DIR --judge QWEN3_14B_DIR --protocol medix_r1 \\
        --tasks configs/eval/medix_r1.yaml --data-dir data/medix_r1   # MediX-R1's published table

What it runs and writes: ``evaluator.py``; ``--protocol medix_r1``: ``medix_r1.py``. Each
checkpoint has its own default ``--out`` (:func:`default_out`), so evaluating another never
meets an earlier one's results; ``--overwrite`` moves a folder's results aside to
``<out>.old-<N>`` (as ``train --overwrite`` does) and starts again: no result is ever deleted.
The arguments are read and the paths checked before torch, transformers or triton is imported
(``--help`` and a bad path answer at once).
"""
from __future__ import annotations

import argparse
import importlib.resources
import os
import sys
from pathlib import Path

from .. import preflight
from ..config import EXPERTS_IMPLEMENTATIONS
from ..errors import ArgumentParser, UsageError, run_command
from .settings import EvalSettings

DEFAULT_R1_TASKS = str(importlib.resources.files("medix_fast.configs") / "eval" / "medix_r1.yaml")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m medix_fast.eval", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "--checkpoint", dest="model", required=True,
                   help="local Hugging Face checkpoint directory, or 'tiny'")
    p.add_argument("--protocol", choices=("medix_fast", "medix_r1"), default="medix_fast",
                   help="medix_fast: this project's scores; medix_r1: MediX-R1's published evaluation "
                        "(its 17 tasks, 3-round JSON judge; medix_r1.py)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--data", help="MediX-schema JSONL / Parquet / dataset dir, or a folder of them "
                                       "(one open-answer task per file); default: the bundled sample:test")
    source.add_argument("--tasks", help="tasks YAML (see medix_fast/eval/tasks.py)")
    p.add_argument("--judge", help="local judge LLM directory; without it open answers score by exact match "
                                   "(medix_r1: required for the judge phase)")
    p.add_argument("--data-dir", help="medix_r1: the folder of the tasks' local copies (default: the YAML's data_dir)")
    p.add_argument("--only", nargs="+", help="medix_r1: these tasks or groups (llm, vlm) of the tasks YAML")
    p.add_argument("--phase", choices=("all", "generate", "judge", "score"), default="all",
                   help="medix_r1: run one phase (each continues from what the output folder holds)")
    p.add_argument("--judge-batch", type=int, default=1024,
                   help="medix_r1: items per three-round judge pass (and per write)")
    p.add_argument("--semantic-model", help="sentence encoder directory (default: all-MiniLM-L6-v2)")
    p.add_argument("--out", help="output folder (default: runs/eval/<run>/<step> for a training checkpoint's "
                                 "model, else runs/eval/<parent folder>/<model folder>)")
    p.add_argument("--overwrite", action="store_true",
                   help="start again instead of continuing the output folder, moved aside to <out>.old-N")
    p.add_argument("--limit", type=int, default=0, help="first N items of each task (0: all)")
    d = EvalSettings()
    p.add_argument("--max-new-tokens", type=int, default=0,
                   help=f"default {d.max_new_tokens} (medix_r1: 2048, the reference's)")
    p.add_argument("--temperature", type=float, default=d.temperature, help="0: greedy")
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="items per rank per sampler call")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--judge-votes", type=int, default=d.judge_votes, help="majority vote over k judge asks")
    p.add_argument("--judge-temperature", type=float, default=d.judge_temperature,
                   help="judge sampling temperature for the vote (0: one greedy ask)")
    p.add_argument("--min-pixels", type=int, default=0, help="VL models: image resize floor (0: the processor's)")
    p.add_argument("--max-pixels", type=int, default=0, help="VL models: image resize cap (0: the processor's)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--experts-implementation", choices=EXPERTS_IMPLEMENTATIONS, default="auto",
                   help="mixture-of-experts models: auto picks grouped GEMM where it runs (model/moe.py)")
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op CPU threads per rank (0: the cores available to the process / local ranks)")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.judge_votes < 1 or args.judge_batch < 1 or \
            min(args.limit, args.max_new_tokens, args.min_pixels, args.max_pixels, args.threads,
                args.judge_temperature) < 0:
        p.error("--batch-size, --judge-votes and --judge-batch must be >= 1; --limit, --max-new-tokens, "
                "--min-pixels, --max-pixels, --threads and --judge-temperature >= 0")
    if args.protocol == "medix_r1":
        if args.data or (args.temperature, args.top_p, args.top_k, args.judge_votes) != (0.0, 1.0, 0, 1):
            p.error("--protocol medix_r1 is greedy with the reference's judge and reads --tasks (default "
                    "configs/eval/medix_r1.yaml): --data, --temperature, --top-p, --top-k and --judge-votes "
                    "do not apply")
    elif args.data_dir or args.only or args.phase != "all":
        p.error("--data-dir, --only and --phase are for --protocol medix_r1")
    if args.min_pixels and args.max_pixels and args.min_pixels > args.max_pixels:
        p.error(f"--min-pixels {args.min_pixels} is above --max-pixels {args.max_pixels}")
    return args


def default_out(model: str) -> Path:
    """The output folder of ``model`` without ``--out``: ``runs/eval/<run>/<step>`` for a training
    checkpoint's ``.../<run>/checkpoints/<step>/model``, else ``runs/eval/<parent>/<name>`` (a
    tiny model: ``runs/eval/<name>``), so that two checkpoints never share one."""
    path = Path(model).expanduser()
    if not path.exists():
        return Path("runs/eval") / path.name
    path = path.resolve()
    if path.name == "model" and path.parent.parent.name == "checkpoints":
        return Path("runs/eval", path.parent.parent.parent.name, path.parent.name)
    return Path("runs/eval", path.parent.name, path.name)


def claim_out(out: Path, overwrite: bool) -> None:
    """With ``overwrite``, move a non-empty ``out`` aside (nothing is deleted) and say where."""
    if overwrite and out.is_dir() and any(out.iterdir()):
        from ..run_dir import move_aside  # imports torch (through checkpoint.py)

        print(f"--overwrite: the earlier results in {out} were moved to {move_aside(out)}", file=sys.stderr)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)  # --help and a bad line are answered here, before torch is imported
    args.out = Path(args.out or default_out(args.model))
    preflight.check_eval(args)  # every path and the protocol's needs, before anything loads
    from .. import distributed as D
    from ..data.vision import Vision
    from ..demo.cache import resolve_model_path
    from ..generate import Sampler
    from ..model.loading import compute_dtype, image_token_id, is_vl, load_image_processor, load_model, stop_ids
    from ..rewards import RewardConfig, build_reward
    from ..runtime import set_cpu_threads, setup_logging
    from .evaluator import Evaluator, describe, sampler_generate
    from .medix_r1 import run_medix_r1
    from .medix_r1_tasks import load_medix_r1_tasks
    from .results import markdown_table
    from .scoring import Scorer
    from .tasks import data_tasks, default_tasks, load_tasks

    setup_logging(int(os.environ.get("RANK", "0")))
    set_cpu_threads(args.threads, "--threads")
    info = D.init_distributed(args.device, "auto")
    try:
        if args.protocol == "medix_r1":
            if info.world > 1:
                raise UsageError("--protocol medix_r1 runs in one process (its sampler batches the items)")
            tasks = load_medix_r1_tasks(args.tasks or DEFAULT_R1_TASKS, args.data_dir, args.limit, args.only,
                                        images=args.phase in ("all", "generate"))
            claim_out(args.out, args.overwrite)
            return run_medix_r1(args, tasks, info)
        args.max_new_tokens = args.max_new_tokens or EvalSettings().max_new_tokens
        tasks = (load_tasks(args.tasks, args.limit) if args.tasks else
                 data_tasks(args.data, args.limit) if args.data else default_tasks(args.limit))
        if info.is_main:
            claim_out(args.out, args.overwrite)
        dtype = compute_dtype(args.dtype, info.device)
        model_path = resolve_model_path(args.model)
        model, tokenizer = load_model(model_path, dtype=dtype, device=info.device,
                                      experts_implementation=args.experts_implementation)
        settings = EvalSettings(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.batch_size,
                                args.seed, args.judge_votes, args.judge_temperature)
        vision = Vision(load_image_processor(model_path), image_token_id(model),
                        args.min_pixels or None, args.max_pixels or None) if is_vl(model) else None
        evaluator = Evaluator(tasks, tokenizer, settings, info, vision)
        sampler = Sampler(model, max_num_seqs=settings.batch_size, dtype=dtype)
        rewards = RewardConfig(judge_model=args.judge, semantic_model=args.semantic_model)
        reward_fn = build_reward(rewards, info.device, dtype)
        scorer = Scorer(reward_fn, votes=args.judge_votes, judge_temperature=args.judge_temperature,
                        seed=args.seed + info.rank)
        out = args.out
        fingerprint = {"model": str(args.model), "judge": args.judge, "semantic_model": args.semantic_model}
        generate = sampler_generate(sampler, tokenizer, stop_ids(model, tokenizer), settings, vision)
        summary = evaluator.run(generate, scorer, out, fingerprint)
    finally:
        D.close()
    if info.is_main:
        print(describe(settings, rewards.weights, len(evaluator.items), args.judge is not None))
        print(markdown_table(summary), end="")
        print(f"generations: {out / 'generations.jsonl'}\nsummary: {out / 'summary.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command: 0 when done, 2 on a user error (one ``error:`` line)."""
    return run_command(_main, argv)
