"""``python -m medix_fast.eval --protocol medix_r1``: MediX-R1's published evaluation, in-process.

    python -m medix_fast.eval --checkpoint DIR --judge QWEN3_14B_DIR --protocol medix_r1 \\
        --tasks configs/eval/medix_r1.yaml --data-dir data/medix_r1 --out runs/eval/r1

Three phases, as the reference kit's ``eval.py`` (``--phase`` runs one), each continuing from
what its file already holds (appended chunk by chunk; a line cut by a kill is dropped):
1. generate: each item's question (``medix_r1_tasks.build_question``), its image first, in a
   user turn of the checkpoint's chat template, no system prompt; greedy, 2,048 new tokens;
   ``generations.jsonl``.
2. judge: three rounds of one conversation per item with the local judge LLM
   (``medix_r1_judge``), every pending item's round in one sampler call; ``judged.jsonl``.
3. score: per task, the share of items scored 1 (MIMIC: the mean rubric score out of 5), and
   the mean over tasks: ``score.txt`` in the kit's layout (Task / Accuracy / Accuracy (%), then
   Overall), and ``summary.md`` / ``summary.json`` in this project's (with the share of judge
   rounds that did not parse).
The candidate model is freed before the judge is loaded.
"""
from __future__ import annotations

import gc
import logging
from pathlib import Path

import torch
from .. import distributed as D
from ..errors import UserError
from .medix_r1_judge import ChatJudge, judge_items
from .medix_r1_tasks import R1Item, R1Task
from .results import check_settings, markdown_table, read_records, summarize, write_summary
from .shares import append_in_shares, on_main

log = logging.getLogger("medix_fast.eval")

MAX_NEW_TOKENS = 2048
PHASES = ("generate", "judge", "score")


def candidate_prompt(tokenizer, item: R1Item, vision=None) -> list[int]:
    """The item as the kit's request renders it: one user turn (image, then the question), the
    checkpoint's chat template, the generation prompt; image tokens expanded for a VL model."""
    from ..data.vision import expand_image_tokens, image_size

    with_image = vision is not None and item.image is not None
    content = [{"type": "image"}, {"type": "text", "text": item.question}] if with_image else item.question
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if vision is not None:
        tokens = [vision.tokens(image_size(item.image))] if with_image else []
        ids = expand_image_tokens(ids, vision.image_token_id, tokens)
    return ids


def candidate_prompts(items: list[R1Item], tokenizer, vision=None) -> dict[str, list[int]]:
    """Each item's :func:`candidate_prompt` by id; a text-only checkpoint (``vision`` None) ignores
    the items' images (said once) and drops them."""
    if vision is None and any(it.image is not None for it in items):
        log.warning("images are ignored: the checkpoint is text only")
        for it in items:
            it.image = None
    return {it.id: candidate_prompt(tokenizer, it, vision) for it in items}


def generate_phase(items: list[R1Item], out: Path, generate, prompt_ids: dict[str, list[int]], chunk: int,
                   info: D.DistInfo | None = None) -> int:
    """Generate every item missing from ``generations.jsonl``, ``chunk`` items per rank per call
    (``shares.append_in_shares``); returns how many were generated. ``generate(items, prompt_ids,
    seed)`` is an ``evaluator.Generate``; ``prompt_ids``: :func:`candidate_prompts`."""
    info, path = info or D.DistInfo(), out / "generations.jsonl"

    def pending() -> list[R1Item]:
        done = {r["id"] for r in read_records(path)}
        if done:
            log.info("%s: %d of %d items already generated", path, len(done & {it.id for it in items}), len(items))
        return [i for i, it in enumerate(items) if it.id not in done]

    def work(share: list[int], call: int) -> list[dict]:
        batch = [items[i] for i in share]
        gens = generate(batch, [prompt_ids[it.id] for it in batch], 0)
        return [{"id": it.id, "task": it.task, "index": it.index, "question": it.question, "answer": it.answer,
                 "response": g.text, "answer_idx": it.answer_idx, "finish_reason": g.finish_reason,
                 "tokens": g.tokens} for it, g in zip(batch, gens)]

    todo = on_main(info, pending)
    append_in_shares(path, todo, chunk, info, work, "generate")
    return len(todo)


def judge_phase(items: list[R1Item], out: Path, chat, chunk: int, rubric: dict[str, bool],
                info: D.DistInfo | None = None) -> int:
    """Judge every generated item missing from ``judged.jsonl`` (``chat``: a ``medix_r1_judge.Chat``),
    ``chunk`` items per rank per three-round pass, one write per pass; returns how many were judged."""
    info, path = info or D.DistInfo(), out / "judged.jsonl"

    def pending() -> list[dict]:
        keys = {it.id for it in items}
        generated = [r for r in read_records(out / "generations.jsonl") if r["id"] in keys]
        missing = len(keys) - len(generated)
        if missing:
            raise UserError(f"{out / 'generations.jsonl'}: {missing} of the {len(keys)} items are not generated "
                            "yet (run the generate phase first)")
        done = {r["id"] for r in read_records(path)}
        return [r for r in generated if r["id"] not in done]

    def work(batch: list[dict], call: int) -> list[dict]:
        verdicts = judge_items(chat, [r["question"] for r in batch], [r["answer"] for r in batch],
                               [r["response"] for r in batch], [rubric[r["task"]] for r in batch])
        return [{**r, "evaluation": v} for r, v in zip(batch, verdicts)]

    todo = on_main(info, pending)
    append_in_shares(path, todo, chunk, info, work, "judge")
    return len(todo)


