"""The trainer behind ``python -m medix_fast.train`` (its command line: ``train/cli.py``): GRPO /
DAPO / GSPO / Dr. GRPO on MediX-style clinical QA.

One training step (``Trainer.step``):
  1. rollout (``rl/rollout.py``): draw prompts, sample G responses each with the in-process
     sampler on the live weights (parameters unsharded under FSDP2), score them with the
     batched reward, group advantages; DAPO drops zero-signal groups and draws more;
  2. update (``rl/update.py``): old (and, with ``beta > 0``, reference) log-probs, then
     ``ppo_epochs`` x mini-batches of AdamW steps on ``fused_linear_policy_loss`` over
     micro-batches packed by token budget, grad-norm clipping, NaN/inf updates skipped;
  3. LR schedule, optional held-out evaluation, metrics (``metrics.py``), checkpoint
     (``checkpoint.py``).

The algorithm is configuration (``configs/``): GRPO = ``loss_type`` grpo/dapo + ``beta`` for the
k3 KL; DAPO = ``dynamic_sampling`` + clip-higher + ``loss_type: dapo`` (+ the ``overlong``
reward for overlong shaping); GSPO / GSPO-token = ``importance_sampling_level`` sequence /
sequence_token; Dr. GRPO = ``advantage_estimator: dr_grpo`` + ``loss_type: dr_grpo``.
Departures from the reference stack (EasyR1 + vLLM + a judge server): no separate engine and
no weight copy (sampling runs on the trained module), rewards in-process and batched, the LM
head never materialises logits, and the LR schedule counts training steps.

SIGTERM / SIGINT (once) finish the current step, write a checkpoint, say so in the summary and
exit with status 143 / 130 (128 + the signal: stopped, not done; ``--resume`` continues); a
second SIGINT stops at once, with one line saying which checkpoint ``--resume`` will take. ``--resume`` restores model, optimizer, scheduler, RNG and the
prompt loader, on any number of processes (``checkpoint.py``); on CPU at the same world size
the resumed run's metrics equal the uninterrupted run's. ``python -m medix_fast.export`` turns
any checkpoint into a Hugging Face model directory.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import random
import resource
import signal
import sys
import time
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as C
from . import distributed as D
from .config import Config, save_config
from .data import PromptLoader, build_prompts, load_examples
from .data.vision import Vision
from .errors import ConfigError
from .eval import Evaluator, R1Evaluator
from .export import save_hf_model, write_hf_files
from .generate import GroupSampler, Sampler
from .generate.memory import keep_across_steps
from .generate.tensor_parallel import tensor_parallel_error
from .kernels.dispatch import use_cpp
from .metrics import MetricsLogger, read_metrics
from .demo.cache import resolve_model_path
from .model.loading import (compute_dtype, image_token_id, is_vl, load_image_processor, load_model,
                            set_vision_trainable, stop_ids)
from .model.exact import enable as enable_exact
from .model.lora import AdaptersOff, add_adapters, merged_state_dict
from .model.moe import is_moe, set_router_trainable
from .model.peft_files import base_identity, read_adapter
from .optim.adamw import adamw
from .report import Eta, clock, end_summary, eval_message, start_message
from .rewards import build_reward
from .rl.loss_options import check_config
from .rl.rollout import Rollout, max_trained_groups
from .rl.update import PolicyObjective, Updater
from .rollouts_log import rollout_records, show_rollouts, write_rollouts
from .run_dir import set_aside_after
from .runtime import set_cpu_threads, set_cuda_allocator
from .wandb_log import WandbSink
from .watchdog import FINISHED, where

log = logging.getLogger("medix_fast.train")


class TrainingDiverged(RuntimeError):
    """Too many consecutive updates with a NaN/inf loss or gradient."""


def lr_lambda(optim, steps: int):
    """LR multiplier after ``step`` training steps: linear warm-up, then constant or cosine."""
    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / (optim.warmup_steps + 1)
        if optim.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - optim.warmup_steps) / max(1, steps - optim.warmup_steps))
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Trainer:
    def __init__(self, cfg: Config, resume: str | None = None):
        check_config(cfg)  # the loss options, before anything loads
        self.cfg = cfg
        t = cfg.train
        set_cuda_allocator(t.device)  # before CUDA allocates
        d = cfg.distributed
        self.info = D.init_distributed(t.device, d.backend, d.strategy, d.timeout_min)
        D.start_watchdog(self.info, d.heartbeat_s, d.dead_after_s, d.stall_warn_s)  # names a dead or stalled rank
        self.threads = set_cpu_threads(t.threads, "train.threads")
        self.out = Path(t.output_dir)
        random.seed(t.seed)
        np.random.seed(t.seed)
        torch.manual_seed(t.seed)
        self.sampled, self.sample_records = None, []  # a rollouts sample to write (rollouts_log.py), the last one
        self.stop_requested = 0  # the signal that asked to stop (SIGINT / SIGTERM), 0 while none

        dropped = self.out / "dropped_rows.txt" if self.info.is_main else None
        train_examples = load_examples(cfg.data.train_files, cfg.data, dropped)  # bad rows fail before any model loads
        train_examples = train_examples[:cfg.data.max_examples or None]
        ckpt = self._find_checkpoint(resume)
        dev, dtype = self.info.device, compute_dtype(cfg.model.dtype, self.info.device)
        attn_impl = None if cfg.model.attn_impl == "auto" else cfg.model.attn_impl
        fsdp = cfg.distributed.strategy == "fsdp"
        experts = cfg.model.experts_implementation  # MoE only; FSDP2 computes the fp32 weights in bf16
        model_path = resolve_model_path(cfg.model.path)  # a tiny name built once, a directory checked once
        if cfg.sampling.tensor_parallel > 1:  # before any weight loads: the config.json's shapes
            from transformers import AutoConfig
            error = tensor_parallel_error(AutoConfig.from_pretrained(model_path), cfg.sampling.tensor_parallel,
                                          self.info.world)
            if error:
                raise ConfigError(f"sampling.tensor_parallel={cfg.sampling.tensor_parallel}: {error}")
        lora = cfg.model.lora
        # LoRA: the frozen base in the compute dtype (no fp32 master), the adapters in fp32
        self.model, self.tokenizer = load_model(model_path, dtype=dtype if lora.rank else torch.float32,
                                                device=dev, attn_impl=attn_impl,
                                                gradient_checkpointing=cfg.model.gradient_checkpointing,
                                                experts_implementation=experts,
                                                compute_dtype=dtype if fsdp else torch.float32)
        self.model.train()
        if is_moe(self.model.config):
            set_router_trainable(self.model, cfg.model.train_router)
        elif cfg.model.router_replay:
            raise ConfigError(f"model.router_replay: {cfg.model.path} is not a mixture-of-experts model "
                              "(it has no routers to replay)")
        vision = None
        if is_vl(self.model):  # images go before the question; the tower trains unless model.train_vision is off
            set_vision_trainable(self.model, cfg.model.train_vision)
            vision = Vision(load_image_processor(model_path), image_token_id(self.model),
                            cfg.data.min_pixels or None, cfg.data.max_pixels or None)
        self.vision = vision
        self.lora_base = None  # LoRA: the base's identity, kept in every checkpoint and checked on resume
        if lora.rank:  # everything frozen (routers, vision tower too) but the adapters
            add_adapters(self.model, lora)
            if lora.init_from:
                read_adapter(self.model, lora, lora.init_from)
            self.lora_base = base_identity(model_path)
        self.prompts, _ = build_prompts(train_examples, self.tokenizer, cfg.data.max_prompt_length, vision, dropped)
        evaluator = R1Evaluator if cfg.eval.protocol == "medix_r1" else Evaluator
        self.evaluator = evaluator.from_config(cfg, self.tokenizer, self.info, vision) if cfg.eval.every else None

        if cfg.sampling.exact:  # sampler and trainer through the same batch-invariant maths (model/exact.py)
            if dev.type != "cpu":
                raise ConfigError(f"sampling.exact: CPU only, and train.device resolved to {dev.type}")
            enable_exact(self.model)
        self.objective = PolicyObjective(self.model, cfg.sampling.temperature, t.share_prompt,
                                         cfg.model.router_aux_loss_coef if is_moe(self.model.config) else 0.0,
                                         cfg.model.router_replay)
        o = cfg.optim
        self.wrapped = D.wrap(self.objective, self.model, cfg.distributed.strategy, self.info, dtype,
                              offload_params=o.offload == "params")
        # CUDA, or exact mode on the CPU: the update's forwards in the sampler's compute dtype
        autocast = dtype if (dev.type == "cuda" or cfg.sampling.exact) and dtype != torch.float32 and not fsdp else None
        fused = not fsdp and dev.type in ("cpu", "cuda")  # one kernel, no host read of each step count (FSDP2: foreach)
        # optim.offload / state_dtype: torch's AdamW, or medix_fast/optim/adamw.py's with host / bf16 states
        self.optimizer = adamw([p for p in self.wrapped.parameters() if p.requires_grad], o, fused)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(o, t.steps))
        ref = None
        if cfg.algorithm.beta > 0 and lora.rank:  # the base with the adapters off: no second copy
            ref = AdaptersOff(self.objective, self.model)
        elif cfg.algorithm.beta > 0:
            ref_model, _ = load_model(model_path, dtype=dtype, device=dev,
                                      attn_impl=attn_impl, gradient_checkpointing=False,
                                      experts_implementation=experts)
            ref_model.eval().requires_grad_(False)
            ref = D.shard_reference(PolicyObjective(ref_model, cfg.sampling.temperature, t.share_prompt), ref_model,
                                    cfg.distributed.strategy, self.info, dtype)
        self.updater = Updater(self.objective, self.wrapped, self.optimizer, cfg.algorithm, t, cfg.sampling, self.info,
                               pad_id=self.tokenizer.pad_token_id or 0, ref_objective=ref, autocast_dtype=autocast,
                               grad_clip=o.grad_clip, max_groups=max_trained_groups(cfg, self.info.world))

        world, s = self.info.world, cfg.sampling
        engine = dict(max_num_seqs=s.max_num_seqs, kv_cache_gb=s.kv_cache_gb, block_size=s.block_size,
                      gpu_memory_utilization=s.gpu_memory_utilization, max_prefill_tokens=s.max_prefill_tokens,
                      record_routing=cfg.model.router_replay, lora_merge=s.lora_merge)
        self.sampler = GroupSampler(self.model, s.tensor_parallel, self.info, dtype, **engine) \
            if s.tensor_parallel > 1 else Sampler(self.model, dtype=dtype, **engine)
        self.loader = PromptLoader(len(self.prompts), t.seed, cfg.data.shuffle, self.info.rank, world)
        reward_fn = build_reward(cfg.rewards, dev, dtype)
        self.rollout = Rollout(self.sampler, reward_fn, self.tokenizer, self.prompts, self.loader, cfg, self.info,
                               stop_token_ids=stop_ids(self.model, self.tokenizer), vision=vision)
        self.update_peak: int | None = None  # bytes, the last update's peak without the sampler's (CUDA)
        self.step, self.run_id = 0, uuid.uuid4().hex
        if ckpt:
            self._restore(ckpt)
        c = cfg.checkpoint
        self.checkpointer = C.Checkpointer(self.out, self.info.rank, world, self.run_id, c.keep_last, c.async_save,
                                           c.keep_staging)
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
            abandoned = set_aside_after(self.out, self.step if ckpt else -1)  # a later branch: kept, not mixed in
            if abandoned:
                log.warning("resumed at step %d: the later steps of the previous branch were moved to %s",
                            self.step, abandoned)
        self.logger = MetricsLogger(self.out, self.info.is_main, cfg.logging.tensorboard,
                                    WandbSink.open(cfg.logging, self.out) if self.info.is_main else None)
        cpp_ops = use_cpp(torch.empty(0, device=dev))  # builds the C++ ops now (once), not inside step 1
        log.info("%s", start_message(cfg, self.info, model_path,
                                     sum(p.numel() for p in self.model.parameters()), self.threads, cpp_ops,
                                     len(self.prompts), len(self.evaluator.items) if self.evaluator else 0))

    # ------------------------------------------------------------------ checkpoints
    def _find_checkpoint(self, resume: str | None) -> Path | None:
        if resume is None:
            return None
        C.wait_all()  # a save this process still has in flight (an earlier Trainer's) is found complete
        found = C.latest_checkpoint(self.cfg.train.output_dir) if resume == "latest" else Path(resume)
        if found is None:
            log.warning("--resume: no finished checkpoint under %s yet: starting from step 0",
                        C.checkpoint_root(self.cfg.train.output_dir))
        else:
            C.check_checkpoint(found)
        return found

    def _restore(self, path: Path) -> None:
        """Model and optimizer (re-sharded to this world size), scheduler, loader, RNG: see checkpoint.py."""
        state = C.load_trainer_state(path)
        saved = state.get("lora", {}).get("base")
        if (saved or {}).get("hash") != (self.lora_base or {}).get("hash"):
            raise C.CheckpointError(f"{path} was trained {f'as adapters on base {saved}' if saved else 'in full'}; "
                                    f"this run {f'adapts base {self.lora_base}' if self.lora_base else 'trains in full'}"
                                    " (model.path / model.lora)")
        trained_only = self.lora_base is not None
        tensors = D.training_state(self.wrapped, self.model, self.optimizer, C.has_optimizer(path), trained_only)
        C.check_model(path, {k: tuple(v.shape) for k, v in tensors["model"].items()})
        C.load_state(path, tensors)
        D.load_training_state(self.wrapped, self.model, self.optimizer, tensors, trained_only)
        if "optimizer" not in tensors:
            log.warning("%s holds no optimizer state (checkpoint.save_optimizer=false): AdamW starts afresh", path)
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["loader"])
        self.updater.nonfinite_in_a_row = state["nonfinite_in_a_row"]
        C.restore_rng(path, self.info.rank, self.info.world, self.cfg.train.seed)
        self._restore_carry(state.get("carry"), state["world"], path)
        self.step, self.run_id = state["step"], state["run_id"]
        log.info("resumed from %s at step %d (written by %d rank%s, now %d)", path, self.step, state["world"],
                 "s" * (state["world"] != 1), self.info.world)

    def _restore_carry(self, carry: list | None, world: int, path: Path) -> None:
        """Partial rollouts: each rank's groups in flight, as saved by the same number of ranks
        (a rank's groups are its own); otherwise dropped, with a line saying how many."""
        if self.rollout.carry is None or not carry:
            if carry and any(carry):
                log.warning("%s holds %d groups in flight (rollout.partial); this run does not carry: dropped",
                            path, sum(map(len, carry)))
            return
        if world != self.info.world:
            log.warning("%s: %d groups in flight were written by %d ranks, now %d: dropped (their prompts are "
                        "not drawn again)", path, sum(map(len, carry)), world, self.info.world)
            return
        self.rollout.carry.load(carry[self.info.rank], self.info.device)
        fresh = [self.rollout.pixels([p.prompt])[0] for p in self.rollout.carry.pending]
        for p, image in zip(self.rollout.carry.pending, fresh):
            p.image = image

    def save(self, hf: bool = False) -> Path:
        """Checkpoint this step (every rank; written in the background with checkpoint.async_save),
        with the Hugging Face model when ``hf``; returns the path it has once published."""
        where.enter("checkpoint")
        full = D.full_state_dict(self.wrapped, self.model) if hf and self.cfg.distributed.strategy == "fsdp" else None
        if hf and self.lora_base:  # the Hugging Face copy: the base with the adapters folded in
            full = merged_state_dict(self.model, full)
        processor = self.vision.image_processor if self.vision else None  # a VL model is served with it

        def write_extra(directory: Path) -> None:  # rank 0
            write_hf_files(directory / C.HF_CONFIG, self.model, self.tokenizer, processor)
            if hf:
                save_hf_model(directory / C.HF_MODEL, self.model, full, self.tokenizer, processor)

        trainer_state = {"scheduler": self.scheduler.state_dict(), "loader": self.loader.state_dict(),
                         "nonfinite_in_a_row": self.updater.nonfinite_in_a_row}
        if self.lora_base:  # what export needs to rebuild the model: the base and the adapters' settings
            trainer_state["lora"] = {"base": self.lora_base, "config": dataclasses.asdict(self.cfg.model.lora)}
        if self.rollout.carry is not None:  # every rank's groups in flight (rank 0 writes them)
            trainer_state["carry"] = D.all_gather_objects(self.rollout.carry.state())
        state = D.training_state(self.wrapped, self.model, self.optimizer, self.cfg.checkpoint.save_optimizer,
                                 trained_only=self.lora_base is not None)
        return self.checkpointer.save(self.step, state, trainer_state, write_extra)

    # ------------------------------------------------------------------ the loop
    def train_step(self) -> dict:
        step = self.step + 1
        dev = self.info.device
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        where.enter("rollout", step)  # for the watchdog's lines: host-side labels only
        keep = self._keep_sampler()
        with self._sampling_weights(keep):
            seqs, metrics = self.rollout.collect(step)
            every = self.cfg.logging.rollouts_every
            if self.info.is_main and every and step % every == 0:  # written by run(), outside the step
                self.sampled = (seqs, self.rollout.last_rewards)
            self.sampler.release(keep)  # unless kept, the K/V pool goes before the update
        t1 = time.perf_counter()
        where.enter("update")
        rollout_peak = 0
        if dev.type == "cuda":  # the update's own peak, for _keep_sampler; the step's is the larger of the two
            rollout_peak = torch.cuda.max_memory_allocated(dev) + self.sampler.vmm_bytes  # its pages: not torch's
            torch.cuda.reset_peak_memory_stats(dev)
        plan = self.updater.prepare(seqs)  # old / reference log-probs: FSDP2 forwards, one unit gathered at a time
        seq_tokens = metrics["rollout/trained_tokens"]
        if not metrics["rollout/trained_groups"]:
            log.warning("step %d: no group with a learning signal was kept; no update", step)
        metrics.update(self.updater.run(plan))
        if dev.type == "cuda":
            self.update_peak = torch.cuda.max_memory_allocated(dev) - (self.sampler.held_bytes if keep else 0)
        t2 = time.perf_counter()
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        with warnings.catch_warnings():
            # The schedule counts training steps, updated or not (no group kept, every update
            # non-finite): torch's "lr_scheduler.step() before optimizer.step()" on a first step
            # without an update is that case, not a wrong order.
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before", UserWarning)
            self.scheduler.step()
        self.step = step
        if self.evaluator and not self.evaluator.resumable and step % self.cfg.eval.every == 0:
            metrics.update(self.evaluate(step))
        t3 = time.perf_counter()
        metrics.update({
            "time/rollout_s": t1 - t0, "time/update_s": t2 - t1, "time/eval_s": t3 - t2, "time/step_s": t3 - t0,
            "throughput/train_tokens_per_s": seq_tokens * self.cfg.algorithm.ppo_epochs / max(t2 - t1, 1e-9),
            "memory/peak_gib": max(peak_memory_gib(dev), rollout_peak / 2**30),
        })
        return metrics

    def _sampling_weights(self, keep: bool):
        """The weights the sampler runs on, for a rollout or an evaluation: this rank's share of the
        tensor-parallel copy (``sampling.tensor_parallel`` > 1; ``keep``: its storage stays for the
        next rollout, refilled in place), else the policy's parameters unsharded (FSDP2; as they
        are with DDP or one process)."""
        if isinstance(self.sampler, GroupSampler):
            return self.sampler.weights(keep)
        return D.generation_mode(self.wrapped)

    def _keep_sampler(self) -> bool:
        """Whether the sampler keeps its K/V pool, its copy of the weights and its CUDA graphs
        through the update (graphs captured once per run): always on the CPU; on CUDA when the last
        update's peak beside them fits (``memory.keep_across_steps``): the first step gives them back
        and measures, a step that no longer fits gives them back again. In sleepable memory
        (``generate/vmm.py``) never: the release puts them to sleep (no bytes held, graphs kept)."""
        dev = self.info.device
        if dev.type != "cuda":
            return True
        if self.sampler.sleeps:
            return False
        if self.update_peak is None:
            return False
        total = torch.cuda.get_device_properties(dev).total_memory
        return keep_across_steps(self.update_peak, self.sampler.held_bytes, total)

    def evaluate(self, step: int) -> dict[str, float]:
        """The held-out evaluation of the live weights (``eval`` section), written under
        ``<output_dir>/eval/step_N/``; returns its ``eval/*`` metrics."""
        where.enter("eval", step)
        # medix_r1's judge comes after the generation: the policy's pool goes before the judge's comes
        keep = self._keep_sampler() and not self.evaluator.resumable

        @contextmanager
        def weights():
            with self._sampling_weights(keep):
                try:
                    yield
                finally:
                    self.sampler.release(keep)
        return self.evaluator.during_training(self.sampler, self.rollout.reward_fn, self.rollout.stop_token_ids,
                                              self.out / "eval" / f"step_{step:08d}", weights)

    def _eval_after_checkpoint(self, step: int) -> bool:
        """Whether ``step`` has a resumable evaluation (``eval.protocol: medix_r1``): run after the
        step's checkpoint and logged as a row of its own, so a run stopped inside it resumes at
        that checkpoint and finishes it (its files are continued)."""
        return bool(self.evaluator and self.evaluator.resumable and step and step % self.cfg.eval.every == 0)

    def _eval_logged(self, step: int) -> bool:
        """Whether ``metrics.jsonl`` holds ``step``'s evaluation (rank 0 reads, every rank is told)."""
        logged = None
        if self.info.is_main:
            rows = read_metrics(self.out / "metrics.jsonl")
            logged = any(r["step"] == step and "eval/mean_accuracy" in r for r in rows)
        return D.broadcast_object(logged)

    def _on_signal(self, signum, frame) -> None:
        if self.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.stop_requested = signum
        log.warning("%s: finishing this step, then checkpoint and exit", signal.Signals(signum).name)

    def run(self) -> list[dict]:
        """Train until ``train.steps`` (or a stop signal); returns this run's metrics records.
        Rank 0 prints each held-out evaluation's table and, at the end, a summary."""
        from tqdm.auto import tqdm

        cfg, main = self.cfg, self.info.is_main
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        bar = tqdm(total=cfg.train.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
                   disable=not (main and cfg.logging.progress))
        eta = Eta(cfg.train.steps, self.step)
        records, started, eval_s, path, resumed_at = [], time.perf_counter(), 0.0, None, self.step

        def show(step: int, metrics: dict) -> None:
            if self.sampled is not None:
                self.sample_records = rollout_records(*self.sampled, self.tokenizer, cfg.logging.rollouts_rows)
                write_rollouts(self.out / "rollouts", step, self.sample_records)
                self.sampled = None
            if main and any(k.startswith("eval/") for k in metrics):
                tqdm.write(eval_message(step, self.evaluator, metrics), file=sys.stdout)
                if self.sample_records:
                    tqdm.write(f"training rollouts (rollouts/, latest):\n{show_rollouts(self.sample_records, 3)}",
                               file=sys.stdout)

        def held_out(step: int) -> None:  # an evaluation logged as a row of its own
            nonlocal eval_s
            t0 = time.perf_counter()
            scores = self.evaluate(step)
            eval_s += time.perf_counter() - t0
            self.logger.log(step, scores)
            records.append({"step": step, **scores})
            show(step, scores)

        try:
            if self.step == 0 and self.evaluator and cfg.eval.at_start:  # the baseline, as step 0
                held_out(0)
            elif self._eval_after_checkpoint(self.step) and not self._eval_logged(self.step):
                held_out(self.step)  # resumed at the checkpoint of an evaluation that had not finished
            while self.step < cfg.train.steps:
                t0 = time.perf_counter()
                metrics = self.train_step()
                self.checkpointer.poll()
                eta.step(time.perf_counter() - t0)
                eval_s += metrics["time/eval_s"]
                self.logger.log(self.step, metrics)
                records.append({"step": self.step, **metrics})
                show(self.step, metrics)
                bar.update(1)
                bar.set_postfix_str(f"eta {clock(eta.remaining())}, reward {metrics.get('reward/overall', float('nan')):.3f}, "
                                    f"len {metrics['response/length_mean']:.0f}, "
                                    f"kept {metrics['rollout/kept_group_fraction']:.2f}")
                if self.updater.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:  # every rank alike
                    self.checkpointer.wait()  # the last good step's checkpoint, if still being written
                    raise TrainingDiverged(f"{self.updater.nonfinite_in_a_row} updates in a row had a NaN/inf loss or "
                                           f"gradient (train.max_nonfinite_steps={cfg.train.max_nonfinite_steps})")
                stop = int(D.reduce_scalars({"stop": self.stop_requested}, self.info.device, "max")["stop"])
                every, hf_every = cfg.checkpoint.every, cfg.checkpoint.save_hf_every
                hf = self.step == cfg.train.steps or bool(hf_every and self.step % hf_every == 0)
                judged = self._eval_after_checkpoint(self.step)
                if stop or hf or judged or (every and self.step % every == 0):
                    saved = self.save(hf)
                    path = saved if hf else path  # the last checkpoint with a model/ to evaluate
                if stop:
                    self.stop_requested = stop  # every rank: the exit status says it
                    log.warning("stopped at step %d by %s; resume with --resume", self.step, signal.Signals(stop).name)
                    break
                if judged:
                    held_out(self.step)
            self.checkpointer.wait()
            where.enter(FINISHED)  # the other ranks' watchdogs: this one's silence from now on is no death
        finally:
            bar.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
            title = (f"{cfg.model.path}, {cfg.algorithm.loss_type.upper()} on {', '.join(cfg.data.train_files)}: "
                     f"{self.step} steps ({cfg.train.output_dir})")
            plot = self.logger.close(cfg.logging.plot and self.step == cfg.train.steps, title)
        if main:
            stopped = signal.Signals(self.stop_requested).name if self.stop_requested else None
            print(end_summary(read_metrics(self.out / "metrics.jsonl"), cfg, time.perf_counter() - started, eval_s,
                              plot, path, stopped, resumed_at), flush=True)
        return records
