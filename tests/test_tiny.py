"""The embedded tiny model: tokenizer, chat template, determinism, cache, warm-started format.

Run: pytest tests/test_tiny.py   (builds the default tiny model into the user cache when missing: ~40 s)
"""
import pathlib
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from medix_fast.data.prompt import FORMAT_TAGS, MODALITY_TAGS, build_messages, split_solution
import medix_fast.demo.tiny as tiny_module
from medix_fast.demo.sample_data import look_alike
from medix_fast.demo.tiny import (TinyConfig, build_tiny, collate, common_prefix_len, encode_examples, read_train_rows,
                                  shared_prefix_loss, teacher_answers, warm_start, warm_start_response)
from medix_fast.demo.cache import ensure_tiny_model, recipe_digest

FORMAT = re.compile(r"(<[A-Z_]+>)<thinking>.+?</thinking><answer>(.+?)</answer>", re.S)


@pytest.fixture(scope="module")
def tiny():
    """The default build, from the user's cache (built there once, shared with the other tests)."""
    return ensure_tiny_model()


@pytest.fixture(scope="module")
def small_builds(tmp_path_factory):
    """Two builds with the same seed and one with another, 3 warm-start steps each."""
    cfg = TinyConfig(steps=3)
    return [build_tiny(tmp_path_factory.mktemp(f"b{i}"), seed=s, cfg=cfg) for i, s in enumerate((0, 0, 1))]


def test_cache_location_atomic_build_and_reuse(tmp_path, monkeypatch):
    builds = []

    def short_build(out, seed):  # the real builder, with fewer warm-start steps
        builds.append(pathlib.Path(out))
        return build_tiny(out, seed, TinyConfig(steps=2))

    monkeypatch.setattr(tiny_module, "build_tiny", short_build)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = ensure_tiny_model(seed=3)
    assert path == tmp_path / "medix_fast" / f"tiny-{recipe_digest()}-seed3"
    assert builds[0].parent == path.parent and builds[0] != path  # built beside it, then renamed
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp dir left behind
    assert ensure_tiny_model(seed=3) == path and len(builds) == 1
    assert ensure_tiny_model(seed=3, cache_dir=tmp_path / "elsewhere").parent == tmp_path / "elsewhere"
    AutoModelForCausalLM.from_pretrained(path)


def test_tags_are_single_tokens_and_round_trip(tiny):
    tok = AutoTokenizer.from_pretrained(tiny)
    for tag in (*FORMAT_TAGS, *MODALITY_TAGS, "<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(tok(tag, add_special_tokens=False).input_ids) == 1, tag
    text = "<OCT_SCAN><thinking>fluid at the fovea</thinking><answer>macular hole</answer>"
    ids = tok(text + "<|im_end|>", add_special_tokens=False).input_ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_chat_template(tiny):
    tok = AutoTokenizer.from_pretrained(tiny)
    messages = build_messages("A plain chest x-ray shows a pleural line.")
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == f"<|im_start|>user\n{messages[0]['content']}<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(messages, tokenize=False) == text.removesuffix("<|im_start|>assistant\n")
    image = tok.apply_chat_template(build_messages("Q?", has_image=True), tokenize=False)
    assert image == tok.apply_chat_template(build_messages("Q?"), tokenize=False)


def test_loads_with_auto_classes(tiny):
    model = AutoModelForCausalLM.from_pretrained(tiny)
    params = sum(p.numel() for p in model.parameters())
    assert model.config.model_type == "qwen2" and model.config.tie_word_embeddings
    assert 1_000_000 < params < 10_000_000
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_warm_started_model_writes_the_format(tiny):
    model, tok = AutoModelForCausalLM.from_pretrained(tiny), AutoTokenizer.from_pretrained(tiny)
    rows = read_train_rows()[:10]
    prompts = [tok.apply_chat_template(build_messages(r["problem"]), tokenize=False, add_generation_prompt=True)
               for r in rows]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=48, do_sample=False)
    texts = tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    matches = [FORMAT.fullmatch(t.strip()) for t in texts]
    assert sum(m is not None for m in matches) > len(rows) // 2, texts
    tags = {m.group(1) for m in matches if m}
    assert tags <= set(MODALITY_TAGS), tags
    # Not a constant output: the tag or the answer follows the question at least sometimes.
    right = sum(m is not None and m.group(2) == split_solution(r["solution"])[1] for m, r in zip(matches, rows))
    assert len({m.group(2) for m in matches if m}) > 1 and right >= 1, texts


def test_same_seed_same_checkpoint(small_builds):
    a, b, c = small_builds
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    wa, wb, wc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    assert any(not torch.equal(wa[name], wc[name]) for name in wa)


def test_shared_prefix_loss_equals_full_batch_loss(small_builds):
    tok = AutoTokenizer.from_pretrained(small_builds[0])
    model = AutoModelForCausalLM.from_pretrained(small_builds[0])
    examples = [(p, responses[0]) for p, responses in encode_examples(tok, read_train_rows()[:6])]
    prefix_len = common_prefix_len(examples)
    assert 50 < prefix_len < min(len(p) for p, _ in examples)
    full = model(**collate(examples, tok.pad_token_id)).loss
    shared = shared_prefix_loss(model, examples, prefix_len, tok.pad_token_id)
    torch.testing.assert_close(shared, full, rtol=1e-5, atol=1e-5)
    g_full = torch.autograd.grad(full, list(model.parameters()))
    g_shared = torch.autograd.grad(shared, list(model.parameters()))
    for a, b in zip(g_full, g_shared):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_unsure_teacher_draws_answers_by_its_probabilities(monkeypatch):
    """Each time an item is shown, its target answer is drawn afresh: right, look-alike, others."""
    rows = read_train_rows()[:40]
    solutions = [r["solution"] for r in rows]
    answers = [teacher_answers(s) for s in solutions]
    assert all(a == [split_solution(s)[1], look_alike(*split_solution(s))] and a[0] != a[1]
               for a, s in zip(answers, solutions))
    responses = [[f"{i}:{k}" for k in range(len(TinyConfig.teacher))] for i in range(len(rows))]
    shown = []

    def record(model, batch, prefix_len, pad_id):
        shown.extend(r for _, r in batch)
        return (model.weight * 0).sum()

    monkeypatch.setattr(tiny_module, "shared_prefix_loss", record)
    cfg = TinyConfig(steps=400, batch_size=10)
    warm_start(torch.nn.Linear(1, 1), [([1, 2], r) for r in responses], cfg, seed=0, pad_id=0)
    picks = torch.tensor([int(r.split(":")[1]) for r in shown])  # (4000,)
    freq = torch.bincount(picks, minlength=len(cfg.teacher)).double() / len(picks)
    torch.testing.assert_close(freq, torch.tensor(cfg.teacher, dtype=torch.float64), atol=0.03, rtol=0)
    assert sorted({int(r.split(":")[0]) for r in shown}) == list(range(len(rows)))  # every item shown
    right, alike = answers[0]
    target = warm_start_response(solutions[0], alike)  # the reasoning stays right; the answer wavers
    assert target.startswith(split_solution(solutions[0])[0])
    assert f"point to {right}, not {alike}.</thinking><answer>{alike}</answer>" in target
