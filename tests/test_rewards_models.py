"""The two reward models: the batched LLM judge against itself one prompt at a time, against
log P(YES) - log P(NO) of a plain unpadded forward, and rigged so that its verdict is known (a tiny
random Qwen3 with a byte-level tokenizer built here), and the batched sentence encoder against
``sentence_transformers`` pair by pair on the bundled all-MiniLM-L6-v2.

Run: pytest tests/test_rewards_models.py
"""
import json
import shutil

import pytest
import torch

from medix_fast.rewards import RewardConfig, build_reward
from medix_fast.rewards.judge import Judge, judge_prompt
from medix_fast.rewards.semantic import SentenceEncoder, default_model_path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)

PAIRS = [
    ("pneumonia", "Pneumonia"),
    ("lung carcinoma in the right upper lobe", "lung cancer"),
    ("left ventricular hypertrophy", "cardiomegaly"),
    ("a", "bb"),
    ("T1/T2 hyperintense lesion with a much longer description " * 3, "glioma"),
    ("diabetic retinopathy", "Diabetic retinopathy with macular edema"),
    ("fracture of the distal radius", "distal radius fracture"),
    ("benign", "malignant"),
    ("drusen", "age-related macular degeneration"),
]


@pytest.fixture(scope="module")
def tiny_judge(tmp_path_factory):
    """A random 2-layer Qwen3 and a byte-level tokenizer with a Qwen-style chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    path = tmp_path_factory.mktemp("judge")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        chat_template=CHAT_TEMPLATE)
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                         pad_token_id=tokenizer.pad_token_id)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # spread the logits so YES/NO margins are far from 0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_judge_batched_equals_one_prompt_at_a_time(tiny_judge):
    judge = Judge(tiny_judge)
    pred, gt = zip(*PAIRS)
    batched = judge.margin(list(pred), list(gt))
    single = torch.cat([judge.margin([p], [g]) for p, g in PAIRS])
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4)
    assert batched.abs().min() > 1e-3 and len(set(judge.verdict(list(pred), list(gt)).tolist())) == 2
    judge.max_batch_tokens = 400  # several length-sorted chunks give the same margins
    torch.testing.assert_close(judge.margin(list(pred), list(gt)), single, atol=1e-4, rtol=1e-4)


def test_judge_margin_is_log_p_yes_minus_log_p_no_of_a_plain_forward(tiny_judge):
    """Each pair alone, unpadded, through the plain HF forward: log P(YES) - log P(NO) of the first
    reply token, the first tokens of "YES" and "NO" found here."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_judge)
    model = AutoModelForCausalLM.from_pretrained(tiny_judge).eval()
    yes, no = tokenizer.encode("YES", add_special_tokens=False)[0], tokenizer.encode("NO", add_special_tokens=False)[0]
    expected = []
    for predicted, truth in PAIRS:
        messages = [{"role": "user", "content": judge_prompt(predicted, truth)}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, -1].double(), -1)
        expected.append(logp[yes] - logp[no])
    expected = torch.stack(expected).float()
    judge = Judge(tiny_judge)
    pred, gt = map(list, zip(*PAIRS))
    torch.testing.assert_close(judge.margin(pred, gt), expected, atol=1e-4, rtol=1e-4)
    assert judge.verdict(pred, gt).tolist() == (expected > 0).float().tolist()
    assert 0 < int((expected > 0).sum()) < len(PAIRS)  # both verdicts occur


