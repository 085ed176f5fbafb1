"""medix_fast.integrations.trl.GRPOTrainer against TRL's own GRPOTrainer.

    python -m pytest -q tests/test_integrations_trl.py

One hand-built batch (left-padded prompts, right-padded completions of different lengths,
off-policy old log-probs so the ratio clips both ways) goes through the adapter's
``compute_loss`` and through ``trl.GRPOTrainer.compute_loss`` called on the same trainer and
model: loss, every parameter's gradient and the logged metrics must agree (fp32: 1e-5 relative).
Under bf16 autocast both are held against an fp64 computation (full logits, tests/reference.py):
the adapter's error must stay within twice TRL's own. Then a short ``trainer.train()``, and
every unsupported setting must raise. Random tiny models from configs; the embedded tiny
model's tokenizer.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
trl = pytest.importorskip("trl")  # CI installs both (the test extra); the GPU machine has neither
Dataset = pytest.importorskip("datasets").Dataset
from transformers import (CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM, PhiConfig,
                          PhiForCausalLM, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)
from trl import GRPOConfig

from medix_fast.demo import tiny
from medix_fast.integrations import trl as adapter
import reference

B, P, K = 4, 6, 7  # completions, prompt width, completion width
COMPLETION_LENGTHS = (7, 3, 5, 1)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.build_tokenizer(tiny.read_train_rows(), 512)


def qwen2(tokenizer, tied=True, seed=0):
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tied, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None))


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):
    """A saved tiny Qwen2: TRL builds its reference model from the policy's path when beta > 0."""
    path = tmp_path_factory.mktemp("tiny_qwen2")
    qwen2(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def length_reward(completions, **_):
    return [float(len(c)) / 10 for c in completions]


def config(tmp_path, **overrides) -> GRPOConfig:
    base = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], per_device_train_batch_size=B,
                num_generations=2, max_completion_length=8, disable_tqdm=True, logging_steps=1, seed=0,
                save_strategy="no", dataloader_num_workers=0)
    return GRPOConfig(**{**base, **overrides})


def make_trainer(tmp_path, model, tokenizer, cls=adapter.GRPOTrainer, extra=None, **overrides):
    dataset = Dataset.from_dict({"prompt": ["What is the imaging modality?", "Name the organ.",
                                            "Is this normal?", "Which sign?"] * 2})
    return cls(model=model, reward_funcs=length_reward, args=config(tmp_path, **overrides), train_dataset=dataset,
               processing_class=tokenizer, **(extra or {}))


def make_batch(trainer, seed=0, vocab=None, prompt_ids=None, ref_gap=None) -> dict:
    """A GRPO batch as TRL's ``_prepare_inputs`` hands it to ``compute_loss``; ``ref_gap``: the
    reference log-probs that many nats above the current ones instead of a small perturbation."""
    g = torch.Generator().manual_seed(seed)
    vocab = vocab or trainer.model.config.get_text_config().vocab_size
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[1, :2] = 0  # left padding
    prompt_mask[3, :4] = 0
    completion_mask = (torch.arange(K)[None, :] < torch.tensor(COMPLETION_LENGTHS)[:, None]).long()  # (B, K)
    inputs = {
        "prompt_ids": torch.randint(0, vocab, (B, P), generator=g) if prompt_ids is None else prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": torch.randint(0, vocab, (B, K), generator=g),
        "completion_mask": completion_mask,
        "advantages": torch.tensor([1.0, -0.7, 0.4, -1.3]),
        "num_items_in_batch": completion_mask.sum() * 2,  # the generation batch spans two steps
    }
    with torch.no_grad():  # TRL's own log-probs, perturbed: off-policy old and reference log-probs
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([prompt_mask, completion_mask], 1), K)
    inputs["old_per_token_logps"] = logps + 0.3 * torch.randn(B, K, generator=g)
    inputs["ref_per_token_logps"] = logps + 0.2 * torch.randn(B, K, generator=g) if ref_gap is None else logps + ref_gap
    return inputs


