"""--protocol medix_r1: MediX-R1's published evaluation reproduced without its data or models.

Synthetic rows in each of the 17 datasets' public column layouts (JSONL, Parquet and a
``datasets.save_to_disk`` folder; SLAKE's image folder, MIMIC's URLs); questions checked
character for character against a construction written here per dataset; the judge's round
logic against canned replies; and end to end, the CLI on the tiny checkpoint with a tiny judge
rigged to reply known JSON (and malformed JSON), killed and resumed, its per-task scores equal
to an independent re-implementation of the kit (the judge asked one conversation at a time
through ``transformers``' ``generate``, the replies read and aggregated as the kit does).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from medix_fast.eval import main
from medix_fast.eval.medix_r1 import judge_phase, score_table
from medix_fast.eval.medix_r1_judge import REEVALUATE, judge_items, judge_prompt, parse_verdict
from medix_fast.eval.medix_r1_tasks import load_medix_r1_tasks
from medix_fast.eval.tasks import TaskError, load_tasks

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "eval" / "medix_r1.yaml"
ALL_TASKS = ["mmlu_clinical_knowledge", "mmlu_college_biology", "mmlu_college_medicine", "mmlu_medical_genetics",
             "mmlu_professional_medicine", "mmlu_anatomy", "medmcqa", "medqa", "usmle_sa", "pubmedqa",
             "mimic_cxr_report_summarization", "slake_vqa", "rad_vqa", "path_vqa", "pmc_vqa", "pmc_vqa_hard",
             "mimic_cxr_report_generation"]

# The rigged judge replies with one of these (one token each), chosen by the marker tokens in its
# prompt (the most frequent wins); "x" and "n" do not parse, "t" has a thinking block.
VERDICTS = {"0": '{"score": 0}', "1": '{"score": 1}', "3": '{"score": 3}', "5": '{"score": 5}',
            "x": '{"score": x}', "t": '<think>\n\n</think>\n\n{"score": 1}', "n": "I cannot tell."}
M = {k: f"⟦{k}⟧" for k in VERDICTS}  # marker tokens
# A reply that is in the conversation counts as a marker too: "1" for "0", "0" for "1" and "x",
# so verdicts can change from round to round (a single "1" marker: rounds 1, 1, 0).
REPLY_MARKS = {"1": "0", "0": "1", "x": "1"}


# ----------------------------------------------------------------------------- synthetic rows
def _mmlu(subject):
    return [{"question": f"Which {subject} fact holds?", "subject": subject,
             "choices": ["alpha", f"beta {M['1']}", "gamma", "delta"], "answer": 1},
            {"question": f"Pick the {subject} term.", "subject": subject,
             "choices": [f"one {M['0']}", "two", "three", "four"], "answer": 0}]


def synthetic_rows() -> dict[str, list[dict]]:
    """Rows per local copy, in the public layouts (tasks.yaml columns plus a few others)."""
    mmlu = {n: _mmlu(n[5:]) for n in ALL_TASKS if n.startswith("mmlu_")}
    return {
        **mmlu,
        "medmcqa": [{"id": "m1", "question": "Drug of choice?", "opa": "aspirin", "opb": "heparin",
                     "opc": f"warfarin {M['x']}", "opd": "none", "cop": 2, "choice_type": "single",
                     "exp": None, "subject_name": "Pharmacology", "topic_name": None},
                    {"id": "m2", "question": "Nerve of the arm?", "opa": f"radial {M['1']}", "opb": "ulnar",
                     "opc": "median", "opd": "axillary", "cop": 0, "choice_type": "single", "exp": "x",
                     "subject_name": "Anatomy", "topic_name": "Arm"}],
        "medqa": [{"id": "q1", "sent1": "A 45-year-old man has chest pain.", "sent2": "", "ending0": "MI",
                   "ending1": f"PE {M['t']}", "ending2": "GERD", "ending3": "costochondritis", "label": 1}],
        "usmle_sa": [{"question": "Best next step?",
                      "options": {"A": "CT", "B": f"MRI {M['1']}", "C": "X-ray", "D": None, "E": None, "F": None,
                                  "G": None, "H": None, "I": None},
                      "answer": f"MRI {M['1']}", "answer_idx": "B"},
                     {"question": "Most likely cause?",
                      "options": {"A": "virus", "B": None, "C": f"bacteria {M['n']}", "D": None, "E": None,
                                  "F": None, "G": None, "H": None, "I": None},
                      "answer": f"bacteria {M['n']}", "answer_idx": "C"}],
        "pubmedqa": [{"QUESTION": "Does statin use lower risk?", "CONTEXTS": ["Context one.", "Context two."],
                      "LABELS": ["BACKGROUND", "RESULTS"], "MESHES": ["Humans"], "final_decision": "yes",
                      "LONG_ANSWER": f"Statins lower the risk. {M['1']}"},
                     {"QUESTION": "Is it harmful?", "CONTEXTS": ["Only context."], "LABELS": ["RESULTS"],
                      "MESHES": [], "final_decision": "maybe", "LONG_ANSWER": f"Unclear. {M['0']}"}],
        "mimic_cxr": [{"image": "https://physionet.org/files/mimic-cxr-jpg/2.0.0/files/p10/s1/cxr_a.jpg",
                       "report": f"Findings: clear lungs. {M['3']} {M['3']}", "summary": f"Normal chest. {M['5']}"},
                      {"image": "https://physionet.org/files/mimic-cxr-jpg/2.0.0/files/p10/s2/cxr_b.jpg",
                       "report": f"Findings: effusion. {M['1']}", "summary": f"Effusion. {M['x']} {M['x']}"}],
        "slake": [{"img_name": "xmlab1/source.jpg", "question": "Which organ is abnormal?",
                   "answer": f"Liver {M['1']}", "q_lang": "en", "qid": 1, "location": "Abdomen", "modality": "CT",
                   "answer_type": "OPEN", "base_type": "vqa", "content_type": "Organ", "triple": []},
                  {"img_name": "xmlab1/source.jpg", "question": "哪个器官不正常?", "answer": "肝脏",
                   "q_lang": "zh", "qid": 2, "location": "Abdomen", "modality": "CT", "answer_type": "OPEN",
                   "base_type": "vqa", "content_type": "Organ", "triple": []},
                  {"img_name": "xmlab2/source.jpg", "question": "Is this an MRI?", "answer": f"No {M['0']}",
                   "q_lang": "en", "qid": 3, "location": "Brain", "modality": "CT", "answer_type": "CLOSED",
                   "base_type": "vqa", "content_type": "Modality", "triple": []}],
        "rad_vqa": [{"image": "img/rad0.png", "question": "is there a fracture?", "answer": f"yes {M['1']}"},
                    {"image": "img/rad1.png", "question": "where is the mass?", "answer": f"left lung {M['0']}"}],
        "path_vqa": [{"image": "img/path0.png", "question": "what is present?", "answer": f"necrosis {M['t']}"}],
        "pmc_vqa": [{"image": "img/pmc0.png", "question": "What does the arrow show?",
                     "choices": ["A: cyst", f"B: tumour {M['1']}", "C: vessel", "D: bone"],
                     "answer": f"B: tumour {M['1']}"}],
        "pmc_vqa_hard": [{"image": "img/pmc1.png", "question": "Which stain was used?", "answer": f"H&E {M['0']}"}],
    }


def expected_items(rows: dict[str, list[dict]]) -> dict[str, list[tuple[str, str]]]:
    """(question, answer) per task, built here dataset by dataset from the kit's rules."""
    L = "ABCDEFGHIJ"

    def listed(options):
        return "".join(f"\n{L[i]}. {o}" for i, o in enumerate(options) if o is not None)

    out = {}
    for name in ALL_TASKS:
        if name.startswith("mmlu_"):
            out[name] = [(f"{r['question']}\n\nChoices:{listed(r['choices'])}", r["choices"][r["answer"]])
                         for r in rows[name]]
    opts = lambda r: [r["opa"], r["opb"], r["opc"], r["opd"]]  # noqa: E731
    out["medmcqa"] = [(f"{r['question']}\n\nChoices:{listed(opts(r))}", opts(r)[r["cop"]]) for r in rows["medmcqa"]]
    ends = lambda r: [r[f"ending{i}"] for i in range(4)]  # noqa: E731
    out["medqa"] = [(f"{r['sent1']}\n\nChoices:{listed(ends(r))}", ends(r)[r["label"]]) for r in rows["medqa"]]
    out["usmle_sa"] = [(f"{r['question']}\n\nChoices:{listed(list(r['options'].values()))}", r["answer"])
                       for r in rows["usmle_sa"]]
    out["pubmedqa"] = [(f"Contexts:\n{r['CONTEXTS'][0]}\n\nQuestion:\n{r['QUESTION']}\n\nChoices:\nA. True\nB. False"
                        f"\nC. maybe", f"{r['final_decision']}\n{r['LONG_ANSWER']}") for r in rows["pubmedqa"]]
    out["mimic_cxr_report_summarization"] = [
        (f"Write a short summary of the following report.\n\nReport:\n{r['report']}:", r["summary"])
        for r in rows["mimic_cxr"]]
    out["mimic_cxr_report_generation"] = [("Generate a detailed report based on the scan.", r["report"])
                                          for r in rows["mimic_cxr"]]
    out["slake_vqa"] = [(r["question"], r["answer"]) for r in rows["slake"] if r["q_lang"] == "en"]
    for name in ("rad_vqa", "path_vqa", "pmc_vqa_hard"):
        out[name] = [(r["question"], r["answer"]) for r in rows[name]]
    out["pmc_vqa"] = [(f"{r['question']}\n\nChoices:{listed(r['choices'])}", r["answer"]) for r in rows["pmc_vqa"]]
    return {k: [(q.strip(), a.strip()) for q, a in v] for k, v in out.items()}


