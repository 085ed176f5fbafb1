"""The MediX-R1 prompt: the fixed instruction around a question, and the modality tags; and the
response text the rewards read (:func:`response_texts`).

The model must answer with exactly one modality tag, then its reasoning inside
``<thinking>...</thinking>``, then the answer inside ``<answer>...</answer>``. A ground-truth
``solution`` is ``"<TAG> answer text"``. The image (if any) goes before the question text.
"""
from __future__ import annotations

MODALITY_TAGS = (
    "<X_RAY>", "<MICROSCOPY>", "<CLINICAL_PHOTOGRAPHY>", "<CT_SCAN>", "<GRAPHICS>", "<ANGIOGRAPHY>",
    "<PET_SCAN>", "<ULTRASOUND>", "<MRI_SCAN>", "<FUNDUS_PHOTOGRAPHY>", "<OCT_SCAN>", "<ENDOSCOPY>",
    "<MAMMOGRAPHY>", "<FLUOROSCOPY>", "<OTHER>", "<SPECT>",
)
FORMAT_TAGS = ("<thinking>", "</thinking>", "<answer>", "</answer>")

INSTRUCTION = (
    "First output exactly one imaging modality tag from: " + " ".join(MODALITY_TAGS) + ". "
    "Then reason step by step inside <thinking> </thinking>, then give the final answer inside "
    "<answer> </answer>. Output nothing else.\n\nQuestion: {question}"
)


def build_messages(question: str, has_image: bool = False) -> list[dict]:
    """Chat messages for one question (the image placeholder first when there is one)."""
    text = INSTRUCTION.format(question=question.strip())
    if not has_image:
        return [{"role": "user", "content": text}]
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def split_solution(solution: str) -> tuple[str, str]:
    """``"<TAG> answer"`` -> (``"<TAG>"``, ``"answer"``); ValueError when there is no leading tag."""
    text = solution.strip()
    if not text.startswith("<") or ">" not in text:
        raise ValueError(f"solution must start with a modality tag like '<CT_SCAN>', got {solution[:60]!r}")
    end = text.index(">") + 1
    return text[:end], text[end:].strip()


def response_texts(tokenizer, completions: list[list[int]], stop_token_ids) -> list[str]:
    """Sampled completions as the text the rewards and eval read: a final stop token dropped,
    special tokens skipped."""
    stop = set(stop_token_ids)
    return tokenizer.batch_decode([c[:-1] if c and c[-1] in stop else c for c in completions],
                                  skip_special_tokens=True)
