"""Mixture-of-experts models (Qwen3-VL-30B-A3B's architecture) on the tiny random ones of
``medix_fast.demo.tiny_moe`` (4 experts, 2 active, 2 layers; the VL one with Qwen3-VL's vision
tower): loading and the one place the experts implementation is chosen, the three experts
implementations against an fp64 reference (forward and gradients), greedy sampler parity with
``generate`` (text and images), a training step on images through the fused loss with gradients
reaching the router and exactly the experts that received tokens, the load-balancing loss, the
Hugging Face checkpoint round trip and eval of it, and two gloo ranks under FSDP2 equal to one.

    pytest tests/test_moe.py
"""
from __future__ import annotations

import copy
import re
import typing
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from medix_fast import distributed as D
from medix_fast.config import AlgorithmConfig, DataConfig, ModelConfig, SamplingConfig, TrainConfig
from medix_fast.data import build_prompts, load_examples
from medix_fast.data.vision import Vision, load_image
from medix_fast.generate import Sampler
from medix_fast.model import moe
from medix_fast.demo.cache import resolve_model_path
from medix_fast.model.loading import load_image_processor, load_model
from medix_fast.rl.batch import Sequences
from medix_fast.rl.update import PolicyObjective, Updater

G = 2


def experts_of(model) -> list[torch.nn.Module]:
    return [block.experts for block in moe.sparse_blocks(model)]


def image_prompts(tokenizer, vision, count: int):
    examples = load_examples(["sample:train_vl"], DataConfig())
    return build_prompts(examples[::8][:count], tokenizer, 4096, vision)[0]


def image_sequences(model, tokenizer, vision, groups: int, seed: int = 0) -> Sequences:
    """``groups`` image prompts x G random completions (1..6 tokens), random advantages and
    sampling log-probs near the model's own."""
    gen = torch.Generator().manual_seed(seed)
    prompts, comps, images = [], [], []
    for p in image_prompts(tokenizer, vision, groups):
        pix = vision.encode([load_image(p.image)])
        for _ in range(G):
            prompts.append(p.ids)
            n = int(torch.randint(1, 7, (1,), generator=gen))
            comps.append(torch.randint(1, model.config.get_text_config().vocab_size, (n,), generator=gen).tolist())
            images.append(pix)
    sampling = [-2.0 + 0.1 * torch.randn(len(c), generator=gen) for c in comps]
    return Sequences(prompts, comps, sampling, torch.randn(len(comps), generator=gen), G, images)


def updater_for(objective, model, info=D.DistInfo(), wrapped=None, micro_batch_tokens=16384, groups=2):
    opt = torch.optim.SGD([p for p in (wrapped or objective).parameters() if p.requires_grad], lr=0.5)
    return Updater(objective, wrapped or objective, opt, AlgorithmConfig(loss_type="dapo", old_logprobs="sampler"),
                   TrainConfig(prompts_per_step=groups, mini_batch_prompts=groups, micro_batch_tokens=micro_batch_tokens),
                   SamplingConfig(group_size=G, max_new_tokens=8), info, pad_id=0, grad_clip=0.0)


def grads_at_step(updater, model) -> dict:
    """Filled with every parameter's gradient (None if it has none) when the optimizer steps (the
    Updater frees the gradients when it ends)."""
    seen = {}

    def snapshot(optimizer, args, kwargs):
        seen.update({n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()})
    updater.optimizer.register_step_pre_hook(snapshot)
    return seen


@pytest.fixture(scope="module")
def vl():
    torch.set_num_threads(1)
    model, tokenizer = load_model(resolve_model_path("tiny-vl-moe"))
    processor = load_image_processor(resolve_model_path("tiny-vl-moe"))
    return model, tokenizer, Vision(processor, model.config.image_token_id)


