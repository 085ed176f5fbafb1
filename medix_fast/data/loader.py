"""Training data: MediX-R1 rows from JSONL / Parquet / ``datasets`` directories, prompts, a resumable loader.

Schema (column names configurable): ``problem`` (the question), ``solution`` (``"<TAG> answer"``),
optional ``image`` (a path, relative ones from the data file's folder, bytes, a PIL image or a
``datasets`` Image; checked from its header, decoded only at rollout). Every row is checked before training starts; problems are reported as
``file:row: reason`` (rows counted from 1, the line number for JSONL). ``strict=True`` raises a
:class:`DataError` listing them; ``strict=False`` skips those rows and names each one in the log
(past ``SHOWN`` of them, the whole list goes to a report file, e.g. ``<output_dir>/dropped_rows.txt``).
A missing or unreadable *file* is an error in every mode (``strict=False`` skips rows, never files).

    examples = load_examples(["train.jsonl"], cfg.data)
    prompts, dropped = build_prompts(examples, tokenizer, max_length=4352)   # vision=Vision(...) for a VL model
    loader = PromptLoader(len(prompts), seed=0)
    batch = loader.next(8)                      # indices into prompts; state_dict() to resume

``"sample:train"`` / ``"sample:test"`` name the bundled synthetic set. Parquet needs ``pyarrow``,
``save_to_disk`` directories need ``datasets`` (both optional imports).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import DataError, UserError
from ..seeds import mix_seed
from .prompt import build_messages, split_solution
from .vision import check_image, expand_image_tokens, image_size, resolve_image

log = logging.getLogger(__name__)


@dataclass
class Example:
    problem: str
    solution: str
    image: Any = None
    source: str = ""  # "file:row"


@dataclass
class Prompt:
    ids: list[int]  # chat-templated prompt tokens, generation prompt included
    solution: str
    image: Any = None


SAMPLE_DIR = Path(__file__).parent / "sample"  # the bundled set (medix_fast.demo.sample_data writes it)


def sample_path(split: str) -> Path:
    """Path of a bundled split (``"train"``, ``"test"``, or ``"train_vl"``: with images) as JSONL."""
    splits = sorted(p.stem for p in SAMPLE_DIR.glob("*.jsonl"))
    if split not in splits:
        raise DataError(f"unknown sample split {split!r}; choose one of {splits}")
    return SAMPLE_DIR / f"{split}.jsonl"


def resolve_data_path(name: str) -> Path:
    """``"sample:<split>"`` -> the bundled file; anything else is a filesystem path."""
    if name.startswith("sample:"):
        return sample_path(name.split(":", 1)[1])
    return Path(name).expanduser()


def iter_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(row number from 1, row) for every row of a JSONL file, a Parquet file or a dataset dir.

    A JSONL line that is not valid JSON yields a string describing the error instead of a dict,
    with the column where it is (the line's own: a line that ends too early says so, rather than
    the "line 2 column 1" json reports for its newline). A UTF-8 byte-order mark is skipped.
    """
    if path.is_dir():
        try:
            import datasets
        except ImportError as err:
            raise DataError(f"{path}: a directory needs the 'datasets' package (pip install datasets)") from err
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            raise DataError(f"{path}: holds the splits {sorted(data)}; point at one split, e.g. {path / next(iter(data))}")
        yield from enumerate(data, start=1)
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise DataError(f"{path}: Parquet needs the 'pyarrow' package (pip install pyarrow)") from err
        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for record in batch.to_pylist():
                row += 1
                yield row, record
    else:
        with path.open("r", encoding="utf-8-sig") as f:
            for number, line in enumerate(f, start=1):
                text = line.rstrip("\r\n")
                if not text.strip():
                    continue
                try:
                    yield number, json.loads(text)
                except json.JSONDecodeError as err:
                    where = (f"the line ends at column {len(text)} before the JSON does"
                             if err.pos >= len(text.rstrip()) else f"at column {err.pos + 1}")
                    yield number, f"not valid JSON ({err.msg}: {where})"


def _check_row(row: Any, problem_key: str, solution_key: str) -> str | None:
    """The reason a row is unusable, or None."""
    if isinstance(row, str):
        return row
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    for key in (problem_key, solution_key):
        if key not in row or row[key] is None:
            return f"missing field {key!r}"
        if not isinstance(row[key], str):
            return f"field {key!r} must be a string, got {type(row[key]).__name__}"
    if not row[problem_key].strip():
        return f"field {problem_key!r} is empty"
    try:
        split_solution(row[solution_key])
    except ValueError as err:
        return f"field {solution_key!r}: {err}"
    return None


SHOWN = 20  # dropped rows named in the log; past this many, all of them go to the report file


def report_dropped(problems: list[str], what: str, report: Path | None) -> None:
    """Log the dropped rows (``file:row: reason``), every one of them when at most ``SHOWN``;
    otherwise the first ``SHOWN`` and the whole list appended to ``report`` (when given)."""
    if not problems:
        return
    shown = "\n  ".join(problems[:SHOWN])
    rest = len(problems) - SHOWN
    if rest > 0 and report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        with report.open("a", encoding="utf-8") as f:
            f.write("".join(p + "\n" for p in problems))
        shown += f"\n  ... and {rest} more: all {len(problems)} are listed in {report}"
    elif rest > 0:
        shown += f"\n  ... and {rest} more"
    log.warning("%s %d %s:\n  %s", "dropped", len(problems), what, shown)