def write_copies(root: Path) -> dict[str, list[dict]]:
    """The local copies: most as JSONL, medqa as Parquet, rad_vqa as a datasets folder (PIL images)."""
    from PIL import Image

    rows = synthetic_rows()
    (root / "img").mkdir(parents=True)
    for k, name in enumerate(["rad0", "rad1", "path0", "pmc0", "pmc1"]):
        Image.new("RGB", (20 + k, 16), (40 * k, 90, 200)).save(root / "img" / f"{name}.png")
    for d in ("xmlab1", "xmlab2"):
        (root / "slake" / "imgs" / d).mkdir(parents=True)
        Image.new("RGB", (24, 24), (10, 200, 30)).save(root / "slake" / "imgs" / d / "source.jpg")
    (root / "mimic_images").mkdir()
    for n in ("cxr_a", "cxr_b"):
        Image.new("L", (32, 28), 128).save(root / "mimic_images" / f"{n}.jpg")
    for name, table in rows.items():
        if name == "medqa":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(table), root / "medqa.parquet")
        elif name == "rad_vqa":
            import datasets

            data = [{**r, "image": Image.open(root / r["image"]).copy()} for r in table]
            datasets.Dataset.from_list(data, features=datasets.Features(
                {"image": datasets.Image(), "question": datasets.Value("string"),
                 "answer": datasets.Value("string")})).save_to_disk(str(root / "rad_vqa"))
        else:  # JSONL (any suffix but .parquet)
            lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in table)
            (root / ("slake_vqa" if name == "slake" else name)).write_text(lines)
    return rows


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    root = tmp_path_factory.mktemp("medix_r1_data")
    return root, write_copies(root)


