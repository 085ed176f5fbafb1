"""The memory plan (``python -m medix_fast.generate --plan``): every shipped MediX-R1 config fits
every phase within 90 % of an 80 GB and a 141 GB GPU on 8 GPUs, the known model shapes against
their published parameter counts, the arithmetic of one plan by hand, the verdicts' remedies, and
the CLI's exit codes. The tensor-parallel, offload and time arithmetic: test_plan_sharding.py.

    pytest tests/test_plan.py -q
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from medix_fast.config import load_config
from medix_fast.generate import memory
from medix_fast.generate.__main__ import main
from medix_fast.model.footprint import TARGET, host_memory, parameter_counts, update_plan

CONFIGS = sorted(Path(__file__).resolve().parent.parent.glob("configs/medix_r1_*.yaml"))
PUBLISHED = {"Qwen3-VL-2B-Instruct": 2.13e9, "Qwen3-VL-8B-Instruct": 8.77e9, "Qwen2.5-VL-7B-Instruct": 8.29e9,
             "Qwen3-VL-30B-A3B-Instruct": 31.1e9, "Qwen3-VL-30B-A3B-Thinking": 31.1e9, "Qwen3-4B-Instruct-2507": 4.02e9, "MedEmbed-large-v0.1": 335e6,
             "all-MiniLM-L6-v2": 22.7e6}  # the model cards' parameter counts


@pytest.mark.parametrize("name", sorted(memory.KNOWN_MODELS))
def test_known_shapes_count_the_published_parameters(name):
    assert memory.count_parameters(memory.load_config(name)) == pytest.approx(PUBLISHED[name], rel=0.005)


@pytest.mark.parametrize("device_gb", [80, 141])
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_fits_every_phase(path, device_gb, capsys):
    """Each shipped config as it ships, on one node of 8 GPUs of 80 and of 141 GB: the rollout (its
    tensor-parallel copy or unsharded weights, the K/V pool, at least one row at the longest
    lengths), the old log-probs and the update each within 90 % of the GPU (footprint.TARGET), and
    the host memory within a 2 TB node."""
    cfg = load_config(path)
    model_config = memory.load_config(cfg.model.path)
    counts = parameter_counts(model_config)
    rewards = memory.reward_model_params(cfg)
    device = int(device_gb * 1e9)
    plan = memory.rollout_plan(cfg, model_config, device, 8, counts, rewards)
    update = update_plan(cfg, model_config, device, 8, rewards, counts)
    assert cfg.distributed.strategy == "fsdp"
    for phase in (plan.peak_bytes, update.logprobs_bytes, update.update_bytes):
        assert phase <= TARGET * device, plan.table() + "\n" + update.table()
    assert plan.rows_fit >= 1 and plan.fits and update.fits
    text = model_config.get_text_config()
    k = cfg.sampling.tensor_parallel
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    assert plan.kv_per_token == 2 * text.num_hidden_layers * max(1, text.num_key_value_heads // k) * head_dim * 2
    copy = next(v for name, v in plan.resident.items() if "unsharded" in name or "tensor-parallel" in name)
    assert copy == 2 * counts.per_rank(k, text.num_key_value_heads) and (k > 1) == (copy < 2 * counts.total)
    assert plan.resident["policy fp32 master shards"] == 4 * counts.total // 8
    assert ("policy AdamW fp32 states" in plan.resident) == (cfg.optim.offload == "none")
    assert ("reference bf16 shards" in plan.resident) == (cfg.algorithm.beta > 0)
    assert plan.pool_bytes == max(0, int(cfg.sampling.gpu_memory_utilization * plan.free_bytes) - plan.reserve)
    assert plan.rows_fit == plan.pool_bytes // plan.kv_per_token // plan.row_tokens
    assert plan.rows_per_group == k * 512 // 8 * 5
    assert sum(host_memory(cfg, counts, 8, 8, rewards).values()) <= 2000e9
    assert main(["--plan", "--config", str(path), "--device-memory-gb", str(device_gb)]) == 0
    out = capsys.readouterr().out
    assert f"{plan.kv_per_token / 1024:.1f} KiB" in out and f"{plan.rows_fit:,}" in out and "does NOT fit" not in out
    assert "update peak" in out and "old log-probs peak" in out and "host memory per node" in out
    peak = max(plan.peak_bytes, update.logprobs_bytes, update.update_bytes)
    assert f"GB of {device_gb:.1f} GB (max over the phases" in out and f", {peak / 1e9:.1f} GB of" in out
    assert "time per step on paper" in out


def test_the_8b_dapo_plan_by_hand():
    """Qwen3-VL-8B (8.77 B) with FSDP on 8 x 141 GB, sampled by pairs of GPUs: fp32 masters (4P/8),
    AdamW (8P/8), the tensor-parallel copy (the q / o projections and the MLP halved, the 8 K/V
    heads split 4 + 4, the rest whole), the 4B judge and the encoder in bf16, 3 GiB of runtime;
    K/V 72 KiB per token per GPU (4 heads); a row holds 4,352 / 5 prompt tokens and 4,096 new, in
    blocks of 16; a pair decodes both GPUs' rows. The old log-probs gather the root and two decoder
    layers at a time, never the whole model."""
    cfg = load_config(CONFIGS[[p.stem for p in CONFIGS].index("medix_r1_8b_dapo")])
    assert cfg.sampling.tensor_parallel == 2
    model_config = memory.load_config("Qwen3-VL-8B-Instruct")
    p, judge, encoder = 8_767_123_696, 4_022_468_096, 335_141_888
    counts = parameter_counts(model_config)
    assert counts.total == p
    split = 36 * (2 * 4096 * 4096 + 3 * 4096 * 12288)  # q, o; gate, up, down
    kv = 36 * 2 * 1024 * 4096
    assert (counts.tp_split, counts.tp_kv) == (split, kv)
    plan = memory.rollout_plan(cfg, model_config, 141 * 10**9, 8, counts, {"judge": judge, "encoder": encoder})
    resident = 12 * p // 8 + 2 * (p - split // 2 - kv // 2) + 2 * judge + 2 * encoder + 3 * 2**30
    layer = 3 * 4096 + 2 * 32 * 128 + 2 * 8 * 128 + 4 * 12288  # norms' inputs, q/o, k/v, the MLP's intermediates
    reserve = 16384 * layer * 2 + 640 * 151936 * 24
    assert sum(plan.resident.values()) == resident and plan.reserve == reserve
    assert plan.pool_bytes == int(0.8 * (141 * 10**9 - resident)) - reserve
    assert plan.kv_per_token == 72 * 1024
    assert plan.row_tokens == 16 * (-(-871 // 16) + 4096 // 16)
    assert plan.rows_per_group == 2 * 512 // 8 * 5
    assert plan.build == 2 * 151936 * 4096  # the largest parameter: an embedding table (the LM head's twin)
    update = update_plan(cfg, model_config, 141 * 10**9, 8, {"judge": judge, "encoder": encoder}, counts)
    decoder_layer = (split + kv) // 36 + 2 * 4096 + 2 * 128  # + its two norms and the q / k norms
    assert update.logprobs == {"root unit bf16": 2 * counts.root,  # FSDP forwards: two layers gathered, one prefetched
                               "two largest units bf16 (one prefetched)": 2 * 2 * decoder_layer,
                               "one layer's forward": 2 * 28672 * layer, "LM-head logits chunk": 2048 * 2**20}


def test_the_30b_moe_reserve_counts_the_routed_experts():
    """Qwen3-VL-30B-A3B's prefill activations per token and layer: attention as a dense model's,
    the router's 128 fp32 scores, and 8 routed experts of 768 (gathered input, gate/up, activation,
    output), not the dense intermediate_size of 6,144; and the K/V of 48 layers, 1 of the 4 heads per
    GPU in groups of 4."""
    cfg = load_config(CONFIGS[[p.stem for p in CONFIGS].index("medix_r1_30b_a3b_dapo")])
    model_config = memory.load_config("Qwen3-VL-30B-A3B-Thinking")
    plan = memory.rollout_plan(cfg, model_config, 141 * 10**9, 8, None, {})
    layer = 3 * 2048 + 2 * 32 * 128 + 2 * 4 * 128 + 2 * 128 + 8 * (2 * 2048 + 3 * 768)
    assert plan.reserve == cfg.sampling.max_prefill_tokens * layer * 2 + cfg.sampling.max_num_seqs * 151936 * 24
    assert plan.kv_per_token == 2 * 48 * 1 * 128 * 2
    assert (cfg.sampling.tensor_parallel, cfg.sampling.max_num_seqs, cfg.optim.offload) == (4, 1280, "optimizer")
    assert plan.build == 2 * 128 * 2048 * 2 * 768  # one layer's gate_up expert bank, whole


def test_cli_says_when_it_does_not_fit(capsys, tmp_path):
    config = tmp_path / "ddp30b.yaml"
    config.write_text(f"base: {CONFIGS[0].parent / 'medix_r1_8b_dapo.yaml'}\ndistributed:\n  strategy: ddp\n")
    assert main(["--plan", "--config", str(config), "--device-memory-gb", "80",
                 "--model-config", "Qwen3-VL-30B-A3B-Instruct"]) == 1
    assert "does NOT fit" in capsys.readouterr().out
    assert main(["--plan", "--config", str(config), "--device-memory-gb", "80", "--model-config", "Nope-7B"]) == 2
    assert "known shapes" in capsys.readouterr().err
    two_b = str(CONFIGS[0].parent / "medix_r1_2b_dapo.yaml")  # a rollout that fits, an update that does not
    assert main(["--plan", "--config", two_b, "--device-memory-gb", "141", "model.gradient_checkpointing=false"]) == 1
    out = capsys.readouterr().out
    assert "decode slots" in out and "step peak: update" in out
    assert ("does NOT fit: the update phase needs" in out and "would fit: GPUs of" in out
            and "model.gradient_checkpointing=true" in out)
    fitting = int(re.search(r"train\.micro_batch_tokens=(\d+) \(the largest that fits\)", out).group(1))
    assert fitting > 0 and fitting % 1024 == 0  # the value that fits, checked by the plan itself:
    for tokens, fits in ((fitting, 0), (fitting + 1024, 1)):
        assert main(["--plan", "--config", two_b, "--device-memory-gb", "141", "model.gradient_checkpointing=false",
                     f"train.micro_batch_tokens={tokens}"]) == fits
    capsys.readouterr()


def test_the_rollout_over_90_percent_names_the_utilization_that_fits(capsys):
    """The 8B unsplit at 85 % of the free memory: one row fits but the phase plans 74.4 GB of 80, over
    the 72 allowed; the verdict names the largest gpu_memory_utilization that fits (checked: it
    does, 0.01 more does not) and tensor parallel 2."""
    eight_b = str(CONFIGS[0].parent / "medix_r1_8b_dapo.yaml")
    unsplit = ["sampling.tensor_parallel=1", "sampling.max_num_seqs=320", "sampling.gpu_memory_utilization=0.85"]
    assert main(["--plan", "--config", eight_b, "--device-memory-gb", "80", *unsplit]) == 1
    verdict = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("verdict"))
    assert "does NOT fit: the rollout needs 74.4 GB, over the 90% planned for (72.0 GB of 80.0 GB)" in verdict
    assert "sampling.tensor_parallel=2 with sampling.gpu_memory_utilization=" in verdict
    utilization = float(re.search(r"sampling\.gpu_memory_utilization=([\d.]+) \(the largest", verdict).group(1))
    for u, fits in ((utilization, 0), (utilization + 0.01, 1)):
        assert main(["--plan", "--config", eight_b, "--device-memory-gb", "80", *unsplit[:2],
                     f"sampling.gpu_memory_utilization={u:.2f}"]) == fits
    capsys.readouterr()


def test_a_misfit_names_its_biggest_term_and_what_would_fit(capsys):
    """The 30B as it shipped before (unsplit rollout, AdamW on the GPU) on 80 GB: the unsharded bf16
    weights (62 GB) are the rollout's biggest term, which 141 GB GPUs or tensor parallel 8 at a lower
    utilization would hold; the update names the optimizer offload; advice already applied (gradient
    checkpointing is on) is not given."""
    thirty_b = str(CONFIGS[0].parent / "medix_r1_30b_a3b_dapo.yaml")
    before = ["sampling.tensor_parallel=1", "sampling.max_num_seqs=320", "sampling.gpu_memory_utilization=0.85",
              "optim.offload=none"]
    assert main(["--plan", "--config", thirty_b, "--device-memory-gb", "80", *before]) == 1
    verdicts = [line for line in capsys.readouterr().out.splitlines() if line.startswith("verdict")]
    assert len(verdicts) == 2 and all("does NOT fit" in v for v in verdicts)
    assert "the biggest term is policy bf16, unsharded for sampling (62.1 GB)" in verdicts[0]
    assert "would fit: sampling.tensor_parallel=8 with sampling.gpu_memory_utilization=0." in verdicts[0]
    utilization = re.search(r"utilization=([\d.]+) \(the smallest", verdicts[0]).group(1)
    assert main(["--plan", "--config", thirty_b, "--device-memory-gb", "80", *before[1:3], "optim.offload=none",
                 "sampling.tensor_parallel=8", f"sampling.gpu_memory_utilization={utilization}"]) == 1
    assert next(line for line in capsys.readouterr().out.splitlines() if line.startswith("verdict")).endswith(
        "(shorter rows use more; longer ones are preempted and recomputed, never lost)")
    assert "its biggest term is AdamW fp32 states (31.1 GB)" in verdicts[1]
    assert "optim.offload=optimizer; optim.offload=params" in verdicts[1]
    assert not any("gradient_checkpointing" in v for v in verdicts)


def test_a_tensor_parallel_size_the_plan_cannot_split_is_refused(capsys):
    """k must divide the query heads (32 for the 8B) and the world: one line, exit status 2."""
    eight_b = str(CONFIGS[0].parent / "medix_r1_8b_dapo.yaml")
    for k, world in ((3, 6), (16, 8), (4, 6)):
        assert main(["--plan", "--config", eight_b, "--device-memory-gb", "80", "--world", str(world),
                     f"sampling.tensor_parallel={k}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith(f"error: sampling.tensor_parallel: {k} must divide the 32 "
                                                          f"query heads and the world of {world} GPUs")
    seven_b = memory.load_config("Qwen2.5-VL-7B-Instruct")  # 28 query heads
    assert memory.tensor_parallel_sizes(seven_b, 8) == [1, 2, 4] and memory.tensor_parallel_error(2, seven_b, 8) is None


def test_a_checkpoint_directory_is_read_from_its_config(tmp_path):
    from medix_fast.demo.cache import resolve_model_path

    config = memory.load_config(str(resolve_model_path("tiny")))
    assert config.model_type == "qwen2" and memory.count_parameters(config) > 0


def test_budget_arithmetic():
    assert memory.kv_budget(100, 0.5, 20) == 30
    assert memory.kv_budget(10, 0.5, 20) == 0


def test_the_plan_says_what_stays_through_the_update_with_sleepable_memory(capsys):
    """With VMM the pool and copy sleep through the update and the graphs stay: their shared fp32
    logits, one step's in their pool and its activations (not a logits tensor per bucket); under
    FSDP2 at tensor_parallel 1 the sampler's own bf16 copy is named."""
    two_b = CONFIGS[[p.stem for p in CONFIGS].index("medix_r1_2b_dapo")]
    cfg = load_config(two_b)
    model_config = memory.load_config("Qwen3-VL-2B-Instruct")
    graphs = memory.graph_pool_bytes(model_config, cfg.sampling.max_num_seqs)
    layer = 3 * 2048 + 2 * 16 * 128 + 2 * 8 * 128 + 4 * 6144
    assert graphs == cfg.sampling.max_num_seqs * (2 * 151936 * 4 + 2 * layer)
    main(["--plan", "--config", str(two_b), "--device-memory-gb", "80"])
    out = capsys.readouterr().out
    assert "sleep, their pages given back, their addresses kept: CUDA graphs captured once per run" in out
    assert f"about {graphs / 1e9:.1f} GB (update + graphs: " in out and "the sampler then reads its own bf16 copy" in out
