"""A full GRPO/DAPO training step: medix_fast's ``Trainer`` against TRL's ``GRPOTrainer``.

    python -m bench --only train

Both train the embedded tiny Qwen2 (``medix_fast.demo.tiny``, built offline) on the bundled clinical QA
prompts with the same work per step: one rollout of 16 prompts x G=8 (sampling temperature 1,
no top-k/top-p, at most 48 new tokens, stop at the model's eos), rewards from medix_fast's
composite reward (the same function object type and weights for both: exact-match accuracy, MiniLM
semantic, format, modality), group advantages, then two AdamW steps on mini-batches of 8 prompts
with the DAPO loss (epsilon 0.2 / 0.28, beta 0, lr 2e-4 constant). Off for both: dynamic
sampling, dual clip, evaluation, checkpoints, logging to disk beyond what each needs.
  medix_fast: ``Trainer.train_step()`` (in-process KV-cached sampler, batched reward, fused loss).
  medix_fast LoRA r=16: the same with ``model.lora.rank=16`` (alpha 32) on the 7 decoder linears: the
              base frozen, AdamW on the adapters only (docs/lora.md); beside full fine-tuning.
  trl:        ``GRPOTrainer.train()`` (HF ``generate``, full logits); per_device_train_batch_size=64
              and steps_per_generation=2, so one rollout feeds two optimizer steps; a step here
              is the time of those two steps, read from a ``TrainerCallback``.
Completion lengths are sampled, so the two do not generate exactly the same number of tokens.
``--smoke``: 2 prompts x G=2, 8 new tokens, one mini-batch.
"""
from __future__ import annotations

import os
import tempfile
import time

import torch

from .case import SUBJECT, Case, Skip
from .timing import Budget, PeakMemory, Timing, summarize


def _workload(smoke: bool) -> dict:
    if smoke:
        return dict(prompts=2, group=2, new_tokens=8, mini_batch=2)
    return dict(prompts=16, group=8, new_tokens=48, mini_batch=8)


def _medix(device: torch.device, w: dict, lora: int = 0):
    from medix_fast.config import load_config
    from medix_fast.train import Trainer

    out = tempfile.mkdtemp(prefix="medix_bench_train_")
    cfg = load_config(None, [
        f"train.device={device.type}", f"train.output_dir={out}", "train.steps=1000", "eval.every=0",
        f"train.prompts_per_step={w['prompts']}", f"train.mini_batch_prompts={w['mini_batch']}",
        f"sampling.group_size={w['group']}", f"sampling.max_new_tokens={w['new_tokens']}",
        "algorithm.dynamic_sampling=false", "algorithm.clip_ratio_c=null", "algorithm.loss_type=dapo",
        "algorithm.epsilon_low=0.2", "algorithm.epsilon_high=0.28", "algorithm.beta=0.0",
        "optim.lr=2e-4", "optim.warmup_steps=0", "checkpoint.every=0",
        "logging.tensorboard=false", "logging.plot=false", "logging.progress=false",
        f"model.lora.rank={lora}", f"model.lora.alpha={2 * lora}",
    ])
    return Trainer(cfg).train_step


def _trl_measure(device: torch.device, budget: Budget, w: dict) -> tuple[Timing, float]:
    try:
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as exc:
        raise Skip(f"trl not installed ({exc.name})") from exc
    from medix_fast.config import DataConfig
    from medix_fast.data import load_examples
    from medix_fast.data.prompt import build_messages
    from medix_fast.rewards import RewardConfig, build_reward
    from medix_fast.demo.cache import ensure_tiny_model

    path = str(ensure_tiny_model())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    examples = load_examples(["sample:train"], DataConfig())
    texts = [tokenizer.apply_chat_template(build_messages(e.problem), tokenize=False, add_generation_prompt=True)
             for e in examples]
    dataset = Dataset.from_dict({"prompt": texts, "solution": [e.solution for e in examples]})
    reward_fn = build_reward(RewardConfig(), device, torch.float32)

    def medix_reward(prompts, completions, solution, completion_ids=None, **_):
        lengths = [len(c) for c in completion_ids] if completion_ids is not None else None
        return reward_fn(completions, solution, response_lengths=lengths)["overall"].tolist()

    cycles = budget.warmup + budget.min_reps + 1  # the last one measures memory
    per_update = w["mini_batch"] * w["group"]
    steps_per_rollout = w["prompts"] // w["mini_batch"]
    marks: list[float] = []
    memory = PeakMemory(device)
    peak: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step % steps_per_rollout == 0:
                if state.global_step == (cycles - 1) * steps_per_rollout:
                    memory.start()
                marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % steps_per_rollout == 0:  # global_step already counts this step
                marks.append(time.perf_counter())
                if state.global_step == cycles * steps_per_rollout:
                    peak.append(memory.stop())

    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_bench_train_"), use_cpu=device.type == "cpu",
        bf16=device.type == "cuda", per_device_train_batch_size=per_update, gradient_accumulation_steps=1,
        steps_per_generation=steps_per_rollout, num_generations=w["group"], max_completion_length=w["new_tokens"],
        temperature=1.0, top_p=1.0, top_k=0, learning_rate=2e-4, lr_scheduler_type="constant", beta=0.0,
        loss_type="dapo", epsilon=0.2, epsilon_high=0.28, max_steps=cycles * steps_per_rollout,
        save_strategy="no", report_to=[], logging_steps=10**6, disable_tqdm=True, seed=0,
        dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=medix_reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[StepClock()])
    trainer.train()
    times = [(end - begin) * 1e3 for begin, end in zip(marks[0::2], marks[1::2])]
    return summarize(times[budget.warmup:cycles - 1]), peak[0]


def cases(smoke: bool, device: torch.device) -> list[Case]:
    w = _workload(smoke)
    rows = w["prompts"] * w["group"]
    shape = f"tiny Qwen2, {w['prompts']} prompts x G={w['group']}, <= {w['new_tokens']} new tokens"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return [
        Case("train", "rollout + 2 updates" if not smoke else "rollout + 1 update", SUBJECT, shape, rows,
             lambda dev: _medix(dev, w), work=rows, work_unit="completions/s"),
        Case("train", "rollout + 2 updates" if not smoke else "rollout + 1 update", f"{SUBJECT} LoRA r=16", shape,
             rows, lambda dev: _medix(dev, w, lora=16), work=rows, work_unit="completions/s"),
        Case("train", "rollout + 2 updates" if not smoke else "rollout + 1 update", "trl", shape, rows, None,
             work=rows, work_unit="completions/s", measure=lambda dev, budget: _trl_measure(dev, budget, w)),
    ]
