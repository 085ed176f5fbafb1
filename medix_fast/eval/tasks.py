"""Evaluation tasks: a small YAML naming local benchmark files, read into checked eval items.

    tasks = load_tasks("tasks.yaml")                 # or data_tasks("test.jsonl"), or default_tasks()
    tasks[0].items[0]  # Item(task, index, question, solution="<TAG> answer", gold, letters, options, image)

A tasks YAML is a list of tasks (or a mapping with the list under ``tasks:``):

    - name: medqa                       # unique; names the task in the table and the JSONL
      file: data/medqa_test.jsonl       # JSONL / Parquet / `datasets` dir, relative to the YAML
      columns: {question: question, answer: answer_idx, options: options}  # and image, for VL models
      template: "{question}\\nOptions:\\n{options}"   # optional; any column name may be a field
      answer_type: multiple_choice      # or open (the default)
      letters: ABCDE                    # optional; default: the options' keys or count, else ABCD
      modality: "<OTHER>"               # tag of answers that carry none (the default)

Columns default to MediX's ``problem`` / ``solution`` / ``image`` / ``options``. An open answer
is text (a leading modality tag is kept as the item's tag). A multiple-choice answer is a letter
("B", "(b)", "B."), a 0-based option index, or an option's text; options are a list (lettered
A, B, ... in order) or a mapping letter -> text; without an options column the question must
list them itself and the answer must be a letter. An image (a path relative to the task file,
bytes, or a ``datasets`` image dict) goes before the question for a vision-language model and is
ignored, with a warning, by a text-only one. Every problem is reported as
``task 'name': file:row: reason`` (``TaskError``).
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import yaml

from ..data import DataError, iter_rows, resolve_data_path
from ..data.prompt import MODALITY_TAGS, split_solution
from ..data.vision import check_image, resolve_image
from ..errors import did_you_mean, yaml_error

ANSWER_TYPES = ("open", "multiple_choice")
DEFAULT_COLUMNS = {"question": "problem", "answer": "solution", "image": "image", "options": "options"}
TASK_KEYS = ("name", "file", "columns", "template", "answer_type", "letters", "modality")
_LETTER_ANSWER = re.compile(r"\(?([A-Za-z])\)?[.)]?")
_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


class TaskError(DataError):
    """A bad tasks YAML or task row; the message names the task and the field."""


@dataclass
class Item:
    task: str
    index: int  # 0-based row of the task's file
    question: str  # the template filled in: the text put into the MediX instruction
    solution: str  # "<TAG> answer text", what the rewards compare against
    gold: str  # the answer text (open) or the correct letter (multiple choice)
    letters: str = ""  # option letters of a multiple-choice item; "" for open
    options: dict[str, str] | None = None  # letter -> option text, when the row has them
    image: Any = None


@dataclass
class Task:
    name: str
    file: str
    columns: dict[str, str] = field(default_factory=dict)
    template: str | None = None
    answer_type: str = "open"
    letters: str | None = None
    modality: str = "<OTHER>"
    items: list[Item] = field(default_factory=list)

    def column(self, key: str) -> str:
        return self.columns.get(key, DEFAULT_COLUMNS[key])


# ----------------------------------------------------------------------------- task lists
def _check_task(raw: Any, number: int, where: str) -> Task:
    if not isinstance(raw, dict):
        raise TaskError(f"{where}: task #{number} must be a mapping, got {raw!r}")
    label = f"{where}: task {raw.get('name', f'#{number}')!r}"
    unknown = sorted(set(raw) - set(TASK_KEYS))
    if unknown:
        raise TaskError(f"{label}: unknown field(s) {unknown}{did_you_mean(str(unknown[0]), TASK_KEYS)}; "
                        f"valid fields: {list(TASK_KEYS)}")
    for key in ("name", "file"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise TaskError(f"{label}: field {key!r} is required and must be a non-empty string")
    columns = raw.get("columns") or {}
    if not isinstance(columns, dict) or not all(isinstance(v, str) for v in columns.values()):
        raise TaskError(f"{label}: field 'columns' must map {sorted(DEFAULT_COLUMNS)} to column names")
    bad = sorted(set(columns) - set(DEFAULT_COLUMNS))
    if bad:
        raise TaskError(f"{label}: columns {bad} are not known; valid: {sorted(DEFAULT_COLUMNS)}")
    if raw.get("answer_type", "open") not in ANSWER_TYPES:
        raise TaskError(f"{label}: field 'answer_type' must be one of {list(ANSWER_TYPES)}, got {raw['answer_type']!r}")
    letters = raw.get("letters")
    if letters is not None and (not isinstance(letters, str) or not letters or len(set(letters)) != len(letters)
                                or any(c not in string.ascii_uppercase for c in letters)):
        raise TaskError(f"{label}: field 'letters' must be distinct capital letters like 'ABCD', got {letters!r}")
    modality = raw.get("modality", "<OTHER>")
    if modality not in MODALITY_TAGS:
        raise TaskError(f"{label}: field 'modality' must be one of {list(MODALITY_TAGS)}, got {modality!r}")
    template = raw.get("template")
    if template is not None and not isinstance(template, str):
        raise TaskError(f"{label}: field 'template' must be a string, got {template!r}")
    return Task(raw["name"], raw["file"], dict(columns), template, raw.get("answer_type", "open"), letters, modality)


def load_tasks(path: str | Path, limit: int = 0) -> list[Task]:
    """The tasks of a YAML file, their files resolved against the YAML's folder and read."""
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise TaskError(f"cannot read tasks file {path}: {err}") from err
    except yaml.YAMLError as err:
        raise TaskError(yaml_error("tasks file", path, err)) from err
    if isinstance(tree, dict) and tree.get("protocol") == "medix_r1":
        raise TaskError(f"tasks file {path} is MediX-R1's evaluation: run it with --protocol medix_r1")
    if isinstance(tree, dict) and set(tree) == {"tasks"}:
        tree = tree["tasks"]
    if not isinstance(tree, list) or not tree:
        raise TaskError(f"tasks file {path}: expected a non-empty list of tasks (or 'tasks:' holding one)")
    tasks = [_check_task(raw, i, str(path)) for i, raw in enumerate(tree, start=1)]
    names = [t.name for t in tasks]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise TaskError(f"tasks file {path}: task names must be unique, repeated: {twice}")
    for task in tasks:
        if not task.file.startswith("sample:") and not Path(task.file).expanduser().is_absolute():
            task.file = str(path.parent / task.file)
    return [read_task(t, limit) for t in tasks]