def score_phase(tasks: list[R1Task], out: Path, model_name: str) -> tuple[dict, str]:
    """(project summary, the kit's score table) from ``judged.jsonl``; writes ``score.txt``,
    ``summary.md``, ``summary.json``."""
    keys = {it.id for t in tasks for it in t.items}
    rubric = {t.name: t.rubric for t in tasks}
    records, unparsed = [], 0
    for r in read_records(out / "judged.jsonl"):
        if r["id"] in keys:
            e = r["evaluation"]
            unparsed += e["unparsed"]
            accuracy = e["score"] / 5 if rubric[r["task"]] else float(int(e["score"]))
            records.append({"task": r["task"], "index": r["index"],
                            "scores": {"accuracy": accuracy, "unparsed": e["unparsed"] / len(e["rounds"])}})
    summary = summarize(records, {t.name: len(t.items) for t in tasks})
    summary["unparsed_rounds"] = unparsed
    write_summary(out, summary)
    table = score_table(summary, model_name)
    (out / "score.txt").write_text(table)
    return summary, table


def score_table(summary: dict, model_name: str) -> str:
    """The kit's score table: ``Model: name``, then Task / Accuracy (a fraction) / Accuracy (%) per
    task and, with several tasks, ``Overall`` (the mean over tasks); tasks not yet judged show n/a."""
    rows = [(name, t["accuracy"] if t["n"] else None) for name, t in summary["tasks"].items()]
    scored = [v for _, v in rows if v is not None]
    if len(rows) > 1:
        rows.append(("Overall", sum(scored) / len(scored) if len(scored) == len(rows) else None))
    width = max(len(n) for n, _ in rows)
    lines = [f"Model: {model_name}", "", f"{'':>3} {'Task':<{width}} {'Accuracy':>8} {'Accuracy (%)':>12}"]
    for i, (name, value) in enumerate(rows):
        shown = ("n/a", "n/a") if value is None else (f"{value:.4f}", f"{value * 100:.2f}%")
        lines.append(f"{i:>3} {name:<{width}} {shown[0]:>8} {shown[1]:>12}")
    return "\n".join(lines) + "\n"


def free_memory() -> None:
    """Give a deleted model's memory back before the next one loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_judge(path: str, dtype: torch.dtype, device, **engine) -> ChatJudge:
    """The judge LLM at ``path`` (a directory or an embedded name) with a ``Sampler`` of its own
    (``engine``: the sampler's sizes)."""
    from ..demo.cache import resolve_model_path
    from ..generate import Sampler
    from ..model.loading import load_model

    model, tokenizer = load_model(resolve_model_path(path), dtype=dtype, device=device)
    return ChatJudge(model, tokenizer, Sampler(model, dtype=dtype, **engine))


def run_medix_r1(args, tasks: list[R1Task], info) -> int:
    """The three phases for ``python -m medix_fast.eval --protocol medix_r1`` (``cli.py``)."""
    from ..data.vision import Vision
    from ..generate import Sampler
    from ..demo.cache import resolve_model_path
    from ..model.loading import compute_dtype, image_token_id, is_vl, load_image_processor, load_model, stop_ids
    from .evaluator import EvalSettings, sampler_generate

    out = Path(args.out)  # with --overwrite, the earlier results were moved aside (cli.claim_out)
    out.mkdir(parents=True, exist_ok=True)
    items = [it for t in tasks for it in t.items]
    phases = PHASES if args.phase == "all" else (args.phase,)
    dtype = compute_dtype(args.dtype, info.device)
    max_new = args.max_new_tokens or MAX_NEW_TOKENS
    if "generate" in phases:
        check_settings(out / "run.json", {"protocol": "medix_r1", "model": str(args.model), "max_new_tokens": max_new,
                                          "tasks": {t.name: t.file for t in tasks}})
        model_path = resolve_model_path(args.model)
        model, tokenizer = load_model(model_path, dtype=dtype, device=info.device,
                                      experts_implementation=args.experts_implementation)
        vision = Vision(load_image_processor(model_path), image_token_id(model),
                        args.min_pixels or None, args.max_pixels or None) if is_vl(model) else None
        settings = EvalSettings(max_new_tokens=max_new, batch_size=args.batch_size)  # greedy
        sampler = Sampler(model, max_num_seqs=args.batch_size, dtype=dtype)
        generate = sampler_generate(sampler, tokenizer, stop_ids(model, tokenizer), settings, vision)
        generate_phase(items, out, generate, candidate_prompts(items, tokenizer, vision), args.batch_size)
        del model, sampler, generate
        free_memory()
    if "judge" in phases:
        check_settings(out / "judge.json", {"judge": str(args.judge)})
        chat = load_judge(args.judge, dtype, info.device, max_num_seqs=args.batch_size)
        judge_phase(items, out, chat, args.judge_batch, {t.name: t.rubric for t in tasks})
        del chat
        free_memory()
    if "score" in phases:
        summary, table = score_phase(tasks, out, Path(args.model).name)
        print(table + "\n" + markdown_table(summary), end="")
        if summary["unparsed_rounds"]:
            print(f"{summary['unparsed_rounds']} judge replies did not parse (each counted as a 0; "
                  f"per task: the 'unparsed' column, % of rounds)")
        print(f"scores: {out / 'score.txt'}\njudged: {out / 'judged.jsonl'}")
    return 0