# ----------------------------------------------------------------------------- loading
def test_loads_qwen3_moe_and_qwen3_vl_moe_with_the_chosen_experts(vl):
    model, tokenizer, _ = vl
    assert type(model).__name__ == "Qwen3VLMoeForConditionalGeneration"
    text, _ = load_model(resolve_model_path("tiny-moe"))
    assert type(text).__name__ == "Qwen3MoeForCausalLM"
    for m in (model, text):
        assert moe.is_moe(m.config) and len(experts_of(m)) == 2
        assert {e.config._experts_implementation for e in experts_of(m)} == {"grouped_mm"}  # CPU, 16-byte widths
    eager, _ = load_model(resolve_model_path("tiny-vl-moe"), experts_implementation="eager")
    assert {e.config._experts_implementation for e in experts_of(eager)} == {"eager"}
    assert not moe.is_moe(load_model(resolve_model_path("tiny"))[0].config)


def test_liger_leaves_the_experts_alone(vl, monkeypatch):
    """Liger (CUDA only) patches norms and RoPE of an MoE but not SwiGLU, whose per-expert modules
    transformers 5 fuses into banks; an architecture it lacks is skipped."""
    import sys
    import types

    from medix_fast.model.loading import apply_liger

    calls = {}
    fake = types.ModuleType("liger_kernel.transformers")
    fake.apply_liger_kernel_to_qwen3_vl_moe = lambda **kw: calls.setdefault("moe", kw)
    fake.apply_liger_kernel_to_qwen2 = lambda **kw: calls.setdefault("dense", kw)
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    assert apply_liger(vl[0]) and apply_liger(load_model(resolve_model_path("tiny"))[0])
    assert calls["moe"]["swiglu"] is False and calls["dense"]["swiglu"] is True
    assert calls["moe"]["rms_norm"] and not calls["moe"]["fused_linear_cross_entropy"]
    moe_model = load_model(resolve_model_path("tiny-moe"))[0]
    assert not apply_liger(moe_model)  # no apply_liger_kernel_to_qwen3_moe in the fake


def test_experts_implementation_is_chosen_in_one_place(vl, monkeypatch):
    config = vl[0].config
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert moe.experts_implementation(config, cpu, torch.float32) == "grouped_mm"
    misaligned = copy.deepcopy(config)
    misaligned.text_config.moe_intermediate_size = 44  # 88-byte bf16 rows: the CPU kernel rejects them
    assert moe.experts_implementation(misaligned, cpu, torch.float32) == "eager"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert moe.experts_implementation(config, cuda, torch.bfloat16) == "grouped_mm"
    assert moe.experts_implementation(config, cuda, torch.float32) == "eager"  # the kernel takes bf16 only
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert moe.experts_implementation(config, cuda, torch.bfloat16) == "eager"
    assert moe.experts_implementation(config, cuda, torch.bfloat16, "batched_mm") == "batched_mm"
    with pytest.raises(ValueError, match="'grouped' is not one of"):
        moe.experts_implementation(config, cpu, torch.float32, "grouped")
    monkeypatch.delattr(torch.nn.functional, "grouped_mm")
    monkeypatch.delattr(torch, "_grouped_mm")
    assert moe.experts_implementation(config, cpu, torch.float32) == "eager"
    field = typing.get_type_hints(ModelConfig)["experts_implementation"]
    assert typing.get_args(field) == moe.EXPERTS_IMPLEMENTATIONS


# ----------------------------------------------------------------------------- experts vs fp64
def reference_experts(x, index, weight, gate_up, down):
    """Each token's weighted sum over its chosen experts of down @ (silu(gate) * up), in a loop."""
    rows = []
    for t in range(x.shape[0]):
        out = torch.zeros_like(x[t])
        for j in range(index.shape[1]):
            e = int(index[t, j])
            gate, up = (gate_up[e] @ x[t]).chunk(2)
            out = out + weight[t, j] * (down[e] @ (torch.nn.functional.silu(gate) * up))
        rows.append(out)
    return torch.stack(rows)


