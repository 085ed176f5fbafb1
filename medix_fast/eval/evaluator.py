"""The evaluator of ``python -m medix_fast.eval`` (the command line is ``cli.py``): accuracy of a
checkpoint on medical QA tasks, graded like MediX-R1.

    python -m medix_fast.eval --model tiny                      # the bundled held-out split
    python -m medix_fast.eval --model DIR --data test.jsonl --judge JUDGE_DIR --out runs/eval/x
    python -m medix_fast.eval --model DIR --tasks tasks.yaml --max-new-tokens 1024 --judge-votes 3 \\
        --judge-temperature 0.7
    torchrun --nproc_per_node=8 -m medix_fast.eval --model DIR --tasks tasks.yaml   # items split by rank

Each item's question goes through the MediX instruction and the model's chat template (with a
vision-language model, its image goes before the question, as in training); the
in-process sampler answers it (greedy by default); ``scoring.Scorer`` scores it with the
rewards (format, modality, semantic, overall) and an accuracy that is a letter match for
multiple-choice tasks and the judge (exact match without ``--judge``) for open ones. Tasks:
``tasks.py`` (``--tasks`` YAML, ``--data`` files, default the bundled ``sample:test``).
Output (``results.py``): ``generations.jsonl`` (one line per item, appended batch by batch,
so a killed run continued with the same command only generates what is missing),
``summary.md`` / ``summary.json`` (per-task and overall table, also printed). Under torchrun
every rank generates and scores its share of each batch and rank 0 writes what it gathers.

The training loop runs the same code every ``eval.every`` steps (``Evaluator.during_training``).
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import distributed as D
from ..data import Example, build_prompts
from ..data.prompt import response_texts
from ..seeds import mix_seed
from .results import check_settings, read_records, summarize, to_metrics, write_summary
from .scoring import Scorer, answer_of
from .settings import EvalSettings
from .shares import append_in_shares, on_main
from .tasks import Item, Task, TaskError, data_tasks, load_tasks

log = logging.getLogger("medix_fast.eval")


@dataclass
class Generation:
    text: str  # decoded, stop token and special tokens dropped
    tokens: int
    finish_reason: str  # "stop" | "length"


Generate = Callable[[list[Item], list[list[int]], int], list[Generation]]  # (items, prompt ids, seed)


def sampler_generate(sampler, tokenizer, stop_token_ids: list[int], settings: EvalSettings,
                     vision=None, n: int = 1) -> Generate:
    """A ``Generate`` running ``medix_fast.generate.Sampler``: ``n`` completions per item,
    item-major; with ``vision`` (a ``medix_fast.data.vision.Vision``, VL models) the items'
    images are encoded and fed. Called with no items it returns none (a rank of a tensor-parallel
    group, ``GroupSampler``, still takes part in the group's call)."""

    def generate(items: list[Item], prompt_ids: list[list[int]], seed: int) -> list[Generation]:
        if not items and not generate.collective:
            return []
        images = None if vision is None else [vision.pixels(it.image) for it in items]
        out = sampler.generate(prompt_ids, n=n, max_new_tokens=settings.max_new_tokens,
                               temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
                               stop_token_ids=stop_token_ids, seed=seed, images=images)
        texts = response_texts(tokenizer, out.completion_ids, stop_token_ids)
        return [Generation(t, len(c), r) for t, c, r in zip(texts, out.completion_ids, out.finish_reasons)]

    generate.collective = getattr(sampler, "collective", False)  # a GroupSampler: called with no items too
    return generate


def describe(settings: EvalSettings, weights: dict[str, float], items: int, judge: bool = False) -> str:
    """One line saying how an evaluation was run, printed above its table (training and
    ``python -m medix_fast.eval`` print the same line for the same settings)."""
    decoding = ("greedy" if settings.temperature == 0 else
                f"T={settings.temperature:g}, top-p {settings.top_p:g}" + (f", top-k {settings.top_k}" if settings.top_k else ""))
    overall = " + ".join(f"{w:.4g}·{k}" for k, w in weights.items() if w)
    return (f"{items} held-out items, {decoding}, <= {settings.max_new_tokens} new tokens; accuracy by "
            f"{'the judge' if judge else 'exact match (no judge)'}; overall = {overall}")


class Evaluator:
    """The items of some tasks, their prompts, and a resumable, distributed ``run``. With
    ``vision`` (VL models) an item's image tokens are expanded in its prompt; the same ``vision``
    must then go to ``sampler_generate``."""

    resumable = False  # in training: run inside its step, its folder written afresh

    def __init__(self, tasks: list[Task], tokenizer, settings: EvalSettings, info: D.DistInfo | None = None,
                 vision=None):
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise TaskError(f"task names must be unique, got {names}")
        self.tasks, self.tokenizer, self.settings, self.vision = tasks, tokenizer, settings, vision
        self.samples, self.sample_settings, self.summary = 0, settings, None  # pass@k in training: from_config
        self.weights, self.judged = {}, False  # the reward weights and whether a judge grades (during_training)
        self.info = info or D.DistInfo()
        self.items = [it for t in tasks for it in t.items]
        examples = [Example(it.question, it.solution, it.image) for it in self.items]
        self.prompt_ids = [p.ids for p in build_prompts(examples, tokenizer, sys.maxsize, vision)[0]]

    def headline(self) -> str:
        """How the evaluation runs, the line above its table (after ``during_training``)."""
        return describe(self.settings, self.weights, len(self.items), self.judged)

    def fingerprint(self, extra: dict | None) -> dict:
        """What the generations depend on: a resumed run must match it."""
        s = dataclasses.asdict(self.settings)
        s.pop("batch_size")
        if self.vision is not None:
            s["pixels"] = [self.vision.min_pixels, self.vision.max_pixels]
        return {"tasks": {t.name: t.file for t in self.tasks}, **s, **(extra or {})}

    def _pending(self, out: Path, extra: dict | None, overwrite: bool) -> list[int]:
        """Indices into ``self.items`` not yet in the JSONL, longest prompt first (rank 0 only)."""
        out.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for name in ("generations.jsonl", "run.json", "summary.md", "summary.json"):
                (out / name).unlink(missing_ok=True)
        check_settings(out / "run.json", self.fingerprint(extra))
        done = {(r["task"], r["index"]) for r in read_records(out / "generations.jsonl")}
        pending = [i for i, it in enumerate(self.items) if (it.task, it.index) not in done]
        if len(pending) < len(self.items):
            log.info("%s: %d of %d items already done, generating the other %d", out, len(self.items) - len(pending),
                     len(self.items), len(pending))
        return sorted(pending, key=lambda i: -len(self.prompt_ids[i]))

    def _records(self, share: list[int], generate: Generate, scorer: Scorer, seed: int) -> list[dict]:
        if not share:  # a tensor-parallel group samples together: this rank takes part with no items
            generate([], [], seed)
            return []
        items = [self.items[i] for i in share]
        gens = generate(items, [self.prompt_ids[i] for i in share], seed)
        scores, choices = scorer(items, [g.text for g in gens], [g.tokens for g in gens])
        records = []
        for j, (it, g, choice) in enumerate(zip(items, gens, choices)):
            record = {"task": it.task, "index": it.index, "question": it.question, "solution": it.solution,
                      "gold": it.gold, "response": g.text, "answer": answer_of(g.text)}
            if it.letters:
                record["choice"] = choice
            record.update(finish_reason=g.finish_reason, tokens=g.tokens,
                          scores={k: float(v[j]) for k, v in scores.items()})
            records.append(record)
        return records

    def run(self, generate: Generate, scorer: Scorer, out_dir: str | Path, fingerprint: dict | None = None,
            overwrite: bool = False, progress: bool = True) -> dict:
        """Generate and score every item missing from ``out_dir/generations.jsonl``, then write
        and return the summary (``eval_results.summarize``). Every rank must call it."""
        out, rank, world = Path(out_dir), self.info.rank, self.info.world
        path = out / "generations.jsonl"
        pending = on_main(self.info, lambda: self._pending(out, fingerprint, overwrite))

        def work(share: list[int], call: int) -> list[dict]:
            return self._records(share, generate, scorer, mix_seed(self.settings.seed, call * world + rank))

        append_in_shares(path, pending, self.settings.batch_size, self.info, work, "eval", progress)
        summary = None
        if self.info.is_main:
            keys = {(it.task, it.index) for it in self.items}
            records = [r for r in read_records(path) if (r["task"], r["index"]) in keys]
            summary = summarize(records, {t.name: len(t.items) for t in self.tasks})
            write_summary(out, summary)
        return D.broadcast_object(summary)

    def pass_at_k(self, generate: Generate, scorer: Scorer, k: int) -> dict[str, float]:
        """``pass@1`` (mean accuracy of a sample) and ``pass@k`` (share of items with at least
        one right answer) over ``k`` samples per item; ``generate`` must draw ``k`` per item
        (``sampler_generate(..., n=k)``). Every rank must call it; nothing is written."""
        rank, world = self.info.rank, self.info.world
        mine = list(range(rank, len(self.items), world))
        right = torch.zeros((), dtype=torch.float64)  # read back once, after the reduce
        any_right = torch.zeros((), dtype=torch.float64)
        per_call = max(1, self.settings.batch_size // k)
        longest = -(-len(self.items) // world)  # the most items a rank has: every rank makes as many calls
        for batch, start in enumerate(range(0, longest, per_call)):
            share = mine[start:start + per_call]
            items = [self.items[i] for i in share]
            seed = (self.settings.seed * 1_000_003 + 7919 * (batch * world + rank + 1)) % (2**31 - 1)
            if not share:
                generate([], [], seed)  # a tensor-parallel group samples together
                continue
            gens = generate(items, [self.prompt_ids[i] for i in share], seed)
            repeated = [it for it in items for _ in range(k)]
            accuracy = scorer.accuracy(repeated, [g.text for g in gens], [it.solution for it in repeated])[0]
            hits = accuracy.view(len(items), k)  # (items, k)
            right = right + hits.sum().to(right)
            any_right = any_right + hits.amax(1).sum().to(any_right)
        total = D.reduce_scalars({"right": right, "any": any_right}, self.info.device)
        n = max(1, len(self.items))
        return {"pass@1": total["right"] / (n * k), f"pass@{k}": total["any"] / n}

    # ------------------------------------------------------------------ inside training
    @classmethod
    def from_config(cls, cfg, tokenizer, info: D.DistInfo, vision=None) -> "Evaluator":
        """The ``eval`` section of a training config: its tasks YAML, else ``data.val_files``
        (``vision``: the trainer's, for a VL model)."""
        e, d = cfg.eval, cfg.data
        if e.tasks:
            tasks = load_tasks(e.tasks, e.limit)
        else:
            columns = {"question": d.problem_key, "answer": d.solution_key, "image": d.image_key}
            tasks = [t for name in d.val_files for t in data_tasks(name, e.limit, columns)]
        settings = EvalSettings(max_new_tokens=e.max_new_tokens or cfg.sampling.max_new_tokens,
                                temperature=e.temperature, top_p=e.top_p, seed=cfg.train.seed,
                                judge_votes=e.judge_votes, judge_temperature=e.judge_temperature)
        evaluator = cls(tasks, tokenizer, settings, info, vision)
        s = cfg.sampling  # pass@k samples like the rollout
        evaluator.samples = e.samples
        evaluator.sample_settings = dataclasses.replace(settings, temperature=s.temperature, top_p=s.top_p,
                                                        top_k=s.top_k)
        return evaluator

    def during_training(self, sampler, reward_fn, stop_token_ids: list[int], out_dir: Path,
                        weights=nullcontext) -> dict[str, float]:
        """Evaluate the live weights with the trainer's sampler and reward models (no copies),
        inside ``weights()`` (the trainer's: the weights the sampler runs on; it gives the sampler's
        K/V pool back, or keeps it for the next rollout, before they go); writes ``out_dir`` afresh and returns ``eval/<score>``, ``eval/<task>/accuracy``,
        ``eval/mean_accuracy`` and, with ``samples`` = k > 0 (``eval.samples``), ``eval/pass@1``
        and ``eval/pass@k`` of k samples per item drawn like the rollout's. ``self.summary`` is
        the table's summary (rank 0)."""
        with weights():
            return self._during_training(sampler, reward_fn, stop_token_ids, out_dir)

    def _during_training(self, sampler, reward_fn, stop_token_ids: list[int], out_dir: Path) -> dict[str, float]:
        settings = dataclasses.replace(self.settings, batch_size=sampler.max_num_seqs)
        scorer = Scorer(reward_fn, votes=settings.judge_votes, judge_temperature=settings.judge_temperature,
                        seed=settings.seed + self.info.rank)
        generate = sampler_generate(sampler, self.tokenizer, stop_token_ids, settings, self.vision)
        saved, self.settings = self.settings, settings
        self.weights, self.judged = dict(reward_fn.cfg.weights), getattr(reward_fn, "judge", None) is not None
        try:
            self.summary = self.run(generate, scorer, out_dir, overwrite=True, progress=False)
            metrics = to_metrics(self.summary)
            if self.samples:
                self.settings = dataclasses.replace(self.sample_settings, batch_size=sampler.max_num_seqs)
                generate = sampler_generate(sampler, self.tokenizer, stop_token_ids, self.settings, self.vision,
                                            n=self.samples)
                metrics.update({f"eval/{k}": v for k, v in self.pass_at_k(generate, scorer, self.samples).items()})
            return metrics
        finally:
            self.settings = saved
