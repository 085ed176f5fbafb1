"""Every command: a user error is one ``error:`` line and exit 2 (a traceback only with --debug),
flags go anywhere on the line, and a new run never writes over an old one.

Run: pytest tests/test_cli.py   (in-process, no model is built: each error comes before one loads)
"""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from medix_fast.demo import sample_data, sample_images, tiny
from medix_fast.errors import ArgumentParser, DataError, UserError, run_command
from medix_fast.eval.cli import main as eval_main
from medix_fast.run_dir import claim_output_dir, is_trainer_run
from medix_fast.train import main as train_main, parse_args

COMMANDS = {"train": train_main, "eval": eval_main, "demo.tiny": tiny.main, "demo.sample_data": sample_data.main,
            "demo.sample_images": sample_images.main}


LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (INFO|WARNING) ")  # progress logged before the error


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip() and not LOG_LINE.match(line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_unknown_flag_is_one_error_line_exit_2(name, capsys, tmp_path):
    required = {"demo.tiny": ["--out", str(tmp_path / "x")], "eval": ["--model", "tiny"]}.get(name, [])
    assert COMMANDS[name]([*required, "--no-such-flag"]) == 2
    assert "--no-such-flag" in one_error_line(capsys)


@pytest.mark.parametrize("argv", [["model.path=/no/such/model", "train.output_dir={tmp}/run"],
                                  ["train.device=cuda", "train.output_dir={tmp}/run"],
                                  ["rewards.weights={{accuracy: 1, typo: 1}}", "train.output_dir={tmp}/run"],
                                  ["data.train_files=[sample:nope]", "train.output_dir={tmp}/run"],
                                  ["train.stpes=3", "train.output_dir={tmp}/run"],
                                  ["rewards.judge_model=/no/such/judge", "train.output_dir={tmp}/run"]])
def test_train_user_errors_are_one_line_exit_2(argv, tmp_path, capsys):
    if "cuda" in argv[0] and __import__("torch").cuda.is_available():
        pytest.skip("a CUDA device is visible")
    assert train_main([a.format(tmp=tmp_path) for a in argv]) == 2
    line = one_error_line(capsys)
    assert any(word in line for word in ("/no/such/model", "cuda", "typo", "nope", "train.stpes", "/no/such/judge")), line


def test_eval_missing_model_is_one_line(capsys):
    assert eval_main(["--model", "/no/such/model"]) == 2
    assert "/no/such/model" in one_error_line(capsys)


def test_builders_refuse_bad_values_in_one_line(tmp_path, capsys):
    assert tiny.main(["--out", str(tmp_path / "t"), "--steps", "0"]) == 2
    assert "--steps" in one_error_line(capsys)
    model_dir = tmp_path / "someone_elses_model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    assert tiny.main(["--out", str(model_dir), "--steps", "1"]) == 2  # never written over
    assert "holds other files (config.json)" in one_error_line(capsys)
    assert (model_dir / "config.json").read_text() == "{}"
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert sample_data.main(["--out", str(blocker / "sub")]) == 2
    assert str(blocker) in one_error_line(capsys)


def test_debug_shows_the_traceback_of_a_user_error(tmp_path):
    with pytest.raises(UserError, match="/no/such/model"):
        train_main(["model.path=/no/such/model", f"train.output_dir={tmp_path}/run", "--debug"])


def test_a_bug_keeps_its_traceback():
    def buggy(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_command(buggy, [])


def test_run_command_returns_2_for_any_user_error(capsys):
    def bad(argv):
        raise DataError("d.jsonl:3: missing field 'solution'")

    assert run_command(bad, []) == 2
    assert one_error_line(capsys) == "error: d.jsonl:3: missing field 'solution'"


def test_flags_anywhere_on_the_line():
    args = parse_args(["train.steps=2", "--strict", "false", "optim.lr=1e-3", "--resume"])
    assert args.overrides == ["train.steps=2", "optim.lr=1e-3"] and args.strict is False and args.resume == "latest"
    parser = ArgumentParser(prog="x")
    parser.add_argument("--n", type=int)
    parser.add_argument("rest", nargs="*")
    assert vars(parser.parse_args(["a", "--n", "3", "b"])) == {"debug": False, "n": 3, "rest": ["a", "b"]}


def test_subprocess_prints_one_line_and_exits_2(tmp_path):
    """As a user sees it: the real interpreter, stderr and status."""
    proc = subprocess.run([sys.executable, "-m", "medix_fast.train", "model.path=/no/such/model",
                           f"train.output_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "warn" not in line.lower()]
    assert lines == [lines[0]] and lines[0].startswith("error: model path '/no/such/model'"), proc.stderr


# ---------------------------------------------------------------------------- the output directory
def test_a_new_run_refuses_a_directory_holding_a_previous_run(tmp_path):
    out = tmp_path / "run"
    assert claim_output_dir(out, resume=False, overwrite=False) is None  # absent: fine
    out.mkdir()
    assert claim_output_dir(out, resume=False, overwrite=False) is None  # empty: fine
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(UserError, match="--resume to continue it.*--overwrite"):
        claim_output_dir(out, resume=False, overwrite=False)
    with pytest.raises(UserError, match="no checkpoint to resume from"):
        claim_output_dir(out, resume=True, overwrite=False)
    done = out / "checkpoints" / "step_00000002"
    (done / "state").mkdir(parents=True)
    (done / "state" / ".metadata").write_bytes(b"")  # what makes a checkpoint complete (checkpoint.is_complete)
    (done / "trainer_state.pt").write_bytes(b"")
    assert claim_output_dir(out, resume=True, overwrite=False) is None
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'  # nothing touched
    with pytest.raises(UserError, match="exclude"):
        claim_output_dir(out, resume=True, overwrite=True)


def test_resume_starts_over_only_in_a_run_of_this_trainer(tmp_path):
    """--resume in a run that crashed before its first save (torchrun --max-restarts restarts it)
    starts from step 0; a directory with anything the trainer does not write is still refused."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("train: {}\n")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "checkpoints" / ".tmp_step_00000002").mkdir(parents=True)  # the save that never finished
    for name in ("eval", "rollouts", "tensorboard", "abandoned-3"):
        (out / name).mkdir()
    assert is_trainer_run(out)
    assert claim_output_dir(out, resume=True, overwrite=False) is None
    with pytest.raises(UserError, match="--resume to continue it"):  # a new run still refuses it
        claim_output_dir(out, resume=False, overwrite=False)
    for stranger in ("notes.txt", "abandoned-x"):
        (out / stranger).write_text("mine")
        assert not is_trainer_run(out)
        with pytest.raises(UserError, match=f"is no run of this trainer \\({stranger}\\).*--overwrite"):
            claim_output_dir(out, resume=True, overwrite=False)
        (out / stranger).unlink()
    (out / "config.yaml").rename(out / "dropped_rows.txt")  # written before config.yaml, when many rows drop
    assert is_trainer_run(out)
    (out / "dropped_rows.txt").unlink()  # trainer names, but none of its first files
    assert not is_trainer_run(out)
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'  # nothing touched


def test_overwrite_moves_the_previous_run_aside(tmp_path):
    out = tmp_path / "run"
    for k in (1, 2):
        out.mkdir()
        (out / "metrics.jsonl").write_text(f"run {k}\n")
        assert claim_output_dir(out, resume=False, overwrite=True, is_main=False) is None
        assert out.exists()  # only rank 0 moves it
        aside = claim_output_dir(out, resume=False, overwrite=True)
        assert aside == tmp_path / f"run.old-{k}" and not out.exists()
        assert (aside / "metrics.jsonl").read_text() == f"run {k}\n"


def test_train_refuses_to_start_over_a_previous_run(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints" / "step_00000007").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 7}\n')
    assert train_main([f"train.output_dir={out}", "train.steps=2"]) == 2
    assert "--overwrite" in one_error_line(capsys)
    assert (out / "metrics.jsonl").read_text() == '{"step": 7}\n'
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000007"]


def test_resuming_at_an_earlier_step_sets_the_later_branch_aside(tmp_path):
    from medix_fast.run_dir import set_aside_after

    out = tmp_path / "run"
    for step in (2, 4, 6):
        (out / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
        (out / "eval" / f"step_{step:08d}").mkdir(parents=True)
    (out / "checkpoints" / ".tmp_step_00000008").mkdir()
    (out / "metrics.jsonl").write_text("".join(f'{{"step": {s}}}\n' for s in range(7)))
    assert set_aside_after(out, 6) is None  # nothing later: nothing moved
    assert set_aside_after(out, 2) == out / "abandoned-1"
    aside = out / "abandoned-1"
    assert (aside / "metrics.jsonl").read_text() == "".join(f'{{"step": {s}}}\n' for s in range(3, 7))
    assert (out / "metrics.jsonl").read_text() == "".join(f'{{"step": {s}}}\n' for s in range(3))
    for sub in ("checkpoints", "eval"):
        assert sorted(p.name for p in (aside / sub).iterdir()) == ["step_00000004", "step_00000006"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [".tmp_step_00000008", "step_00000002"]
    (out / "metrics.jsonl").write_text('{"step": 1}\n{"step": 9}\n')
    assert set_aside_after(out, 1) == out / "abandoned-2"  # a second roll back: a second folder