def loss_and_grads(compute_loss, trainer, inputs):
    """(loss, {name: grad}, {metric: value}) of one compute_loss call."""
    model = trainer.model
    model.zero_grad(set_to_none=True)
    for values in trainer._metrics.values():
        values.clear()
    loss = compute_loss(trainer, model, inputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    mode = "train" if model.training else "eval"
    metrics = {k: v[-1] for k, v in trainer._metrics[mode].items() if k != "step_time"}
    return loss.detach(), grads, metrics


def ours(trainer, model, inputs):
    return adapter.GRPOTrainer.compute_loss(trainer, model, inputs)


def theirs(trainer, model, inputs):
    return trl.GRPOTrainer.compute_loss(trainer, model, inputs)


def assert_same(a, b, rtol=1e-5):
    loss_a, grads_a, metrics_a = a
    loss_b, grads_b, metrics_b = b
    torch.testing.assert_close(loss_a, loss_b, rtol=rtol, atol=rtol * abs(loss_b.item()))
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name, grad in grads_b.items():
        torch.testing.assert_close(grads_a[name], grad, rtol=rtol, atol=rtol * grad.abs().max().item(), msg=name)
    clip = {f"clip_ratio/{side}_mean" for side in ("low", "high", "region")} | {"cispo_clip_ratio"}
    renamed = {}  # sequence level: TRL counts sequences, the adapter tokens, under another name
    if any(name.endswith("_token_mean") for name in metrics_a):
        renamed = {name.replace("_mean", "_token_mean").replace("ratio", "ratio_token_mean")
                   if name == "cispo_clip_ratio" else name.replace("_mean", "_token_mean"): name for name in clip}
    not_logged = {"clip_ratio/low_min", "clip_ratio/high_max", "vespo/phi_seq_mean"}
    if "policy_loss" not in metrics_a:  # logged but for top_entropy_quantile < 1
        not_logged.add("policy_loss")
    assert metrics_a.keys() - renamed.keys() == metrics_b.keys() - not_logged - set(renamed.values())
    for name in metrics_a.keys() & metrics_b.keys():
        assert metrics_a[name] == pytest.approx(metrics_b[name], rel=rtol, abs=1e-6), name


CASES = {  # GRPOConfig settings, gradient-accumulation steps of the step under test
    "dapo": (dict(loss_type="dapo", epsilon_high=0.28, gradient_accumulation_steps=2, steps_per_generation=4), 2),
    "dapo_on_policy": (dict(loss_type="dapo", beta=0.04, use_bias_correction_kl=False), 1),  # no old log-probs
    "dr_grpo_accum2": (dict(loss_type="dr_grpo", gradient_accumulation_steps=2), 2),
    "bnpo": (dict(loss_type="bnpo"), 1),
    "grpo_beta": (dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=False), 1),
    "gspo": (dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=0.02, epsilon_high=0.03), 1),
    "gspo_dapo": (dict(loss_type="dapo", importance_sampling_level="sequence", epsilon=0.05), 1),
    # TRL 1.16's other loss types and options
    "cispo": (dict(loss_type="cispo", epsilon_high=1.2, gradient_accumulation_steps=2, steps_per_generation=4), 2),
    "cispo_gspo": (dict(loss_type="cispo", importance_sampling_level="sequence", epsilon_high=1.05), 1),
    "sapo": (dict(loss_type="sapo", gradient_accumulation_steps=2), 2),
    "luspo_gspo": (dict(loss_type="luspo", importance_sampling_level="sequence", epsilon=0.02), 1),
    "vespo": (dict(loss_type="vespo", vespo_k_neg=2.5), 1),
    "delta": (dict(loss_type="grpo", delta=1.3), 1),
    "bias_correction_kl": (dict(loss_type="grpo", beta=0.04), 1),  # TRL's default use_bias_correction_kl=True
    "bias_correction_kl_gspo": (dict(loss_type="dapo", beta=0.04, importance_sampling_level="sequence", epsilon=0.02), 1),
    "entropy_bonus_dapo": (dict(loss_type="dapo", entropy_coef=0.1, gradient_accumulation_steps=2), 2),
    "entropy_bonus_bnpo": (dict(loss_type="bnpo", entropy_coef=0.1, gradient_accumulation_steps=2), 2),
    "top_entropy_quantile": (dict(loss_type="dapo", top_entropy_quantile=0.5, entropy_coef=0.05), 1),
    "off_policy_mask": (dict(loss_type="grpo", off_policy_mask_threshold=0.0), 1),
    "together": (dict(loss_type="cispo", epsilon_high=1.2, beta=0.04, off_policy_mask_threshold=0.0,
                      top_entropy_quantile=0.6, entropy_coef=0.05), 1),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_and_gradients_equal_trl(case, model_dir, tokenizer, tmp_path):
    overrides, accumulation = CASES[case]
    trainer = make_trainer(tmp_path, model_dir, tokenizer, **overrides)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = accumulation
    inputs = make_batch(trainer)
    if case.endswith("on_policy"):  # TRL's batch when the old policy is the current one: ratio 1
        del inputs["old_per_token_logps"]
    expected = loss_and_grads(theirs, trainer, inputs)
    got = loss_and_grads(ours, trainer, inputs)
    if "old_per_token_logps" in inputs and "clip_ratio/low_mean" in expected[2]:
        assert expected[2]["clip_ratio/low_mean"] > 0 and expected[2]["clip_ratio/high_mean"] > 0  # both clips ran
    if "cispo_clip_ratio" in expected[2] and overrides.get("importance_sampling_level") != "sequence":
        assert 0 < expected[2]["cispo_clip_ratio"] < 1  # the cap ran
    assert_same(got, expected)


