"""MediX-R1's published judge: three rounds of one conversation with a local LLM, batched.

    judge = ChatJudge(model, tokenizer, sampler)        # e.g. Qwen3-14B, run by medix_fast.generate
    verdicts = judge_items(judge, questions, answers, responses, rubric=[False, ...])
    verdicts[0]  # {"score": 1, "rounds": [1, 1, 0], "replies": [...], "unparsed": 0}

What the reference kit (``eval/utils.py``) does per item, kept here: the response's text up to
its last ``</think>`` (else ``</thinking>``) is dropped; the judge gets :func:`judge_prompt`
(a fixed "medical expert" prompt asking for ``{"score": 0|1}``, or for the MIMIC tasks a 0-5
rubric) ending in `` /no_think``, rendered by the judge's own chat template (as its vLLM server
renders it: no extra template arguments); after each reply the reply and "Please reevaluate and
make sure your judgment is correct." are appended to the same conversation, three rounds,
greedy, 512 new tokens. A reply is read by :func:`parse_verdict` (its thinking dropped, then the
text from the first ``{`` to the last ``}`` as JSON). The item scores 1 when at least two rounds
say 1 (``scores.count(1) >= 2``); a MIMIC item scores the mean of its rounds (out of 5).

Unlike the kit (whose worker raises on an unreadable reply, so the item is retried forever by a
deterministic judge), a round whose reply does not parse counts as a 0 and is counted
(``unparsed``, reported per task). Batched: round 1 of every item in one ``Sampler.generate``
call, then round 2 of all, then round 3 (the kit sends one HTTP request per round per item).
"""
from __future__ import annotations

import json
import numbers
from collections.abc import Callable, Sequence

REEVALUATE = "Please reevaluate and make sure your judgment is correct."
ROUNDS = 3
JUDGE_MAX_NEW_TOKENS = 512
NO_THINK = " /no_think"


def strip_thinking(text: str) -> str:
    """The text after the last ``</think>`` (else the last ``</thinking>``), stripped; else ``text``."""
    for mark in ("</think>", "</thinking>"):
        if mark in text:
            return text.split(mark)[-1].strip()
    return text


def judge_prompt(question: str, correct: str, predicted: str, rubric: bool) -> str:
    """The kit's judge prompt (verbatim): binary for most tasks, the 0-5 rubric for MIMIC."""
    if not rubric:
        return f"""You are a medical expert.

Your task is to evaluate whether the Predicted Answer correctly answers the Medical Question, based on the Ground Truth (Correct Answer) provided.

Question:
{question}

Correct Answer:
{correct}

Predicted Answer:
{predicted}

Score 1 if the predicted answer matches the correct answer either fully in text or by indicating the correct option label (e.g., "B", "Option B", or a paraphrased version that clearly identifies the correct choice). Score 0 if the predicted answer is incorrect or points to the wrong option.

Respond strictly in the following JSON format:

```json
{{
"score": <score>
}}
```{NO_THINK}"""
    return f"""You are a medical expert evaluating the clinical accuracy, completeness, and relevance of a generated medical report or summary.

Your task is to compare an AI-generated report or summary to a reference (gold standard) report or summary, based on a clinical instruction or question. Assess the generated output on how well it preserves key clinical information, factual correctness, and clinical reasoning relevant to the task.

Assign a score between 0 and 5 using the following scale:

0 - Completely incorrect: Clinically irrelevant, misleading, or factually wrong. No meaningful alignment with the instruction or reference.

1 - Poor match: Barely relevant or mostly incorrect. Contains significant clinical misinformation or omits nearly all critical details.

2 - Weak match: Some fragments of relevant content are present, but major clinical errors or omissions exist. Clinical utility is low.

3 - Fair match: Contains several relevant points, but includes notable errors, missing findings, or misinterpretations that affect clinical reliability.

4 - Good match: Mostly accurate and clinically sound. Minor issues or missing details, but the overall meaning and purpose are preserved.

5 - Perfect or near-perfect match: Clinically accurate, complete, and faithful to the instruction and reference. No significant omissions or errors.

Respond only in the following example JSON format:

Example JSON format:
```json
{{
"score": <score between 0 and 5>
}}
```

Now, evaluate the following:

### Clinical Instruction or Question::
{question}

### Reference Report or Summary:
{correct}

### AI-Generated Report or Summary:
{predicted}{NO_THINK}"""


def parse_verdict(reply: str, rubric: bool):
    """The round's score as the kit reads it, or None when the reply does not parse (no JSON
    object with a ``score``; for the rubric, a score that is not a number)."""
    text = strip_thinking(reply)
    try:
        verdict = json.loads(text[text.find("{"):text.rfind("}") + 1])
        score = verdict["score"]
    except (ValueError, TypeError, KeyError, IndexError):
        return None
    if rubric and not isinstance(score, numbers.Real):
        return None
    return score


def item_score(rounds: list, rubric: bool) -> float:
    """The kit's item score from its rounds (None: unparsed, counted as 0): MIMIC the mean, else
    1 when at least two rounds say 1."""
    if rubric:
        return float(sum(0 if s is None else s for s in rounds) / len(rounds))
    return 1.0 if rounds.count(1) >= 2 else 0.0


Chat = Callable[[list[list[dict]]], list[str]]  # conversations -> one greedy reply each


class ChatJudge:
    """``__call__(conversations)`` -> replies: each conversation rendered by the judge's chat
    template (generation prompt added), all of them answered by one ``Sampler.generate`` call
    (greedy, ``max_new_tokens``), the stop token and special tokens dropped as vLLM returns them."""

    def __init__(self, model, tokenizer, sampler, max_new_tokens: int = JUDGE_MAX_NEW_TOKENS):
        from ..model.loading import stop_ids

        self.tokenizer, self.sampler, self.max_new_tokens = tokenizer, sampler, max_new_tokens
        self.stops = stop_ids(model, tokenizer)

    def prompt_ids(self, conversations: list[list[dict]]) -> list[list[int]]:
        texts = [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                 for c in conversations]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def __call__(self, conversations: list[list[dict]]) -> list[str]:
        from ..data.prompt import response_texts

        if not conversations:
            return []
        out = self.sampler.generate(self.prompt_ids(conversations), max_new_tokens=self.max_new_tokens,
                                    temperature=0.0, stop_token_ids=self.stops, seed=0)
        return response_texts(self.tokenizer, out.completion_ids, self.stops)


def judge_items(chat: Chat, questions: Sequence[str], answers: Sequence[str], responses: Sequence[str],
                rubric: Sequence[bool]) -> list[dict]:
    """Three judge rounds for every item, one ``chat`` call per round over all items; per item
    ``{"score", "rounds", "replies", "unparsed"}``."""
    conversations = [[{"role": "user", "content": judge_prompt(q, a, strip_thinking(r), m)}]
                     for q, a, r, m in zip(questions, answers, responses, rubric)]
    replies: list[list[str]] = [[] for _ in conversations]
    for _ in range(ROUNDS):
        for conversation, history, reply in zip(conversations, replies, chat(conversations)):
            conversation += [{"role": "assistant", "content": reply}, {"role": "user", "content": REEVALUATE}]
            history.append(reply)
    verdicts = []
    for history, m in zip(replies, rubric):
        rounds = [parse_verdict(r, m) for r in history]
        verdicts.append({"score": item_score(rounds, m), "rounds": rounds, "replies": history,
                         "unparsed": sum(s is None for s in rounds)})
    return verdicts
