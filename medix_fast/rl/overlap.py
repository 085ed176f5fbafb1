"""Reward scoring that overlaps the decode (``rollout.overlap_rewards``): each group is scored as
soon as its last row finishes, on one worker thread, while the call's other rows decode.

    scorer = GroupScorer(score, rows_of_group, batch_groups=4, device=device)
    out = sampler.generate(..., on_finish=scorer.finished)   # rows' tokens as they finish
    rewards = scorer.results(groups)                          # {component: (rows,)} in ``groups``' order

``score(groups, tokens)`` is the rollout's reward call for those groups (``tokens``: each finished
row's completion, by its row in the call); it runs on the worker, ``batch_groups`` groups at a time
(the reward models' batches, so a judge still sees batches, not single groups). On CUDA the worker
launches on a stream of its own, which the caller's stream waits for in :meth:`results`: the reward
models' kernels run beside the decode's on the device. On the CPU the worker is a second thread:
it overlaps when the decode leaves a core free (the default run's ``train.threads: 1`` on 2 cores),
and competes with it otherwise. Scored in pieces, a group's rewards are those of one batched call up
to the reward models' padding (rule-based components: exactly).
"""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor

import torch


class GroupScorer:
    def __init__(self, score, group_rows: list[list[int]], batch_groups: int, device: torch.device,
                 sizes: list[int] | None = None):
        """``sizes``: rows each group's scores have (default: its rows in the call; a carried group
        also scores the rows it finished in earlier calls)."""
        self.score, self.batch = score, max(1, batch_groups)
        self.sizes = sizes or [len(rows) for rows in group_rows]
        self.left = [set(rows) for rows in group_rows]  # each group's rows not finished yet
        self.group_of = {r: g for g, rows in enumerate(group_rows) for r in rows}
        self.tokens: dict[int, list[int]] = {}
        self.ready: list[int] = []  # finished groups not handed to the worker yet
        self.jobs: list[tuple[list[int], object]] = []
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="medix-rewards")

    def finished(self, rows: list[tuple[int, list[int]]]) -> None:
        """The sampler's ``on_finish``: rows (call index, tokens) that finished in a decode step."""
        for r, tokens in rows:
            self.tokens[r] = list(tokens)
            g = self.group_of[r]
            self.left[g].discard(r)
            if not self.left[g]:
                self.ready.append(g)
        if len(self.ready) >= self.batch:
            self._submit()

    def _submit(self) -> None:
        groups, self.ready = self.ready, []
        self.jobs.append((groups, self.pool.submit(self._run, groups, dict(self.tokens))))

    def _run(self, groups: list[int], tokens: dict[int, list[int]]) -> dict[str, torch.Tensor]:
        with torch.no_grad(), (torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()):
            return self.score(groups, tokens)

    def results(self, groups: list[int]) -> dict[str, torch.Tensor]:
        """Every finished group's rewards, (rows,) per component in ``groups``' order (their rows in
        the order ``score`` returned them); ``groups`` must all be finished."""
        if self.ready:
            self._submit()
        pieces: dict[int, dict[str, torch.Tensor]] = {}
        try:
            for done, job in self.jobs:
                out = job.result()
                sizes = [self.sizes[g] for g in done]
                for g, part in zip(done, zip(*(v.split(sizes) for v in out.values()))):
                    pieces[g] = dict(zip(out.keys(), part))
        finally:
            self.pool.shutdown(wait=True)
        if self.stream is not None:  # the training stream reads them: it waits, and owns their memory from here
            main = torch.cuda.current_stream(self.stream.device)
            main.wait_stream(self.stream)
            for part in pieces.values():
                for v in part.values():
                    v.record_stream(main)
        missing = [g for g in groups if g not in pieces]
        if missing:
            raise RuntimeError(f"groups {missing} were not finished, so never scored")
        keys = next(iter(pieces.values())).keys() if pieces else ()
        return {k: torch.cat([pieces[g][k] for g in groups]) for k in keys}
