"""``eval.protocol: medix_r1``: MediX-R1's published evaluation inside training, by the phases of
``python -m medix_fast.eval --protocol medix_r1`` (``medix_r1.py``), on the live weights.

Every ``eval.every`` steps, under ``<output_dir>/eval/step_N/``, the files the command line
writes: ``generations.jsonl`` (the trainer's sampler, greedy, the items split across ranks),
``judged.jsonl`` (three rounds per item, every rank's share of ``eval.judge_batch`` items in one
sampler call per round), ``score.txt`` and ``summary.md`` / ``summary.json``; logged as
``eval/<task>/accuracy``, ``eval/mean_accuracy`` (the kit's Overall), ``eval/accuracy`` (over
items) and ``eval/unparsed``. The judge is the one the reward holds (``rewards.judge_model``),
used as it is (moved to the device for the evaluation under ``rewards.offload``), unless
``eval.judge_model`` names another: that one is loaded for each evaluation and released after.

Resumable with the run: the files are continued, never started again, and the trainer writes
the checkpoint of an evaluation's step before the evaluation (``resumable``), so a run stopped
inside one resumes at that checkpoint and finishes it from what its folder holds.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from .. import distributed as D
from .medix_r1 import candidate_prompts, free_memory, generate_phase, judge_phase, load_judge, score_phase
from .medix_r1_judge import ChatJudge
from .medix_r1_tasks import R1Task, load_medix_r1_tasks
from .results import check_settings, to_metrics
from .settings import EvalSettings
from .shares import on_main


def _same_path(a: str, b: str | None) -> bool:
    return b is not None and Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


class R1Evaluator:
    """MediX-R1's tasks, their prompts for the trained model, and ``during_training``."""

    resumable = True  # the trainer checkpoints an evaluation's step first; the files are continued

    def __init__(self, tasks: list[R1Task], tokenizer, info: D.DistInfo, vision, max_new_tokens: int,
                 judge_model: str | None, judge_batch: int, dtype: torch.dtype, engine: dict):
        self.tasks, self.info, self.vision, self.max_new_tokens = tasks, info, vision, max_new_tokens
        self.judge_model, self.judge_batch, self.dtype, self.engine = judge_model, judge_batch, dtype, engine
        self.items = [it for t in tasks for it in t.items]
        self.prompt_ids = candidate_prompts(self.items, tokenizer, vision)
        self.tokenizer, self.summary, self.judge_name = tokenizer, None, judge_model

    @classmethod
    def from_config(cls, cfg, tokenizer, info: D.DistInfo, vision=None) -> "R1Evaluator":
        """The ``eval`` section (``eval.tasks``, default the command line's ``configs/eval/medix_r1.yaml``)."""
        from ..model.loading import compute_dtype
        from .cli import DEFAULT_R1_TASKS

        e, s = cfg.eval, cfg.sampling
        tasks = load_medix_r1_tasks(e.tasks or DEFAULT_R1_TASKS, e.data_dir, e.limit)
        engine = dict(max_num_seqs=s.max_num_seqs, kv_cache_gb=s.kv_cache_gb, block_size=s.block_size,
                      gpu_memory_utilization=s.gpu_memory_utilization, max_prefill_tokens=s.max_prefill_tokens)
        evaluator = cls(tasks, tokenizer, info, vision, e.max_new_tokens or s.max_new_tokens, e.judge_model,
                        e.judge_batch, compute_dtype(cfg.model.dtype, info.device), engine)
        evaluator.judge_name = e.judge_model or cfg.rewards.judge_model
        return evaluator

    def headline(self) -> str:
        """How the evaluation runs, the line above its table."""
        return (f"{len(self.items)} items of {len(self.tasks)} MediX-R1 task(s), greedy, <= {self.max_new_tokens} "
                f"new tokens; judged by {self.judge_name} (3 rounds, MediX-R1's kit)")

    @contextmanager
    def _chat(self, reward_fn):
        """The judge for one evaluation: the reward's (on its device), else ``eval.judge_model``
        loaded now and released after; its K/V pool is released after either way."""
        held = getattr(reward_fn, "judge", None)
        if held is not None and (self.judge_model is None or _same_path(self.judge_model, reward_fn.cfg.judge_model)):
            from ..generate import Sampler

            with reward_fn.placed():
                chat = ChatJudge(held.model, held.tokenizer, Sampler(held.model, dtype=self.dtype, **self.engine))
                try:
                    yield chat
                finally:
                    chat.sampler.release()
            return
        chat = load_judge(self.judge_model, self.dtype, self.info.device, **self.engine)
        try:
            yield chat
        finally:
            del chat
            free_memory()

    def during_training(self, sampler, reward_fn, stop_token_ids: list[int], out_dir: Path,
                        weights=nullcontext) -> dict[str, float]:
        """The three phases in ``out_dir`` (continued where it stopped), the generation inside
        ``weights()`` (the trainer's: the weights the sampler runs on, FSDP2's unsharded; it gives
        the K/V pool back before they go), the judge after it; returns the per-task scores as
        ``eval/*``. ``self.summary``: the table's summary. Every rank calls it."""
        from .evaluator import sampler_generate

        out = Path(out_dir)
        fingerprint = {"protocol": "medix_r1", "model": "the trained weights", "max_new_tokens": self.max_new_tokens,
                       "tasks": {t.name: t.file for t in self.tasks}}

        def claim() -> None:
            out.mkdir(parents=True, exist_ok=True)
            check_settings(out / "run.json", fingerprint)
            check_settings(out / "judge.json", {"judge": str(self.judge_name)})

        on_main(self.info, claim)
        settings = EvalSettings(max_new_tokens=self.max_new_tokens, batch_size=sampler.max_num_seqs)  # greedy
        generate = sampler_generate(sampler, self.tokenizer, stop_token_ids, settings, self.vision)
        with weights():  # the policy's weights and K/V pool go before the judge's come
            generate_phase(self.items, out, generate, self.prompt_ids, settings.batch_size, self.info)
        with self._chat(reward_fn) as chat:
            judge_phase(self.items, out, chat, self.judge_batch, {t.name: t.rubric for t in self.tasks}, self.info)
        self.summary = on_main(self.info, lambda: score_phase(self.tasks, out, out.name)[0])
        return to_metrics(self.summary)

