"""TRL's ``GRPOTrainer`` training step with and without medix_fast's adapter, same model and batch.

    python -m bench --only integrations

Both trainers wrap the same randomly initialised tiny Qwen2 (the embedded tiny model's shape:
hidden 128, 4 layers, 4/2 heads, tied embeddings) at Qwen's 151,936-token vocabulary, with TRL's
defaults (dapo loss, beta 0, on-policy, gradient checkpointing, bf16 on GPU) and one fixed batch:
16 completions of up to 256 tokens (lengths drawn once, about 60 % of the positions valid) after
64-token prompts. One call is TRL's own ``training_step`` (the loss, its backward) then an AdamW
step; generation is left out (the batch is handed over ready), since the adapter changes only
the loss. ``trl``: ``trl.GRPOTrainer`` (its chunked fused log-prob head, then its loss);
``medix_fast``: ``medix_fast.integrations.trl.GRPOTrainer`` (``fused_linear_policy_loss``).
``--smoke``: 4 completions of up to 8 tokens at a 4,096-token vocabulary.
"""
from __future__ import annotations

import tempfile

import torch

from .case import SUBJECT, Case, Skip

VOCAB = 151_936


def _workload(smoke: bool) -> dict:
    if smoke:
        return dict(vocab=4096, completions=4, prompt=8, completion=8)
    return dict(vocab=VOCAB, completions=16, prompt=64, completion=256)


def _batch(w: dict) -> dict:
    """The batch TRL's ``_prepare_inputs`` would hand to ``compute_loss`` (on-policy: no old log-probs)."""
    g = torch.Generator().manual_seed(0)
    n, k = w["completions"], w["completion"]
    lengths = torch.randint(k // 5, k + 1, (n,), generator=g)  # (n,)
    completion_mask = (torch.arange(k)[None, :] < lengths[:, None]).long()  # (n, K)
    return {
        "prompt_ids": torch.randint(0, w["vocab"], (n, w["prompt"]), generator=g),
        "prompt_mask": torch.ones(n, w["prompt"], dtype=torch.long),
        "completion_ids": torch.randint(0, w["vocab"], (n, k), generator=g),
        "completion_mask": completion_mask,
        "advantages": torch.randn(n, generator=g),
        "num_items_in_batch": completion_mask.sum(),
    }


def _training_step(device: torch.device, w: dict, fused: bool):
    try:
        import trl
        from datasets import Dataset
    except ImportError as exc:
        raise Skip(f"trl not installed ({exc.name})") from exc
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from medix_fast.demo import tiny

    trainer_cls = trl.GRPOTrainer
    if fused:
        from medix_fast.integrations.trl import GRPOTrainer as trainer_cls
    tokenizer = tiny.build_tokenizer(tiny.read_train_rows(), 512)
    cfg = tiny.TinyConfig()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=w["vocab"], hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    args = trl.GRPOConfig(output_dir=tempfile.mkdtemp(prefix="bench_integrations_"), use_cpu=device.type == "cpu",
                          bf16=device.type == "cuda", per_device_train_batch_size=w["completions"],
                          num_generations=2, max_completion_length=w["completion"], report_to=[],
                          disable_tqdm=True, save_strategy="no", seed=0)
    trainer = trainer_cls(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["x"] * w["completions"]}),
                          processing_class=tokenizer)
    trainer._prepare_inputs = lambda inputs: inputs  # the batch is ready: no generation in the timed step
    trainer.current_gradient_accumulation_steps = 1
    optimizer = trainer.create_optimizer()
    inputs = {k: v.to(device) for k, v in _batch(w).items()}
    model = trainer.model.to(device)

    def step():
        loss = trainer.training_step(model, inputs, inputs["num_items_in_batch"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def cases(smoke: bool, device: torch.device) -> list[Case]:
    w = _workload(smoke)
    shape = (f"tiny Qwen2 (H=128, 4 layers), V={w['vocab']:,}, {w['completions']} completions "
             f"x <= {w['completion']} tokens after {w['prompt']}")
    tokens = w["completions"] * w["completion"]
    return [
        Case("integrations", "TRL GRPOTrainer step (loss, backward, AdamW)", impl, shape, tokens,
             lambda dev, fused=fused: _training_step(dev, w, fused))
        for impl, fused in ((SUBJECT, True), ("trl", False))
    ]
