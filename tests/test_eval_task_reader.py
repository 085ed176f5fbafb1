"""The one reader of both task formats (``eval/tasks.read_items``: ``tasks.py``'s and
``medix_r1_tasks.py``'s): the limit counts kept items, a skipped row is not one, and every bad
row or file is a TaskError naming the task and ``file:row``.

Run: pytest tests/test_eval_task_reader.py
"""
from __future__ import annotations

import json

import pytest

from medix_fast.eval.tasks import TaskError, read_items


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_the_limit_counts_the_items_kept_not_the_rows_read(tmp_path):
    path = write(tmp_path / "t.jsonl", [{"n": i} for i in range(6)])
    odd = lambda row, where, i: (i, row["n"]) if row["n"] % 2 else None  # noqa: E731
    assert read_items("t", path, 2, odd) == [(0, 1), (1, 3)]
    assert read_items("t", path, 0, odd) == [(0, 1), (1, 3), (2, 5)]
    assert read_items("t", path, 0, lambda row, where, i: where) == [f"task 't': {path}:{n}" for n in range(1, 7)]


@pytest.mark.parametrize("row, message", [("[1, 2]", "t.jsonl:2: expected a JSON object, got list"),
                                          ("{bad", "t.jsonl:2: not valid JSON")])
def test_a_bad_row_names_the_task_file_and_row(tmp_path, row, message):
    path = write(tmp_path / "t.jsonl", [{"n": 0}, row])
    with pytest.raises(TaskError, match="task 't': .*" + message):
        read_items("t", path, 0, lambda row, where, i: row)


def test_no_usable_row_and_an_unreadable_file_are_task_errors(tmp_path):
    path = write(tmp_path / "t.jsonl", [{"n": 0}])
    with pytest.raises(TaskError, match=r"task 't': .*t.jsonl has no usable rows"):
        read_items("t", path, 0, lambda row, where, i: None)
    with pytest.raises(TaskError, match=r"task 't': cannot read .*missing.jsonl"):
        read_items("t", tmp_path / "missing.jsonl", 0, lambda row, where, i: row)