@pytest.mark.parametrize("impl", ["eager", "batched_mm", "grouped_mm"])
def test_experts_implementations_match_fp64(vl, impl):
    """Forward and gradients (input, routing weights, both expert banks) of each implementation
    against an fp64 loop; expert 3 receives no token and gets an exactly zero gradient."""
    experts = copy.deepcopy(experts_of(vl[0])[0])
    experts.config._experts_implementation = impl
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, experts.hidden_dim, generator=gen, requires_grad=True)  # (T, H)
    index = torch.randint(0, 3, (12, 2), generator=gen)  # experts 0..2 only
    index[:, 1] = (index[:, 0] + 1 + torch.randint(0, 2, (12,), generator=gen)) % 3  # two distinct experts
    weight = torch.softmax(torch.randn(12, 2, generator=gen), -1).requires_grad_()  # (T, k)
    probe = torch.randn(12, experts.hidden_dim, generator=gen)  # (T, H)
    out = experts(x, index, weight)  # (T, H)
    (out * probe).sum().backward()
    ref_in = [t.detach().double().requires_grad_() for t in (x, weight, experts.gate_up_proj, experts.down_proj)]
    ref = reference_experts(ref_in[0], index, ref_in[1], ref_in[2], ref_in[3])
    (ref * probe.double()).sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    for got, want in zip((x.grad, weight.grad, experts.gate_up_proj.grad, experts.down_proj.grad), ref_in):
        torch.testing.assert_close(got.double(), want.grad, rtol=1e-4, atol=1e-5)
    for bank in (experts.gate_up_proj.grad, experts.down_proj.grad):
        assert torch.equal(bank[3], torch.zeros_like(bank[3]))
        assert all(bank[e].abs().sum() > 0 for e in range(3))


def test_grouped_mm_layer_and_router_loss_make_no_host_sync(vl):
    """A sparse MoE block forward + backward with grouped_mm, and the load-balancing loss, issue
    no host-device sync (tests/syncs.py, on the CPU too); eager's per-expert loop does."""
    from syncs import count_syncs

    block = copy.deepcopy(moe.sparse_blocks(vl[0])[0])
    x = torch.randn(2, 9, block.experts.hidden_dim, requires_grad=True)  # (B, T, H)
    for impl, free in (("grouped_mm", True), ("eager", False)):
        block.experts.config._experts_implementation = impl
        with count_syncs() as c:
            block(x).sum().backward()
        assert (c.count == 0) == free, (impl, c.where)
    router = moe.RouterLogits(copy.deepcopy(vl[0]))
    router.logits = [torch.randn(18, 4, requires_grad=True) for _ in range(2)]  # (rows, E) of 2 layers
    with count_syncs() as c:
        router.loss([torch.ones(2, 9)]).backward()
    assert c.count == 0, c.where


@pytest.mark.cuda
def test_grouped_mm_on_cuda_bf16_matches_fp64(vl):
    """What auto picks on a GPU (grouped_mm on the bf16 compute weights) against the fp64 loop,
    forward and gradients, within bf16's error; no host sync."""
    from syncs import count_syncs

    dev = torch.device("cuda")
    experts = copy.deepcopy(experts_of(vl[0])[0]).to(dev, torch.bfloat16)
    assert moe.experts_implementation(vl[0].config, dev, torch.bfloat16) == "grouped_mm"
    experts.config._experts_implementation = "grouped_mm"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, experts.hidden_dim, generator=gen).to(dev, torch.bfloat16).requires_grad_()
    index = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(64)]).to(dev)  # (T, 2) distinct
    weight = torch.softmax(torch.randn(64, 2, generator=gen), -1).to(dev, torch.bfloat16).requires_grad_()
    with count_syncs() as c:
        out = experts(x, index, weight)
        out.float().sum().backward()
    assert c.count == 0, c.where
    ref_in = [t.detach().double().cpu().requires_grad_() for t in (x, weight, experts.gate_up_proj, experts.down_proj)]
    ref = reference_experts(ref_in[0], index.cpu(), ref_in[1], ref_in[2], ref_in[3])
    ref.sum().backward()
    scale = ref.abs().max()
    torch.testing.assert_close(out.double().cpu(), ref, rtol=2e-2, atol=2e-2 * float(scale))
    for got, want in zip((x.grad, weight.grad, experts.gate_up_proj.grad, experts.down_proj.grad), ref_in):
        torch.testing.assert_close(got.double().cpu(), want.grad, rtol=2e-2, atol=2e-2 * float(want.grad.abs().max()))


