"""The memory plan of LoRA configs (``python -m medix_fast.generate --plan``, docs/lora.md "Memory
plan"): the 8B with rank-64 adapters on one 80 GB GPU, the 30B-A3B with expert adapters on 8 x 80 GB
under FSDP2 (its frozen base sharded and gathered in bf16, the experts' adapters and their folded
banks counted), and the longest completion that fits per GPU size. Shapes only: no weights load."""
from __future__ import annotations

from pathlib import Path

import pytest

from medix_fast.config import load_config
from medix_fast.generate import memory
from medix_fast.generate.__main__ import main as plan_main
from medix_fast.generate.longest import STEP, longest_completion
from medix_fast.model.footprint import lora_counts, parameter_counts, update_at, update_plan

CONFIGS = Path(__file__).parent.parent / "configs"
GB = 10**9
LORA_8B = ["model.lora.rank=64", "model.lora.alpha=128", "distributed.strategy=ddp", "sampling.tensor_parallel=1"]
LORA_30B = ["model.lora.rank=16", "model.lora.alpha=32", "model.lora.experts=true", "optim.offload=none",
            "train.micro_batch_tokens=43008"]


@pytest.fixture(scope="module")
def qwen3_vl_8b():
    model_config = memory.load_config("Qwen3-VL-8B-Instruct")
    return model_config, parameter_counts(model_config)


@pytest.fixture(scope="module")
def qwen3_vl_30b():
    model_config = memory.load_config("Qwen3-VL-30B-A3B-Thinking")
    return model_config, parameter_counts(model_config)


def test_the_plan_of_the_8b_with_lora_on_one_80_gb_gpu(qwen3_vl_8b, capsys):
    """Qwen3-VL-8B with rank-64 adapters on every decoder linear, one GPU: the base frozen in bf16
    (2 bytes/param: the sampler's weights and the KL reference, no copy), the fp32 state of the
    adapters only, and their own activations (each adapted input saved for lora_A, A x for lora_B,
    the fp32 cast of the input); it fits on 80 GB where full fine-tuning (16 bytes/param) does not."""
    path = CONFIGS / "medix_r1_8b_dapo.yaml"
    cfg = load_config(path, LORA_8B)
    model_config, counts = qwen3_vl_8b
    lora = lora_counts(cfg.model.lora, model_config)
    n = lora.total
    assert n == 36 * 64 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 12288))  # q o, k v, gate up down
    rewards = memory.reward_model_params(cfg)
    plan = memory.rollout_plan(cfg, model_config, 80 * GB, 1, counts, rewards, lora=lora)
    adapters = {k: v for k, v in plan.resident.items() if k.startswith("adapters'")}
    assert plan.resident["frozen base bf16 (sampled as is)"] == 2 * counts.total and sum(adapters.values()) == 16 * n
    assert not any("reference" in k or "copy" in k for k in plan.resident) and plan.fits
    update = update_plan(cfg, model_config, 80 * GB, 1, rewards, counts, lora)
    assert update.fits and sum(v for k, v in update.resident.items() if k.startswith("adapters'")) == 12 * n
    tokens = cfg.train.micro_batch_tokens  # one layer recomputed: 6 adapted inputs of 4096 and down's 12288, + r each
    own = update.update["adapters' activations (inputs and A x saved; the fp32 input cast)"]
    assert own == 2 * tokens * (6 * (4096 + 64) + 12288 + 64) + 4 * tokens * 12288
    assert update.update["checkpointed layer inputs"] == 2 * tokens * 4096 * 36  # the frozen tower saves nothing
    full = update_plan(load_config(path, ["sampling.tensor_parallel=1"]), model_config, 80 * GB, 1, rewards, counts)
    assert not full.fits
    assert plan_main(["--plan", "--config", str(path), "--device-memory-gb", "80", "--world", "1", *LORA_8B]) == 0
    assert "update: adapters' activations" in capsys.readouterr().out


