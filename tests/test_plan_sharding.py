"""The memory plan's model of the sharded rollout, the offloaded optimizer and the time on paper:
the tensor-parallel copy's weights and K/V per GPU against a shard cut from the meta-device model
of each tiny model, where the training state lives for each ``optim.offload`` / ``state_dtype``,
the host memory per node, and the 30B's time per step by hand.

    pytest tests/test_plan_sharding.py -q
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medix_fast.config import load_config
from medix_fast.demo.cache import resolve_model_path
from medix_fast.distributed import decoder_layers
from medix_fast.generate import memory
from medix_fast.generate.__main__ import main
from medix_fast.generate.step_time import ALLREDUCE_LATENCY, step_time
from medix_fast.model.footprint import (experts_read, host_memory, meta_model, parameter_counts,
                                        state_bytes, update_plan)
from medix_fast.optim.adamw import device_bytes, host_bytes, staging_bytes

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def shard_numel(model, k: int, kv_heads: int, head_dim: int) -> int:
    """Elements one of ``k`` ranks holds, cut from the meta-device model module by module as the
    spec says: q heads / k, max(1, kv_heads / k) K/V heads, o's input / k, the MLP's and each
    expert's intermediate / k; everything else whole."""
    kv_rows = max(1, kv_heads // k) * head_dim
    held = sum(p.numel() for p in model.parameters())
    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        cut = {attn.q_proj.weight: attn.q_proj.weight[: attn.q_proj.weight.shape[0] // k],
               attn.o_proj.weight: attn.o_proj.weight[:, : attn.o_proj.weight.shape[1] // k]}
        for proj in (attn.k_proj, attn.v_proj):
            cut[proj.weight] = proj.weight[:kv_rows]
            if proj.bias is not None:
                cut[proj.bias] = proj.bias[:kv_rows]
        if attn.q_proj.bias is not None:
            cut[attn.q_proj.bias] = attn.q_proj.bias[: attn.q_proj.bias.shape[0] // k]
        if hasattr(mlp, "experts"):  # (E, 2I, H) and (E, H, I)
            e = mlp.experts
            cut[e.gate_up_proj] = e.gate_up_proj[:, : e.gate_up_proj.shape[1] // k]
            cut[e.down_proj] = e.down_proj[:, :, : e.down_proj.shape[2] // k]
        else:
            cut[mlp.gate_proj.weight] = mlp.gate_proj.weight[: mlp.gate_proj.weight.shape[0] // k]
            cut[mlp.up_proj.weight] = mlp.up_proj.weight[: mlp.up_proj.weight.shape[0] // k]
            cut[mlp.down_proj.weight] = mlp.down_proj.weight[:, : mlp.down_proj.weight.shape[1] // k]
        held -= sum(full.numel() - part.numel() for full, part in cut.items())
    return held


@pytest.mark.parametrize("name", ["tiny", "tiny-vl", "tiny-moe", "tiny-vl-moe"])
def test_tensor_parallel_weights_and_kv_against_a_meta_shard(name):
    """Each tiny model (4 query / 2 K/V heads: k = 4 replicates the K/V heads) at k = 1, 2, 4:
    ``ParameterCounts.per_rank`` equals the shard cut from its meta-device modules, and the K/V
    per token per GPU is 2 layers' worth of the heads a rank keeps."""
    config = memory.load_config(str(resolve_model_path(name)))
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    counts = parameter_counts(config)
    model = meta_model(config)
    assert model.parameters().__next__().device == torch.device("meta")
    for k in memory.tensor_parallel_sizes(config, 8):
        assert counts.per_rank(k, text.num_key_value_heads) == shard_numel(model, k, text.num_key_value_heads,
                                                                           head_dim), k
        heads = max(1, text.num_key_value_heads // k)
        assert memory.kv_bytes_per_token(text, tensor_parallel=k) == text.num_hidden_layers * 2 * heads * head_dim * 2
    assert counts.per_rank(1, text.num_key_value_heads) == counts.total
    assert counts.largest == max(p.numel() for p in model.parameters())


def test_a_decode_step_reads_the_experts_its_rows_are_routed_to():
    moe = memory.load_config(str(resolve_model_path("tiny-moe")))  # 2 of 4 experts per token
    assert experts_read(moe, 1) == 0.5 and experts_read(moe, 3) == 1 - 0.5**3
    assert experts_read(memory.load_config(str(resolve_model_path("tiny"))), 1) == 1.0
    counts = parameter_counts(moe)
    assert counts.per_rank(1, 2, counts.decode, 0.5) == counts.decode - counts.experts // 2
    assert counts.per_rank(2, 2, counts.decode, 1.0) == counts.decode - (counts.tp_split - counts.tp_split // 2) - (
        counts.tp_kv - counts.tp_kv // 2)


@pytest.mark.parametrize("offload", ["none", "optimizer", "params"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_where_the_training_state_lives(offload, dtype):
    """Bytes per parameter on the device and the host for each optim.offload / state_dtype (the
    optimizer's own table, optim.adamw), and the 8B's update and rollout planning exactly those
    (plus the chunk buffers of the optimizer's step)."""
    b = state_bytes(offload, dtype)
    states = 8 if dtype == "float32" else 4
    assert {**b.device, **b.host} == {"master": 4, "grads": 4, "states": states}
    assert set(b.host) == {"none": set(), "optimizer": {"states"}, "params": {"master", "grads", "states"}}[offload]
    assert b.device.get("master", 0) + b.device.get("states", 0) == device_bytes(offload, dtype)
    assert b.host.get("master", 0) + b.host.get("states", 0) == host_bytes(offload, dtype)
    path = CONFIGS / "medix_r1_8b_dapo.yaml"
    model_config = memory.load_config("Qwen3-VL-8B-Instruct")
    counts = parameter_counts(model_config)
    p = counts.total
    base = update_plan(load_config(path), model_config, int(80e9), 8, {}, counts)
    plan = update_plan(load_config(path, [f"optim.offload={offload}", f"optim.state_dtype={dtype}"]), model_config,
                       int(80e9), 8, {}, counts)
    on_device = sum(b.device.get(key, 0) for key in ("master", "states")) * p // 8
    assert base.update_bytes - plan.update_bytes == 12 * p // 8 - on_device + 4 * p // 8 * ("grads" in b.host) - (
        staging_bytes(offload, dtype))
    assert base.logprobs_bytes - plan.logprobs_bytes == 12 * p // 8 - on_device
    rollout = memory.rollout_plan(load_config(path, [f"optim.offload={offload}", f"optim.state_dtype={dtype}"]),
                                  model_config, int(80e9), 8, counts, {})
    assert sum(v for name, v in rollout.resident.items() if "AdamW" in name or "master" in name) == on_device


def test_host_memory_per_node(capsys):
    """The 30B as shipped (AdamW's fp32 states pinned on the host, the checkpoint's staging copy of
    masters and states kept): 8 + 12 bytes per parameter per node of 8; per node of 16 GPUs over 2
    nodes the same per rank; params offload in bf16 states 12 + 8; the node's size is a flag."""
    path = CONFIGS / "medix_r1_30b_a3b_dapo.yaml"
    model_config = memory.load_config("Qwen3-VL-30B-A3B-Thinking")
    counts = parameter_counts(model_config)
    p = counts.total
    host = host_memory(load_config(path), counts, 8, 8)
    assert host == {"pinned AdamW fp32 states": 8 * p // 8 * 8,
                    "checkpoint staging copy (keep_staging)": 12 * p // 8 * 8}
    assert sum(host_memory(load_config(path), counts, 16, 8).values()) == 8 * (8 * p // 16) + 8 * (12 * p // 16)
    bf16 = host_memory(load_config(path, ["optim.state_dtype=bfloat16"]), counts, 8, 8)
    assert bf16 == {"pinned AdamW bf16 states": 4 * p, "checkpoint staging copy (keep_staging)": 8 * p}
    params = host_memory(load_config(path, ["optim.offload=params", "optim.state_dtype=bfloat16",
                                            "checkpoint.keep_staging=false", "rewards.offload=true"]),
                         counts, 8, 8, {"judge": 1000})
    assert params == {"pinned fp32 master shards": 4 * p, "pinned fp32 gradient shards": 4 * p,
                      "pinned AdamW bf16 states": 4 * p, "judge bf16 (rewards.offload)": 2 * 1000 * 8}
    assert main(["--plan", "--config", str(path), "--device-memory-gb", "80", "--host-memory-gb", "600"]) == 1
    out = capsys.readouterr().out
    assert "total 621.4 GB of the 600 GB assumed (--host-memory-gb): does NOT fit" in out


def test_the_30b_step_on_paper_by_hand(capsys):
    """The shipped 30B on 8 x H100: the decode step reads the GPU's quarter of the language model
    (the experts its rows are routed to) and the rows' K/V at 3.35 TB/s, then 96 all-reduces of
    rows x 2,048 bf16 (ring 2 x 3/4 sent) at 450 GB/s with their latency; the optimizer offload
    moves AdamW's fp32 states in and out for each of 4 optimizer steps at 25 GB/s; the update runs
    4 forwards' FLOPs at the MFU asked for."""
    path = CONFIGS / "medix_r1_30b_a3b_dapo.yaml"
    cfg = load_config(path)
    model_config = memory.load_config("Qwen3-VL-30B-A3B-Thinking")
    counts = parameter_counts(model_config)
    rollout = memory.rollout_plan(cfg, model_config, int(80e9), 8, counts, {})
    t = step_time(cfg, model_config, counts, rollout, 8, "H100", 0.3)
    phases = {name: seconds for name, seconds, _ in t.phases}
    b = rollout.rows_fit
    assert 1 <= b < 1280
    weights = 2 * counts.per_rank(4, 4, counts.decode, 1 - (1 - 8 / 128) ** b)
    kv = 2 * 48 * 1 * 128 * 2 * (-(-b // 5) * 4352 + b * 2048)
    step = (weights + kv) / 3.35e12 + b * 2 * 48 * 2048 * 2 * 2 * 3 / 4 / 450e9 + 96 * ALLREDUCE_LATENCY
    assert phases["decode"] == pytest.approx(1280 * 4096 * step / b)
    assert t.decode_tokens_per_s[0] == pytest.approx(2 * b / step)
    assert phases["offload over PCIe"] == pytest.approx(2 * 8 * counts.total / 8 * 4 / 25e9)
    faster = step_time(cfg, model_config, counts, rollout, 8, "H100", 0.6)
    assert faster.phases[4][1] == pytest.approx(phases["update"] / 2) and faster.phases[4][0] == "update"
    assert t.seconds == pytest.approx(sum(phases.values()))
    assert main(["--plan", "--config", str(path), "--device-memory-gb", "80"]) == 0
    out = capsys.readouterr().out
    assert "time per step on paper (8 x H100" in out and "reference (MediX-R1): tensor parallel 8" in out
