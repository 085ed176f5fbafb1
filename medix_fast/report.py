"""What a training run tells its user (rank 0): the start line, each held-out evaluation's
table, a steady ETA, and the end-of-run summary with the command that evaluates the checkpoint.

    start_message(cfg, info, model_path, parameters, threads, cpp_ops, train_prompts, held_out)
    eval_message(step, evaluator, metrics)    # the table of ``python -m medix_fast.eval``, + pass@k
    eta = Eta(total_steps); eta.step(seconds); eta.remaining()   # the first step (warm-up) excluded
    end_summary(records, cfg, seconds, plot, checkpoint)
"""
from __future__ import annotations

import math
import shlex
from pathlib import Path

from .eval.results import markdown_table


def clock(seconds: float) -> str:
    """``83.2`` -> ``"1:23"``; ``"?"`` when unknown."""
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def start_message(cfg, info, model_path: Path, parameters: int, threads: tuple[int, str], cpp_ops: bool,
                  train_prompts: int, held_out: int) -> str:
    """Three lines: what trains where (processes, threads and why, kernels), on what, for how long."""
    t, s, e = cfg.train, cfg.sampling, cfg.eval
    where = f"{info.device.type} x{info.world}" + (
        f" ({cfg.distributed.strategy})" if info.world > 1 or cfg.distributed.strategy == "fsdp" else "")
    how = threads[1] if threads[1].startswith("train.threads") else f"{threads[1]}; train.threads=N sets it"
    cpu = f", {threads[0]} CPU thread{'s' * (threads[0] != 1)} per process ({how})"
    lines = [f"training {cfg.model.path} ({model_path}, {parameters / 1e6:.2f}M parameters) on {where}{cpu}; "
             f"{'C++' if cpp_ops else 'PyTorch'} ops on the CPU",
             f"data: {train_prompts} train prompts from {', '.join(cfg.data.train_files)}; " + (
                 f"held-out: {held_out} items, evaluated {'at step 0 and ' * e.at_start}every {e.every} steps" if held_out
                 else "no held-out evaluation"),
             f"{t.steps} steps x {t.prompts_per_step} prompts x {s.group_size} responses ({cfg.algorithm.loss_type}); "
             f"output: {t.output_dir}"]
    return "\n".join(lines)


def eval_message(step: int, evaluator, metrics: dict[str, float]) -> str:
    """The held-out table of ``step`` (as ``python -m medix_fast.eval`` prints it) under the line
    saying how it was run, and pass@1 / pass@k when sampled."""
    text = (f"held-out evaluation at step {step}: "
            f"{evaluator.headline()}\n"
            + markdown_table(evaluator.summary))
    passes = {k: v for k, v in metrics.items() if k.startswith("eval/pass@")}
    if passes:
        s = evaluator.sample_settings
        text += (", ".join(f"{k[5:]} {v:.3f}" for k, v in passes.items())
                 + f" ({evaluator.samples} samples per item at T={s.temperature:g}, top-p {s.top_p:g})\n")
    return text


class Eta:
    """Time left, from the mean duration of the steps so far except the first (which builds and
    warms up), so that it does not jump after step 1."""

    def __init__(self, total: int, done: int = 0):
        self.total, self.done, self.times = total, done, []

    def step(self, seconds: float) -> None:
        self.done += 1
        self.times.append(seconds)

    def remaining(self) -> float:
        steady = self.times[1:] or self.times
        if not steady:
            return float("nan")
        return sum(steady) / len(steady) * max(0, self.total - self.done)


def first_last(records: list[dict], key: str) -> tuple[float, float] | None:
    """The first and last logged values of ``key``, or None when it was never logged."""
    values = [r[key] for r in records if key in r and r[key] == r[key]]
    return (values[0], values[-1]) if values else None