def test_far_from_the_reference_equals_trl(model_dir, tokenizer, tmp_path):
    """The KL unclamped as TRL's: loss, logged KL and gradients equal at ref - logp from 0.5 to 5
    nats (veRL/EasyR1's clamp, kl_clamp=10, would cap the KL from ~2.6 nats and zero its gradient)."""
    for corrected in (False, True):  # TRL's default use_bias_correction_kl=True: the KL times the ratio
        trainer = make_trainer(tmp_path, model_dir, tokenizer, loss_type="grpo", beta=0.1,
                               use_bias_correction_kl=corrected)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        for gap in (0.5, 1.0, 2.5, 3.0, 5.0, -3.0):
            inputs = make_batch(trainer, ref_gap=gap)
            expected = loss_and_grads(theirs, trainer, inputs)
            assert_same(loss_and_grads(ours, trainer, inputs), expected)
            d = torch.tensor(gap, dtype=torch.float64)
            if not corrected:
                assert expected[2]["kl"] == pytest.approx((d.exp() - d - 1).item(), rel=1e-5)  # k3, unclamped


def test_eval_mode_tool_mask_and_vllm_ratio_equal_trl(tokenizer, tmp_path):
    """Eval normaliser (no accumulation), tool-result tokens masked out, vLLM's per-token and
    per-sequence importance-sampling ratios (set on the trainer: vLLM itself is not installed)."""
    trainer = make_trainer(tmp_path, qwen2(tokenizer), tokenizer, loss_type="dapo", gradient_accumulation_steps=2)
    trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, True
    inputs = make_batch(trainer, seed=1)
    inputs["tool_mask"] = torch.ones(B, K, dtype=torch.long)
    inputs["tool_mask"][0, 2:4] = 0
    g = torch.Generator().manual_seed(2)
    for ratio in (2 * torch.rand(B, K, generator=g), 2 * torch.rand(B, 1, generator=g)):
        inputs["importance_sampling_ratio"] = ratio
        for training in (True, False):
            trainer.model.train(training)
            trainer.current_gradient_accumulation_steps = 2
            assert_same(loss_and_grads(ours, trainer, inputs), loss_and_grads(theirs, trainer, inputs))


@pytest.mark.parametrize("kind", ["untied", "bias", "logit_scale"])
def test_heads_equal_trl(kind, tokenizer, tmp_path):
    """Untied and biased LM heads, a logit scale (Cohere)."""
    torch.manual_seed(0)
    common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    overrides = {}
    if kind == "bias":
        model = PhiForCausalLM(PhiConfig(**common))
        torch.nn.init.normal_(model.lm_head.bias, std=0.5)
    elif kind == "logit_scale":
        model = CohereForCausalLM(CohereConfig(**common, logit_scale=0.37, tie_word_embeddings=True))
    else:
        model = qwen2(tokenizer, tied=kind != "untied")
    trainer = make_trainer(tmp_path, model, tokenizer, loss_type="bnpo", temperature=0.7)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs = make_batch(trainer)
    assert_same(loss_and_grads(ours, trainer, inputs), loss_and_grads(theirs, trainer, inputs))