@pytest.mark.parametrize("winner", ["YES", "NO"])
def test_rigged_judge_gives_its_known_verdict(tiny_judge, tmp_path, winner):
    """The tiny judge rigged so that one answer wins for every input: the attention and MLP outputs
    are zeroed, so the last position's hidden state is the normed embedding of the prompt's last
    token (the same for every pair), and the LM-head rows of Y and N point along it, winner first."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_judge)
    model = AutoModelForCausalLM.from_pretrained(tiny_judge)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        last = tokenizer("\n", add_special_tokens=False)["input_ids"][-1]  # the rendered prompt ends with it
        h = model.model(input_ids=torch.tensor([[last]])).last_hidden_state[0, -1]
        first = {w: tokenizer.encode(w, add_special_tokens=False)[0] for w in ("YES", "NO")}
        sign = {"YES": 1.0, "NO": -1.0}[winner]
        model.lm_head.weight[first["YES"]] = sign * 5 * h / h.norm()
        model.lm_head.weight[first["NO"]] = -sign * 5 * h / h.norm()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    judge = Judge(str(tmp_path))
    assert judge.render("x", "y").endswith("\n")
    pred, gt = map(list, zip(*PAIRS))
    margins = judge.margin(pred, gt)
    assert (margins * sign > 1.0).all(), margins
    assert judge.verdict(pred, gt).tolist() == [float(winner == "YES")] * len(PAIRS)


def test_judge_prompt_goes_through_chat_template_with_thinking_off(tiny_judge):
    judge = Judge(tiny_judge)
    text = judge.render("lung cancer", "lung carcinoma")
    assert text.startswith("<|im_start|>user\n" + judge_prompt("lung cancer", "lung carcinoma"))
    assert "Predicted:lung cancer\nGround Truth:lung carcinoma\n" in text
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert judge.tokenizer.decode([judge.yes]) == "Y" and judge.tokenizer.decode([judge.no]) == "N"


def test_accuracy_asks_the_judge_only_for_valid_non_exact_rows(tiny_judge):
    reward = build_reward(RewardConfig(judge_model=tiny_judge, weights={"accuracy": 1.0}))
    asked = []
    margin = reward.judge.margin
    reward.judge.margin = lambda p, g: asked.append((p, g)) or margin(p, g)
    responses = ["<answer>pneumonia</answer>", "<answer>lung cancer</answer>", "<answer>x</answer>",
                 "<answer>why?</answer>", "<answer>benign tumour</answer>"]
    solutions = ["<CT_SCAN> pneumonia", "<CT_SCAN> lung carcinoma", "<CT_SCAN> x", "<CT_SCAN> why",
                 "<CT_SCAN> malignant"]
    out = reward(responses, solutions)
    assert asked == [(["lung cancer", "benign tumour"], ["lung carcinoma", "malignant"])]
    expected = Judge(tiny_judge).verdict(["lung cancer", "benign tumour"], ["lung carcinoma", "malignant"])
    torch.testing.assert_close(out["accuracy"], torch.tensor([1.0, expected[0], 0.0, 0.0, expected[1]]))
    assert set(out) == {"accuracy", "overall"}


def test_reward_models_are_frozen_in_the_training_dtype(tiny_judge):
    reward = build_reward(RewardConfig(judge_model=tiny_judge), dtype=torch.bfloat16)
    for model in (reward.judge.model, reward.encoder.model):
        assert not model.training
        assert all(not p.requires_grad and p.dtype == torch.bfloat16 for p in model.parameters())
    out = reward(["<CT_SCAN><thinking>t</thinking><answer>lung cancer</answer>"], ["<CT_SCAN> lung carcinoma"])
    assert all(v.dtype == torch.float32 and v.shape == (1,) for v in out.values())


@pytest.fixture(scope="module")
def minilm():
    return default_model_path()


def st_pair_cosines(path, pairs):
    from sentence_transformers import SentenceTransformer, util

    model = SentenceTransformer(path, device="cpu")
    return torch.tensor([util.cos_sim(*model.encode([a, b], convert_to_tensor=True)).item() for a, b in pairs])


def test_semantic_cosine_matches_sentence_transformers_pair_by_pair(minilm):
    ours = SentenceEncoder(minilm).cosine([a for a, _ in PAIRS], [b for _, b in PAIRS])
    ref = st_pair_cosines(minilm, PAIRS)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=0)
    assert ref.min() < 0.8 < ref.max()  # the table straddles the threshold

    reward = build_reward(RewardConfig(weights={"semantic": 1.0}))
    out = reward([f"<answer>{a}</answer>" for a, _ in PAIRS], [f"<CT_SCAN> {b}" for _, b in PAIRS])
    expected = (ref >= 0.8).float()
    expected[3] = 0.0  # "a" is a one-character answer
    torch.testing.assert_close(out["semantic"], expected)


def test_semantic_reads_the_pooling_config(minilm, tmp_path):
    """A CLS-pooled copy of the folder (as MedEmbed-large is) gives sentence-transformers' cosines."""
    folder = tmp_path / "cls"
    shutil.copytree(minilm, folder)
    cfg = json.loads((folder / "1_Pooling" / "config.json").read_text())
    cfg.update(pooling_mode_cls_token=True, pooling_mode_mean_tokens=False)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(cfg))
    ours = SentenceEncoder(str(folder)).cosine([a for a, _ in PAIRS], [b for _, b in PAIRS])
    torch.testing.assert_close(ours, st_pair_cosines(str(folder), PAIRS), atol=2e-5, rtol=0)
    mean = SentenceEncoder(minilm).cosine([a for a, _ in PAIRS], [b for _, b in PAIRS])
    assert (ours - mean).abs().max() > 1e-2


def test_chunk_rows_keeps_similar_lengths_together_and_respects_the_cap():
    from medix_fast.rewards.batching import length_buckets

    assert length_buckets([90, 100, 95, 110], None) == [[0, 2, 1, 3]]  # one forward
    lengths = [90, 100, 95, 110, 3000, 5, 6]
    chunks = length_buckets(lengths, None)
    assert sorted(i for c in chunks for i in c) == list(range(7)) and [4] in chunks  # the outlier alone
    for c in length_buckets([10] * 10, 35):
        assert len(c) * 10 <= 35
