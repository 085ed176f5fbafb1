"""Partial rollouts (``rollout.partial``): groups a step's sampling left unfinished, carried on.

    carry = Carry(group_size)
    call = carry.call(fresh_ids, step, seed, max_staleness)  # carried rows first, then fresh groups
    out = sampler.generate([prompts[i].ids for i in call.prompts], n=call.counts, row_seeds=call.seeds,
                           continued=call.continued, required=call.required, stop_share=share, ...)
    finished = carry.absorb(call, out, step)  # the groups done now (carried first), G rows each

A group is a :class:`Pending` from its first call until its last row is finished. Its unfinished
rows keep their tokens and behaviour log-probs (the sampler's, under the weights of the call that
drew them) and their random stream ``(seed, row)``; the next call recomputes their K/V under the
updated weights and samples on (``generate/partial.py``). A group first sampled at step ``s`` must
be done by step ``s + max_staleness``: its rows are ``required`` in that call. Its finished rows
wait for the rest; the group's rewards and advantages are computed once it is done (rl/rollout.py).
Each row remembers how many tokens it drew in which step, for the staleness figures.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..generate.partial import PARTIAL


@dataclass(eq=False)
class Pending:
    """A group in flight: its prompt and, per row, what was sampled so far."""

    prompt: int  # index into the rollout's prompts
    born: int  # step of the group's first call
    seeds: list[tuple[int, int]]  # each row's stream
    tokens: list[list[int]]
    logprobs: list[torch.Tensor | None]  # (len,) fp32 behaviour log-probs, on the sampler's device
    reasons: list[str]  # "stop" | "length" | "partial" (unfinished)
    segments: list[list[tuple[int, int]]]  # per row: (step, tokens drawn in that step's call)
    routing: list = field(default_factory=list)  # MoE record of each row's finishing call (or None)
    image: object = None  # the prompt's PixelBatch (decoded once for the group's life)

    @property
    def open_rows(self) -> list[int]:
        return [j for j, r in enumerate(self.reasons) if r == PARTIAL]

    @property
    def done(self) -> bool:
        return not self.open_rows

    def state(self) -> dict:
        """JSON-able (the checkpoint's): tokens, float32 log-probs as numbers, routing as lists."""
        return {"prompt": self.prompt, "born": self.born, "seeds": [list(s) for s in self.seeds],
                "tokens": self.tokens, "logprobs": [lp.float().tolist() for lp in self.logprobs],
                "reasons": self.reasons, "segments": [[list(s) for s in seg] for seg in self.segments],
                "routing": [[str(r.dtype).removeprefix("torch."), r.tolist()] if r is not None else None
                            for r in self.routing]}

    @classmethod
    def from_state(cls, s: dict, device: torch.device) -> "Pending":
        return cls(s["prompt"], s["born"], [tuple(x) for x in s["seeds"]], s["tokens"],
                   [torch.tensor(lp, dtype=torch.float32, device=device) for lp in s["logprobs"]], s["reasons"],
                   [[tuple(x) for x in seg] for seg in s["segments"]],
                   [torch.tensor(r[1], dtype=getattr(torch, r[0]), device=device) if r is not None else None
                    for r in s["routing"]])


@dataclass
class Call:
    """One sampler call's arguments: ``entries`` (a Pending and its rows in the call) in order."""

    entries: list[tuple[Pending, list[int]]]
    rows: list[list[int]]  # per entry: its rows' positions in the call
    seeds: list[tuple[int, int]]
    continued: list  # per row: None or (tokens, log-probs)
    required: list[bool]

    @property
    def prompts(self) -> list[int]:  # prompt index per entry
        return [p.prompt for p, _ in self.entries]

    @property
    def counts(self) -> list[int]:  # rows per entry
        return [len(r) for r in self.rows]


class Carry:
    """This rank's groups in flight between steps (they stay on the rank that drew them)."""

    def __init__(self, group_size: int):
        self.g = group_size
        self.pending: list[Pending] = []

    def call(self, fresh: list[int], step: int, seed: int, max_staleness: int, carried: bool = True) -> Call:
        """The call for this step: the carried groups' open rows (``carried``), then ``fresh``
        prompts' G rows each with streams ``(seed, i * G + j)`` (a synchronous call's)."""
        entries = [(p, p.open_rows) for p in (self.pending if carried else [])]
        for i, prompt in enumerate(fresh):
            g = self.g
            entries.append((Pending(prompt, step, [(seed, i * g + j) for j in range(g)], [[] for _ in range(g)],
                                    [None] * g, [PARTIAL] * g, [[] for _ in range(g)], [None] * g),
                            list(range(g))))
        seeds, continued, required, positions = [], [], [], []
        for p, rows in entries:
            due = p.born + max_staleness <= step  # trained this step or never: must finish now
            positions.append(list(range(len(seeds), len(seeds) + len(rows))))
            for j in rows:
                seeds.append(p.seeds[j])
                continued.append((p.tokens[j], p.logprobs[j]) if p.tokens[j] else None)
                required.append(due)
        return Call(entries, positions, seeds, continued, required)

    def absorb(self, call: Call, out, step: int) -> list[Pending]:
        """The call's output into its groups; returns those now done (in call order: carried
        first) and keeps the rest for the next step."""
        k = 0
        for p, rows in call.entries:
            for j in rows:
                drawn = len(out.completion_ids[k]) - len(p.tokens[j])
                if drawn:
                    p.segments[j].append((step, drawn))
                p.tokens[j], p.logprobs[j], p.reasons[j] = out.completion_ids[k], out.logprobs[k], out.finish_reasons[k]
                if out.routing is not None and p.reasons[j] != PARTIAL:
                    p.routing[j] = out.routing[k]
                k += 1
        kept = {id(p) for p in self.pending}
        groups = [p for p, _ in call.entries]
        self.pending = [p for p in self.pending if not p.done] + [p for p in groups if id(p) not in kept and not p.done]
        return [p for p in groups if p.done]

    def state(self) -> list[dict]:
        return [p.state() for p in self.pending]

    def load(self, states: list[dict], device: torch.device) -> None:
        self.pending = [Pending.from_state(s, device) for s in states]


def staleness_tokens(groups: list[Pending], step: int) -> dict[int, int]:
    """Tokens of ``groups`` by staleness (``step`` minus the step that drew them)."""
    counts: dict[int, int] = {}
    for p in groups:
        for seg in p.segments:
            for drawn_at, n in seg:
                counts[step - drawn_at] = counts.get(step - drawn_at, 0) + n
    return counts
