"""End to end: the tiny default trains, checkpoints, resumes exactly after a kill, and fails cleanly.

Runs use the packaged default config with small overrides (4 prompts x 4 responses x 16 tokens).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medix_fast import checkpoint as C
from medix_fast.metrics import read_metrics
from medix_fast.run_dir import is_trainer_run
from medix_fast.eval import main as eval_main
from medix_fast.train import main

SMALL = ["train.prompts_per_step=4", "train.mini_batch_prompts=2", "sampling.group_size=4",
         "sampling.max_new_tokens=16", "algorithm.chunk_prompts=4", "algorithm.max_tries=2",
         "eval.every=2", "eval.limit=4", "checkpoint.every=2", "checkpoint.keep_last=2",
         "logging.progress=false"]
TIMING = ("time/", "throughput/", "memory/")


def comparable(records: list[dict]) -> list[dict]:
    """Everything but timings, NaN (no update made) as None so that records compare equal."""
    return [{k: None if v != v else v for k, v in r.items() if not k.startswith(TIMING)} for r in records]


def command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "medix_fast.train", *SMALL, f"train.output_dir={out}", *extra]


def test_three_steps_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*SMALL, f"train.output_dir={out}", "train.steps=3", "checkpoint.save_hf_every=1"]) == 0
    baseline, *records = read_metrics(out / "metrics.jsonl")
    assert baseline["step"] == 0 and "eval/overall" in baseline  # held-out score before training
    assert [r["step"] for r in records] == [1, 2, 3]  # step 0 written once
    printed = capsys.readouterr().out
    for step in (0, 2):  # each held-out evaluation's table, as it happens
        assert f"held-out evaluation at step {step}: 4 held-out items, greedy" in printed
    assert printed.count("| sample_test | 4 |") == 2
    assert "done: 3 steps in " in printed and "training reward (overall" in printed
    assert f"metrics: {out / 'metrics.jsonl'}" in printed
    assert f"evaluate it: python -m medix_fast.eval --model {out / 'checkpoints' / 'step_00000003' / 'model'}" in printed
    for key in ("reward/overall", "reward/format", "reward/accuracy", "advantage/std", "kl", "clip_high",
                "entropy", "response/length_mean", "rollout/kept_group_fraction", "throughput/sample_tokens_per_s",
                "throughput/train_tokens_per_s", "time/rollout_s", "time/update_s", "memory/peak_gib", "loss"):
        assert all(key in r for r in records), key
    assert "eval/overall" in records[1]
    assert all(0 <= r["reward/overall"] <= 1 and 0 < r["rollout/kept_group_fraction"] <= 1 for r in records)
    assert (out / "config.yaml").exists() and is_trainer_run(out)  # every name it wrote is one run_dir knows
    assert [p.name for p in C.list_checkpoints(out)] == ["step_00000002", "step_00000003"]
    assert [p.name for p in (C.checkpoint_root(out) / "step_00000001").iterdir()] == ["model"]  # HF copy kept
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(C.latest_checkpoint(out) / "model")  # plain HF checkpoint
    assert sum(p.numel() for p in final.parameters()) > 0
    pytest.importorskip("matplotlib")
    assert (out / "rewards.png").stat().st_size > 0


def test_the_printed_eval_command_scores_the_checkpoint_as_training_did(tmp_path, capsys):
    """One definition of held-out evaluation: the command the summary prints (python -m
    medix_fast.eval) gives the numbers training logged for the same weights."""
    out = tmp_path / "run"
    assert main([*SMALL, f"train.output_dir={out}", "train.steps=2", "eval.samples=2"]) == 0
    logged = read_metrics(out / "metrics.jsonl")[-1]
    assert logged["step"] == 2 and {"eval/pass@1", "eval/pass@2"} <= set(logged)
    assert 0 <= logged["eval/pass@1"] <= logged["eval/pass@2"] <= 1
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("evaluate it: "))
    argv = line.removeprefix("evaluate it: ").split()[3:]  # after "python -m medix_fast.eval"
    assert eval_main([*argv, "--out", str(tmp_path / "eval")]) == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())["micro"]
    assert summary["n"] == 4
    for key in ("accuracy", "format", "modality", "semantic", "overall"):
        assert summary[key] == pytest.approx(logged[f"eval/{key}"]), key


def test_resume_after_kill_reproduces_the_metrics(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main([*SMALL, f"train.output_dir={whole}", "train.steps=4"]) == 0
    expected = comparable(read_metrics(whole / "metrics.jsonl"))
    proc = subprocess.Popen(command(killed, "train.steps=4"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while C.latest_checkpoint(killed) is None and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
    finally:
        proc.kill()  # SIGKILL: no chance to clean up
        proc.wait()
    done = C.latest_checkpoint(killed)
    assert done is not None and done.name == "step_00000002"
    assert not (done / "model").exists()  # HF copies: at the end only by default
    assert main([*SMALL, f"train.output_dir={killed}", "train.steps=4", "--resume"]) == 0
    assert comparable(read_metrics(killed / "metrics.jsonl")) == expected
    resumed = C.load_trainer_state(C.latest_checkpoint(killed))
    assert resumed["step"] == 4 and (C.latest_checkpoint(killed) / "model" / "config.json").is_file()


def test_resume_before_the_first_checkpoint_starts_from_step_0(tmp_path, capsys):
    """An attempt that died before its first save (torchrun --max-restarts then runs the same
    command again, --resume included): step 0, said in one line; the attempt's rows are set aside."""
    out = tmp_path / "run"
    (out / "checkpoints" / ".tmp_step_00000002").mkdir(parents=True)
    (out / "config.yaml").write_text("train: {}\n")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    assert main([*SMALL, f"train.output_dir={out}", "train.steps=1", "eval.every=0", "--resume"]) == 0
    assert f"--resume: no finished checkpoint under {out / 'checkpoints'} yet: starting from step 0" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1]
    assert read_metrics(out / "metrics.jsonl")[0]["loss"] != 9.0
    assert (out / "abandoned-1" / "metrics.jsonl").read_text() == '{"step": 1, "loss": 9.0}\n'