def test_cast_lm_head_to_fp32_equals_trl(tokenizer, tmp_path):
    """A bf16 model with TRL's ``cast_lm_head_to_fp32``: bf16 hidden states, an fp32 head. The
    head's inputs are the same for both, so the loss agrees to fp32 precision (the bf16 backbone's
    gradients to a bf16 ulp)."""
    trainer = make_trainer(tmp_path, qwen2(tokenizer).to(torch.bfloat16), tokenizer, bf16=True,
                           cast_lm_head_to_fp32=True, loss_type="bnpo")
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    head = trainer.model.lm_head.weight
    assert head.dtype == torch.float32
    with torch.no_grad():  # as after fp32 optimizer steps: no longer bf16-representable
        head.add_(1e-3 * torch.randn(head.shape, generator=torch.Generator().manual_seed(0)))
    inputs = make_batch(trainer)
    got, expected = loss_and_grads(ours, trainer, inputs), loss_and_grads(theirs, trainer, inputs)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=0)
    for name, grad in expected[1].items():
        torch.testing.assert_close(got[1][name].float(), grad.float(), rtol=2e-2, atol=2e-2 * grad.abs().max().item())


def test_peft_lora_equals_trl(tokenizer, tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    trainer = make_trainer(tmp_path, qwen2(tokenizer), tokenizer, loss_type="dapo", extra={"peft_config": config})
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs = make_batch(trainer)
    got, expected = loss_and_grads(ours, trainer, inputs), loss_and_grads(theirs, trainer, inputs)
    assert expected[1] and all("lora_" in name for name in expected[1])
    assert_same(got, expected)


def test_vlm_inputs_equal_trl(tokenizer, tmp_path):
    """A random tiny Qwen2.5-VL: pixel values and grid sizes reach the backbone, as in TRL's loss."""
    torch.manual_seed(0)
    image_token = len(tokenizer) - 1  # any id works as the placeholder in a random model
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, rope_parameters={"rope_type": "default",
                "mrope_section": [2, 1, 1], "rope_theta": 10000.0}, pad_token_id=tokenizer.pad_token_id)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[0])
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                                                                image_token_id=image_token))
    trainer = make_trainer(tmp_path, model, tokenizer, loss_type="bnpo")
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    prompt_ids = torch.randint(0, image_token, (B, P), generator=torch.Generator().manual_seed(3))
    prompt_ids[:, -2:] = image_token  # 2 image tokens per prompt: a 2x4 patch grid merged 2x2
    inputs = make_batch(trainer, vocab=image_token, prompt_ids=prompt_ids)
    inputs["image_grid_thw"] = torch.tensor([[1, 2, 4]] * B)
    inputs["pixel_values"] = torch.randn(B * 8, 3 * 2 * 14 * 14)
    inputs["num_images"] = [1] * B
    got, expected = loss_and_grads(ours, trainer, inputs), loss_and_grads(theirs, trainer, inputs)
    assert any("visual" in name for name in expected[1])  # the vision tower is in the graph
    assert_same(got, expected)