def r1_yaml(tmp_path: Path, root: Path) -> Path:
    """The shipped YAML reading ``root``, medqa's copy as Parquet."""
    text = CONFIG.read_text().replace("file: medqa,", "file: medqa.parquet,")
    path = tmp_path / "medix_r1.yaml"
    path.write_text(text.replace("data_dir: data/medix_r1", f"data_dir: {root}"))
    return path


def test_questions_equal_the_kits_character_for_character(copies, tmp_path):
    root, rows = copies
    tasks = load_medix_r1_tasks(r1_yaml(tmp_path, root))
    assert [t.name for t in tasks] == ALL_TASKS
    expected = expected_items(rows)
    for t in tasks:
        assert [(it.question, it.answer) for it in t.items] == expected[t.name], t.name
        assert [it.id for it in t.items] == [f"{t.name}_{i}" for i in range(len(t.items))]
    by = {t.name: t for t in tasks}
    assert by["pubmedqa"].items[0].question.endswith("A. True\nB. False\nC. maybe")
    assert by["usmle_sa"].items[1].question.endswith("A. virus\nC. bacteria ⟦n⟧")  # None options keep letters
    assert [it.image is None for it in by["mimic_cxr_report_summarization"].items] == [True, True]
    for name in ("slake_vqa", "rad_vqa", "path_vqa", "pmc_vqa", "pmc_vqa_hard", "mimic_cxr_report_generation"):
        assert all(it.image.mode == "RGB" for it in by[name].items), name
    assert by["mimic_cxr_report_generation"].items[0].image.size == (32, 28)
    assert by["usmle_sa"].items[0].answer_idx == "B"
    only = load_medix_r1_tasks(r1_yaml(tmp_path, root), only=["vlm", "medqa"], limit=1)
    assert [t.name for t in only] == ["medqa"] + ALL_TASKS[11:] and all(len(t.items) == 1 for t in only)
    undecoded = load_medix_r1_tasks(r1_yaml(tmp_path, root), images=False)
    assert [(it.id, it.question) for t in undecoded for it in t.items] == [(it.id, it.question) for t in tasks
                                                                           for it in t.items]
    assert all(it.image is None for t in undecoded for it in t.items)


