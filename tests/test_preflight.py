"""Every command refuses each bad input before it works: one ``error:`` line on stderr naming
what is wrong, no traceback, exit status 2, and nothing in the folder written, changed or removed.

Run: pytest tests/test_preflight.py   (each command line a process of its own, as a user runs it,
forked by tests/command_runner.py after one import of the commands; no model loads)

Each case is (command, its arguments, a fragment the error line must hold); ``{t}`` is the test's
folder, which holds the inputs (``fixtures``) and is the working directory. Permission cases need
a user that permissions apply to: as root they run under ``unshare --user`` (root mapped to an
unprivileged user), and are skipped where that is not allowed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TRAIN, EVAL, EXPORT, PLAN = (["medix_fast.train"], ["medix_fast.eval"], ["medix_fast.export"],
                             ["medix_fast.generate", "--plan"])
RUN = "train.output_dir={t}/run"
PLAN_GB = ["--device-memory-gb", "80"]
CASES = [  # (id, command, arguments, fragment of the error line)
    # train: config file, keys, output directory, model, data, checkpoint, tasks, reward models
    ("train-config-missing", TRAIN, ["--config", "{t}/nope.yaml", RUN], "nope.yaml"),
    ("train-config-unreadable", TRAIN, ["--config", "{t}/noread.yaml", RUN], "noread.yaml: [Errno 13]"),
    ("train-config-a-directory", TRAIN, ["--config", "{t}/dir", RUN], "Is a directory"),
    ("train-config-corrupt", TRAIN, ["--config", "{t}/bad.yaml", RUN], "bad.yaml:2:1 is not valid YAML"),
    ("train-config-binary", TRAIN, ["--config", "{t}/binary.yaml", RUN], "cannot read config file"),
    ("train-config-unknown-key", TRAIN, ["--config", "{t}/typo.yaml", RUN], "did you mean 'train.steps'"),
    ("train-override-unknown-key", TRAIN, ["train.stpes=1", RUN], "did you mean 'train.steps'"),
    ("train-out-unwritable", TRAIN, ["train.output_dir={t}/ro/run"], "cannot be written: Permission denied"),
    ("train-out-under-a-file", TRAIN, ["train.output_dir={t}/file/run"], "'{t}/file' is a file"),
    ("train-out-a-file", TRAIN, ["train.output_dir={t}/file"], "is not a directory"),
    ("train-model-missing", TRAIN, ["model.path={t}/nope", RUN], "'{t}/nope' does not exist"),
    ("train-model-a-file", TRAIN, ["model.path={t}/file", RUN], "is not a directory"),
    ("train-model-a-checkpoint", TRAIN, ["model.path={t}/ckpt", RUN], "python -m medix_fast.export"),
    ("train-data-missing", TRAIN, ["data.train_files=[{t}/nope.jsonl]", RUN], "data.train_files[0]"),
    ("train-data-unreadable", TRAIN, ["data.train_files=[{t}/noread.jsonl]", RUN], "cannot be read"),
    ("train-data-corrupt", TRAIN, ["data.train_files=[{t}/bad.jsonl]", RUN], "bad.jsonl:1"),
    ("train-data-not-a-list", TRAIN, ["data.train_files={t}/bad.jsonl", RUN], "data.train_files=[{t}/bad.jsonl]"),
    ("train-resume-from-missing", TRAIN, ["--resume-from", "{t}/nope", RUN], "--resume-from '{t}/nope'"),
    ("train-eval-tasks-missing", TRAIN, ["eval.every=1", "eval.tasks={t}/nope.yaml", RUN], "eval.tasks"),
    ("train-judge-missing", TRAIN, ["rewards.judge_model={t}/nope", RUN], "rewards.judge_model"),
    ("train-tensor-parallel-heads", TRAIN, ["sampling.tensor_parallel=3", RUN],
     "sampling.tensor_parallel=3: 4 attention heads are not divisible by 3"),
    ("train-tensor-parallel-world", TRAIN, ["sampling.tensor_parallel=2", RUN],
     "sampling.tensor_parallel=2: 2 does not divide the world size 1"),
    # eval: model, tasks, data, judge, protocol, output folder, flags
    ("eval-model-missing", EVAL, ["--model", "{t}/nope"], "does not exist"),
    ("eval-model-a-file", EVAL, ["--model", "{t}/file"], "is not a directory"),
    ("eval-model-unreadable", EVAL, ["--model", "{t}/noread"], "cannot be read"),
    ("eval-model-a-checkpoint", EVAL, ["--model", "{t}/ckpt"], "python -m medix_fast.export --checkpoint"),
    ("eval-tasks-missing", EVAL, ["--model", "tiny", "--tasks", "{t}/nope.yaml"], "--tasks"),
    ("eval-tasks-a-directory", EVAL, ["--model", "tiny", "--tasks", "{t}/dir"], "is a directory, not a file"),
    ("eval-tasks-corrupt", EVAL, ["--model", "tiny", "--tasks", "{t}/bad.yaml"], "bad.yaml:2:1 is not valid YAML"),
    ("eval-tasks-unknown-field", EVAL, ["--model", "tiny", "--tasks", "{t}/tasks_typo.yaml"],
     "did you mean 'answer_type'"),
    ("eval-data-missing", EVAL, ["--model", "tiny", "--data", "{t}/nope.jsonl"], "--data"),
    ("eval-data-corrupt", EVAL, ["--model", "tiny", "--data", "{t}/bad.jsonl"], "bad.jsonl:1"),
    ("eval-judge-missing", EVAL, ["--model", "tiny", "--judge", "{t}/nope"], "--judge"),
    ("eval-r1-without-judge", EVAL, ["--model", "tiny", "--protocol", "medix_r1"], "needs --judge"),
    ("eval-r1-data-dir-missing", EVAL, ["--model", "tiny", "--protocol", "medix_r1", "--phase", "generate",
                                        "--data-dir", "{t}/nope"], "--data-dir"),
    ("eval-out-unwritable", EVAL, ["--model", "tiny", "--out", "{t}/ro/out"], "cannot be written"),
    ("eval-out-under-a-file", EVAL, ["--model", "tiny", "--out", "{t}/file/out"], "is a file"),
    ("eval-out-a-file", EVAL, ["--model", "tiny", "--out", "{t}/file"], "is not a directory"),
    ("eval-unknown-flag", EVAL, ["--model", "tiny", "--ovewrite"], "did you mean '--overwrite'"),
    # export: checkpoint and output directory
    ("export-checkpoint-missing", EXPORT, ["--checkpoint", "{t}/nope", "--out", "{t}/hf"], "--checkpoint"),
    ("export-checkpoint-a-file", EXPORT, ["--checkpoint", "{t}/file", "--out", "{t}/hf"], "is a file"),
    ("export-checkpoint-not-one", EXPORT, ["--checkpoint", "{t}/dir", "--out", "{t}/hf"], "not a checkpoint"),
    ("export-out-unwritable", EXPORT, ["--checkpoint", "{t}/ckpt", "--out", "{t}/ro/hf"], "cannot be written"),
    ("export-out-under-a-file", EXPORT, ["--checkpoint", "{t}/ckpt", "--out", "{t}/file/hf"], "is a file"),
    # the memory plan: config file, keys, model config
    ("plan-config-missing", PLAN, ["--config", "{t}/nope.yaml", *PLAN_GB], "--config"),
    ("plan-config-unreadable", PLAN, ["--config", "{t}/noread.yaml", *PLAN_GB], "cannot be read"),
    ("plan-config-a-directory", PLAN, ["--config", "{t}/dir", *PLAN_GB], "is a directory"),
    ("plan-config-corrupt", PLAN, ["--config", "{t}/bad.yaml", *PLAN_GB], "bad.yaml:2:1 is not valid YAML"),
    ("plan-unknown-key", PLAN, ["--config", "{t}/typo.yaml", *PLAN_GB], "did you mean 'train.steps'"),
    ("plan-model-config-unreadable", PLAN, ["--config", "{t}/good.yaml", "--model-config", "{t}/noread", *PLAN_GB],
     "cannot be read"),
]
PERMISSIONS = ("unreadable", "unwritable")


def fixtures(t: Path) -> None:
    """The inputs the cases name, good and bad."""
    (t / "dir").mkdir()
    (t / "file").write_text("a file\n")
    (t / "good.yaml").write_text("train: {steps: 1}\n")
    (t / "bad.yaml").write_text("train:\n\tsteps: 1\n")  # a tab: line 2, column 1
    (t / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    (t / "typo.yaml").write_text("train:\n  stpes: 1\n")
    (t / "noread.yaml").write_text("train: {steps: 1}\n")
    (t / "bad.jsonl").write_text('{"problem": "q", "solution": \n')
    (t / "noread.jsonl").write_text('{"problem": "q", "solution": "a"}\n')
    (t / "tasks_typo.yaml").write_text("- {name: a, file: x.jsonl, answer_typ: open}\n")
    (t / "noread").mkdir()
    (t / "noread" / "config.json").write_text("{}")
    (t / "ckpt" / "hf_config").mkdir(parents=True)  # a training checkpoint without model/
    (t / "ckpt" / "hf_config" / "config.json").write_text("{}")
    (t / "ro").mkdir()
    for name in ("noread.yaml", "noread.jsonl", "noread"):
        (t / name).chmod(0)
    (t / "ro").chmod(0o555)


def snapshot(t: Path) -> dict[str, tuple]:
    """Every entry under ``t``: kind, size, mode, modification time."""
    found = {}
    for root, dirs, files in os.walk(t):
        for name in dirs + files:
            s = os.lstat(Path(root) / name)
            found[str((Path(root) / name).relative_to(t))] = (s.st_mode, s.st_size, s.st_mtime_ns)
    return found


def as_unprivileged() -> list[str] | None:
    """The command prefix under which permissions apply: none for a user, ``unshare --user`` for
    root where allowed, else None."""
    if os.geteuid() != 0:
        return []
    if shutil.which("unshare") and subprocess.run(["unshare", "--user", "true"], capture_output=True).returncode == 0:
        return ["unshare", "--user"]
    return None


LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (INFO|WARNING) ")


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
    """Every case run in one prepared folder, each a process of its own forked by
    ``command_runner.py`` (the commands imported once): {id: (status, stdout, stderr)}, with
    the folder's snapshot before and after all of them."""
    t, logs = tmp_path_factory.mktemp("preflight"), tmp_path_factory.mktemp("preflight_logs")
    fixtures(t)
    prefix = as_unprivileged()
    cases = [c for c in CASES if prefix is not None or not any(p in c[0] for p in PERMISSIONS)]
    before = snapshot(t)
    runner = [*(prefix or []), sys.executable, str(Path(__file__).with_name("command_runner.py")), str(logs)]
    lines = [[command[0], [*command[1:], *(a.format(t=t) for a in args)]] for _, command, args, _ in cases]
    done = subprocess.run(runner, input=json.dumps(lines), cwd=t, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-3000:]
    after = snapshot(t)
    for p in (t / "ro", *(t / n for n in ("noread.yaml", "noread.jsonl", "noread"))):
        p.chmod(0o755)
    statuses = json.loads((logs / "status.json").read_text())
    results = {case[0]: (status, (logs / f"{i}.out").read_text(), (logs / f"{i}.err").read_text())
               for i, (case, status) in enumerate(zip(cases, statuses))}
    return t, results, before, after


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_bad_input_is_one_line_exit_2_nothing_written(case, refusals):
    t, results, _, _ = refusals
    name, _, _, fragment = case
    if name not in results:
        pytest.skip("permissions do not apply to root here (unshare --user is not allowed)")
    status, out, err = results[name]
    lines = [line for line in err.splitlines() if line.strip() and not LOG_LINE.match(line)]
    assert "Traceback" not in err + out, err
    assert lines and lines[0].startswith("error: "), err
    assert all(line.startswith("  ") for line in lines[1:]), err  # only a data error's rows, one a line
    assert fragment.format(t=t) in err, err
    assert status == 2, err


def test_the_refusals_wrote_and_removed_nothing(refusals):
    _, _, before, after = refusals
    assert after == before
