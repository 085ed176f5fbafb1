"""The 17 benchmarks of MediX-R1's evaluation kit, read from local copies into its items.

    tasks = load_medix_r1_tasks("configs/eval/medix_r1.yaml", data_dir="data/medix_r1")
    tasks[0].items[0]  # R1Item(id="mmlu_clinical_knowledge_0", task, question, answer, image, answer_idx)

The YAML (``configs/eval/medix_r1.yaml``) keeps the reference's ``tasks.yaml`` keys per task:
``question_column`` (a column, a list of columns, or empty), ``choices_column`` (a list of
columns, one column holding a list or a mapping, or ``[]``), ``choices`` (fixed options),
``answer_id`` (a column indexing the choices), ``answer_column``, ``answer`` (columns joined);
plus ``group`` (llm / vlm), ``file`` (the local copy: a ``datasets.save_to_disk`` folder, Parquet
or JSONL, relative to ``data_dir``; ``sample:test`` is the bundled held-out set), ``source`` (the
hub dataset it was fetched from) and
``image_dir`` (SLAKE's unzipped ``imgs.zip``, MIMIC-CXR's downloaded JPEGs).

:func:`build_question` builds the question and answer exactly as the kit's
``load_dataset_with_params`` does (its quirks kept: a list cell contributes its first element,
``None`` options keep their letter slot, MIMIC's fixed instructions, the outer ``strip()``);
SLAKE keeps English questions only, ids are ``<task>_<kept row>``.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..data import DataError, resolve_data_path
from ..data.vision import load_image
from ..errors import did_you_mean, yaml_error
from .tasks import TaskError, read_items

OPTION_KEYS = "ABCDEFGHIJ"
TASK_KEYS = ("name", "group", "file", "source", "image_dir", "question_column", "choices_column", "choices",
             "answer_id", "answer_column", "answer")
REPORT_GENERATION = "mimic_cxr_report_generation"
REPORT_SUMMARY = "mimic_cxr_report_summarization"


@dataclass
class R1Item:
    id: str  # "<task>_<c>": the reference's id (the task is everything before the last "_")
    task: str
    index: int
    question: str
    answer: str
    image: Any = None  # an RGB PIL image (JPEG round trip, as the kit sends it) or None
    answer_idx: Any = None


@dataclass
class R1Task:
    name: str
    params: dict
    file: str
    image_dir: str | None = None
    items: list[R1Item] = field(default_factory=list)

    @property
    def rubric(self) -> bool:
        """MIMIC tasks: a 0-5 rubric averaged over the judge's rounds, out of 5."""
        return "mimic" in self.name


def _cell(value: Any) -> Any:
    return value[0] if isinstance(value, list) else value


def build_question(params: dict, name: str, row: dict) -> tuple[str, str]:
    """(question, answer) of one row, as the reference's kit builds them."""
    if isinstance(params.get("question_column"), list):
        question = "".join(f"{c.lower().capitalize()}:\n{_cell(row.get(c))}\n\n" for c in params["question_column"])
        question += "Choices:"
        for i, option in enumerate(params.get("choices") or []):
            if option is not None:
                question += f"\n{OPTION_KEYS[i]}. {option}"
        answer = "".join(row.get(c) + "\n" for c in params.get("answer") or [])
    else:
        value = row.get(params.get("question_column"))
        question = f"{value}" if value is not None else ""
        choices: Any = []
        spec = params.get("choices_column")
        if isinstance(spec, list) and spec:
            question += "\n\nChoices:"
            choices = [row.get(c) for c in spec]
        if isinstance(spec, str):
            question += "\n\nChoices:"
            choices = row.get(spec)
            if isinstance(choices, dict):
                choices = list(choices.values())
        for i, option in enumerate(choices):
            if option is not None:
                question += f"\n{OPTION_KEYS[i]}. {option}"
        answer = None
        if "answer_id" in params:
            answer = choices[row.get(params["answer_id"])]
        if "answer_column" in params:
            answer = row.get(params["answer_column"])
    if name == REPORT_GENERATION:
        question = "Generate a detailed report based on the scan."
    if name == REPORT_SUMMARY:
        question = f"Write a short summary of the following report.\n\nReport:\n{row.get('report')}:"
    return question.strip(), answer.strip()