def test_bad_r1_tasks_name_the_task(copies, tmp_path):
    root, _ = copies
    with pytest.raises(TaskError, match="--protocol medix_r1"):
        load_tasks(CONFIG)
    with pytest.raises(TaskError, match="no local copy"):
        load_medix_r1_tasks(CONFIG, data_dir=tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"protocol: medix_r1\ndata_dir: {root}\ntasks:\n  - {{name: medqa, file: medqa.parquet, "
                   "question_column: sent1, answer_id: nope, choices_column: [ending0]}\n")
    with pytest.raises(TaskError, match=r"task .medqa.: .*medqa.parquet:1: cannot build the item"):
        load_medix_r1_tasks(bad)


# ----------------------------------------------------------------------------- judge rounds
def kit_parse(out: str):
    """The kit's reading of one reply (raises where it raises)."""
    if "</think>" in out:
        out = out.split("</think>")[-1].strip()
    elif "</thinking>" in out:
        out = out.split("</thinking>")[-1].strip()
    return json.loads(out[out.find("{"):out.rfind("}") + 1])["score"]


def kit_item_score(replies: list[str], mimic: bool):
    """The kit's aggregation, an unparseable round read as 0 (the documented difference)."""
    scores = []
    for r in replies:
        try:
            s = kit_parse(r)
        except (ValueError, KeyError, TypeError):
            s = 0
        scores.append(0 if mimic and not isinstance(s, (int, float)) else s)
    return sum(scores) / len(scores) if mimic else (1 if scores.count(1) >= 2 else 0)


@pytest.mark.parametrize("reply, rubric, expected", [
    ('{"score": 1}', False, 1), ('```json\n{\n"score": 0\n}\n```', False, 0),
    ('<think>\nhmm {"score": 0}\n</think>\n\n{"score": 1}', False, 1),
    ("<thinking>x</thinking> {'score': 1}", False, None),
    ('{"score": 1} and {"score": 0}', False, None), ("no json", False, None), ('{"grade": 1}', False, None),
    ('{"score": "1"}', False, "1"), ('{"score": 4}', True, 4), ('{"score": 2.5}', True, 2.5),
    ('{"score": "4"}', True, None), ("[1]", False, None)])
def test_parse_verdict_reads_like_the_kit(reply, rubric, expected):
    assert parse_verdict(reply, rubric) == expected