def reference_loss(model, inputs, **opts):
    """fp64: full logits from the model's own forward, TRL's min() loss (tests/reference.py)."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -K - 1:-1].double()  # (B, K, V)
    logp = torch.log_softmax(logits, -1).gather(-1, inputs["completion_ids"][..., None]).squeeze(-1)
    return reference.policy_loss(logp, inputs["old_per_token_logps"], inputs["advantages"],
                                 inputs["completion_mask"], **opts)[0]


def test_bf16_autocast_within_twice_trl_error(tokenizer, tmp_path):
    """TRL's default bf16=True: the backbone under bf16 autocast, for TRL and for the adapter."""
    trainer = make_trainer(tmp_path, qwen2(tokenizer), tokenizer, bf16=True, loss_type="dapo", epsilon_high=0.28)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs = make_batch(trainer)
    inputs["num_items_in_batch"] = inputs["completion_mask"].sum()
    model64 = Qwen2ForCausalLM(trainer.model.config).double()
    model64.load_state_dict(trainer.model.state_dict())
    exact = reference_loss(model64, inputs, loss_type="dapo", epsilon_low=0.2, epsilon_high=0.28,
                           num_items_in_batch=inputs["completion_mask"].sum().item())
    exact.backward()
    exact_grads = {n: p.grad for n, p in model64.named_parameters()}

    def errors(result):
        loss, grads, _ = result
        grad_err = torch.cat([(grads[n].double() - g).flatten() for n, g in exact_grads.items()]).norm()
        return abs(loss.double() - exact).item(), grad_err.item()

    trl_loss_err, trl_grad_err = errors(loss_and_grads(theirs, trainer, inputs))
    our_loss_err, our_grad_err = errors(loss_and_grads(ours, trainer, inputs))
    assert trl_grad_err > 1e-4  # bf16 really ran
    assert 0.1 * trl_grad_err < our_grad_err <= 2 * trl_grad_err  # bf16 too (autocast honoured), no worse
    assert our_loss_err <= 2 * trl_loss_err + 1e-6 * abs(exact.item())


def test_train_runs_with_the_fused_loss(tokenizer, tmp_path, monkeypatch):
    """A few optimizer steps of TRL's own loop (generation, rewards, bf16 autocast) on the adapter."""
    calls = []
    fused = adapter.fused_linear_policy_loss
    monkeypatch.setattr(adapter, "fused_linear_policy_loss", lambda *a, **k: calls.append(1) or fused(*a, **k))
    model = qwen2(tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = make_trainer(tmp_path, model, tokenizer, bf16=True, max_steps=2, per_device_train_batch_size=4,
                           max_completion_length=6, learning_rate=1e-2, loss_type="dapo", extra={"clip_ratio_c": 3.0})
    trainer.train()
    assert len(calls) == 2
    logged = [h for h in trainer.state.log_history if "clip_ratio/region_mean" in h]
    assert logged and all(h["entropy"] > 0 for h in logged)
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_forward_hooks_of_the_wrapper_fire(tokenizer, tmp_path):
    """The loss runs inside the model's forward (what DDP/FSDP/ZeRO-3 hooks need)."""
    trainer = make_trainer(tmp_path, qwen2(tokenizer), tokenizer)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs = make_batch(trainer)
    seen = []
    handle = trainer.model.register_forward_pre_hook(lambda *_: seen.append(1))
    try:
        ours(trainer, trainer.model, inputs)
    finally:
        handle.remove()
    assert seen == [1]


def test_adaptive_entropy_controller_equals_trl(tokenizer, tmp_path):
    """use_adaptive_entropy: the coefficient applied while the window's entropy is below target,
    and its update at the optimizer step, as TRL's (the controller state compared after each)."""
    trainer = make_trainer(tmp_path, qwen2(tokenizer), tokenizer, loss_type="bnpo", use_adaptive_entropy=True,
                           entropy_coef=0.2, entropy_target=100.0, entropy_coef_delta=0.05)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs = make_batch(trainer)
    names = ("entropy_coef", "_last_world_entropy", "_entropy_window_stats")
    for step in range(3):  # the first applies no bonus (no entropy measured yet), the next ones do
        state = {n: getattr(trainer, n) for n in names}
        expected = loss_and_grads(theirs, trainer, inputs)
        after = {n: getattr(trainer, n) for n in names}
        for n, v in state.items():
            setattr(trainer, n, v)
        assert_same(loss_and_grads(ours, trainer, inputs), expected)
        assert {n: getattr(trainer, n) for n in names} == pytest.approx(after) and after["_last_world_entropy"] < 100
        assert expected[2]["entropy_coef"] == pytest.approx(0.2 + 0.05 * (step + 1))


def test_moe_router_loss_equals_trl(tokenizer, tmp_path):
    """A tiny Qwen3-MoE with router_aux_loss_coef: the load-balancing loss joins the loss (/ the
    accumulation steps) and is logged as aux_loss, as TRL's."""
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        router_aux_loss_coef=0.3, output_router_logits=True, pad_token_id=tokenizer.pad_token_id))
    trainer = make_trainer(tmp_path, model, tokenizer, loss_type="grpo", gradient_accumulation_steps=2)
    assert trainer.aux_loss_enabled
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2
    inputs = make_batch(trainer)
    got, expected = loss_and_grads(ours, trainer, inputs), loss_and_grads(theirs, trainer, inputs)
    assert expected[2]["aux_loss"] > 0 and any("gate" in name for name in expected[1])
    assert_same(got, expected)


