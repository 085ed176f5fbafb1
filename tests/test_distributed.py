"""Two gloo processes (``torchrun --nproc_per_node=2``) give the parameters of one process.

Each rank updates on half of the groups (DDP and FSDP2); one process updates on all of them
(one mini-batch, two PPO epochs, micro-batches of 40 tokens, so the ranks pad to the same
micro-batch count and the second epoch uses recomputed old log-probs). The dapo normaliser counts tokens over both ranks and
grpo / dr_grpo count sequences over both ranks, so the results must agree. The same launch runs
LoRA (``model.lora``: adapters on a frozen base, the KL to the base with the adapters off) under both.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from dist_worker import lora_update
from test_update import ALGORITHMS, G, MAX_NEW, make_sequences, tiny_model
from two_rank_jobs import run_launch

from medix_fast.config import AlgorithmConfig, SamplingConfig, TrainConfig
from medix_fast.distributed import DistInfo
from medix_fast.rl.update import PolicyObjective, Updater

NAMES = ["dapo", "grpo_kl", "dr_grpo", "gspo_token"]
GROUPS = 4


def torchrun(args: list[str], tmp_path: Path, timeout: int = 300, launcher: list[str] = ()) -> subprocess.CompletedProcess:
    """``torchrun`` (2 processes, ``launcher``'s flags too) running ``args``; asserts it succeeded."""
    done = run_launch(args, tmp_path, timeout, launcher)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


@pytest.fixture(scope="module")
def two_process_results(two_ranks):
    return two_ranks.folder("dist")


def one_process(name: str):
    model = tiny_model(0)
    seqs = make_sequences(GROUPS, model=tiny_model(0))
    objective = PolicyObjective(model, temperature=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    a = AlgorithmConfig(old_logprobs="recompute", ppo_epochs=2, **ALGORITHMS[name])
    train = TrainConfig(prompts_per_step=GROUPS, mini_batch_prompts=GROUPS, micro_batch_tokens=40)
    ref = PolicyObjective(tiny_model(5), 1.0) if a.beta else None
    updater = Updater(objective, objective, opt, a, train, SamplingConfig(group_size=G, max_new_tokens=MAX_NEW),
                      DistInfo(), pad_id=0, ref_objective=ref, grad_clip=1.0)
    return updater.update(seqs), model.state_dict()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("name", NAMES)
def test_two_ranks_equal_one_process(two_process_results, strategy, name):
    saved = torch.load(two_process_results / f"{strategy}_{name}.pt", weights_only=False)
    metrics, state = one_process(name)
    assert saved["metrics"]["optimizer_steps"] == metrics["optimizer_steps"] == 2
    assert saved["metrics"]["loss"] == pytest.approx(metrics["loss"], rel=1e-5, abs=1e-6)
    assert saved["metrics"]["train_tokens"] == metrics["train_tokens"]
    assert saved["state"].keys() == state.keys()
    for key, value in state.items():
        torch.testing.assert_close(saved["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def lora_one_process():
    """One process, the KL reference a second copy of the base (the ranks switch their adapters off)."""
    return lora_update(make_sequences(GROUPS, model=tiny_model(0)), DistInfo(), reference=tiny_model(0))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_lora_on_two_ranks_equals_one_process(two_process_results, lora_one_process, strategy):
    """LoRA, 2 optimizer steps with the KL on: the ranks' adapters, loss, grad norm and KL (to the base
    with their adapters off) are one process's (KL to a copy of the base); the base is unchanged; DDP
    all-reduces the adapters' gradients and nothing else, FSDP2's optimizer holds shards of the adapters only."""
    saved = torch.load(two_process_results / f"lora_{strategy}.pt", weights_only=False)
    metrics, one = lora_one_process
    assert saved["metrics"]["optimizer_steps"] == metrics["optimizer_steps"] == 2 and metrics["kl"] > 0
    for key in ("loss", "grad_norm", "kl"):
        assert saved["metrics"][key] == pytest.approx(metrics[key], rel=1e-5, abs=1e-6), key
    adapters = {k for k in one["state"] if ".lora_A." in k or ".lora_B." in k}
    base = tiny_model(0).state_dict()
    assert saved["state"].keys() == one["state"].keys() and len(adapters) == 2 * 7 * 2
    for key, value in one["state"].items():
        torch.testing.assert_close(saved["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)
        if key not in adapters:  # the frozen base, as loaded
            assert torch.equal(saved["state"][key], base[key.replace(".base_layer.", ".")]), key
    assert {name for name, _ in saved["held"]} == adapters
    if strategy == "ddp":
        assert set(saved["reduced"]) == adapters
    else:
        assert all(sharded for _, sharded in saved["held"])


FSDP_RUN = ["distributed.strategy=fsdp", "train.steps=2", "train.prompts_per_step=4", "train.mini_batch_prompts=2",
            "sampling.group_size=4", "sampling.max_new_tokens=32", "algorithm.chunk_prompts=4", "algorithm.max_tries=2",
            "algorithm.beta=0.02", "eval.every=2", "eval.limit=4", "rollout.partial=true", "rollout.stop_share=0.5",
            "algorithm.tis_cap=2.0", "checkpoint.every=2", "logging.progress=false"]


def fsdp_training_run(out: Path, info: DistInfo) -> None:
    """A two-rank job (tests/two_rank_jobs.py): the training command with ``FSDP_RUN``, into ``out/run``."""
    from medix_fast.train import main

    assert main([*FSDP_RUN, f"train.output_dir={out / 'run'}"]) == 0


def test_two_process_fsdp_training_run(two_ranks):
    """The whole loop under torchrun with FSDP2 (and a sharded KL reference): per-rank rollouts, unsharded generation,
    DAPO's cross-rank dynamic-sampling agreement, a gathered HF checkpoint; partial rollouts, each rank
    carrying its own groups, every rank's saved with the checkpoint."""
    out = two_ranks.folder("fsdp_run") / "run"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]  # 0: the held-out baseline
    assert "eval/overall" in records[2]
    carry = json.loads((out / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())["carry"]
    assert len(carry) == 2 and len(carry[0]) + len(carry[1]) == records[2]["rollout/carried_groups"] > 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step_00000002" / "model")
    assert (out / "checkpoints" / "step_00000002" / "rng_rank1.safetensors").exists()
    assert all(torch.isfinite(p).all() for p in model.parameters())