# ----------------------------------------------------------------------------- rollout
def assert_greedy_like_generate(model, ids: list[list[int]], pix: list | None = None, new: int = 10) -> None:
    """The sampler's greedy rows (2 per prompt) equal ``model.generate``'s for each prompt alone."""
    pix = pix or [None] * len(ids)
    out = Sampler(model).generate(ids, n=2, max_new_tokens=new, temperature=0.0, stop_token_ids=[],
                                  images=pix if any(b is not None for b in pix) else None)
    for i, (x, b) in enumerate(zip(ids, pix)):
        x = torch.tensor([x])
        kw = {} if b is None else dict(pixel_values=b.pixel_values, image_grid_thw=b.image_grid_thw,
                                       mm_token_type_ids=(x == model.config.image_token_id).int())
        ref = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new, do_sample=False,
                             eos_token_id=None, **kw)[0, x.shape[1]:].tolist()
        assert out.completion_ids[2 * i] == out.completion_ids[2 * i + 1] == ref, i


def test_sampler_greedy_matches_generate_text_moe():
    """The text-only Qwen3-MoE, eager experts."""
    model, tokenizer = load_model(resolve_model_path("tiny-moe"), experts_implementation="eager")
    prompts = build_prompts(load_examples(["sample:test"], DataConfig())[:3], tokenizer, 4096)[0]
    assert_greedy_like_generate(model, [p.ids for p in prompts])


def test_sampler_greedy_matches_generate_with_images(vl):
    """Qwen3-VL-MoE, grouped_mm experts, image prompts and a text-only one in the same call."""
    model, tokenizer, vision = vl
    prompts = image_prompts(tokenizer, vision, 2)
    text_only = build_prompts(load_examples(["sample:test"], DataConfig())[:1], tokenizer, 4096, vision)[0]
    assert_greedy_like_generate(model, [p.ids for p in prompts] + [text_only[0].ids],
                                [vision.encode([load_image(p.image)]) for p in prompts] + [None])


# ----------------------------------------------------------------------------- training
def skip_expert_3(module, args, output):
    """Router forward hook: route no token to expert 3 (its slot goes to another expert of 0..1),
    keeping the router's weights, so the router still gets its gradient."""
    logits, weights, index = output
    other = index.flip(-1)  # the pair's other expert (top-2)
    return logits, weights, torch.where(index == 3, torch.where(other == 0, 1, 0), index)