def data_tasks(data: str, limit: int = 0, columns: dict[str, str] | None = None) -> list[Task]:
    """Open-answer tasks for ``--data``: one file (or ``datasets`` dir, or ``sample:test``), or a
    folder of such files (one task per file, named by its stem); MediX columns unless ``columns``."""
    path = resolve_data_path(data)
    if not path.exists():
        raise TaskError(f"--data {data}: no such file or directory")
    if path.is_dir() and not any((path / f).is_file() for f in _DATASET_FILES):
        files = sorted(p for p in path.iterdir() if p.suffix in _DATA_SUFFIXES or (p / "dataset_info.json").is_file())
        if not files:
            raise TaskError(f"--data {data}: the folder holds no .jsonl / .parquet file or dataset dir")
        return [read_task(Task(p.stem, str(p), dict(columns or {})), limit) for p in files]
    name = path.parent.name + "_" + path.stem if data.startswith("sample:") else path.stem
    return [read_task(Task(name, str(path), dict(columns or {})), limit)]


def default_tasks(limit: int = 0) -> list[Task]:
    """The bundled held-out split as one open-answer task."""
    return data_tasks("sample:test", limit)


# ----------------------------------------------------------------------------- rows -> items
def _options(value: Any, where: str) -> dict[str, str]:
    if isinstance(value, list) and value and len(value) <= 26 and all(isinstance(v, str) for v in value):
        return {string.ascii_uppercase[i]: v.strip() for i, v in enumerate(value)}
    if isinstance(value, dict) and value and all(isinstance(v, str) for v in value.values()):
        keys = {str(k).strip().upper(): v.strip() for k, v in value.items()}
        if all(len(k) == 1 and k in string.ascii_uppercase for k in keys):
            return dict(sorted(keys.items()))
    raise TaskError(f"{where}: options must be a list of strings or a mapping letter -> string, got {value!r}")


def _gold_letter(answer: Any, letters: str, options: dict[str, str] | None, where: str) -> str:
    """A multiple-choice answer (letter, 0-based index or option text) as its letter."""
    if isinstance(answer, int) and not isinstance(answer, bool):
        if 0 <= answer < len(letters):
            return letters[answer]
        raise TaskError(f"{where}: answer index {answer} is outside the {len(letters)} options")
    if not isinstance(answer, str):
        raise TaskError(f"{where}: answer must be a letter, an option index or an option's text, got {answer!r}")
    text = answer.strip()
    m = _LETTER_ANSWER.fullmatch(text)
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    for letter, option in (options or {}).items():
        if option.casefold() == text.casefold():
            return letter
    choices = f"a letter of {letters}" + (" or one of the options" if options else " (no options column)")
    raise TaskError(f"{where}: answer {answer!r} is not {choices}")