def _as_sent(image) -> Any:
    """The image as the candidate receives it from the kit: RGB, JPEG-encoded (PIL's default quality)."""
    from PIL import Image

    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG")
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _image(task: R1Task, row: dict, root: Path) -> Any:
    """The row's image: SLAKE's ``img_name`` under ``image_dir/imgs``; MIMIC's URL by its file name
    under ``image_dir``; else the ``image`` or ``image_id`` cell; none for the report summary."""
    if task.name == REPORT_SUMMARY:
        return None
    if row.get("img_name"):
        value = Path(task.image_dir or root) / "imgs" / row["img_name"]
    elif "mimic" in task.name and isinstance(row.get("image"), str):
        value = Path(task.image_dir or root) / row["image"].split("/")[-1]
    else:
        value = row.get("image") or row.get("image_id")
    return None if value is None else _as_sent(load_image(value, root=root))


def _check(raw: Any, number: int, where: str) -> dict:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not isinstance(raw.get("file"), str):
        raise TaskError(f"{where}: task #{number} must be a mapping with string 'name' and 'file', got {raw!r}")
    label = f"{where}: task {raw['name']!r}"
    unknown = sorted(set(raw) - set(TASK_KEYS))
    if unknown:
        raise TaskError(f"{label}: unknown field(s) {unknown}{did_you_mean(str(unknown[0]), TASK_KEYS)}; "
                        f"valid fields: {list(TASK_KEYS)}")
    if not isinstance(raw.get("question_column"), list) and "answer_id" not in raw and "answer_column" not in raw:
        raise TaskError(f"{label}: needs 'answer_id' or 'answer_column' (or a question_column list with 'answer')")
    return raw


def load_medix_r1_tasks(path: str | Path, data_dir: str | Path | None = None, limit: int = 0,
                        only: list[str] | None = None, images: bool = True) -> list[R1Task]:
    """The tasks of a MediX-R1 tasks YAML (``protocol: medix_r1``), their local copies read from
    ``data_dir`` (default: the YAML's ``data_dir``, relative to the current directory); ``only``
    keeps tasks or groups by name (``llm``, ``vlm``); ``images=False`` leaves images undecoded
    (None: the judge and score phases do not read them)."""
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise TaskError(f"cannot read tasks file {path}: {err}") from err
    except yaml.YAMLError as err:
        raise TaskError(yaml_error("tasks file", path, err)) from err
    if not isinstance(tree, dict) or tree.get("protocol") != "medix_r1" or not isinstance(tree.get("tasks"), list):
        raise TaskError(f"tasks file {path}: expected 'protocol: medix_r1' and a 'tasks:' list "
                        "(the other tasks YAML format is for --protocol medix_fast)")
    root = Path(data_dir or tree.get("data_dir") or ".").expanduser()
    raws = [_check(raw, i, str(path)) for i, raw in enumerate(tree["tasks"], start=1)]
    if only:
        known = {r["name"] for r in raws} | {r.get("group") for r in raws}
        unknown = sorted(set(only) - known)
        if unknown:
            raise TaskError(f"--only {unknown}: not a task or group of {path}; tasks: {[r['name'] for r in raws]}")
        raws = [r for r in raws if r["name"] in only or r.get("group") in only]
    tasks = []
    for raw in raws:
        image_dir = raw.get("image_dir")
        task = R1Task(raw["name"], {k: v for k, v in raw.items() if k not in ("name", "group", "file", "source",
                                                                              "image_dir")},
                      str(resolve_data_path(raw["file"]) if raw["file"].startswith("sample:") else root / raw["file"]),
                      str(root / image_dir) if image_dir else None)
        tasks.append(read_r1_task(task, limit, images))
    return tasks


def read_r1_task(task: R1Task, limit: int = 0, images: bool = True) -> R1Task:
    path = Path(task.file)
    if not path.exists():
        raise TaskError(f"task {task.name!r}: no local copy at {path} (see README 'MediX-R1's published "
                        "evaluation' for how to fetch it)")

    def make(row: dict, where: str, c: int) -> R1Item | None:
        if task.name == "slake_vqa" and row.get("q_lang") != "en":
            return None
        try:
            question, answer = build_question(task.params, task.name, row)
            image = _image(task, row, path.parent) if images else None
        except (AttributeError, IndexError, KeyError, TypeError, DataError) as err:
            raise TaskError(f"{where}: cannot build the item from columns {sorted(row)} "
                            f"({type(err).__name__}: {err})") from None
        return R1Item(f"{task.name}_{c}", task.name, c, question, answer, image, row.get("answer_idx"))

    task.items = read_items(task.name, path, limit, make)
    return task
