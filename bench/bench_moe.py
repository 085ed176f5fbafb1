"""Mixture of experts: rollout tokens/s and one training step of a tiny Qwen3-MoE against the dense
Qwen3 of the same active size, and the experts implementations against each other.

    python -m bench --only moe

Models are random (no download), text-only, built from ``medix_fast.demo.tiny_moe``'s fields: the
MoE runs ``experts_per_token`` of its experts per token, the dense model one MLP as wide as those
experts together (so both do the same matrix work per token; the MoE holds experts/k times the MLP
weights). Rows of one comparison:
- ``medix_fast``: the MoE with the experts implementation ``model/moe.py`` picks here (grouped_mm);
- ``eager experts`` / ``batched_mm experts``: the same MoE with transformers' other implementations;
- ``dense (same active)``: the dense model.
Cases:
- ``rollout``: ``Sampler.generate``, P prompts x G samples, stopping disabled so every row makes
  exactly ``new`` tokens; throughput is generated tokens per second;
- ``train step``: one ``Updater.update`` (DAPO, fused LM-head loss, backward, AdamW step) on
  P prompts x G random completions; throughput is trained completion tokens per second.
  CPU: hidden 128, 4 layers, 8 experts (intermediate 128), 2 active; dense intermediate 256;
       vocab 2,048, fp32; 8 prompts x G=8 x 64 new (rollout), 8 x 8 x <= 64 (train).
  GPU: Qwen3-30B-A3B's layer (hidden 2048, 32 / 4 heads of 128, 128 experts of 768, 8 active;
       dense 6,144) at 4 layers, vocab 151,936, bf16; 8 prompts x G=8 x 128 new / <= 512 trained.
``--smoke``: the embedded tiny MoE's shape (4 experts, 2 active, 2 layers), 2 x 2 x 8.
"""
from __future__ import annotations

import torch

from .case import SUBJECT, Case

SHAPES = {  # TinyMoeConfig fields, vocab, (prompts, G, new tokens, prompt tokens)
    "smoke": (dict(), 256, (2, 2, 8, 12)),
    "cpu": (dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, num_experts=8,
                 experts_per_token=2, expert_intermediate=128, init_std=0.02), 2048, (8, 8, 64, 64)),
    "gpu": (dict(hidden_size=2048, num_layers=4, num_heads=32, num_kv_heads=4, head_dim=128, num_experts=128,
                 experts_per_token=8, expert_intermediate=768, max_position_embeddings=4096, init_std=0.02),
            151_936, (8, 8, 128, 128)),
}
IMPLS = {SUBJECT: "auto", "eager experts": "eager", "batched_mm experts": "batched_mm", "dense (same active)": None}


def random_model(fields: dict, vocab: int, experts: str | None, device: torch.device, dtype: torch.dtype):
    """The random MoE (``experts``: its implementation, "auto" as loading picks it) or, for None,
    the dense model of the same active size; never stops (equal work for every row)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    from medix_fast.demo.tiny_moe import TinyMoeConfig, dense_config, text_fields
    from medix_fast.model.moe import experts_implementation

    cfg = TinyMoeConfig(**fields)
    common = dict(eos_token_id=None, pad_token_id=0)  # bos: None in text_fields
    if experts is None:
        config = Qwen3Config(**dense_config(cfg, vocab), **common)
    else:
        config = Qwen3MoeConfig(**text_fields(cfg, vocab), norm_topk_prob=True, **common)
        config._experts_implementation = experts_implementation(config, device, dtype, experts)
    torch.manual_seed(0)
    with torch.device(device):
        model = (Qwen3ForCausalLM if experts is None else Qwen3MoeForCausalLM)(config).to(dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def prompts_and_completions(layout: tuple, vocab: int) -> tuple[list[list[int]], list[list[int]]]:
    """P prompts of about ``prompt tokens`` and G completions of 1 .. ``new`` tokens for each."""
    prompts_n, g, new, length = layout
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, vocab, (length + 4 * i,), generator=gen).tolist() for i in range(prompts_n)]
    completions = [torch.randint(1, vocab, (int(torch.randint(1, new + 1, (1,), generator=gen)),), generator=gen).tolist()
                   for _ in range(prompts_n * g)]
    return prompts, completions


def rollout(model, layout: tuple, vocab: int):
    from medix_fast.generate import Sampler

    prompts, _ = prompts_and_completions(layout, vocab)
    _, g, new, _ = layout
    sampler = Sampler(model)
    return lambda: sampler.generate(prompts, n=g, max_new_tokens=new, temperature=1.0, stop_token_ids=[], seed=0)


def train_step(model, layout: tuple, vocab: int):
    from medix_fast.config import AlgorithmConfig, SamplingConfig, TrainConfig
    from medix_fast.distributed import DistInfo
    from medix_fast.rl.batch import Sequences
    from medix_fast.rl.update import PolicyObjective, Updater

    prompts, completions = prompts_and_completions(layout, vocab)
    prompts_n, g, new, _ = layout
    gen = torch.Generator().manual_seed(1)
    seqs = Sequences([p for p in prompts for _ in range(g)], completions,
                     [torch.full((len(c),), -3.0) for c in completions], torch.randn(len(completions), generator=gen), g)
    model.train()
    objective = PolicyObjective(model, temperature=1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    updater = Updater(objective, objective, optimizer, AlgorithmConfig(loss_type="dapo", old_logprobs="sampler"),
                      TrainConfig(prompts_per_step=prompts_n, mini_batch_prompts=prompts_n),
                      SamplingConfig(group_size=g, max_new_tokens=new), DistInfo(device=next(model.parameters()).device),
                      pad_id=0)
    return lambda: updater.update(seqs)


def cases(smoke: bool, device: torch.device) -> list[Case]:
    gpu = device.type == "cuda"
    fields, vocab, layout = SHAPES["smoke" if smoke else ("gpu" if gpu else "cpu")]
    dtype = torch.bfloat16 if gpu else torch.float32
    prompts_n, g, new, _ = layout
    train_layout = (prompts_n, g, 512 if gpu else new, layout[3]) if not smoke else layout
    _, completions = prompts_and_completions(train_layout, vocab)
    trained = sum(map(len, completions))
    from medix_fast.demo.tiny_moe import TinyMoeConfig

    m = TinyMoeConfig(**fields)
    shape = (f"h{m.hidden_size}x{m.num_layers} {m.num_experts} experts x{m.expert_intermediate}, "
             f"{m.experts_per_token} active, {'bf16' if gpu else 'fp32'}")
    out = []
    for impl, experts in IMPLS.items():
        if experts == "batched_mm" and not smoke:  # (tokens x k, 2I, H) gathered weights: rollout only
            kinds = ("rollout",)
        else:
            kinds = ("rollout", "train step")
        for kind in kinds:
            run, lay = (rollout, layout) if kind == "rollout" else (train_step, train_layout)

            def build(dev, experts=experts, run=run, lay=lay):
                return run(random_model(fields, vocab, experts, dev, dtype), lay, vocab)
            work = prompts_n * g * new if kind == "rollout" else trained
            what = f"{prompts_n} prompts x G={g} x {new} new" if kind == "rollout" else f"{prompts_n} x {g}, {trained} tokens"
            out.append(Case("moe", kind, impl, f"{shape}, {what}", work, build, work=work,
                            work_unit="tok/s"))
    return out