UNSUPPORTED = {
    "top_entropy_quantile": (dict(top_entropy_quantile=0.2, use_adaptive_entropy=True), 1),
    "vespo": (dict(loss_type="vespo", use_vllm=True, vllm_importance_sampling_correction=True), 1),
    "processes": (dict(top_entropy_quantile=0.2), 2),
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_options_raise_by_name(name, tokenizer, tmp_path):
    overrides, processes = UNSUPPORTED[name]
    args = config(tmp_path, **{k: v for k, v in overrides.items() if k != "use_vllm"})
    for k, v in overrides.items():
        setattr(args, k, v)  # use_vllm without vLLM installed: set after GRPOConfig's own checks
    problems = adapter.unsupported_options(args, processes)
    assert any(name in p for p in problems), problems
    assert adapter.unsupported_options(config(tmp_path), processes) == []
    if processes == 1 and name != "vespo":
        with pytest.raises(ValueError, match=name):
            make_trainer(tmp_path, qwen2(tokenizer), tokenizer, **overrides)


@pytest.mark.parametrize("scale", [None, 0.37], ids=["gemma2", "gemma2_logit_scale"])
def test_final_logit_softcapping_equals_trl(scale, tokenizer, tmp_path):
    """A tiny Gemma-2 whose logits reach well past its cap (the tied embedding scaled up; cap 2):
    TRL's head computes c tanh(s z / c) / T, the adapter the kernels' softcap c / s at temperature
    T / s. With a logit scale s (a config attribute TRL's head reads, as for Muse Glimmer) too."""
    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, final_logit_softcapping=2.0, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **({} if scale is None else {"logit_scale": scale})))
    with torch.no_grad():
        gemma.get_output_embeddings().weight.mul_(150)  # raw logits of several times the cap
    gemma.save_pretrained(tmp_path / "gemma2")  # beta > 0: TRL loads its reference model from a path
    trainer = make_trainer(tmp_path, str(tmp_path / "gemma2"), tokenizer, loss_type="dapo", beta=0.04,
                           entropy_coef=0.05, temperature=0.7)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs = make_batch(trainer)
    with torch.no_grad():
        backbone = trainer.model.model(input_ids=inputs["prompt_ids"][:1]).last_hidden_state
        raw = trainer.model.lm_head(backbone) * (scale or 1.0)
    assert raw.abs().max() > 5 * 2.0  # the cap acts
    assert_same(loss_and_grads(ours, trainer, inputs), loss_and_grads(theirs, trainer, inputs))


def test_unsupported_models_raise_by_name(tokenizer, tmp_path):
    peft = pytest.importorskip("peft")
    prefix = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    with pytest.raises(ValueError, match="prompt-learning"):
        make_trainer(tmp_path, qwen2(tokenizer), tokenizer, extra={"peft_config": prefix})
    with pytest.raises(ValueError, match="clip_ratio_c"):
        make_trainer(tmp_path, qwen2(tokenizer), tokenizer, extra={"clip_ratio_c": 0.5})


def test_unsupported_trl_version_refused_at_import(monkeypatch):
    assert trl.__version__ in adapter.SUPPORTED_TRL
    monkeypatch.setattr(trl, "__version__", "1.0.0")
    spec = importlib.util.spec_from_file_location("adapter_copy", adapter.__file__)
    with pytest.raises(ImportError, match="supports trl"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