def test_rounds_share_one_conversation_and_vote(tmp_path):
    """Canned replies per (item, round): 2 of 3 ones score 1, the rubric averages, unparsed rounds count."""
    script = {"q0": ['{"score": 1}', '{"score": 0}', '{"score": 1}'],  # 2 of 3 -> 1
              "q1": ['{"score": 0}', '{"score": 1}', "garbage"],  # 1 of 3 -> 0, one unparsed
              "q2": ['{"score": 1}', '{"score": 1}', '{"score": 0}'],
              "q3": ['{"score": 4}', '{"score": 5}', "{bad}"],  # rubric: (4 + 5 + 0) / 3
              "q4": ['{"score": "1"}', '{"score": 1}', '{"score": 0}']}  # "1" is not 1 -> 0
    calls = []

    def chat(conversations):
        calls.append([list(c) for c in conversations])
        r = len(calls) - 1
        return [next(v[r] for q, v in script.items() if f"\n{q}\n" in c[0]["content"]) for c in conversations]

    qs = ["q0", "q1", "q2", "q3", "q4"]
    responses = ["<think>long</think> B", "B</thinking>final", "A", "report", "C"]
    verdicts = judge_items(chat, qs, ["ans"] * 5, responses, [False, False, False, True, False])
    assert len(calls) == 3 and all(len(c) == 5 for c in calls)  # one call per round for all items
    for r, conversations in enumerate(calls):
        for i, conv in enumerate(conversations):
            assert len(conv) == 2 * r + 1 and all(m["content"] == REEVALUATE for m in conv[2::2])
            assert [m["content"] for m in conv[1::2]] == script[qs[i]][:r]
    first = calls[0][0][0]["content"]
    assert first == judge_prompt("q0", "ans", "B", False)
    assert first.endswith("```json\n{\n\"score\": <score>\n}\n``` /no_think")
    assert "Predicted Answer:\nfinal\n" in calls[0][1][0]["content"]
    assert calls[0][3][0]["content"].startswith("You are a medical expert evaluating")
    assert [v["score"] for v in verdicts] == [1.0, 0.0, 1.0, 3.0, 0.0]
    assert [v["unparsed"] for v in verdicts] == [0, 1, 0, 1, 0]
    assert [v["score"] for v in verdicts] == [kit_item_score(script[q], q == "q3") for q in qs]


def test_score_table_layout():
    summary = {"tasks": {"a": {"n": 2, "accuracy": 0.5}, "bb": {"n": 1, "accuracy": 1.0}}}
    assert score_table(summary, "m") == ("Model: m\n\n    Task    Accuracy Accuracy (%)\n"
                                         "  0 a         0.5000       50.00%\n  1 bb        1.0000      100.00%\n"
                                         "  2 Overall   0.7500       75.00%\n")
    summary["tasks"]["bb"]["n"] = 0  # not judged yet: no overall
    assert score_table(summary, "m").splitlines()[-2:] == ["  1 bb           n/a          n/a",
                                                           "  2 Overall      n/a          n/a"]


