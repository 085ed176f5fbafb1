"""MediX-R1's string rules: normalisation, answer extraction, invalid answers, format, modality.

Each rule is the reference's (``training/examples/reward_function/medical.py`` of MediX-R1), written
to run in linear time: the reference's regexes backtrack quadratically on long junk (100K spaces
take ~50 s to normalise), so each pattern here is replaced by an equivalent scan, and
``tests/test_rewards_rules.py`` checks the equivalence against the original regexes.

One departure: the ground-truth tag and answer come from ``medix_fast.data.prompt.split_solution``,
which strips the solution first (the reference keeps leading whitespace in the tag).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from medix_fast.data.prompt import split_solution

INVALID_SYMBOLS = ("__", ":", "?")
_SPACE_RUN = re.compile(r"\s+")
_THINK_THEN_ANSWER = re.compile(r"</thinking>\s*<answer>")
_SPECIAL = "<>/"


def _drop_if_beside_special(m: re.Match) -> str:
    s, i, j = m.string, m.start(), m.end()
    beside = (i > 0 and s[i - 1] in _SPECIAL) or (j < len(s) and s[j] in _SPECIAL)
    return "" if beside else m.group(0)


def normalize(response: str) -> str:
    """Remove whitespace next to ``<``, ``>`` and ``/`` (reference: ``re.sub(r"\\s*(<|>|/)\\s*", r"\\1", s)``)."""
    return _SPACE_RUN.sub(_drop_if_beside_special, response)


def format_ok(text: str) -> bool:
    """``text[first <thinking>:].strip()`` fully matches ``<thinking>.*?</thinking>\\s*<answer>.*?</answer>``.

    Equivalent scan: the tail must end with ``</answer>``, and the leftmost ``</thinking>\\s*<answer>``
    after the opening tag must close before that final ``</answer>`` begins."""
    start = text.find("<thinking>")
    if start < 0:
        return False
    tail = text[start:].strip()
    if not tail.endswith("</answer>"):
        return False
    m = _THINK_THEN_ANSWER.search(tail, len("<thinking>"))
    return m is not None and m.end() <= len(tail) - len("</answer>")


def modality_ok(text: str, gt_tag: str) -> bool:
    """The text before the first ``<thinking>``, stripped, equals the ground-truth tag (any case)."""
    start = text.find("<thinking>")
    return start >= 0 and text[:start].strip().upper() == gt_tag.upper()


def extract_answer(text: str) -> str:
    """First ``<answer>...</answer>`` content (else the whole text), stripped, then ``.`` stripped."""
    open_at = text.find("<answer>")
    close_at = text.find("</answer>", open_at + len("<answer>")) if open_at >= 0 else -1
    inner = text[open_at + len("<answer>"):close_at] if close_at >= 0 else text
    return inner.strip().strip(".")


def answer_invalid(answer: str) -> bool:
    """Empty, one character, or containing ``__``, ``:`` or ``?``."""
    return len(answer) <= 1 or any(sym in answer for sym in INVALID_SYMBOLS)


@dataclass
class Parsed:
    """The rule outputs for one batch; the two answer lists feed the model-based components."""
    format: list[float]
    modality: list[float]
    answers: list[str]  # predicted answers
    references: list[str]  # ground-truth answers
    invalid: list[bool]
    exact: list[bool]  # valid and equal to the reference: scores 1 without a model

    def pending(self) -> list[int]:
        """Rows a model must judge: valid answers that are not exact matches."""
        return [i for i, (bad, hit) in enumerate(zip(self.invalid, self.exact)) if not (bad or hit)]


def parse(responses: list[str], solutions: list[str]) -> Parsed:
    """Apply every rule to a batch (solutions must have passed ``validate_solutions``)."""
    texts = [normalize(r) for r in responses]
    tags, refs = zip(*(split_solution(s) for s in solutions)) if solutions else ((), ())
    answers = [extract_answer(t) for t in texts]
    references = [r.strip(".") for r in refs]
    invalid = [answer_invalid(a) for a in answers]
    return Parsed(
        format=[float(format_ok(t)) for t in texts],
        modality=[float(modality_ok(t, g)) for t, g in zip(texts, tags)],
        answers=answers,
        references=references,
        invalid=invalid,
        exact=[not bad and a == r for a, r, bad in zip(answers, references, invalid)],
    )


def validate_solutions(solutions: list[str]) -> None:
    """ValueError naming the first row whose solution lacks a leading ``<TAG>``."""
    for i, s in enumerate(solutions):
        if not isinstance(s, str):
            raise ValueError(f"solution row {i}: expected a string, got {type(s).__name__}")
        try:
            split_solution(s)
        except ValueError as e:
            raise ValueError(f"solution row {i}: {e}") from None
