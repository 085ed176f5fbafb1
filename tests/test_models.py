"""Model loading: tiny random Qwen2 / Qwen3 / Llama checkpoints saved to disk and loaded back.

Run: pytest tests/test_models.py
"""
import json
import subprocess
import sys
import types

import pytest
import torch
from transformers import GPT2Config, LlamaConfig, Qwen2Config, Qwen3Config

from medix_fast.demo.cache import resolve_model_path
from medix_fast.model.loading import SUPPORTED_MODEL_TYPES, attention_backend, load_model
from medix_fast.model.forward import hidden_states, lm_head
from medix_fast.demo.tiny import build_tokenizer, read_train_rows

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
CONFIGS = {
    "qwen2": lambda v: Qwen2Config(vocab_size=v, tie_word_embeddings=True, **SIZES),
    "qwen3": lambda v: Qwen3Config(vocab_size=v, head_dim=16, tie_word_embeddings=True, **SIZES),
    "llama": lambda v: LlamaConfig(vocab_size=v, tie_word_embeddings=False, mlp_bias=False, **SIZES),
}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(read_train_rows()[:64], vocab_size=400)


def save_random(arch, tokenizer, tmp_path_factory):
    """A random-weight model of ``arch`` with the tiny tokenizer, saved: (its folder, the model)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch](len(tokenizer)))
    path = tmp_path_factory.mktemp(arch)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tokenizer, tmp_path_factory):
    """A random-weight checkpoint of one architecture, with the tiny tokenizer, on disk."""
    return request.param, *save_random(request.param, tokenizer, tmp_path_factory)


def batch(tokenizer, texts):
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    tokenizer.padding_side = "right"
    return enc.input_ids, enc.attention_mask  # (B, T), (B, T)


def test_loads_each_architecture(checkpoint):
    arch, path, original = checkpoint
    model, tok = load_model(path)
    assert model.config.model_type == arch
    assert model.config._attn_implementation == "sdpa"
    assert next(model.parameters()).dtype == torch.float32
    assert tok.chat_template and tok.pad_token is not None
    for name, p in original.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], p, rtol=0, atol=0, msg=name)


def test_hidden_states_times_head_is_logits(checkpoint, tokenizer):
    _, path, _ = checkpoint
    model, _ = load_model(path)
    ids, mask = batch(tokenizer, ["<CT_SCAN><thinking>a", "An axial ct scan of a 40-year-old man shows"])
    h = hidden_states(model, ids, mask)  # (B, T, H)
    weight, bias = lm_head(model)  # (V, H)
    assert h.shape == (*ids.shape, model.config.hidden_size) and bias is None
    assert weight.shape == (len(tokenizer), model.config.hidden_size)
    assert (weight is model.get_input_embeddings().weight) == model.config.tie_word_embeddings
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
    torch.testing.assert_close(h @ weight.T, logits, rtol=1e-5, atol=1e-5)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(hidden_states(model, ids, mask, positions) @ weight.T, logits, rtol=1e-5, atol=1e-5)


def test_dtype_attention_and_checkpointing_options(checkpoint, tokenizer):
    _, path, _ = checkpoint
    model, _ = load_model(path, dtype=torch.bfloat16, attn_impl="eager", gradient_checkpointing=True)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    is_on = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"
    assert getattr(model, is_on)
    model.train()
    ids, mask = batch(tokenizer, ["<X_RAY> pneumothorax", "<SPECT> apex"])
    hidden_states(model, ids, mask).float().square().mean().backward()
    assert all(p.grad is not None for p in model.get_decoder().layers.parameters())


def test_tiny_means_the_cached_tiny_model(checkpoint, monkeypatch):
    _, path, _ = checkpoint
    monkeypatch.setattr("medix_fast.demo.cache.ensure_tiny_model", lambda: path)
    model, _ = load_model(resolve_model_path("tiny"))
    assert model.name_or_path == str(path)
    assert resolve_model_path(path) == path  # a directory is itself
    with pytest.raises(ValueError, match="'tiny' does not exist"):  # the model layer knows directories only
        load_model("tiny")


def test_missing_path(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path)


def test_unsupported_architecture(tmp_path, tokenizer):
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tokenizer)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'gpt2'.*" + ", ".join(SUPPORTED_MODEL_TYPES)):
        load_model(tmp_path)


def test_missing_tokenizer_and_chat_template(checkpoint, tmp_path):
    _, _, model = checkpoint
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no tokenizer"):
        load_model(tmp_path)
    build_tokenizer(read_train_rows()[:8], vocab_size=300).save_pretrained(tmp_path)
    cfg = tmp_path / "tokenizer_config.json"
    cfg.write_text(json.dumps({k: v for k, v in json.loads(cfg.read_text()).items() if k != "chat_template"}))
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="no chat template"):
        load_model(tmp_path)


def test_attention_backend(monkeypatch):
    assert attention_backend("cpu") == "sdpa"
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import fails
    assert attention_backend("cuda") == "sdpa"
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    assert attention_backend(torch.device("cuda", 0)) == "flash_attention_2"
    assert attention_backend("cpu") == "sdpa"


LIGER_CHECK = """
import json, sys
from transformers import AutoModelForCausalLM
from medix_fast.model.loading import apply_liger

def patches(path):
    model = AutoModelForCausalLM.from_pretrained(path)
    forward, decoder = type(model).forward, model.get_decoder()
    layer = decoder.layers[0]
    def seen():  # the final norm's, the first MLP's and the attention module's RoPE function
        rope = sys.modules[type(layer.self_attn).__module__].apply_rotary_pos_emb
        return [decoder.norm.forward.__qualname__, layer.mlp.forward.__qualname__,
                getattr(rope, "__name__", type(rope).__name__)]  # transformers' own may be a module
    before = seen()
    return {"before": before, "applied": apply_liger(model), "after": seen(),
            "loss kept": type(model).forward is forward and "forward" not in vars(model)}

print(json.dumps({path: patches(path) for path in sys.argv[1:]}))
"""
LIGER = ["LigerRMSNorm.forward", "LigerSwiGLUMLP.forward", "liger_rotary_pos_emb"]


@pytest.fixture(scope="module")
def liger_patches(tokenizer, tmp_path_factory):
    """Liger patches process-wide (and runs Triton on CUDA only): the patching, checked in a subprocess,
    one for every architecture (one start of torch, transformers and Liger); arch -> what it saw."""
    paths = {arch: str(save_random(arch, tokenizer, tmp_path_factory)[0]) for arch in sorted(CONFIGS)}
    done = subprocess.run([sys.executable, "-c", LIGER_CHECK, *paths.values()], capture_output=True, text=True,
                          cwd=paths["qwen2"], timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    return {arch: seen[path] for arch, path in paths.items()}


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_liger_patches_norm_mlp_rope_only(liger_patches, arch):
    seen = liger_patches[arch]
    # nothing of Liger before its own patch (an earlier architecture's patch leaked into it would hide a miss)
    assert seen["applied"] and not set(seen["before"]) & set(LIGER) and seen["after"] == LIGER, seen
    assert seen["loss kept"]  # no fused cross-entropy