# ----------------------------------------------------------------------------- the rigged judge
JUDGE_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def rigged_judge(tmp_path_factory):
    """A 1-layer Qwen3 whose reply is one verdict token then <|im_end|>: attention is uniform over
    the prompt (zero queries and keys) and only marker tokens have values, so the last position
    sees the markers' mean; the LM head prefers, after the final newline, the verdict of the
    most frequent marker, and after a verdict, <|im_end|>."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    path = tmp_path_factory.mktemp("rigged_judge")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    keys = list(VERDICTS)
    tok.add_tokens([AddedToken(VERDICTS[k], normalized=False) for k in keys] +
                   [AddedToken(M[k], normalized=False) for k in keys])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        chat_template=JUDGE_TEMPLATE)
    ids = lambda text: tokenizer.convert_tokens_to_ids(text)  # noqa: E731
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192,
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight  # dims 0-15: identity, 16-31: marker, 48-63: attention output
        emb.zero_()
        emb[:, 32:48] = torch.randn(emb.shape[0], 16)
        emb[newline] = 0
        emb[newline, 0] = 1
        for i, k in enumerate(keys):
            emb[ids(VERDICTS[k])] = 0
            emb[ids(VERDICTS[k]), 1 + i] = 1
            if k in REPLY_MARKS:
                emb[ids(VERDICTS[k]), 16 + keys.index(REPLY_MARKS[k])] = 1
            emb[ids(M[k])] = 0
            emb[ids(M[k]), 16 + i] = 1
        layer = model.model.layers[0]
        for w in (layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight,
                  layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight, model.lm_head.weight):
            w.zero_()
        for j in range(16):
            layer.self_attn.v_proj.weight[j, 16 + j] = 1  # kv head 0 carries the marker dims
            layer.self_attn.o_proj.weight[48 + j, j] = 1  # query head 0 writes them to dims 48-63
        for i, k in enumerate(keys):
            model.lm_head.weight[ids(VERDICTS[k]), 0] = 200
            model.lm_head.weight[ids(VERDICTS[k]), 48 + i] = 50
            model.lm_head.weight[tokenizer.eos_token_id, 1 + i] = 200
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def kit_judge(judge_dir: str, generations: list[dict], rubric: dict[str, bool]) -> dict[str, float]:
    """Per-task scores as the kit computes them, with the judge run one conversation at a time by
    ``transformers`` (greedy, 512 tokens, the chat template rendered like vLLM's server)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(judge_dir)
    model = AutoModelForCausalLM.from_pretrained(judge_dir).eval()
    totals: dict[str, list[float]] = {}
    for g in generations:
        mimic = "mimic" in g["id"]
        predicted = g["response"]
        if "</think>" in predicted:
            predicted = predicted.split("</think>")[-1].strip()
        elif "</thinking>" in predicted:
            predicted = predicted.split("</thinking>")[-1].strip()
        messages = [{"role": "user", "content": judge_prompt(g["question"], g["answer"], predicted, mimic)}]
        replies = []
        for _ in range(3):
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                out = model.generate(ids, do_sample=False, max_new_tokens=512, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id)
            reply = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            replies.append(reply)
            messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": REEVALUATE}]
        task = "_".join(g["id"].split("_")[:-1])
        score = kit_item_score(replies, mimic)
        totals.setdefault(task, []).append(score / 5 if mimic else float(score))
    return {task: sum(v) / len(v) for task, v in totals.items()}


def test_end_to_end_resumes_and_equals_the_kit(copies, rigged_judge, tmp_path, capsys):
    root, _ = copies
    tasks_yaml, out = r1_yaml(tmp_path, root), tmp_path / "out"
    args = ["--checkpoint", "tiny", "--tasks", str(tasks_yaml), "--protocol", "medix_r1", "--judge", rigged_judge,
            "--out", str(out), "--max-new-tokens", "6", "--batch-size", "8", "--judge-batch", "7"]
    # interrupted: generation done, the judge killed after its first chunk of 7 items
    assert main(args + ["--phase", "generate"]) == 0
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    n = sum(len(v) for v in expected_items(synthetic_rows()).values())
    assert len(generations) == n == 30 and {g["finish_reason"] for g in generations} <= {"stop", "length"}
    # generation as the kit's request: the question alone in a user turn, no system prompt, greedy
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medix_fast.demo.cache import resolve_model_path

    tiny = resolve_model_path("tiny")
    tokenizer, model = AutoTokenizer.from_pretrained(tiny), AutoModelForCausalLM.from_pretrained(tiny).eval()
    for g in generations[::10]:
        text = tokenizer.apply_chat_template([{"role": "user", "content": g["question"]}], tokenize=False,
                                             add_generation_prompt=True)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            new = model.generate(ids, do_sample=False, max_new_tokens=6)[0, ids.shape[1]:]
        assert g["response"] == tokenizer.decode(new, skip_special_tokens=True).strip() or \
            g["response"] == tokenizer.decode(new, skip_special_tokens=True), (g["id"], g["response"])
    import medix_fast.eval.medix_r1 as r1

    calls = []

    def killed(items, out_dir, chat, chunk, rubric):
        def dying(conversations):
            calls.append(len(conversations))
            if len(calls) == 4:
                raise KeyboardInterrupt("simulated kill")
            return chat(conversations)
        return judge_phase(items, out_dir, dying, chunk, rubric)

    r1.judge_phase, saved = killed, r1.judge_phase
    try:
        with pytest.raises(KeyboardInterrupt):
            main(args + ["--phase", "judge"])
    finally:
        r1.judge_phase = saved
    assert calls == [7, 7, 7, 7] and len((out / "judged.jsonl").read_text().splitlines()) == 7
    capsys.readouterr()
    assert main(args) == 0  # generate: nothing left; judge: the other 24; score
    printed = capsys.readouterr().out
    judged = [json.loads(line) for line in (out / "judged.jsonl").read_text().splitlines()]
    assert sorted(j["id"] for j in judged) == sorted(g["id"] for g in generations)
    summary = json.loads((out / "summary.json").read_text())
    rubric = {t: "mimic" in t for t in ALL_TASKS}
    expected = kit_judge(rigged_judge, generations, rubric)
    got = {t: v["accuracy"] for t, v in summary["tasks"].items()}
    assert list(got) == ALL_TASKS
    for task in ALL_TASKS:
        assert math.isclose(got[task], expected[task], abs_tol=1e-9), (task, got[task], expected[task])
    mean = sum(expected.values()) / len(expected)
    overall = (out / "score.txt").read_text().splitlines()[-1].split()
    assert overall[1:] == ["Overall", f"{mean:.4f}", f"{mean * 100:.2f}%"] and overall[-1] in printed
    # the rig gives every kind of verdict: ones, zeros, split rounds, rubric means, unparsed replies
    scores = [j["evaluation"]["score"] for j in judged]
    rounds = [tuple(j["evaluation"]["rounds"]) for j in judged]
    assert {0.0, 1.0} <= set(scores) and (1, 1, 0) in rounds and (0, 0, 1) in rounds
    assert any(0 < j["evaluation"]["score"] < 5 and j["evaluation"]["score"] % 1 for j in judged if "mimic" in j["id"])
    assert summary["unparsed_rounds"] >= 6 and "judge replies did not parse" in printed
    # a rerun only scores
    capsys.readouterr()
    assert main(args) == 0 and len((out / "judged.jsonl").read_text().splitlines()) == n


def test_vl_prompt_puts_the_image_first_and_no_system_turn(copies, tmp_path):
    from medix_fast.data.vision import Vision, image_size
    from medix_fast.demo.cache import resolve_model_path
    from medix_fast.eval.medix_r1 import candidate_prompt
    from medix_fast.model.loading import load_image_processor, load_model

    root, _ = copies
    model, tokenizer = load_model(resolve_model_path("tiny-vl"))
    vision = Vision(load_image_processor(resolve_model_path("tiny-vl")), model.config.image_token_id)
    item = load_medix_r1_tasks(r1_yaml(tmp_path, root), only=["rad_vqa"])[0].items[0]
    ids = candidate_prompt(tokenizer, item, vision)
    assert ids.count(vision.image_token_id) == vision.tokens(image_size(item.image)) > 0
    text = tokenizer.decode(ids)
    assert text.index("<|image_pad|>") < text.index(item.question) and "system" not in text
    assert text.endswith(item.question + "<|im_end|>\n<|im_start|>assistant\n")


def test_cli_errors_for_the_protocol(capsys):
    assert main(["--model", "tiny", "--protocol", "medix_r1", "--temperature", "0.7"]) == 2
    assert "greedy" in capsys.readouterr().err
    assert main(["--model", "tiny", "--phase", "judge"]) == 2
    assert "--protocol medix_r1" in capsys.readouterr().err
    assert main(["--model", "tiny", "--protocol", "medix_r1", "--judge", "/no/such/judge"]) == 2
    assert capsys.readouterr().err.startswith("error: --judge: model path '/no/such/judge' does not exist")


def test_in_training_equals_the_command_line_and_resumes(copies, rigged_judge, tmp_path, monkeypatch):
    """``eval.protocol: medix_r1`` with the reward's judge (the rigged one): a run stopped inside the
    judge phase of step 2's evaluation resumes at step 2's checkpoint (written for the evaluation:
    checkpoint.every is 0) and finishes that evaluation from its files (no item generated or judged
    twice); the logged per-task scores and the judged records equal what the printed ``python -m
    medix_fast.eval`` command gives for that checkpoint."""
    import shlex

    import yaml

    from medix_fast.config import load_config
    from medix_fast.export import main as export_main
    from medix_fast.eval.medix_r1_judge import ChatJudge
    from medix_fast.metrics import read_metrics
    from medix_fast.report import eval_command
    from medix_fast.train import main as train_main

    root, _ = copies
    keep = ("medmcqa", "usmle_sa", "pubmedqa", "mimic_cxr_report_summarization")  # 8 items, every kind of verdict
    tree = yaml.safe_load(r1_yaml(tmp_path, root).read_text())
    tree["tasks"] = [t for t in tree["tasks"] if t["name"] in keep]
    tasks = tmp_path / "r1_four.yaml"
    tasks.write_text(yaml.safe_dump(tree))
    out = tmp_path / "run"
    argv = ["train.steps=3", "checkpoint.every=0", "checkpoint.keep_last=2", "train.prompts_per_step=2",
            "train.mini_batch_prompts=2", "sampling.group_size=2", "sampling.max_new_tokens=8",
            "algorithm.chunk_prompts=2", "algorithm.max_tries=1", "eval.every=2", "eval.at_start=false",
            "eval.protocol=medix_r1", f"eval.tasks={tasks}", "eval.samples=0", "eval.judge_batch=3",
            f"rewards.judge_model={rigged_judge}", "logging.progress=false", "logging.plot=false",
            "logging.rollouts_every=0", f"train.output_dir={out}"]
    calls, chat = [], ChatJudge.__call__

    def stopped_on_the_fourth(self, conversations):  # after the first pass of 3 items x 3 rounds
        calls.append(len(conversations))
        if len(calls) == 4:
            raise KeyboardInterrupt
        return chat(self, conversations)

    monkeypatch.setattr(ChatJudge, "__call__", stopped_on_the_fourth)
    assert train_main(argv) == 130
    step = out / "eval" / "step_00000002"
    assert len((step / "generations.jsonl").read_text().splitlines()) == 8
    assert len((step / "judged.jsonl").read_text().splitlines()) == 3
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]  # the training rows
    calls.clear()
    monkeypatch.setattr(ChatJudge, "__call__", lambda self, c: calls.append(len(c)) or chat(self, c))
    assert train_main([*argv, "--resume"]) == 0
    assert calls == [3, 3, 3, 2, 2, 2]  # the 5 items left, nothing judged twice
    generated = [json.loads(line) for line in (step / "generations.jsonl").read_text().splitlines()]
    judged = {r["id"]: r for r in map(json.loads, (step / "judged.jsonl").read_text().splitlines())}
    assert len(generated) == len({g["id"] for g in generated}) == len(judged) == 8
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 2, 3] and "eval/mean_accuracy" not in rows[1]
    logged = rows[2]
    assert export_main(["--checkpoint", str(out / "checkpoints" / "step_00000002"), "--out", str(tmp_path / "hf")]) == 0
    command = eval_command(load_config(out / "config.yaml"), tmp_path / "hf")
    assert main([*shlex.split(command)[3:], "--out", str(tmp_path / "cli")]) == 0
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert list(summary["tasks"]) == list(keep)
    assert {k: v for k, v in logged.items() if k.startswith("eval/") and k.count("/") == 2} == \
        {f"eval/{t}/accuracy": summary["tasks"][t]["accuracy"] for t in keep}
    assert logged["eval/mean_accuracy"] == summary["macro"]["accuracy"] and logged["eval/unparsed"] > 0
    assert 0 < logged["eval/mean_accuracy"] < 1
    cli = {r["id"]: r for r in map(json.loads, (tmp_path / "cli" / "judged.jsonl").read_text().splitlines())}
    assert {i: (r["response"], r["evaluation"]) for i, r in cli.items()} == \
        {i: (r["response"], r["evaluation"]) for i, r in judged.items()}
    tables = [(d / "score.txt").read_text().splitlines()[1:] for d in (step, tmp_path / "cli")]
    assert tables[0] == tables[1]  # the kit's table, but for its "Model:" line


