"""What a run says and how it sets itself up: threads from the cores it may use, logs and warnings
on rank 0 only, the C++ build announced, the start line, the ETA, the end summary, the plot.

Run: pytest tests/test_runtime.py
"""
from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import pytest
import torch

from medix_fast import runtime
from medix_fast.config import load_config
from medix_fast.distributed import DistInfo
from medix_fast.report import Eta, end_summary, eval_command, quarter_means, start_message


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_from_affinity_divided_by_local_ranks(monkeypatch, restore_threads, tmp_path):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "CPU_MAX", tmp_path / "absent")
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert runtime.set_cpu_threads(0) == (3, "6 cores available / 2 ranks on this node")
    assert torch.get_num_threads() == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # more ranks than cores: one thread each, never 0
    assert runtime.set_cpu_threads(0)[0] == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert runtime.set_cpu_threads(0) == (2, "OMP_NUM_THREADS")
    assert runtime.set_cpu_threads(5, "train.threads") == (5, "train.threads=5") and torch.get_num_threads() == 5


def test_cgroup_quota_caps_the_cores(monkeypatch, tmp_path):
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")
    assert runtime.cgroup_cores(quota) == 1
    quota.write_text("max 100000\n")
    assert runtime.cgroup_cores(quota) is None
    quota.write_text("400000 100000\n")
    monkeypatch.setattr(runtime, "CPU_MAX", quota)
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert runtime.available_cores() == 4


def test_logs_and_warnings_only_on_rank_0(capsys):
    logging.captureWarnings(False)  # an earlier command in this process may have captured them
    with warnings.catch_warnings():  # pytest records warnings: show them, once per place, as Python does
        warnings.simplefilter("default")
        check_logs_and_warnings(capsys)


def check_logs_and_warnings(capsys):
    try:
        runtime.setup_logging(1)
        logging.getLogger("medix_fast.x").warning("rank-1 warning")
        warnings.warn("rank-1 python warning", FutureWarning)
        assert "rank-1" not in capsys.readouterr().err
        runtime.setup_logging(0)
        logging.getLogger("medix_fast.x").warning("rank-0 warning")
        for _ in range(3):
            warnings.warn("rank-0 python warning", FutureWarning)
        err = capsys.readouterr().err
        assert "rank-0 warning" in err and err.count("FutureWarning: rank-0 python warning") == 1
    finally:
        logging.captureWarnings(False)


def test_first_cpp_build_is_announced(monkeypatch, tmp_path, caplog):
    from torch.utils import cpp_extension

    from medix_fast.kernels import cpp

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: None)
    with caplog.at_level(logging.INFO, logger="medix_fast.kernels"):
        cpp._build()
    assert "building the C++ ops" in caplog.text and "once" in caplog.text and str(tmp_path) in caplog.text
    caplog.clear()
    name = cpp.extension_name()
    (tmp_path / "py_cpu" / name).mkdir(parents=True)
    (tmp_path / "py_cpu" / name / f"{name}.so").write_bytes(b"")
    with caplog.at_level(logging.INFO, logger="medix_fast.kernels"):
        cpp._build()
    assert "building" not in caplog.text


def test_start_message_names_processes_threads_and_data():
    cfg = load_config(None)
    one = start_message(cfg, DistInfo(), Path("/cache/tiny"), 1_050_000, (2, "2 cores available"), True, 400, 80)
    assert "on cpu x1, 2 CPU threads per process (2 cores available" in one and "(ddp)" not in one
    assert "400 train prompts" in one and "held-out: 80 items, evaluated at step 0 and every" in one
    assert "C++ ops" in one
    late = start_message(load_config(None, ["eval.at_start=false"]), DistInfo(), Path("/t"), 1, (1, "x"), True, 4, 8)
    assert f"held-out: 8 items, evaluated every {cfg.eval.every} steps" in late
    two = start_message(cfg, DistInfo(world=2), Path("/cache/tiny"), 1, (1, "2 cores available / 2 ranks"), False,
                        400, 0)
    assert "cpu x2 (ddp)" in two and "no held-out evaluation" in two
    pinned = start_message(cfg, DistInfo(), Path("/t"), 1, (1, "train.threads=1"), True, 4, 0)
    assert "1 CPU thread per process (train.threads=1)" in pinned


def test_eta_ignores_the_warm_up_step():
    eta = Eta(total=10)
    eta.step(30.0)  # builds the C++ ops, warms up
    assert eta.remaining() == pytest.approx(9 * 30.0)  # nothing better known yet
    eta.step(1.0)
    assert eta.remaining() == pytest.approx(8 * 1.0)  # no jump to (30 + 1) / 2 per step
    eta.step(3.0)
    assert eta.remaining() == pytest.approx(7 * 2.0)
    assert math.isnan(Eta(5).remaining())
    resumed = Eta(total=10, done=8)
    resumed.step(2.0)
    assert resumed.remaining() == pytest.approx(2.0)