def load_examples(files: list[str], cfg, report: Path | None = None) -> list[Example]:
    """Every valid row of ``files``; ``cfg`` is a :class:`~medix_fast.config.DataConfig`.

    Raises DataError naming each bad row (file and row number) unless ``cfg.strict`` is False,
    in which case bad rows are skipped and named (:func:`report_dropped`, into ``report`` when many).
    A missing or unreadable file raises DataError whatever ``cfg.strict``.
    """
    examples, problems = [], []
    for name in files:
        path = resolve_data_path(name)
        try:
            for number, row in iter_rows(path):
                reason = _check_row(row, cfg.problem_key, cfg.solution_key)
                if reason is not None:
                    problems.append(f"{path}:{number}: {reason}")
                    continue
                image = row.get(cfg.image_key)
                if image is not None:
                    image = resolve_image(image, path.parent)
                    reason = check_image(image)
                    if reason is not None:
                        problems.append(f"{path}:{number}: {reason}")
                        continue
                examples.append(Example(row[cfg.problem_key], row[cfg.solution_key], image, f"{path}:{number}"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            if isinstance(err, DataError):
                raise
            raise DataError(f"{path}: unreadable ({type(err).__name__}: {err}); every data file must be "
                            "readable (data.strict=false skips bad rows, not files)") from err
    if problems and cfg.strict:
        shown = "\n  ".join(problems[:SHOWN]) + (f"\n  ... and {len(problems) - SHOWN} more"
                                                  if len(problems) > SHOWN else "")
        raise DataError(f"{len(problems)} malformed row(s) in the training data "
                        f"(data.strict=false skips them):\n  {shown}")
    report_dropped(problems, "malformed row(s) (data.strict=false)", report)
    if not examples:
        raise DataError(f"no usable rows in {files}")
    return examples


def build_prompts(examples: list[Example], tokenizer, max_length: int, vision=None,
                  report: Path | None = None) -> tuple[list[Prompt], int]:
    """Chat-templated prompts (MediX instruction, generation prompt added); those longer than
    ``max_length`` tokens are dropped, each named (:func:`report_dropped`, into ``report`` when
    many). Returns (prompts, number dropped).

    With ``vision`` (a :class:`medix_fast.data.vision.Vision`, for a VL model) a row's image goes
    before the question and its ``<|image_pad|>`` is expanded to the image's token count at the
    configured pixel limits (read from the header; pixels are encoded at rollout). Without it,
    prompts are text only and images are ignored.
    """
    with_image = [vision is not None and e.image is not None for e in examples]
    texts = [tokenizer.apply_chat_template(build_messages(e.problem, has_image), tokenize=False,
                                           add_generation_prompt=True) for e, has_image in zip(examples, with_image)]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    if vision is not None:
        ids = [expand_image_tokens(t, vision.image_token_id, [vision.tokens(image_size(e.image))] if has_image else [])
               for t, e, has_image in zip(ids, examples, with_image)]
    prompts = [Prompt(list(t), e.solution, e.image) for t, e in zip(ids, examples) if len(t) <= max_length]
    dropped = len(examples) - len(prompts)
    report_dropped([f"{e.source or f'row {i + 1}'}: the prompt is {len(t)} tokens" for i, (t, e)
                    in enumerate(zip(ids, examples)) if len(t) > max_length],
                   f"of {len(examples)} prompts, longer than data.max_prompt_length={max_length} tokens", report)
    if vision is None and any(e.image is not None for e in examples):
        log.warning("image columns are ignored: the model is text only")
    if not prompts:
        raise DataError(f"every prompt is longer than data.max_prompt_length={max_length}")
    return prompts, dropped


class PromptLoader:
    """Draws prompt indices in epochs: a seeded permutation per epoch, resumable exactly.

    ``next(k)`` returns the next ``k`` indices of one global stream, crossing epoch boundaries
    as needed. With ``rank``/``world`` every rank advances the same global stream by
    ``k * world`` and keeps its own slice, so the global batch does not depend on the world size.
    """

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world: int = 1):
        if size <= 0:
            raise ValueError(f"PromptLoader needs at least one prompt, got size={size}")
        self.size, self.seed, self.shuffle, self.rank, self.world = size, seed, shuffle, rank, world
        self.epoch, self.pos = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        return torch.randperm(self.size, generator=g).tolist()

    def _take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos == self.size:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            n = min(k - len(out), self.size - self.pos)
            out += self._order[self.pos:self.pos + n]
            self.pos += n
        return out

    def next(self, k: int) -> list[int]:
        """This rank's ``k`` next prompt indices (the global stream advances by ``k * world``)."""
        stream = self._take(k * self.world)
        return stream[self.rank * k:(self.rank + 1) * k]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "size": self.size}

    def load_state_dict(self, state: dict) -> None:
        if (state["seed"], state["size"]) != (self.seed, self.size):
            raise UserError(f"loader state is for seed={state['seed']} size={state['size']}, "
                             f"this loader has seed={self.seed} size={self.size} (data or seed changed?)")
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._permutation(self.epoch)