def test_the_evaluations_judge_is_the_rewards_else_loaded_and_released(rigged_judge):
    """The reward's judge is used as it is; without one, ``eval.judge_model`` is loaded for the
    evaluation and released after it."""
    import gc
    import weakref
    from contextlib import nullcontext
    from types import SimpleNamespace

    from medix_fast.distributed import DistInfo
    from medix_fast.eval.medix_r1_training import R1Evaluator
    from medix_fast.model.loading import load_model

    conversation = [[{"role": "user", "content": f"{M['1']}\n"}]]
    evaluator = R1Evaluator([], None, DistInfo(), None, 8, rigged_judge, 4, torch.float32, {"max_num_seqs": 4})
    without = SimpleNamespace(judge=None, cfg=SimpleNamespace(judge_model=None), placed=nullcontext)
    with evaluator._chat(without) as chat:
        assert chat(conversation) == [VERDICTS["1"]]
        loaded = weakref.ref(chat.sampler.model)
    del chat
    gc.collect()
    assert loaded() is None  # released
    model, tokenizer = load_model(rigged_judge)
    held = SimpleNamespace(judge=SimpleNamespace(model=model, tokenizer=tokenizer),
                           cfg=SimpleNamespace(judge_model=rigged_judge), placed=nullcontext)
    with evaluator._chat(held) as chat:
        assert chat.sampler.model is model and chat(conversation) == [VERDICTS["1"]]