def test_training_step_on_images_reaches_router_and_used_experts(tmp_path):
    """One Updater step on image prompts (fused DAPO loss): the vision tower, every router and
    every expert that received a token get a gradient; layer 0's expert 3, which receives none,
    gets exactly zero."""
    model, tokenizer = load_model(resolve_model_path("tiny-vl-moe"))
    vision = Vision(load_image_processor(resolve_model_path("tiny-vl-moe")), model.config.image_token_id)
    model.train()
    blocks = moe.sparse_blocks(model)
    blocks[0].gate.register_forward_hook(skip_expert_3)
    chosen = [set() for _ in blocks]
    for layer, block in enumerate(blocks):
        block.experts.register_forward_pre_hook(
            lambda m, args, layer=layer: chosen[layer].update(args[1].flatten().tolist()))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    objective = PolicyObjective(model, temperature=1.0)
    updater = updater_for(objective, model)
    grads = grads_at_step(updater, model)
    metrics = updater.update(image_sequences(model, tokenizer, vision, 2))
    assert metrics["optimizer_steps"] == 1 and "router_aux" not in metrics
    assert chosen[0] == {0, 1, 2} and chosen[1] == {0, 1, 2, 3}
    for layer in range(2):
        prefix = f"model.language_model.layers.{layer}.mlp."
        assert grads[prefix + "gate.weight"].abs().sum() > 0, layer
        for bank in (grads[prefix + "experts.gate_up_proj"], grads[prefix + "experts.down_proj"]):
            for e in range(4):
                assert (bank[e].abs().sum() > 0) == (e in chosen[layer]), (layer, e)
    assert all(grads[n].abs().sum() > 0 for n, _ in model.named_parameters() if ".visual.merger." in n)
    assert all(p.grad is None for p in model.parameters())  # freed: the next rollout does not carry them
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert {n for n in changed if ".mlp.gate." in n} == {f"model.language_model.layers.{i}.mlp.gate.weight"
                                                          for i in range(2)}


def test_frozen_routers_get_no_gradient():
    model, tokenizer = load_model(resolve_model_path("tiny-vl-moe"))
    vision = Vision(load_image_processor(resolve_model_path("tiny-vl-moe")), model.config.image_token_id)
    moe.set_router_trainable(model, False)
    objective = PolicyObjective(model, temperature=1.0)
    updater = updater_for(objective, model)
    grads = grads_at_step(updater, model)
    updater.update(image_sequences(model, tokenizer, vision, 1, seed=2))
    assert {n for n, g in grads.items() if g is None} == {n for n, _ in model.named_parameters() if ".mlp.gate." in n}
    assert all(grads[n].abs().sum() > 0 for n in grads if n.endswith("experts.gate_up_proj"))
    with pytest.raises(ValueError, match="no mixture-of-experts router"):
        moe.set_router_trainable(load_model(resolve_model_path("tiny"))[0], False)


# ----------------------------------------------------------------------------- load-balancing loss
def router_aux_and_grad(model, mb, **objective_kwargs):
    objective = PolicyObjective(model, temperature=1.0, router_aux_coef=1.0, **objective_kwargs)
    model.zero_grad(set_to_none=True)
    _, metrics = objective(mb, {"loss_type": "dapo", "num_items_in_batch": float(mb.tokens)})
    metrics["router_aux"].backward()
    objective(mb)  # log-probs only: nothing recorded
    assert objective.router.logits == []  # nor in a checkpointed layer's recomputation during backward
    return metrics["router_aux"].detach(), [b.gate.weight.grad.clone() for b in moe.sparse_blocks(model)]