def _split_tag(answer: str) -> tuple[str | None, str]:
    """(modality tag, rest) when the answer starts with one of the MediX tags, else (None, answer)."""
    try:
        tag, rest = split_solution(answer)
    except ValueError:
        return None, answer.strip()
    return (tag.upper(), rest) if tag.upper() in MODALITY_TAGS else (None, answer.strip())


def _image(value: Any, root: Path, where: str, column: str) -> Any:
    """The row's image resolved against the task file's folder and checked to decode."""
    image = resolve_image(value, root)
    reason = check_image(image)
    if reason is not None:
        raise TaskError(f"{where}: column {column!r} (columns.image): {reason}")
    return image


def _item(task: Task, index: int, row: dict, where: str, root: Path) -> Item:
    fields = {key: task.column(key) for key in DEFAULT_COLUMNS}
    for key in ("question", "answer"):
        if row.get(fields[key]) is None:
            raise TaskError(f"{where}: missing column {fields[key]!r} (columns.{key}); row has {sorted(row)}")
    question = row[fields["question"]]
    if not isinstance(question, str) or not question.strip():
        raise TaskError(f"{where}: column {fields['question']!r} (columns.question) must be a non-empty string")
    answer = row[fields["answer"]]
    tag = None
    if isinstance(answer, str):
        tag, answer = _split_tag(answer)
    options = None
    if task.answer_type == "multiple_choice":
        if "options" in task.columns and row.get(fields["options"]) is None:
            raise TaskError(f"{where}: missing column {fields['options']!r} (columns.options)")
        if row.get(fields["options"]) is not None:
            options = _options(row[fields["options"]], f"{where}: column {fields['options']!r}")
        letters = task.letters or ("".join(options) if options else "ABCD")
        if options and set(options) - set(letters):
            raise TaskError(f"{where}: options {sorted(options)} do not fit the task's letters {letters!r}")
        gold = _gold_letter(answer, letters, options, f"{where}: column {fields['answer']!r}")
        text = options[gold] if options else gold
    else:
        if not isinstance(answer, (str, int, float)) or isinstance(answer, bool) or not str(answer).strip():
            raise TaskError(f"{where}: column {fields['answer']!r} (columns.answer) must be a non-empty string")
        letters, gold = "", str(answer).strip()
        text = gold
    listed = "\n".join(f"{k}. {v}" for k, v in (options or {}).items())
    template = task.template or ("{question}\nOptions:\n{options}" if options else "{question}")
    values = {k: v for k, v in row.items() if isinstance(k, str)}
    values.update(question=question.strip(), options=listed)
    try:
        rendered = template.format_map(values)
    except KeyError as err:
        raise TaskError(f"task {task.name!r}: template field {{{err.args[0]}}} is neither question, options "
                        f"nor a column of {where}") from None
    except (ValueError, IndexError, AttributeError) as err:
        raise TaskError(f"task {task.name!r}: template {task.template!r} is malformed ({err})") from None
    image = row.get(fields["image"])
    if image is not None:
        image = _image(image, root, where, fields["image"])
    return Item(task.name, index, rendered, f"{tag or task.modality} {text}", gold, letters, options, image)


def read_items(name: str, path: Path, limit: int, make: Callable[[dict, str, int], Any]) -> list:
    """The items ``make(row, where, index)`` builds from the rows of task ``name``'s file ``path``
    (the first ``limit`` items when > 0; ``make`` returning None skips the row): the one reader of
    both task formats (this file's and ``medix_r1_tasks.py``'s). Every failure is a TaskError naming
    the task and ``file:row``."""
    items = []
    try:
        for number, row in iter_rows(path):
            if limit and len(items) >= limit:
                break
            where = f"task {name!r}: {path}:{number}"
            if isinstance(row, str):
                raise TaskError(f"{where}: {row}")
            if not isinstance(row, dict):
                raise TaskError(f"{where}: expected a JSON object, got {type(row).__name__}")
            item = make(row, where, len(items))
            if item is not None:
                items.append(item)
    except TaskError:
        raise
    except (DataError, OSError, UnicodeDecodeError) as err:
        raise TaskError(f"task {name!r}: cannot read {path} ({type(err).__name__}: {err})") from err
    if not items:
        raise TaskError(f"task {name!r}: {path} has no usable rows")
    return items


def read_task(task: Task, limit: int = 0) -> Task:
    """Read the task's rows into ``task.items`` (the first ``limit`` rows when > 0)."""
    path = resolve_data_path(task.file)
    task.items = read_items(task.name, path, limit, lambda row, where, i: _item(task, i, row, where, path.parent))
    return task
