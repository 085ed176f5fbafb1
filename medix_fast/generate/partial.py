"""Interruptible sampling calls: rows continued from an earlier call, and a call that stops early.

    out = sampler.generate(prompts, n=[2, 8], continued=[(tokens, logprobs), (tokens, logprobs)] + [None] * 8,
                           row_seeds=seeds, stop_share=0.9, required=[True, True] + [False] * 8)
    out.finish_reasons[k]  # "stop" | "length" | "partial" (left unfinished: its tokens so far)

A continued row starts with the tokens (and their per-token log-probs) an earlier call sampled:
the engine recomputes their K/V under the weights it has now (a preempted row's path) and samples
on from there; its random stream goes on at step ``len(tokens)`` of its ``row_seeds`` key, so a row
split over calls draws the noise it would draw in one. Its output holds every token and log-prob,
the earlier ones first. With ``stop_share`` the call stops at the first decode step after which at
least ``ceil(stop_share * rows)`` rows are finished and every ``required`` row is; the rows not
finished then (running, preempted or never admitted) end with the reason ``"partial"``.
"""
from __future__ import annotations

import math

import torch

PARTIAL = "partial"


class StopRule:
    """When a call with ``stop_share`` may stop: counts finished rows and required rows left."""

    def __init__(self, rows: int, share: float | None, required: list[bool] | None):
        if share is not None and not 0 < share <= 1:
            raise ValueError(f"stop_share must be in (0, 1], got {share}")
        if required is not None and len(required) != rows:
            raise ValueError(f"required has {len(required)} entries for {rows} rows")
        self.share = share
        self.need = math.ceil(share * rows) if share is not None else rows
        self.required = required or [False] * rows
        self.required_left = sum(self.required)
        self.finished = 0

    def finish(self, row: int) -> None:
        self.finished += 1
        self.required_left -= self.required[row]

    @property
    def reached(self) -> bool:
        return self.share is not None and self.finished >= self.need and not self.required_left


def check_continued(continued: list | None, rows: int, max_new: int, stops: set[int]) -> list | None:
    """``continued`` (None, or per row None or (tokens, (len,) log-probs)) checked: each continued
    row has fewer than ``max_new`` tokens, as many log-probs, and no stop token (it was unfinished)."""
    if continued is None:
        return None
    if len(continued) != rows:
        raise ValueError(f"continued has {len(continued)} entries for {rows} rows")
    out = []
    for k, item in enumerate(continued):
        if item is None:
            out.append(None)
            continue
        tokens, logprobs = list(item[0]), item[1]
        if not torch.is_tensor(logprobs) or logprobs.shape != (len(tokens),):
            raise ValueError(f"continued row {k}: {len(tokens)} tokens need ({len(tokens)},) log-probs, "
                             f"got {getattr(logprobs, 'shape', type(logprobs).__name__)}")
        if len(tokens) >= max_new:
            raise ValueError(f"continued row {k}: {len(tokens)} tokens leave nothing to sample "
                             f"under max_new_tokens={max_new}")
        if stops.intersection(tokens):
            raise ValueError(f"continued row {k} holds a stop token: it was finished, not partial")
        out.append((tokens, logprobs))
    return out