def test_router_aux_loss_is_the_models_own_over_valid_tokens(vl):
    """The recorded load-balancing loss equals transformers' aux_loss of the full padded rows with
    their attention mask, whether the prompt runs once per group (weights G) or per row, and
    under gradient checkpointing (whose recomputation records nothing)."""
    from medix_fast.rl.batch import collate

    model, tokenizer, vision = vl
    seqs = image_sequences(model, tokenizer, vision, 2, seed=1)
    mb = collate(seqs, [0, 1], 0, torch.device("cpu"))
    shared, shared_grads = router_aux_and_grad(model, mb, share_prompt=True)
    full, full_grads = router_aux_and_grad(model, mb, share_prompt=False)
    ids = torch.cat([mb.prompt_ids.repeat_interleave(G, 0), mb.targets], 1)  # (B, P + C)
    mask = torch.cat([mb.prompt_mask.repeat_interleave(G, 0), mb.mask.long()], 1)  # (B, P + C)
    pix = torch.cat([seqs.images[0].pixel_values] * G + [seqs.images[G].pixel_values] * G)
    grid = torch.cat([seqs.images[0].image_grid_thw] * G + [seqs.images[G].image_grid_thw] * G)
    from medix_fast.model.forward import mrope_positions

    with torch.no_grad():
        hf = model(input_ids=ids, attention_mask=mask, pixel_values=pix, image_grid_thw=grid,
                   position_ids=mrope_positions(model, ids, mask, grid), output_router_logits=True).aux_loss
    torch.testing.assert_close(full, hf, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(shared, full, rtol=1e-5, atol=1e-7)
    for a, b in zip(shared_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    try:
        ckpt, ckpt_grads = router_aux_and_grad(model, mb)
    finally:
        model.activation_checkpointing_disable()
        model.eval()
    torch.testing.assert_close(ckpt, full, rtol=1e-5, atol=1e-7)
    for a, b in zip(ckpt_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_router_aux_loss_is_weighted_into_the_update():
    """With coefficient c the update's router gradient is the policy loss's plus c x the
    load-balancing gradient of each micro-batch weighted by its share of the completion tokens."""
    model, tokenizer = load_model(resolve_model_path("tiny-vl-moe"))
    vision = Vision(load_image_processor(resolve_model_path("tiny-vl-moe")), model.config.image_token_id)
    seqs = image_sequences(model, tokenizer, vision, 2, seed=3)
    budget = 150  # one group per micro-batch
    grads = {}
    for coef in (0.0, 0.3):
        updater = updater_for(PolicyObjective(model, 1.0, router_aux_coef=coef), model, micro_batch_tokens=budget)
        updater.optimizer.param_groups[0]["lr"] = 0.0  # keep the weights: compare gradients only
        seen = grads_at_step(updater, model)
        metrics = updater.update(seqs)
        grads[coef] = [seen[f"model.language_model.layers.{i}.mlp.gate.weight"] for i in range(2)]
    minis = updater.plan(seqs).minis
    assert len(minis) == 1 and len(minis[0]) == 2
    total = sum(mb.tokens for mb in minis[0])
    want = [torch.zeros_like(g) for g in grads[0.0]]
    aux_mean = 0.0
    for mb in minis[0]:
        aux, aux_grads = router_aux_and_grad(model, mb)
        aux_mean += float(aux) * mb.tokens / total
        for w, g in zip(want, aux_grads):
            w += 0.3 * mb.tokens / total * g
    assert metrics["router_aux"] == pytest.approx(aux_mean, rel=1e-5)
    for with_aux, without, w in zip(grads[0.3], grads[0.0], want):
        torch.testing.assert_close(with_aux - without, w, rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------- checkpoint and eval
def test_trainer_checkpoint_round_trip_in_hf_format_and_eval(tmp_path, capsys):
    """One Trainer step of configs/tiny_vl_moe.yaml (load-balancing loss on), its checkpoint in the
    Hub's Qwen3-VL-MoE layout with the image processor, loaded back bit-identical through
    load_model, and ``python -m medix_fast.eval`` on it: grouped_mm and eager experts agree."""
    from medix_fast.config import load_config
    from medix_fast.eval.cli import main as eval_main
    from medix_fast.eval.results import read_records
    from medix_fast.train import Trainer

    cfg = load_config(Path(__file__).parents[1] / "configs" / "tiny_vl_moe.yaml", [
        "train.steps=1", "train.prompts_per_step=2", "train.mini_batch_prompts=2", "sampling.group_size=2",
        "sampling.max_new_tokens=6", "algorithm.dynamic_sampling=false", "model.router_aux_loss_coef=0.01",
        "logging.progress=false", "logging.plot=false", "logging.tensorboard=false", f"train.output_dir={tmp_path}"])
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    metrics = trainer.train_step()
    assert metrics["optimizer_steps"] == 1 and metrics["router_aux"] > 0
    path = trainer.save(hf=True) / "model"
    trainer.checkpointer.wait()  # published (async by default)
    assert (path / "preprocessor_config.json").is_file()
    text = trainer.model.config.text_config
    with safe_open(str(path / "model.safetensors"), "pt") as f:  # (E, H, 2I) / (E, I, H), as on the Hub
        prefix = "model.language_model.layers.0.mlp.experts."
        assert f.get_slice(prefix + "gate_up_proj").get_shape() == [4, text.hidden_size, 2 * text.moe_intermediate_size]
        assert f.get_slice(prefix + "down_proj").get_shape() == [4, text.moe_intermediate_size, text.hidden_size]
    loaded, _ = load_model(path)
    state = trainer.model.state_dict()
    assert loaded.state_dict().keys() == state.keys()
    assert any(not torch.equal(before[k], v) for k, v in state.items() if ".experts." in k)
    for key, value in state.items():
        assert torch.equal(loaded.state_dict()[key], value), key

    answers = {}
    for impl in ("auto", "eager"):
        out = tmp_path / f"eval_{impl}"
        assert eval_main(["--model", str(path), "--data", "sample:train_vl", "--limit", "2", "--max-new-tokens", "6",
                          "--experts-implementation", impl, "--out", str(out)]) == 0
        answers[impl] = [r["response"] for r in read_records(out / "generations.jsonl")]
    assert len(answers["auto"]) == 2 and answers["auto"] == answers["eager"]
    assert re.search(r"^\| \S+ \| 2 \| ", capsys.readouterr().out, re.M)  # the task's row of the table: 2 items


def test_text_moe_checkpoint_keeps_per_expert_keys(tmp_path):
    model, tokenizer = load_model(resolve_model_path("tiny-moe"))
    model.save_pretrained(tmp_path, state_dict=D.full_state_dict(model, model))
    tokenizer.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "model.layers.1.mlp.experts.3.gate_proj.weight" in f.keys()
    loaded, _ = load_model(tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


# ----------------------------------------------------------------------------- memory plan
QWEN3_VL_30B_A3B = dict(  # config.json of Qwen/Qwen3-VL-30B-A3B-Instruct / -Thinking (the same shapes)
    tie_word_embeddings=False,
    text_config=dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                     num_experts_per_tok=8, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                     head_dim=128, vocab_size=151936, decoder_sparse_step=1),
    vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                       spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                       out_hidden_size=2048, deepstack_visual_indexes=[8, 16, 24]))
REWARD_MODELS = {"judge Qwen3-4B-Instruct-2507": 4_022_468_096, "encoder MedEmbed-large-v0.1": 335_141_888}


def test_parameter_counts_total_active_and_fsdp_units(vl):
    from medix_fast.model.footprint import parameter_counts

    model = vl[0]
    c = parameter_counts(model.config)
    assert c.total == sum(p.numel() for p in model.parameters())
    assert c.experts == sum(p.numel() for e in experts_of(model) for p in e.parameters())
    assert c.active == c.total - c.experts // 2  # 2 of 4 experts run per token
    assert c.units == tuple(sum(p.numel() for p in u.parameters()) for u in D.shard_units(model))
    assert len(c.units) == 4 and c.root == c.total - sum(c.units)  # 2 vision blocks, 2 decoder layers
    dense = parameter_counts(load_model(resolve_model_path("tiny-vl"))[0].config)
    assert dense.experts == 0 and dense.active == dense.total


def test_30b_update_plan_fits_8_h100_and_names_the_fix():
    """The shipped 30B config on Qwen3-VL-30B-A3B's shapes: 31.1 B parameters, 3.9 B active; with
    AdamW's states offloaded (as shipped) the update and the old log-probs (FSDP forwards, one unit
    gathered at a time) fit 90 % of one of 8 80 GB GPUs, with them on the GPU they do not; without
    activation checkpointing the update does not fit and the verdict says what to change."""
    from transformers import AutoConfig

    from medix_fast.config import load_config
    from medix_fast.model.footprint import routing_ids_bytes, update_plan

    path = Path(__file__).parents[1] / "configs" / "medix_r1_30b_a3b_dapo.yaml"
    cfg = load_config(path)
    assert (cfg.model.router_aux_loss_coef, cfg.model.train_router, cfg.model.gradient_checkpointing) == (0.0, True, True)
    assert (cfg.data.max_prompt_length, cfg.sampling.max_new_tokens, cfg.sampling.group_size) == (4352, 4096, 5)
    assert (cfg.data.min_pixels, cfg.data.max_pixels, cfg.distributed.strategy) == (262144, 4194304, "fsdp")
    model_config = AutoConfig.for_model("qwen3_vl_moe", **QWEN3_VL_30B_A3B)
    plan = update_plan(cfg, model_config, int(80e9), 8, REWARD_MODELS)
    assert plan.counts.total == pytest.approx(31.07e9, rel=1e-3) and plan.counts.active == pytest.approx(3.89e9, rel=1e-2)
    assert plan.resident["fp32 master shards"] == 4 * plan.counts.total // 8 and cfg.optim.offload == "optimizer"
    assert plan.update["fp32 gradient shards"] == 4 * plan.counts.total // 8
    assert plan.logprobs["root unit bf16"] == 2 * plan.counts.root
    assert plan.logprobs["two largest units bf16 (one prefetched)"] == 2 * sum(sorted(plan.counts.units)[-2:])
    assert plan.fits and plan.logprobs_bytes < plan.update_bytes < 0.9 * 80e9
    assert "verdict" in plan.table() and "3.89 B active" in plan.table()
    assert not update_plan(load_config(path, ["optim.offload=none"]), model_config, int(80e9), 8, REWARD_MODELS).fits
    eager = update_plan(load_config(path, ["model.gradient_checkpointing=false"]), model_config, int(141e9), 8,
                        REWARD_MODELS)
    assert not eager.fits and "model.gradient_checkpointing" in eager.table()
    offloaded = update_plan(load_config(path, ["rewards.offload=true"]), model_config, int(141e9), 8, REWARD_MODELS)
    assert plan.update_bytes - offloaded.update_bytes == 2 * sum(REWARD_MODELS.values())
    # routing replay's ids: 64 groups x (4352 + 5 x 4096) tokens x 48 layers x 8 experts x 1 byte per GPU
    assert routing_ids_bytes(cfg, model_config, 8) == 64 * 5 * (4352 + 4096) * 48 * 8 == 1_038_090_240
    assert routing_ids_bytes(cfg, AutoConfig.for_model("qwen3", num_hidden_layers=2), 8) == 0


# ----------------------------------------------------------------------------- two ranks
def test_two_fsdp_ranks_equal_one_process(two_ranks):
    """Each of two gloo ranks updates on its half of 4 image groups under FSDP2 (experts and vision
    blocks sharded, load-balancing loss on, a group per micro-batch: moe_dist_worker.run); the gathered
    weights equal one process on all four."""
    saved = torch.load(two_ranks.folder("moe") / "fsdp_moe.pt", weights_only=False)
    model, tokenizer = load_model(resolve_model_path("tiny-vl-moe"))
    vision = Vision(load_image_processor(resolve_model_path("tiny-vl-moe")), model.config.image_token_id)
    objective = PolicyObjective(model, temperature=1.0, router_aux_coef=0.1)
    metrics = updater_for(objective, model, groups=4, micro_batch_tokens=150).update(
        image_sequences(model, tokenizer, vision, 4, seed=5))
    assert saved["metrics"]["loss"] == pytest.approx(metrics["loss"], rel=1e-5, abs=1e-6)
    assert saved["metrics"]["router_aux"] == pytest.approx(metrics["router_aux"], rel=1e-5)
    state = model.state_dict()
    assert saved["state"].keys() == state.keys()
    for key, value in state.items():
        torch.testing.assert_close(saved["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)