@pytest.mark.parametrize("signals", [(signal.SIGTERM,), (signal.SIGINT, signal.SIGINT)])
def test_a_signal_stops_the_run_and_says_how_to_continue(tmp_path, signals):
    """Once: the step finishes, a checkpoint, a summary saying it stopped, exit 128 + the signal (143 for
    SIGTERM); Ctrl-C twice: one line naming the checkpoint --resume takes, no traceback, exit 130."""
    out = tmp_path / "run"
    proc = subprocess.Popen(command(out, "train.steps=50", "checkpoint.every=1", "eval.every=0"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while C.latest_checkpoint(out) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signals[0])
    seen = []
    if len(signals) > 1:  # the second once the first was handled (two at once are one to Python's handler)
        for line in proc.stderr:
            seen.append(line)
            if "finishing this step" in line:
                proc.send_signal(signals[1])
                break
    stdout, err = proc.communicate(timeout=240)
    err = "".join(seen) + err
    assert proc.returncode == 128 + signals[0], err[-2000:]
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl")]
    assert 1 <= len(steps) < 50 and "Traceback" not in err
    latest = C.latest_checkpoint(out)
    if len(signals) == 1:
        assert latest.name == f"step_{steps[-1]:08d}"
        assert f"stopped by SIGTERM at step {steps[-1]} of 50" in stdout and "--resume" in stdout
    else:
        said = [line for line in err.splitlines() if line.startswith("stopped at once")]  # (log lines interleave)
        assert said == [f"stopped at once (Ctrl-C), without writing a checkpoint: --resume will continue from {latest} "
                        f"(step {C.step_of(latest)})"]


def test_nonfinite_updates_are_skipped_then_training_stops(tmp_path, monkeypatch, capsys, recwarn):
    import medix_fast.rl.update as update

    def nan_loss(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        return loss * float("nan"), metrics

    real = update.fused_linear_policy_loss
    monkeypatch.setattr(update, "fused_linear_policy_loss", nan_loss)
    monkeypatch.setattr(C.Checkpointer, "poll", lambda self: None)  # step 1's async save: still pending at the stop
    out = tmp_path / "run"
    assert main([*SMALL, f"train.output_dir={out}", "train.steps=5", "train.max_nonfinite_steps=2",
                 "train.mini_batch_prompts=4", "eval.every=0", "algorithm.dynamic_sampling=false",
                 "checkpoint.every=1"]) == 1
    assert "NaN/inf" in capsys.readouterr().err
    assert [p.name for p in C.list_checkpoints(out)] == ["step_00000001"]  # waited for, published
    records = read_metrics(out / "metrics.jsonl")
    assert [r["skipped_updates"] for r in records] == [1.0, 1.0]  # (eval off: no step-0 record)
    assert all(r["optimizer_steps"] == 0 for r in records)
    # the schedule still advances per training step, without torch's ordering warning
    assert records[0]["lr"] < records[1]["lr"]
    assert not [w for w in recwarn if "lr_scheduler" in str(w.message)]


def test_bad_config_key_or_checkpoint_is_named(capsys, tmp_path):
    assert main(["train.stpes=3", f"train.output_dir={tmp_path}"]) == 2
    assert "train.stpes" in capsys.readouterr().err
    assert main([*SMALL, f"train.output_dir={tmp_path}", "--resume-from", str(tmp_path)]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err


def test_bad_data_rows_fail_before_training_unless_not_strict(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    rows = [json.dumps({"problem": f"Is finding {i} present?", "solution": "<CT_SCAN> yes"}) for i in range(6)]
    rows[2] = json.dumps({"problem": "no tag", "solution": "yes"})
    data.write_text("\n".join(rows) + "\n")
    args = [*SMALL, f"data.train_files=[{data}]", "data.val_files=[]", f"train.output_dir={tmp_path / 'run'}",
            "train.steps=1", "eval.every=0"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{data}:3:" in err and "modality tag" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert main([*args, "--strict", "false"]) == 0
    assert len(read_metrics(tmp_path / "run" / "metrics.jsonl")) == 1


@pytest.fixture(autouse=True)
def _single_thread(monkeypatch):
    """Subprocesses of these tests share the CI machine's cores with pytest itself."""
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))


def test_resume_from_an_earlier_checkpoint_rolls_back_in_place(tmp_path, capsys):
    """--resume-from runs/x/checkpoints/step_N into runs/x: the run continues from step N there; the
    abandoned branch's later checkpoints and metric rows go to runs/x/abandoned-1/, never mixed in."""
    out = tmp_path / "run"
    args = [*SMALL, f"train.output_dir={out}", "eval.every=0", "checkpoint.every=1", "checkpoint.keep_last=0"]
    assert main([*args, "train.steps=3"]) == 0
    first = read_metrics(out / "metrics.jsonl")
    capsys.readouterr()
    assert main([*args, "train.steps=3", "--resume-from", str(C.checkpoint_root(out) / "step_00000001")]) == 0
    printed = capsys.readouterr()
    assert "done: steps 2-3 (2 run now, resumed from step 1)" in printed.out
    assert "(written by 1 rank, now 1)" in printed.err
    aside = out / "abandoned-1"
    assert read_metrics(aside / "metrics.jsonl") == first[1:]  # steps 2 and 3 of the abandoned branch
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["step_00000002", "step_00000003"]
    again = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in again] == [1, 2, 3] and again[0] == first[0]
    assert comparable(again) == comparable(first)  # the same steps again, deterministically
    assert [p.name for p in C.list_checkpoints(out)] == ["step_00000001", "step_00000002", "step_00000003"]


def test_a_stop_signal_is_named(caplog):
    import logging
    import signal

    from medix_fast.train import Trainer

    trainer = Trainer.__new__(Trainer)  # only the handler's state
    trainer.stop_requested = 0
    with caplog.at_level(logging.WARNING, logger="medix_fast.train"):
        trainer._on_signal(signal.SIGINT, None)
    assert "SIGINT: finishing this step" in caplog.text and trainer.stop_requested == signal.SIGINT


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_lr_schedule_values(schedule):
    """Warm-up from (0 + 1) / (w + 1) at the first step to 1 at its end, then constant or a cosine from 1
    at the end of the warm-up down to min_lr_ratio at the last step."""
    from types import SimpleNamespace

    from medix_fast.train import lr_lambda

    f = lr_lambda(SimpleNamespace(warmup_steps=3, schedule=schedule, min_lr_ratio=0.1), 13)
    assert [f(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    if schedule == "constant":
        assert f(8) == f(13) == 1.0
    else:
        assert [f(8), f(13), f(20)] == pytest.approx([0.55, 0.1, 0.1])  # half-way: (1 + 0.1) / 2


def test_metrics_file_truncates_to_the_resumed_step(tmp_path):
    from medix_fast.metrics import MetricsLogger, truncate_after

    logger = MetricsLogger(tmp_path, tensorboard=False)
    for step in (1, 2, 3):
        logger.log(step, {"reward/overall": step / 10, "loss": torch.tensor(0.5)})
    truncate_after(tmp_path / "metrics.jsonl", 2)
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "reward/overall": 0.1, "loss": 0.5},
                                                       {"step": 2, "reward/overall": 0.2, "loss": 0.5}]
    pytest.importorskip("matplotlib")
    assert logger.close(plot=True).stat().st_size > 0


@pytest.mark.parametrize("keep", [False, True])
def test_kv_pool_is_released_or_kept_before_each_update(tmp_path, monkeypatch, keep):
    """Before the update runs the rollout's K/V pool is given back (a step's peak is max(rollout,
    update), not their sum; made again by the next rollout), or kept with the sampler's weights and
    graphs when the trainer's policy says they fit beside the update (always on the CPU)."""
    from medix_fast.generate import Sampler
    from medix_fast.rl.update import Updater
    from medix_fast.trainer import Trainer

    events = []
    release, run = Sampler.release, Updater.run

    def recording_release(self, kept=False):
        release(self, kept)
        events.append(("release", kept, self.pool is not None))

    def recording_run(self, plan):  # the trainer prepares the plan inside generation_mode, runs it after
        events.append(("update", None, None))
        return run(self, plan)

    monkeypatch.setattr(Sampler, "release", recording_release)
    monkeypatch.setattr(Updater, "run", recording_run)
    if not keep:  # what a GPU does when they do not fit
        monkeypatch.setattr(Trainer, "_keep_sampler", lambda self: False)
    assert main([*SMALL, f"train.output_dir={tmp_path / 'run'}", "train.steps=2", "eval.every=0"]) == 0
    assert events == [("release", keep, keep), ("update", None, None)] * 2


def test_rollouts_sample_and_wandb_offline_on_the_tiny_default(tmp_path, capsys, monkeypatch):
    """rollouts/step_N.jsonl every logging.rollouts_every steps (prompt, completion, reward components,
    advantage), a few printed at the held-out evaluation; wandb offline gets the same scalars and the plot."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    from medix_fast.wandb_log import WandbSink

    logged, log = [], WandbSink.log
    monkeypatch.setattr(WandbSink, "log", lambda self, step, record: logged.append((step, {
        k: v for k, v in record.items() if k != "step"})) or log(self, step, record))
    out = tmp_path / "run"
    assert main([*SMALL, f"train.output_dir={out}", "train.steps=2", "eval.at_start=false", "logging.rollouts_every=2",
                 "logging.rollouts_rows=5", "logging.wandb=true", "logging.wandb_mode=offline"]) == 0
    assert sorted(p.name for p in (out / "rollouts").iterdir()) == ["step_00000002.jsonl"]
    rows = [json.loads(line) for line in (out / "rollouts" / "step_00000002.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and [r["group"] for r in rows] == [0, 0, 0, 0, 1]
    assert all(r["prompt"] and isinstance(r["completion"], str) and -10 < r["advantage"] < 10 for r in rows)
    assert {"reward/overall", "reward/format", "reward/accuracy"} <= set(rows[0])
    group = [r["reward/overall"] for r in rows[:4]]
    mean = sum(group) / 4
    assert all((r["advantage"] > 0) == (r["reward/overall"] > mean) for r in rows[:4] if r["reward/overall"] != mean)
    assert "training rollouts (rollouts/, latest):" in capsys.readouterr().out
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    assert [{"step": s, **r} for s, r in logged] == read_metrics(out / "metrics.jsonl")  # the same scalars
    deadline = time.monotonic() + 30  # wandb-core's writer can flush the file just after run.finish() returns
    while b"reward/overall" not in runs[0].read_bytes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert b"reward/overall" in runs[0].read_bytes()
    assert len(list((out / "wandb").glob("offline-run-*/files/media/images/rewards_*.png"))) == 1  # the plot