def quarter_means(records: list[dict], key: str) -> tuple[float, float] | None:
    """Mean of ``key`` over the first and over the last quarter of the training steps."""
    values = [r[key] for r in records if r.get("step", 0) > 0 and key in r and r[key] == r[key]]
    if not values:
        return None
    q = max(1, len(values) // 4)
    return sum(values[:q]) / q, sum(values[-q:]) / q


def eval_command(cfg, model_dir: Path) -> str:
    """The ``python -m medix_fast.eval`` line that evaluates ``model_dir`` as training did."""
    e, r1 = cfg.eval, cfg.eval.protocol == "medix_r1"
    args = ["python", "-m", "medix_fast.eval", "--model", str(model_dir)]
    if r1:  # MediX-R1's published evaluation, with the judge training used
        args += ["--protocol", "medix_r1", "--judge", e.judge_model or cfg.rewards.judge_model]
        if e.data_dir:
            args += ["--data-dir", e.data_dir]
    if e.tasks:
        args += ["--tasks", e.tasks]
    elif not r1 and cfg.data.val_files and cfg.data.val_files != ["sample:test"]:
        args += ["--data", cfg.data.val_files[0]]
    args += ["--max-new-tokens", str(e.max_new_tokens or cfg.sampling.max_new_tokens)]
    if e.limit:
        args += ["--limit", str(e.limit)]
    for flag, pixels in (("--min-pixels", cfg.data.min_pixels), ("--max-pixels", cfg.data.max_pixels)):
        if pixels:  # VL: the images resized as in training
            args += [flag, str(pixels)]
    if r1:
        return shlex.join(args)
    if e.temperature:
        args += ["--temperature", f"{e.temperature:g}", "--top-p", f"{e.top_p:g}"]
    if cfg.rewards.judge_model:
        args += ["--judge", cfg.rewards.judge_model]
    if cfg.rewards.semantic_model:
        args += ["--semantic-model", cfg.rewards.semantic_model]
    return shlex.join(args)


def end_summary(records: list[dict], cfg, seconds: float, eval_seconds: float, plot: Path | None,
                checkpoint: Path | None, stopped: str | None = None, resumed_at: int = 0) -> str:
    """Steps and time, training reward and held-out accuracy first -> last, where things are;
    ``stopped`` (a signal's name) says the run was stopped early and how to continue it;
    ``resumed_at``: the checkpoint's step this process started from (the steps before it ran earlier)."""
    steps = max((r["step"] for r in records), default=0)
    done = (f"done: {steps} steps" if not resumed_at else
            f"done: steps {resumed_at + 1}-{steps} ({steps - resumed_at} run now, resumed from step {resumed_at})"
            if steps > resumed_at else f"done: no step left to run (resumed from step {resumed_at})")
    head = f"stopped by {stopped} at step {steps} of {cfg.train.steps}" if stopped else done
    lines = [f"{head} in {clock(seconds)} ({clock(seconds - eval_seconds)} training, "
             f"{clock(eval_seconds)} held-out evaluation)"]
    if stopped:
        lines.append(f"continue it: the same command with --resume (from the checkpoint of step {steps})")
    reward = quarter_means(records, "reward/overall")
    if reward:
        lines.append(f"training reward (overall, mean of the first -> last quarter of steps): "
                     f"{reward[0]:.3f} -> {reward[1]:.3f}")
    held = [(name, first_last(records, f"eval/{key}")) for name, key in
            (("accuracy", "accuracy"), ("overall", "overall"))]
    held += [(k[5:], first_last(records, k)) for k in sorted({k for r in records for k in r
                                                              if k.startswith("eval/pass@")})]
    held = [f"{name} {fl[0]:.3f} -> {fl[1]:.3f}" for name, fl in held if fl]
    if held:
        lines.append("held-out (step 0 -> last evaluation): " + ", ".join(held))
    out = Path(cfg.train.output_dir)
    lines.append(f"metrics: {out / 'metrics.jsonl'}" + (f"; plot: {plot}" if plot else ""))
    if checkpoint is not None:
        lines.append(f"checkpoint: {checkpoint} (a Hugging Face model in model/)")
        lines.append(f"evaluate it: {eval_command(cfg, checkpoint / 'model')}")
    return "\n".join(lines)