def test_the_30b_with_expert_lora_fits_8_x_80_gb_under_fsdp2(qwen3_vl_30b):
    """Qwen3-VL-30B-A3B, the shipped config with rank-16 adapters on the attention linears and every
    expert (FSDP2, tensor-parallel sampling on 4 GPUs): the experts' A (E, r, in) and B (E, out, r)
    per bank and layer counted, their weights and AdamW states sharded like the frozen bf16 base
    (no fp32 master, gradient nor AdamW state for it), the folded expert banks in the update's and
    the old log-probs' peaks, the tensor-parallel copy base-shaped; full fine-tuning's figures unchanged."""
    path = CONFIGS / "medix_r1_30b_a3b_dapo.yaml"
    cfg = load_config(path, LORA_30B)
    model_config, counts = qwen3_vl_30b
    lora = lora_counts(cfg.model.lora, model_config)
    experts = 128 * 16 * ((2048 + 2 * 768) + (768 + 2048))  # gate_up (E, 2I, H) and down (E, H, I)
    attention = 16 * (2 * (2048 + 4096) + 2 * (2048 + 512))  # q o, k v
    assert lora.total == 48 * (experts + attention) and lora.banks == (128 * 1536 * 2048, 128 * 2048 * 768)
    rewards = memory.reward_model_params(cfg)
    update = update_plan(cfg, model_config, 80 * GB, 8, rewards, counts, lora)
    assert update.resident["frozen base bf16 shards (the KL reference with adapters off)"] == 2 * counts.total // 8
    assert {k: v for k, v in update.resident.items() if k.startswith("adapters'")} == {
        "adapters' fp32 master shards": 4 * lora.total // 8, "adapters' AdamW fp32 states": 8 * lora.total // 8}
    gate_up, down = lora.banks
    assert update.update["expert delta bmm(B, A): folded banks bf16 (saved) + fp32 product + the bank's gradient"] \
        == 2 * (gate_up + down) + 10 * gate_up
    assert update.logprobs["expert delta bmm(B, A): folded banks bf16 + fp32 product"] == 2 * (gate_up + down) + (
        8 * gate_up)
    unit = max(counts.units) + experts + attention  # a decoder layer with its adapters, gathered in bf16
    assert update.update["two layers gathered bf16, one's adapters' grads + fp32 reduce"] == 4 * unit + 6 * (
        experts + attention)  # two layers' weights; one's adapters' bf16 gradients and fp32 reduce-scatter input
    assert update.fits and update.tokens >= update.group_tokens  # a group at the longest lengths fits one micro-batch
    rollout = memory.rollout_plan(cfg, model_config, 80 * GB, 8, counts, rewards, lora=lora)
    copy = "frozen base bf16, tensor-parallel copy (1/4 of the layers, adapters merged)"
    assert rollout.resident[copy] == 2 * counts.per_rank(4, 4) and rollout.build == 10 * gate_up
    assert rollout.fits and not rollout.expert_delta  # the copy holds the merged banks: no fold per decode step
    unsharded = memory.rollout_plan(load_config(path, [*LORA_30B, "sampling.tensor_parallel=1"]), model_config,
                                    80 * GB, 8, counts, rewards, lora=lora)
    assert unsharded.expert_delta == 2 * (gate_up + down) + 8 * gate_up and not unsharded.fits
    full = load_config(path)  # full fine-tuning, as the shipped config: the figures of before
    rollout, update = memory.rollout_plan(full, model_config, 80 * GB, 8, counts, rewards), update_plan(
        full, model_config, 80 * GB, 8, rewards, counts)
    assert (rollout.peak_bytes, update.logprobs_bytes, update.update_bytes) == (71191958038, 35800208760, 70605455088)
    assert "but one group" in update.table()  # 5 x (4,352 + 4,096) tokens, over its 16,384-token micro-batch


def test_the_longest_completion_of_the_8b_with_lora_grows_with_memory(qwen3_vl_8b, capsys):
    """The 8B with rank-64 adapters on one GPU (the judge and encoder offloaded): no completion on 24 GB
    (the frozen base alone is 17.5 GB; refused in one line), then longer on 48 than on 80 GB; each the
    last STEP that fits, with a micro-batch of at least one whole group. A GPU whose update cannot hold
    one group is refused in one line naming it."""
    path = CONFIGS / "medix_r1_8b_dapo.yaml"
    cfg = load_config(path, [*LORA_8B, "rewards.offload=true"])
    model_config, counts = qwen3_vl_8b
    lora = lora_counts(cfg.model.lora, model_config)
    rows = {gb: longest_completion(cfg, model_config, gb * GB, 1, counts, {}, lora) for gb in (24, 48, 80)}
    assert 0 == rows[24].max_new_tokens < rows[48].max_new_tokens < rows[80].max_new_tokens
    assert "rollout does NOT fit" in rows[24].line() and "frozen base bf16" in rows[24].why_not
    for gb in (48, 80):
        row, g, prompt = rows[gb], cfg.sampling.group_size, cfg.data.max_prompt_length
        group = lambda n: g * (prompt + n)  # noqa: E731
        assert row.micro_batch_tokens >= row.group_tokens == group(row.max_new_tokens)
        assert update_at(cfg, model_config, gb * GB, 1, {}, counts, group(row.max_new_tokens), lora).fits
        assert not update_at(cfg, model_config, gb * GB, 1, {}, counts, group(row.max_new_tokens + STEP), lora).fits
    tight = load_config(path, ["model.lora.rank=64", "model.lora.alpha=128", "sampling.tensor_parallel=8",
                               "rewards.offload=true"])  # FSDP2 on 8 x 24 GB: the rollout fits, one group does not
    row = longest_completion(tight, model_config, 24 * GB, 8, counts, {}, lora)
    assert not row.max_new_tokens and "one group of 5 x (4,352 + 64) = 22,080 tokens" in row.why_not
    assert plan_main(["--plan", "--config", str(path), "--world", "1", *LORA_8B, "rewards.offload=true",
                      "--longest-completion", "24", "48"]) == 1  # 24 GB: none
    out = capsys.readouterr().out
    assert "24 GB x 1: no completion fits" in out and f"sampling.max_new_tokens={rows[48].max_new_tokens} " in out


def test_the_folded_expert_banks_are_what_the_backward_keeps():
    """The plan's expert delta keeps each MoE layer's folded banks for the backward (2 bytes per
    element of ``LoraCounts.banks``): on tiny-MoE with expert adapters, the two largest tensors
    autograd saves in one sparse block's forward are the folded banks (the grouped GEMM's weights)."""
    import torch

    from medix_fast.config import LoraConfig
    from medix_fast.demo.cache import resolve_model_path
    from medix_fast.model.loading import load_model
    from medix_fast.model.lora import add_adapters
    from medix_fast.model.moe import sparse_blocks

    model, _ = load_model(resolve_model_path("tiny-moe"))
    lora = LoraConfig(rank=4, alpha=8, experts=True, target_modules=["q_proj"])
    banks = lora_counts(lora, model.config).banks
    add_adapters(model, lora)
    saved = []
    x = torch.randn(1, 5, model.config.hidden_size, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        sparse_blocks(model)[0](x)
    assert sorted(saved)[-2:] == sorted(banks)  # the two largest tensors kept
