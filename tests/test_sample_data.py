"""The bundled sample set: regenerates byte-identically, covers every modality tag, scores.

Run: pytest tests/test_sample_data.py
"""
import json
import subprocess
import sys
from collections import Counter

import pytest

from medix_fast.data.prompt import MODALITY_TAGS, split_solution
from medix_fast.demo.sample_data import MODALITIES, SPLITS, candidates, look_alike
from medix_fast.data.loader import sample_path


def rows(split):
    return [json.loads(line) for line in sample_path(split).read_text().splitlines()]


def test_committed_files_match_the_generator(tmp_path):
    subprocess.run([sys.executable, "-m", "medix_fast.demo.sample_data", "--out", str(tmp_path)], check=True,
                   capture_output=True)
    for split in SPLITS:
        assert (tmp_path / f"{split}.jsonl").read_bytes() == sample_path(split).read_bytes(), split


def test_modality_table_follows_prompt_tags():
    assert tuple(m.tag for m in MODALITIES) == MODALITY_TAGS


@pytest.mark.parametrize("split", sorted(SPLITS))
def test_schema_and_tag_balance(split):
    data = rows(split)
    assert len(data) == SPLITS[split] * len(MODALITY_TAGS)
    tags = Counter()
    for i, row in enumerate(data):
        assert set(row) == {"problem", "solution"}, (split, i)
        tag, answer = split_solution(row["solution"])
        tags[tag] += 1
        # MediX scores an answer of <= 1 character, or with "__", ":" or "?", as 0.
        assert len(answer) > 1 and not any(c in answer for c in ("__", ":", "?")), (split, i, answer)
        hints = next(m.hints for m in MODALITIES if m.tag == tag)
        assert any(h.lower() in row["problem"].lower() for h in hints), (split, i)
    assert tags == {t: SPLITS[split] for t in MODALITY_TAGS}


def test_splits_are_disjoint_and_unique():
    train, test = ({r["problem"] for r in rows(s)} for s in ("train", "test"))
    assert len(train) == len(rows("train")) and len(test) == len(rows("test"))
    assert not train & test


def kind(problem: str) -> str:
    if "Where is the" in problem:
        return "site"
    if "Which imaging modality" in problem:
        return "modality"
    return "choice" if "Options:" in problem else "diagnosis"


@pytest.mark.parametrize("split", sorted(SPLITS))
def test_every_answer_has_a_look_alike_the_question_makes_wrong(split):
    """The rules of the RL demo: a site question names the lesion's site and its look-alike (with
    nothing in it); a choice lists the answer and its look-alike; 4 wrong candidates per answer."""
    kinds = Counter()
    for row in rows(split):
        tag, answer = split_solution(row["solution"])
        wrong = candidates(tag, answer)
        assert len(wrong) == 4 and answer not in wrong and wrong[0] == look_alike(tag, answer)
        q, k = row["problem"], kind(row["problem"])
        kinds[k] += 1
        if k == "site":
            assert f"in the {answer}" in q and f"nothing in the {wrong[0]}" in q
        if k == "choice":
            assert f". {answer}." in q and f". {wrong[0]}." in q
    assert set(kinds) == {"site", "modality", "choice", "diagnosis"}  # held-out asks every kind too
    assert all(n >= len(rows(split)) // 10 for n in kinds.values()), kinds


def test_held_out_questions_are_new_but_share_the_answers():
    """No test question is a train question; every test answer is one the train split teaches."""
    train_answers = {r["solution"] for r in rows("train")}
    test = rows("test")
    assert sum(r["solution"] in train_answers for r in test) >= 0.9 * len(test)


def test_generator_is_seeded():
    from medix_fast.demo.sample_data import build_splits

    assert build_splits(1) == build_splits(1) != build_splits(2)


def test_unknown_split():
    with pytest.raises(ValueError, match="validation"):
        sample_path("validation")
