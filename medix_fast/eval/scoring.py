"""Scoring of eval generations: the MediX rewards, an option-letter match, the judge's majority vote.

    scorer = Scorer(build_reward(RewardConfig(judge_model="/models/judge")), votes=3, judge_temperature=0.7)
    scores, choices = scorer(items, responses, lengths)   # {component: (N,)}, extracted letters

``format``, ``modality`` and ``semantic`` come from the rewards module as in training.
``accuracy`` is, per item:
- multiple choice: the letter read from the response (``extract_choice``) equals the gold
  letter; no letter read -> 0; no judge is asked;
- open: MediX's rule (invalid answer -> 0, exact match after normalisation -> 1), else the judge;
  without a judge, exact match only.
``overall`` is the rewards' weighted sum with this accuracy.

Majority vote: one judge forward gives the margin logit(YES) - logit(NO) of the first reply
token; a vote of k asks at judge temperature T draws k replies from that distribution
(restricted to YES / NO, so P(YES) = sigmoid(margin / T)) with a seeded generator and scores 1
when more than half say YES. At T = 0 (MediX's setting) the k asks are identical, so the vote
equals one greedy ask: that is what runs, with a warning when k > 1.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import re
from collections.abc import Sequence

import torch

from ..errors import UserError
from ..rewards.rules import extract_answer, normalize, parse

log = logging.getLogger(__name__)

_ANSWER_TAG = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.S | re.I)
_BARE = re.compile(r"[\W_]*([A-Za-z])[\W_]*")  # "B", "(b)", "B.", "**C**", "[D]"
_LABEL = re.compile(r"[\W_]*\(?([A-Za-z])(?:\)|\.|:|\s[-\u2013\u2014])(?:\s|$)")  # "C) foo", "(A) bar", "B. baz"
_EXPLICIT = re.compile(r"\b(?:answer|option|choice)\b(?:\s+is)?\s*[:=\-]?\s*(?:option\s+|choice\s+)?\(?([A-Za-z])\)?"
                       r"(?=$|[\s.,;:!)\]*])", re.I)
_HEDGE = re.compile(r"(?<![A-Za-z0-9])([A-Z])\)?\s*(?:,|/|\bor\b|\band\b)\s*\(?([A-Z])(?![A-Za-z0-9])")
_STANDALONE = re.compile(r"(?<![A-Za-z0-9'])([A-Z])(?![A-Za-z0-9'])")
_WORD_NEXT = re.compile(r"\s+[A-Za-z]")


def _answer_region(text: str) -> tuple[str, bool]:
    """(content of the first <answer> tag, True), or (the whole text, False) when there is none."""
    m = _ANSWER_TAG.search(text)
    return (m.group(1).strip(), True) if m else (text.strip(), False)


def extract_choice(response: str, letters: str = "ABCD", options: dict[str, str] | None = None) -> str | None:
    """The option letter a response picks, or None (no letter, a hedge like "A or B", a letter
    outside ``letters``). Looked for in the ``<answer>`` content when there is one, else in the
    whole response, in this order: the answer is just a letter ("(B)", "b."); it equals one
    option's text (case-insensitive); a hedge naming two letters -> None; it starts with a label
    ("C) foo", "B. bar"); an explicit phrase ("Answer: b", "the answer is D"; the last one wins;
    "the answer is a ..." is an article); inside ``<answer>`` only, the one capital letter of
    ``letters`` standing alone."""
    region, tagged = _answer_region(response)
    region = region.replace("**", "")

    def pick(letter: str | None) -> str | None:
        return letter.upper() if letter and letter.upper() in letters else None

    m = _BARE.fullmatch(region)
    if m:
        return pick(m.group(1))
    text = region.strip().strip(".").casefold()
    hits = [k for k, v in (options or {}).items() if v.strip().strip(".").casefold() == text]
    if len(hits) == 1:
        return pick(hits[0])
    hedge = _HEDGE.search(region)
    if hedge and {hedge.group(1), hedge.group(2)} <= set(letters) and hedge.group(1) != hedge.group(2):
        return None
    m = _LABEL.match(region)
    if m:
        return pick(m.group(1))
    found = [m for m in _EXPLICIT.finditer(region)  # a lower-case letter before a word is an article
             if not (m.group(1).islower() and _WORD_NEXT.match(region, m.end()))]
    if found:
        return pick(found[-1].group(1))
    if tagged:
        alone = {c for c in _STANDALONE.findall(region) if c in letters}
        if len(alone) == 1:
            return alone.pop()
    return None

def vote(margin: torch.Tensor, votes: int, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """(N,) float 0/1: the majority of ``votes`` YES/NO replies drawn at ``temperature`` (0: greedy)."""
    if temperature == 0:
        return (margin > 0).float()
    p_yes = torch.sigmoid(margin.float() / temperature)  # (N,)
    draws = torch.rand((margin.numel(), votes), generator=generator) < p_yes[:, None]  # (N, k)
    return (draws.sum(1) * 2 > votes).float()


class Scorer:
    """Scores eval items: ``__call__(items, responses, lengths)`` -> ({component: (N,)}, letters).

    ``reward_fn`` is a ``medix_fast.rewards.RewardFunction`` (its models are shared, not copied);
    ``judge`` defaults to its judge and is anything with ``margin(predicted, ground_truth) -> (N,)``.
    """

    def __init__(self, reward_fn, judge=None, votes: int = 1, judge_temperature: float = 0.0, seed: int = 0):
        if votes < 1 or judge_temperature < 0:
            raise UserError(f"need judge votes >= 1 and judge temperature >= 0, got {votes}, {judge_temperature}")
        if votes > 1 and judge_temperature == 0:
            log.warning("%d judge votes at temperature 0 are %d identical asks: one greedy ask is used "
                        "(give a judge temperature > 0 for a sampled majority vote)", votes, votes)
        self.weights = dict(reward_fn.cfg.weights)
        self.others = copy.copy(reward_fn)  # the same models, scoring every component but accuracy
        self.others.cfg = dataclasses.replace(reward_fn.cfg, weights={k: v for k, v in self.weights.items()
                                                                       if k != "accuracy"})
        self.judge = judge if judge is not None else getattr(reward_fn, "judge", None)
        self.votes, self.temperature = votes, judge_temperature
        self.generator = torch.Generator().manual_seed(seed)

    def accuracy(self, items: Sequence, responses: list[str], solutions: list[str]) -> tuple[torch.Tensor, list]:
        """(N,) accuracy and the letter read from each multiple-choice response (None for open items)."""
        p = parse(responses, solutions)
        acc = torch.tensor([float(e) for e in p.exact]).reshape(len(items))
        choices = [extract_choice(normalize(r), it.letters, it.options) if it.letters else None
                   for it, r in zip(items, responses)]
        pending = []
        for i, (it, choice) in enumerate(zip(items, choices)):
            if it.letters:
                acc[i] = float(choice == it.gold)
            elif not (p.invalid[i] or p.exact[i]):
                pending.append(i)
        if self.judge is not None and pending:
            margin = self.judge.margin([p.answers[i] for i in pending], [p.references[i] for i in pending])
            acc[pending] = vote(margin.cpu(), self.votes, self.temperature, self.generator)
        return acc, choices

    def __call__(self, items: Sequence, responses: Sequence[str], lengths: Sequence[int]) -> tuple[dict, list]:
        responses, solutions = list(responses), [it.solution for it in items]
        scores = self.others(responses, solutions, response_lengths=torch.tensor(list(lengths)))
        accuracy, choices = self.accuracy(items, responses, solutions)
        overall = scores.pop("overall") + self.weights.get("accuracy", 0.0) * accuracy
        return {"accuracy": accuracy, **scores, "overall": overall}, choices


def answer_of(response: str) -> str:
    """The predicted answer as the rewards read it (for the JSONL)."""
    return extract_answer(normalize(response))