def test_end_summary_says_what_changed_and_where_things_are(tmp_path):
    cfg = load_config(None, [f"train.output_dir={tmp_path}"])
    records = [{"step": 0, "eval/accuracy": 0.2, "eval/overall": 0.4, "eval/pass@1": 0.15, "eval/pass@8": 0.7}]
    records += [{"step": s, "reward/overall": 0.1 if s <= 2 else 0.5} for s in range(1, 9)]
    records[-1].update({"eval/accuracy": 0.5, "eval/overall": 0.6, "eval/pass@1": 0.45, "eval/pass@8": 0.72})
    assert quarter_means(records, "reward/overall") == (0.1, 0.5)
    ckpt = tmp_path / "checkpoints" / "step_00000008"
    text = end_summary(records, cfg, 125.0, 20.0, tmp_path / "rewards.png", ckpt)
    assert "done: 8 steps in 2:05 (1:45 training, 0:20 held-out evaluation)" in text
    assert "0.100 -> 0.500" in text
    assert "accuracy 0.200 -> 0.500" in text and "pass@1 0.150 -> 0.450" in text and "pass@8 0.700 -> 0.720" in text
    assert f"metrics: {tmp_path / 'metrics.jsonl'}; plot: {tmp_path / 'rewards.png'}" in text
    assert f"evaluate it: python -m medix_fast.eval --model {ckpt / 'model'} --max-new-tokens 48" in text
    resumed = end_summary(records, cfg, 125.0, 20.0, None, None, resumed_at=2)
    assert resumed.startswith("done: steps 3-8 (6 run now, resumed from step 2) in 2:05")
    assert end_summary(records, cfg, 1.0, 0.0, None, None, resumed_at=8).startswith(
        "done: no step left to run (resumed from step 8)")
    stopped = end_summary(records, cfg, 125.0, 20.0, None, None, "SIGINT").splitlines()
    assert stopped[:2] == [f"stopped by SIGINT at step 8 of {cfg.train.steps} in 2:05 (1:45 training, 0:20 held-out "
                           "evaluation)", "continue it: the same command with --resume (from the checkpoint of step 8)"]


def test_eval_command_carries_what_training_evaluated_with():
    cfg = load_config(None, ["data.val_files=[held.jsonl]", "eval.limit=7", "eval.temperature=0.6",
                             "eval.top_p=0.95", "eval.max_new_tokens=32"])
    assert eval_command(cfg, Path("m")) == ("python -m medix_fast.eval --model m --data held.jsonl "
                                            "--max-new-tokens 32 --limit 7 --temperature 0.6 --top-p 0.95")
    vl = load_config(None, ["data.min_pixels=784", "data.max_pixels=12544"])  # the images resized as in training
    assert "--max-new-tokens 48 --min-pixels 784 --max-pixels 12544" in eval_command(vl, Path("m"))


def test_reward_plot_reads_at_a_glance():
    pytest.importorskip("matplotlib")
    from matplotlib.colors import to_hex

    from medix_fast.metrics import reward_figure

    records = [{"step": 0, "eval/accuracy": 0.2, "eval/semantic": 0.3, "eval/format": 1.0, "eval/pass@8": 0.7}]
    records += [{"step": s, "reward/overall": 0.3 + s / 100, "reward/accuracy": 0.2, "reward/semantic": 0.3,
                 "reward/format": 1.0} for s in range(1, 21)]
    records[-1].update({"eval/accuracy": 0.5, "eval/semantic": 0.5, "eval/format": 1.0, "eval/pass@8": 0.75})
    fig = reward_figure(records, "a title")
    top, bottom = fig.axes
    assert fig._suptitle.get_text() == "a title"
    labels = {line.get_label(): line for line in top.get_lines()}
    assert {"training reward (overall)", "held-out accuracy (greedy)", "held-out pass@8 (sampled)"} <= set(labels)
    colors = {line.get_label(): to_hex(line.get_color()) for line in bottom.get_lines()}
    for name in ("accuracy", "semantic", "format"):
        assert colors[f"{name}: training"] == colors[f"{name}: held-out"], name
    assert len({colors[f"{n}: training"] for n in ("accuracy", "semantic", "format")}) == 3
    fig.canvas.draw()
    for ax in (top, bottom):  # each legend sits beside its panel, over no line
        assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1
    for r in records[1:]:
        r.update({"mismatch/abs_mean": 1e-7, "mismatch/abs_max": 5e-6, "mismatch/k3_kl": 1e-13})
    third = reward_figure(records).axes[2]  # the mismatch panel, only when logged
    assert {line.get_label() for line in third.get_lines()} >= {"abs_mean", "abs_max", "k3_kl"}


def test_cuda_allocator_gets_expandable_segments_unless_the_user_chose(monkeypatch):
    import os

    from medix_fast.runtime import ALLOC_CONF, set_cuda_allocator

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert set_cuda_allocator("cpu") is None and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert set_cuda_allocator("auto") == ALLOC_CONF == os.environ["PYTORCH_CUDA_ALLOC_CONF"]
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    assert set_cuda_allocator("cuda") == "max_split_size_mb:128" == os.environ["PYTORCH_CUDA_ALLOC_CONF"]
