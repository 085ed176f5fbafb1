"""Sampling on a tensor-parallel copy of the policy (``sampling.tensor_parallel``), on 2 gloo ranks.

The group sampler gives each rank the tokens a Sampler on the whole policy gives it alone: greedy
and sampled (log-probs within 1e-5 in fp32), with images, with the MoE routing record (the same
experts per token), through preemption; a rank with no prompts takes part in its group's call. A
training step with ``tensor_parallel: 2`` (resumed from a checkpoint written with 1) equals the
step with 1. The split itself (shares, head counts, refusals) is checked in one process.
Run: pytest tests/test_tensor_parallel.py
"""
from __future__ import annotations

import pytest
import torch

from medix_fast.demo.cache import resolve_model_path
from medix_fast.generate.tensor_parallel import TensorParallelCopy, tensor_parallel_error
from medix_fast.model.loading import load_model

MODELS = ["tiny", "tiny-vl", "tiny-moe", "tiny-vl-moe"]


@pytest.fixture(scope="module")
def engine(two_ranks):
    out = two_ranks.folder("tp_engine")  # tp_worker.engine
    return [torch.load(out / f"engine_rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.fixture(scope="module")
def trained(two_ranks):
    out = two_ranks.folder("tp_train")  # tp_worker.train
    return [torch.load(out / f"train_rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.mark.parametrize("name", MODELS)
def test_group_sampler_gives_each_rank_the_tokens_it_samples_alone(engine, name):
    for rank, results in enumerate(engine):
        r = results[name]
        assert r["group_greedy"]["tokens"] == r["alone_greedy"]["tokens"], (rank, "greedy")
        assert r["group"]["tokens"] == r["alone"]["tokens"], (rank, "sampled")
        assert len(r["group"]["tokens"]) == 3 * (2 if rank == 0 else 1)  # its own prompts' rows only
        for ours, alone in zip(r["group"]["logprobs"], r["alone"]["logprobs"]):
            torch.testing.assert_close(ours, alone, rtol=0, atol=1e-5)
        assert r["weights_after"] == "meta"  # the copy is given back after the rollout


def test_moe_routing_record_and_preemption_agree(engine):
    for rank, results in enumerate(engine):
        r = results["tiny-moe"]
        assert r["preemptions"] > 0 and r["alone_preemptions"] > 0  # a pool too small for every row at once
        assert len(r["group"]["routing"]) == len(r["alone"]["routing"])
        for ours, alone in zip(r["group"]["routing"], r["alone"]["routing"]):
            assert torch.equal(ours, alone), rank  # the same experts chosen for every token


@pytest.mark.parametrize("name", ["tiny", "tiny-vl"])
def test_a_group_call_stopped_early_and_continued_equals_one_call(engine, name):
    for rank in (0, 1):
        pieces, _, whole = engine[rank][name]["pieces"]
        assert pieces == whole, rank
    assert engine[0][name]["pieces"][1] + engine[1][name]["pieces"][1] > 0  # rows were left and continued


def test_a_lora_policy_samples_its_merged_weights_on_the_copy(engine):
    """tiny-MoE with adapters on its linears and experts: the copy's shares are the folded weights, the
    adapters' update between two calls of a kept copy seen (tests/tp_worker.py's lora)."""
    for rank in (0, 1):
        r = engine[rank]["lora"]
        assert r["group0"] == r["merged0"] and r["group1"] == r["merged1"], rank
        assert r["merged0"] != r["merged1"]  # the update changes the tokens


def test_a_rank_without_prompts_takes_part_in_its_group(engine):
    assert [len(engine[r]["tiny"]["sat_out"]) for r in (0, 1)] == [4, 0]  # rank 0's 2 prompts x 2; rank 1 none


def test_a_training_step_with_tensor_parallel_equals_the_unsharded_one(trained):
    for results in trained:
        whole, sharded = results["tp1_step2"], results["tp2_step2"]  # 2: resumed from 1's checkpoint of step 1
        assert sharded["metrics"]["loss"] == pytest.approx(whole["metrics"]["loss"], rel=1e-5, abs=1e-7)
        assert whole["metrics"]["grad_norm"] > 0  # a step with a learning signal
        assert sharded["metrics"]["grad_norm"] == pytest.approx(whole["metrics"]["grad_norm"], rel=1e-5)
    results = trained[0]  # the full parameters are gathered on rank 0
    whole, sharded, before = (results[k]["state"] for k in ("tp1_step2", "tp2_step2", "tp1_step1"))
    assert whole.keys() == sharded.keys() and whole
    for key, value in whole.items():
        torch.testing.assert_close(sharded[key], value, rtol=1e-5, atol=1e-7, msg=key)
    assert any(not torch.equal(before[k], v) for k, v in whole.items())  # the step moved the weights


def test_held_out_evaluation_runs_on_the_group_sampler(trained):
    """3 items over 2 ranks: a rank without items takes part in its group's calls (greedy and pass@k)."""
    for results in trained:
        metrics = results["tp2_eval"]
        assert 0 <= metrics["eval/mean_accuracy"] <= 1 and 0 <= metrics["eval/pass@1"] <= metrics["eval/pass@2"] <= 1


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
@pytest.mark.parametrize("k", [2, 4])
def test_shares_concatenate_to_the_policy(name, k):
    """Column shares stack to the full weight along their split, K/V heads replicated past their
    count; the copy's config holds one rank's head counts and widths."""
    model, _ = load_model(resolve_model_path(name), dtype=torch.float32, device="cpu")
    copies = [TensorParallelCopy(model, k, None, r, torch.float32, torch.device("cpu")) for r in range(k)]
    text, local = model.config.get_text_config(), copies[0].model.config.get_text_config()
    assert local.num_attention_heads == text.num_attention_heads // k
    assert local.num_key_value_heads == max(1, text.num_key_value_heads // k)
    params = dict(model.named_parameters())
    q = params["model.layers.0.self_attn.q_proj.weight"]
    o = params["model.layers.0.self_attn.o_proj.weight"]
    assert torch.equal(torch.cat([c._share("model.layers.0.self_attn.q_proj.weight", q) for c in copies]), q)
    assert torch.equal(torch.cat([c._share("model.layers.0.self_attn.o_proj.weight", o) for c in copies], 1), o)
    kv = params["model.layers.0.self_attn.k_proj.weight"]
    shares = [c._share("model.layers.0.self_attn.k_proj.weight", kv) for c in copies]
    step = max(1, k // text.num_key_value_heads)  # ranks holding each K/V head
    assert torch.equal(torch.cat(shares[::step]), kv)
    assert all(torch.equal(shares[r], shares[r - r % step]) for r in range(k))
    if name == "tiny-moe":
        up = params["model.layers.0.mlp.experts.gate_up_proj"]  # (E, 2I, H): each share keeps gate and up halves
        parts = [c._share("model.layers.0.mlp.experts.gate_up_proj", up).chunk(2, dim=1) for c in copies]
        assert torch.equal(torch.cat([g for g, _ in parts], 1), up.chunk(2, dim=1)[0])
        assert torch.equal(torch.cat([u for _, u in parts], 1), up.chunk(2, dim=1)[1])
    else:
        gate = params["model.layers.0.mlp.gate_proj.weight"]
        assert torch.equal(torch.cat([c._share("model.layers.0.mlp.gate_proj.weight", gate) for c in copies]), gate)
    norm = params["model.layers.0.input_layernorm.weight"]
    assert all(c._share("model.layers.0.input_layernorm.weight", norm) is norm for c in copies)  # replicated


def test_a_split_the_model_cannot_take_is_refused():
    model, _ = load_model(resolve_model_path("tiny"), dtype=torch.float32, device="cpu")  # 4 heads, 2 K/V heads
    assert tensor_parallel_error(model.config, 1) is None
    assert tensor_parallel_error(model.config, 4, world=8) is None
    assert tensor_parallel_error(model.config, 3) == "4 attention heads are not divisible by 3"
    assert tensor_parallel_error(model.config, 2, world=3) == "2 does not divide the world size 3 (groups of 2 " \
                                                                 "consecutive ranks)"
    with pytest.raises(ValueError, match="sampling.tensor_parallel=8: 4 attention heads are not divisible by 8"):
        TensorParallelCopy(model, 8, None, 0, torch.float32, torch.device("cpu"))
