"""The engine's record of a mixture-of-experts model's routing (``Sampler(record_routing=True)``):
each input token's selected experts per layer, for the update's routing replay (``model/routing.py``).

Every forward's ids (its tokens, layers, k) are an output of the runner's forward (``runner.routed``,
stacked inside the step, so the fixed-shape step and its CUDA graph write them into the graph's own
buffer, copied out after each replay) and go to a log on the device, as the log-probs do; each
prompt's prefix (its tokens but the last, prefilled once for the group) and each row's private
inputs (x_0 = the prompt's last token, x_i = completion[i - 1], see ``sequence.py``) keep where
theirs are in the log. A recomputed row's inputs point to the recompute's ids (overwritten, never
duplicated). A row's output is (len(prompt) + len(completion) - 1, layers, k): every input position
of prompt + completion but the last, which is what the trainer's forward routes for the row's
log-probs (the final completion token is never an input). A row continued from an earlier call
(``partial.py``) is recomputed here, so its record is this call's, prompt and earlier tokens too.
"""
from __future__ import annotations

import torch

from ..model.routing import RoutingRecord
from .partial import PARTIAL
from .scheduler import PrefillPlan
from .sequence import Row


class RoutingLog:
    def __init__(self, runner):
        self.runner = runner
        runner.record = RoutingRecord(runner.model)
        self.log: list[torch.Tensor] = []
        self.size = 0
        self.prefix: dict[int, list[int]] = {}  # group index -> log positions of its prefix tokens
        self.private: dict[int, list[int]] = {}  # row index -> log positions of x_0 .. x_{computed-1}

    def remove(self) -> None:
        self.runner.record.remove()
        self.runner.record = self.runner.routed = None

    def _append(self) -> int:
        ids = self.runner.routed  # (tokens, layers, k), the last forward's
        start = self.size
        self.log.append(ids)
        self.size += ids.shape[0]
        return start

    def prefilled(self, plan: PrefillPlan) -> None:
        """After ``runner.prefill(plan)``: the groups' prefixes, then the rows' recomputed inputs."""
        start = self._append()
        for g in plan.groups:
            self.prefix[g.index] = list(range(start, start + g.prefix_len))
            start += g.prefix_len
        for r in plan.rows:
            self.private[r.index] = list(range(start, start + len(r.tokens)))
            start += len(r.tokens)

    def decoded(self, batch: list[Row]) -> None:
        """After a decode step: row i routed its next input, x_computed."""
        start = self._append()
        for i, r in enumerate(batch):
            self.private.setdefault(r.index, []).append(start + i)

    def collect(self, rows: list[Row]) -> list[torch.Tensor]:
        """Each row's (len(prompt) + len(completion) - 1, layers, k) ids, one gather; none (0 ids)
        for a row left ``partial`` (its next call recomputes and records all of it)."""
        flat = torch.cat(self.log)  # (logged tokens, layers, k)
        index = [[] if r.finish == PARTIAL else self.prefix.get(r.group.index, []) + self.private.get(r.index, [])
                 for r in rows]
        for r, i in zip(rows, index):
            if r.finish != PARTIAL and len(i) != len(r.group.tokens) - 1 + len(r.tokens):
                raise RuntimeError(f"row {r.index}: routing of {len(i)} inputs recorded for "
                                   f"{len(r.group.tokens) - 1 + len(r.tokens)}")
        picked = flat[torch.tensor([p for i in index for p in i], dtype=torch.long, device=flat.device)]
        return list(picked.split([len(i) for i in index]))
