"""LoRA policies (``model.lora``, model/lora.py, model/peft_files.py): the config's refusals, adapters
on the dense, VL and MoE tiny models equal to PEFT's (logits and greedy sampling), a LoRA run's
checkpoint (adapters only) resuming bit-identically, and its export as PEFT files or merged."""
from __future__ import annotations

import pytest
import torch

from medix_fast.config import LoraConfig, load_config
from medix_fast.demo.cache import resolve_model_path
from medix_fast.errors import ConfigError, UserError
from medix_fast.generate import Sampler
from medix_fast.model.loading import load_model
from medix_fast.model.lora import AdaptersOff, adapter_parameters, add_adapters, merged_state_dict
from medix_fast.model.moe import save_pretrained
from medix_fast.model.peft_files import read_adapter, write_adapter

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("override, named", [
    ("model.lora.rank=-1", "rank must be >= 0"),
    ("model.lora.rank=0 model.lora.init_from=x", "init_from needs rank > 0"),
    ("model.lora.target_modules=[q_proj,lm_head]", "stay frozen"),
    ("model.lora.dropout=1.0", "0 <= dropout < 1"),
    ("model.lora.experts=true model.lora.dropout=0.1", "dropout must be 0 with experts"),
])
def test_bad_lora_settings_are_refused_in_one_line(override, named):
    with pytest.raises(ConfigError, match=named) as err:
        load_config(None, ["model.lora.rank=8", *override.split()])
    assert str(err.value).startswith("model.lora") and "\n" not in str(err.value)


def adapted(name: str, lora: LoraConfig, seed: int = 0):
    """The tiny model ``name`` with adapters, their B made non-zero (a fresh B is zero), and its tokenizer."""
    model, tokenizer = load_model(resolve_model_path(name))
    add_adapters(model, lora)
    g = torch.Generator().manual_seed(seed)
    for p in adapter_parameters(model):
        p.data = torch.randn(p.shape, generator=g) * 0.1
    return model.eval(), tokenizer


@pytest.mark.parametrize("name", ["tiny", "tiny-vl", "tiny-moe"])
def test_adapters_equal_peft_and_merge_and_switch_off(name, tmp_path):
    """Only the adapters train (the LM head and a VL tower frozen), every one gets a gradient and
    dropout acts in training only; fresh adapters change nothing;
    PEFT loads the written adapter with equal fp32 logits, and so does the merged model; with the
    adapters off the model is its base (the KL reference)."""
    moe = name == "tiny-moe"
    lora = LoraConfig(rank=4, alpha=8, experts=moe, dropout=0.0 if moe else 0.1)
    path = resolve_model_path(name)
    base, _ = load_model(path)
    ids = torch.randint(0, 200, (2, 11))
    with torch.no_grad():
        expected_base = base(ids).logits
    fresh, _ = load_model(path)
    add_adapters(fresh, lora)
    trained = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    assert not any("visual" in n or "lm_head" in n for n in trained)
    assert any("experts.lora_A" in n for n in trained) == lora.experts
    model, _ = adapted(name, lora)
    model.train()(ids).logits.square().mean().backward()  # every adapter learns (dropout on: training)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter_parameters(model))
    if lora.dropout:
        with torch.no_grad():
            assert not torch.equal(model(ids).logits, model(ids).logits)
    model.eval()  # dropout off, as the sampler runs the model
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, expected_base)
        logits = model(ids).logits
        assert (logits - expected_base).abs().max() > 1e-2
        assert torch.equal(AdaptersOff(model, model)(ids).logits, expected_base)
        write_adapter(model, lora, str(path), tmp_path / "adapter")
        reference = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
        torch.testing.assert_close(reference(input_ids=ids).logits, logits, rtol=0, atol=1e-5)
        again, _ = load_model(path)
        add_adapters(again, lora)
        read_adapter(again, lora, tmp_path / "adapter")
        assert torch.equal(again(ids).logits, logits)
        with pytest.raises(UserError, match=r"^model\.lora\.init_from: .* r=4, lora_alpha=8; model.lora has rank=8"):
            read_adapter(again, LoraConfig(rank=8, alpha=8, experts=lora.experts), tmp_path / "adapter")
        save_pretrained(model, tmp_path / "merged", merged_state_dict(model))
        merged = type(base).from_pretrained(tmp_path / "merged")
        torch.testing.assert_close(merged(input_ids=ids).logits, logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_sampler_greedy_equals_peft_generate(name, tmp_path):
    """The in-process sampler runs the adapters (``sampling.lora_merge``'s default; both ways in
    tests/test_lora_sampling.py): its greedy tokens are HF + PEFT ``generate``'s."""
    lora = LoraConfig(rank=4, alpha=8, experts=name == "tiny-moe")
    model, _ = adapted(name, lora, seed=1)
    write_adapter(model, lora, "base", tmp_path)
    reference = peft.PeftModel.from_pretrained(load_model(resolve_model_path(name))[0], tmp_path).eval()
    prompts = [torch.randint(0, 200, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 9, 3)]
    expected = [reference.generate(input_ids=torch.tensor([p]), do_sample=False, max_new_tokens=10,
                                   eos_token_id=None, pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    with torch.no_grad():
        out = Sampler(model, max_num_seqs=4).generate(prompts, n=1, max_new_tokens=10, temperature=0,
                                                      stop_token_ids=[])
    assert out.completion_ids == expected


SMALL = ["train.prompts_per_step=4", "train.mini_batch_prompts=2", "sampling.group_size=4",
         "sampling.max_new_tokens=48", "algorithm.chunk_prompts=4", "algorithm.max_tries=2", "eval.every=0",
         "checkpoint.every=1", "checkpoint.keep_last=0", "logging.progress=false", "train.steps=3",
         "model.lora.rank=4", "model.lora.alpha=8", "model.lora.dropout=0.1", "algorithm.beta=0.01", "optim.lr=1e-2"]


def test_a_lora_run_checkpoints_adapters_resumes_exactly_and_exports(tmp_path, capsys):
    """The checkpoint holds the adapters and their AdamW state only (plus the base's identity); a
    resume from step 1 gives the same metrics (dropout, KL to the adapters-off base) and adapters;
    export writes PEFT files and, with --merge, the model they make; a run started from them
    (``model.lora.init_from``) holds those adapters."""
    from medix_fast import checkpoint as C
    from medix_fast.export import main as export_main
    from medix_fast.metrics import read_metrics
    from medix_fast.train import main
    from safetensors.torch import load_file

    from medix_fast import distributed as D
    from medix_fast.trainer import Trainer

    out = tmp_path / "run"
    args = [*SMALL, f"train.output_dir={out}"]
    trainer = Trainer(load_config(None, args))
    try:
        assert [id(p) for g in trainer.optimizer.param_groups for p in g["params"]] == \
            [id(p) for p in adapter_parameters(trainer.model)]
        assert isinstance(trainer.updater.ref_objective, AdaptersOff)  # the base, not a copy nor the policy
        trainer.run()
    finally:
        D.close()
    first = read_metrics(out / "metrics.jsonl")
    assert first[-1]["kl"] > 0 and first[-1]["grad_norm"] > 0
    step1 = C.checkpoint_root(out) / "step_00000001"
    saved = C.read_metadata(step1).state_dict_metadata
    assert saved and all(".lora_A." in k or ".lora_B." in k or not k.startswith(("model.", "optimizer.state"))
                         for k in saved)
    assert C.load_trainer_state(step1)["lora"]["base"]["hash"]
    assert main([*args, "--resume-from", str(step1)]) == 0
    timing = ("time/", "throughput/", "memory/")
    assert [{k: v for k, v in r.items() if not k.startswith(timing)} for r in read_metrics(out / "metrics.jsonl")] \
        == [{k: v for k, v in r.items() if not k.startswith(timing)} for r in first]
    ends = [out / "abandoned-1" / "checkpoints" / "step_00000003", C.checkpoint_root(out) / "step_00000003"]
    for end, name in zip(ends, ("first", "again")):
        assert export_main(["--checkpoint", str(end), "--out", str(tmp_path / name)]) == 0
    first_adapter, again = (load_file(tmp_path / n / "adapter_model.safetensors") for n in ("first", "again"))
    assert first_adapter.keys() == again.keys() and all(torch.equal(first_adapter[k], again[k]) for k in again)
    assert export_main(["--checkpoint", str(ends[1]), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    capsys.readouterr()
    base, _ = load_model(resolve_model_path("tiny"))
    merged, _ = load_model(tmp_path / "merged")
    ids = torch.randint(0, 200, (1, 12))
    with torch.no_grad():
        expected = merged(ids).logits
        assert (expected - base(ids).logits).abs().max() > 1e-3
        got = peft.PeftModel.from_pretrained(base, tmp_path / "again")(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    from medix_fast.model.peft_files import peft_tensors

    started = Trainer(load_config(None, [*SMALL, f"train.output_dir={tmp_path / 'next'}",
                                         f"model.lora.init_from={tmp_path / 'again'}"]))  # a run from the adapter
    try:
        assert all(torch.equal(v, again[k]) for k, v in peft_tensors(started.model).items())
    finally:
        D.close()


def test_fsdp2_trains_the_adapters_and_writes_the_merged_model(tmp_path):
    """FSDP2 (one process: the same fully_shard units as on many ranks) with adapters: a step, a
    checkpoint of the adapters' shards only, and the gathered Hugging Face copy with the adapters
    folded in, equal to PEFT on the exported adapter. (Two gloo ranks: tests/test_distributed.py.)"""
    from medix_fast import checkpoint as C
    from medix_fast import distributed as D
    from medix_fast.export import export
    from medix_fast.trainer import Trainer

    out = tmp_path / "fsdp"
    trainer = Trainer(load_config(None, [*SMALL, f"train.output_dir={out}", "distributed.strategy=fsdp"]))
    try:
        assert D._fsdp_modules(trainer.wrapped)
        assert trainer.train_step()["grad_norm"] > 0
        path = trainer.save(hf=True)
        trainer.checkpointer.wait()
    finally:
        D.close()
    assert all(".lora_" in k for k in C.read_metadata(path).state_dict_metadata if k.startswith("model."))
    export(path, tmp_path / "adapter")
    base, _ = load_model(resolve_model_path("tiny"))
    merged, _ = load_model(path / C.HF_MODEL)
    ids = torch.randint(0, 200, (1, 12))
    with torch.no_grad():
        got = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")(input_ids=ids).logits
        torch.testing.assert_close(merged(ids).logits, got, rtol=0, atol=1e-4)
