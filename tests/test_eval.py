"""python -m medix_fast.eval: accuracy table, letter extraction, resumable output, task errors, tiny smoke.

The table and resume tests inject a canned ``generate`` and a fake judge (a rule on the two
answers), so every score is known by hand; the smoke tests run the real CLI on the tiny model,
once in one process and once under torchrun with two gloo ranks (greedy: the same responses).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from medix_fast.eval import EvalSettings, Evaluator, Generation, main
from medix_fast.eval.results import ResumeError, markdown_table, read_records, to_metrics
from medix_fast.eval.scoring import Scorer, extract_choice, vote
from medix_fast.eval.tasks import TaskError, load_tasks
from medix_fast.rewards import RewardConfig, build_reward, medix_weights

W = medix_weights()  # accuracy 0.5175, semantic 0.3375, modality 0.045, format 0.1
OPTIONS = ["alpha", "beta", "gamma", "delta"]


def wrap(tag: str, answer: str) -> str:
    return f"{tag}<thinking>because</thinking><answer>{answer}</answer>"


# (row, canned response, expected accuracy)
OPEN = [
    ({"q": "Q-open-0", "a": "<X_RAY> pneumonia"}, wrap("<X_RAY>", "Pneumonia."), 1.0),  # judge says YES
    ({"q": "Q-open-1", "a": "<CT_SCAN> left lower lobe"}, wrap("<CT_SCAN>", "left lower lobe"), 1.0),  # exact
    ({"q": "Q-open-2", "a": "<X_RAY> fracture"}, wrap("<MRI_SCAN>", "sprain"), 0.0),  # judge says NO
    ({"q": "Q-open-3", "a": "<OTHER> yes"}, wrap("<OTHER>", "?"), 0.0),  # invalid answer: no judge
    ({"q": "Q-open-4", "a": "no tag here"}, "<answer>no tag here</answer>", 1.0),  # exact, task modality <OTHER>
]
MCQ = [
    ({"question": "Q-mc-0", "opts": OPTIONS, "answer": "B"}, wrap("<OTHER>", "(B)"), 1.0),
    ({"question": "Q-mc-1", "opts": OPTIONS, "answer": 2}, "The answer is C", 1.0),  # index 2 = C
    ({"question": "Q-mc-2", "opts": OPTIONS, "answer": "delta"}, wrap("<OTHER>", "A"), 0.0),  # gold D
    ({"question": "Q-mc-3", "opts": OPTIONS, "answer": "(a)"}, wrap("<OTHER>", "no idea"), 0.0),  # no letter
]
CANNED = {row.get("q", row.get("question")): response for row, response, _ in OPEN + MCQ}


class FakeJudge:
    """YES when the answers agree ignoring case; records what it was asked."""

    def __init__(self):
        self.asked = []

    def margin(self, predicted, ground_truth):
        import torch

        self.asked += list(zip(predicted, ground_truth))
        return torch.tensor([4.0 if p.lower() == g.lower() else -4.0 for p, g in zip(predicted, ground_truth)])


def canned_generate(calls: list | None = None, fail_on_call: int | None = None):
    def generate(items, prompt_ids, seed):
        if calls is not None:
            calls.append([(it.task, it.index) for it in items])
            if fail_on_call is not None and len(calls) == fail_on_call:
                raise KeyboardInterrupt("simulated kill")
        assert len(prompt_ids) == len(items) and all(prompt_ids)
        return [Generation(CANNED[it.question.split("\n")[0]], 7, "stop") for it in items]
    return generate


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    from medix_fast.model.loading import load_tokenizer
    from medix_fast.demo.cache import ensure_tiny_model

    return load_tokenizer(ensure_tiny_model())


@pytest.fixture(scope="module")
def reward_fn():
    weights = {k: v for k, v in W.items() if k != "semantic"}  # no encoder: every score known by hand
    return build_reward(RewardConfig(weights=weights))


@pytest.fixture
def tasks_yaml(tmp_path):
    write_jsonl(tmp_path / "open.jsonl", [r for r, _, _ in OPEN])
    write_jsonl(tmp_path / "mc.jsonl", [r for r, _, _ in MCQ])
    (tmp_path / "tasks.yaml").write_text(
        "tasks:\n"
        "  - {name: open_qa, file: open.jsonl, columns: {question: q, answer: a}}\n"
        "  - name: mcq\n    file: mc.jsonl\n    answer_type: multiple_choice\n"
        "    columns: {question: question, answer: answer, options: opts}\n"
        "    template: \"{question}\\nChoose one of {options}\"\n")
    return tmp_path / "tasks.yaml"


def test_accuracy_table_with_fake_judge(tasks_yaml, tokenizer, reward_fn, tmp_path):
    tasks = load_tasks(tasks_yaml)
    assert [t.name for t in tasks] == ["open_qa", "mcq"]
    assert tasks[1].items[0].question == "Q-mc-0\nChoose one of A. alpha\nB. beta\nC. gamma\nD. delta"
    assert [it.gold for it in tasks[1].items] == ["B", "C", "D", "A"]
    assert tasks[0].items[4].solution == "<OTHER> no tag here"
    judge = FakeJudge()
    evaluator = Evaluator(tasks, tokenizer, EvalSettings(batch_size=3))
    summary = evaluator.run(canned_generate(), Scorer(reward_fn, judge=judge), tmp_path / "out")

    # only the valid, non-exact open answers reach the judge; multiple choice never does
    assert sorted(judge.asked) == [("Pneumonia", "pneumonia"), ("sprain", "fracture")]
    records = {(r["task"], r["index"]): r for r in read_records(tmp_path / "out" / "generations.jsonl")}
    assert len(records) == len(OPEN) + len(MCQ)
    for task, rows in (("open_qa", OPEN), ("mcq", MCQ)):
        for i, (_, response, accuracy) in enumerate(rows):
            assert records[task, i]["response"] == response
            assert records[task, i]["scores"]["accuracy"] == accuracy, (task, i)
    assert [records["mcq", i]["choice"] for i in range(4)] == ["B", "C", "A", None]
    first = records["open_qa", 0]["scores"]  # right format, modality and answer: every weight but semantic
    assert first["format"] == first["modality"] == 1.0
    assert first["overall"] == pytest.approx(W["accuracy"] + W["modality"] + W["format"])
    wrong = records["open_qa", 2]["scores"]  # format only
    assert (wrong["modality"], wrong["overall"]) == (0.0, pytest.approx(W["format"]))
    assert records["mcq", 1]["scores"]["format"] == 0.0  # bare "The answer is C": accuracy without format

    assert summary["tasks"]["open_qa"]["accuracy"] == pytest.approx(3 / 5)
    assert summary["tasks"]["mcq"]["accuracy"] == pytest.approx(2 / 4)
    assert summary["macro"]["accuracy"] == pytest.approx((3 / 5 + 2 / 4) / 2)
    assert summary["micro"]["accuracy"] == pytest.approx(5 / 9)
    table = markdown_table(summary)
    assert table == (tmp_path / "out" / "summary.md").read_text()
    lines = table.splitlines()
    assert lines[0] == "| task | n | accuracy | format | modality | overall |"
    assert lines[2].startswith("| open_qa | 5 | 60.0 | 80.0 | 60.0 |")
    assert lines[3].startswith("| mcq | 4 | 50.0 | 75.0 | 75.0 |")
    assert lines[4].startswith("| **mean over tasks** | 9 | 55.0 |")
    assert lines[5].startswith("| **all items** | 9 | 55.6 |")
    micro = {f"eval/{k}": pytest.approx(summary["micro"][k]) for k in ("accuracy", "format", "modality", "overall")}
    assert to_metrics(summary) == {**micro, "eval/open_qa/accuracy": pytest.approx(0.6), "eval/mcq/accuracy": 0.5,
                                   "eval/mean_accuracy": pytest.approx(0.55)}
    assert micro["eval/format"] == 7 / 9 and micro["eval/accuracy"] == 5 / 9


@pytest.mark.parametrize("response, expected", [
    ("(B)", "B"), ("B.", "B"), ("b", "B"), ("Answer: b", "B"), ("answer: (c).", "C"),
    ("<answer>C) foo</answer>", "C"), ("<answer>(a) alpha</answer>", "A"), ("<answer>B. beta</answer>", "B"),
    ("The answer is D", "D"), ("the correct option is (C).", "C"), ("the answer is option b", "B"),
    ("Answer - C", "C"), ("<answer>**D**</answer>", "D"), ("<answer>[A]</answer>", "A"),
    ("<answer>I'd go with C</answer>", "C"), ("<answer> gamma </answer>", "C"), ("<answer>Delta.</answer>", "D"),
    ("<CT_SCAN><thinking>A and B are unlikely; D fits.</thinking><answer>D</answer>", "D"),
    ("<thinking>not A</thinking> So the answer is B.", "B"), ("Answer: A\nExplanation: B is wrong", "A"),
    # no letter, a hedge, or a letter that is not an option: wrong
    ("", None), ("I think it's a tough one", None), ("A 54-year-old man with fever", None),
    ("<answer>E</answer>", None), ("<answer>A or B</answer>", None), ("<answer>C and D</answer>", None),
    ("<answer>(A)/(B)</answer>", None), ("<answer>The answer is a pneumonia</answer>", None),
    ("<answer>The answer is</answer>", None), ("<answer>no idea</answer>", None),
])
def test_extract_choice(response, expected):
    assert extract_choice(response, "ABCD", dict(zip("ABCD", OPTIONS))) == expected


def test_extract_choice_letters_and_options():
    assert extract_choice("(E)", "ABCDE") == "E"
    assert extract_choice("<answer>vitamin A deficiency</answer>", "ABC",
                          {"A": "scurvy", "B": "vitamin A deficiency", "C": "rickets"}) == "B"
    assert extract_choice("<answer>gamma</answer>", "ABCD") is None  # option text needs the options


def test_vote():
    import torch

    margin = torch.tensor([3.0, -3.0, 0.2, -0.2])
    g = torch.Generator().manual_seed(0)
    assert vote(margin, 3, 0.0, g).tolist() == [1.0, 0.0, 1.0, 0.0]  # greedy: k identical asks
    big = torch.tensor([50.0, -50.0])
    assert vote(big, 3, 1.0, g).tolist() == [1.0, 0.0]
    p_yes = torch.sigmoid(torch.tensor(0.5))  # P(majority of 3) = p^3 + 3 p^2 (1 - p)
    votes = vote(torch.full((20000,), 0.5), 3, 1.0, g).mean()
    assert votes == pytest.approx(float(p_yes**3 + 3 * p_yes**2 * (1 - p_yes)), abs=0.015)


def test_a_tied_vote_is_no():
    """An even number of votes split evenly is not a majority: NO (the draws replayed with the same generator)."""
    import torch

    margin = torch.zeros(4000)  # p(YES) = 1/2 per vote: about 3/8 of 4-vote rows tie 2-2
    out = vote(margin, 4, 1.0, torch.Generator().manual_seed(3))
    draws = (torch.rand((4000, 4), generator=torch.Generator().manual_seed(3)) < 0.5).sum(1)  # (N,) YES votes
    assert (draws == 2).sum() > 1000
    assert out.tolist() == (draws >= 3).float().tolist()


def test_scorer_votes_with_a_real_judge_model(tasks_yaml):
    """The tiny model as the judge: the open rows that need it get the vote of its YES/NO margins."""
    import torch

    from medix_fast.demo.cache import ensure_tiny_model

    weights = {k: v for k, v in W.items() if k != "semantic"}
    reward = build_reward(RewardConfig(weights=weights, judge_model=str(ensure_tiny_model())))
    items = load_tasks(tasks_yaml)[0].items
    responses = [response for _, response, _ in OPEN]
    pending = [0, 2]  # the valid, non-exact answers: ("Pneumonia", "pneumonia"), ("sprain", "fracture")
    margin = reward.judge.margin(["Pneumonia", "sprain"], ["pneumonia", "fracture"])
    for votes, temperature in ((1, 0.0), (3, 0.0), (5, 2.0)):
        scores, _ = Scorer(reward, votes=votes, judge_temperature=temperature, seed=3)(items, responses, [7] * 5)
        expected = vote(margin, votes, temperature, torch.Generator().manual_seed(3))
        assert scores["accuracy"][pending].tolist() == expected.tolist()
        assert scores["accuracy"][[1, 3, 4]].tolist() == [1.0, 0.0, 1.0]  # exact, invalid, exact: no judge
        assert list(scores) == ["accuracy", "format", "modality", "overall"]


def test_pass_at_k_counts_items_with_any_right_sample(tmp_path, tokenizer, reward_fn):
    """pass@1 is the mean accuracy of the k samples, pass@k the share of items with one right."""
    rows = [{"q": f"Q{i}", "a": f"<CT_SCAN> answer {i}"} for i in range(5)]
    write_jsonl(tmp_path / "t.jsonl", rows)
    (tmp_path / "t.yaml").write_text("- {name: t, file: t.jsonl, columns: {question: q, answer: a}}\n")
    tasks = load_tasks(tmp_path / "t.yaml")
    right = {0: 3, 1: 1, 2: 0, 3: 4, 4: 0}  # right samples of 4 per item
    calls = []

    def generate(items, prompt_ids, seed):
        calls.append(len(items))
        return [Generation(wrap("<CT_SCAN>", f"answer {int(it.question[1:])}" if j < right[int(it.question[1:])]
                                else "other"), 5, "stop") for it in items for j in range(4)]

    evaluator = Evaluator(tasks, tokenizer, EvalSettings(batch_size=8))
    result = evaluator.pass_at_k(generate, Scorer(reward_fn), 4)
    assert result == {"pass@1": pytest.approx(8 / 20), "pass@4": pytest.approx(3 / 5)}
    assert calls == [2, 2, 1]  # batch_size counts samples: 8 // 4 items per call


def test_one_task_table_has_no_repeated_mean_rows():
    summary = {"keys": ["accuracy"], "tasks": {"t": {"n": 2, "total": 2, "accuracy": 0.5}},
               "macro": {"n": 2, "accuracy": 0.5}, "micro": {"n": 2, "accuracy": 0.5}}
    assert markdown_table(summary).splitlines()[2:] == ["| t | 2 | 50.0 |"]


def test_resume_generates_only_the_rest(tasks_yaml, tokenizer, reward_fn, tmp_path):
    tasks = load_tasks(tasks_yaml)
    out = tmp_path / "out"
    evaluator = Evaluator(tasks, tokenizer, EvalSettings(batch_size=2))
    scorer = Scorer(reward_fn, judge=FakeJudge())
    calls = []
    with pytest.raises(KeyboardInterrupt):
        evaluator.run(canned_generate(calls, fail_on_call=3), scorer, out, {"model": "m"})
    path = out / "generations.jsonl"
    written = read_records(path)
    assert len(written) == 4 and len(calls) == 3  # two batches of 2 written, the third was killed
    with path.open("a") as f:
        f.write(json.dumps(written[0])[:40])  # a line cut short by the kill
    calls.clear()
    summary = evaluator.run(canned_generate(calls), scorer, out, {"model": "m"})
    again = [key for batch in calls for key in batch]
    done = {(r["task"], r["index"]) for r in written}
    assert len(again) == 9 - 4 and not done & set(again)
    records = read_records(path)
    assert sorted((r["task"], r["index"]) for r in records) == sorted(
        [("open_qa", i) for i in range(5)] + [("mcq", i) for i in range(4)])
    assert path.read_text().endswith("}\n")
    assert summary["micro"]["n"] == 9 and summary["micro"]["accuracy"] == pytest.approx(5 / 9)

    calls.clear()
    evaluator.run(canned_generate(calls), scorer, out, {"model": "m"})
    assert calls == []  # nothing left to do
    with pytest.raises(ResumeError, match="model: 'm' -> 'other'"):
        evaluator.run(canned_generate(calls), scorer, out, {"model": "other"})
    evaluator.run(canned_generate(calls), scorer, out, {"model": "other"}, overwrite=True)
    assert len(calls) == 5 and len(read_records(path)) == 9

    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3] + ["{broken"] + lines[3:]) + "\n")
    with pytest.raises(ResumeError, match="generations.jsonl:4 is not a valid eval record"):
        evaluator.run(canned_generate(calls), scorer, out, {"model": "other"})


BAD_TASKS = [  # (YAML, fragments the error must hold)
    ("- {name: a, file: x.jsonl, answer_type: mcq}", ["task 'a'", "field 'answer_type' must be one of"]),
    ("- {file: x.jsonl}", ["task '#1'", "field 'name' is required"]),
    ("- {name: a, file: x.jsonl, colums: {}}", ["task 'a'", "unknown field(s) ['colums']"]),
    ("- {name: a, file: x.jsonl, columns: {query: q}}", ["task 'a'", "columns ['query'] are not known"]),
    ("- {name: a, file: x.jsonl, letters: abc}", ["task 'a'", "field 'letters' must be distinct capital letters"]),
    ("- {name: a, file: x.jsonl, modality: CT}", ["task 'a'", "field 'modality' must be one of"]),
    ("- {name: a, file: x.jsonl}\n- {name: a, file: x.jsonl}", ["task names must be unique, repeated: ['a']"]),
    ("- {name: a, file: missing.jsonl}", ["task 'a'", "cannot read", "missing.jsonl"]),
    ("- {name: a, file: x.jsonl, columns: {question: q}}", 
     ["task 'a'", "x.jsonl:1: missing column 'q' (columns.question)"]),
    ("- {name: a, file: x.jsonl, columns: {answer: ans}}", 
     ["task 'a'", "x.jsonl:1: missing column 'ans' (columns.answer)"]),
    ("- {name: a, file: x.jsonl, answer_type: multiple_choice}",
     ["task 'a'", "x.jsonl:2: column 'solution': answer 'beta' is not a letter of ABCD"]),
    ("- {name: a, file: x.jsonl, answer_type: multiple_choice, columns: {options: opts}}",
     ["task 'a'", "x.jsonl:1: missing column 'opts' (columns.options)"]),
    ("- {name: a, file: x.jsonl, template: '{question} {context}'}", 
     ["task 'a'", "template field {context} is neither"]),
    ("{name: a}", ["expected a non-empty list of tasks"]),
    ("- [a, b]", ["task #1 must be a mapping"]),
    ("- {name: a, file: x.jsonl", ["is not valid YAML"]),
]


@pytest.mark.parametrize("text, fragments", BAD_TASKS)
def test_bad_tasks_name_the_task_and_field(tmp_path, text, fragments):
    write_jsonl(tmp_path / "x.jsonl", [{"problem": "q1", "solution": "<X_RAY> B"},
                                       {"problem": "q2", "solution": "<X_RAY> beta"}])
    (tmp_path / "t.yaml").write_text(text)
    with pytest.raises(TaskError) as err:
        load_tasks(tmp_path / "t.yaml")
    assert all(f in str(err.value) for f in fragments), str(err.value)


def test_cli_errors(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "t.yaml").write_text("- {name: a, file: x.jsonl}")
    assert main(["--model", "tiny", "--tasks", str(tmp_path / "t.yaml")]) == 2
    assert "task 'a': cannot read" in capsys.readouterr().err


def cli(*args: str) -> list[str]:
    return ["--model", "tiny", "--limit", "4", "--max-new-tokens", "40", "--batch-size", "1", *args]


def two_rank_eval(out: Path, info) -> None:
    """A two-rank job (tests/two_rank_jobs.py): the command of ``test_tiny_smoke_and_two_ranks`` into
    ``out/out``, its items split over the ranks."""
    assert main(cli("--out", str(out / "out"))) == 0


def test_tiny_smoke_and_two_ranks(tmp_path, capsys, two_ranks):
    """The default task (bundled held-out split) on the tiny model: 2 items, then 2 more resumed;
    then the same 4 items split over 2 gloo ranks (``two_rank_eval``) give the same greedy responses."""
    one = tmp_path / "one"
    assert main(cli("--limit", "2", "--out", str(one))) == 0
    assert len(read_records(one / "generations.jsonl")) == 2
    assert main(cli("--out", str(one))) == 0
    printed = capsys.readouterr().out
    assert "4 held-out items, greedy, <= 40 new tokens; accuracy by exact match" in printed
    assert "| sample_test | 4 |" in printed  # one task: no mean rows
    records = read_records(one / "generations.jsonl")
    assert sorted(r["index"] for r in records) == [0, 1, 2, 3]
    for r in records:
        assert set(r["scores"]) == {"accuracy", "format", "modality", "semantic", "overall"}
        assert all(0.0 <= v <= 1.0 for v in r["scores"].values())
        assert r["finish_reason"] in ("stop", "length") and 0 < r["tokens"] <= 40
    assert (one / "summary.md").read_text().startswith("| task | n | accuracy |")

    two = two_ranks.folder("eval")
    outs = [(two / f"rank{r}.out").read_text() for r in (0, 1)]
    assert [out.count("| sample_test | 4 |") for out in outs] == [1, 0]  # rank 0 prints
    by_index = {r["index"]: r for r in read_records(two / "out" / "generations.jsonl")}
    assert sorted(by_index) == [0, 1, 2, 3]
    for r in records:
        assert by_index[r["index"]]["response"] == r["response"]
        assert by_index[r["index"]]["scores"] == r["scores"]


def test_each_checkpoint_keeps_its_results(tmp_path, monkeypatch, capsys):
    """Two checkpoints of a run evaluated in a row, then the first again with --overwrite: all
    three results stay on disk (the default --out is per checkpoint; --overwrite moves aside)."""
    from medix_fast.demo.cache import resolve_model_path

    monkeypatch.chdir(tmp_path)
    steps = [tmp_path / "run" / "checkpoints" / f"step_0000000{k}" for k in (1, 2)]
    for step in steps:
        shutil.copytree(resolve_model_path("tiny"), step / "model")
    small = ["--limit", "1", "--max-new-tokens", "4", "--batch-size", "1"]
    for step in steps:
        assert main(["--model", str(step / "model"), *small]) == 0
    results = [Path("runs/eval/run") / step.name for step in steps]
    first = (results[0] / "generations.jsonl").read_text()
    assert all(len(read_records(r / "generations.jsonl")) == 1 for r in results)
    again = ["--model", str(steps[0] / "model"), *small, "--max-new-tokens", "5"]
    assert main(again) == 2  # other settings: refused
    assert "give another --out, or add --overwrite" in capsys.readouterr().err
    assert main([*again, "--limit", "2", "--overwrite"]) == 0
    assert f"moved to {results[0]}.old-1" in capsys.readouterr().err
    assert (Path(f"{results[0]}.old-1") / "generations.jsonl").read_text() == first
    assert len(read_records(results[0] / "generations.jsonl")) == 2
    assert len(read_records(results[1] / "generations.jsonl")) == 1


def test_a_training_checkpoint_without_model_names_export(tmp_path, capsys):
    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    (step / "hf_config").mkdir(parents=True)
    (step / "hf_config" / "config.json").write_text("{}")
    assert main(["--model", str(step)]) == 2
    err = capsys.readouterr().err
    assert "training checkpoint without a Hugging Face model" in err and "python -m medix_fast.export" in err
    (step / "model").mkdir()
    (step / "model" / "config.json").write_text("{}")
    assert main(["--model", str(step)]) == 2
    assert f"give its Hugging Face model, {step / 'model'}" in capsys.readouterr().err


def test_training_loop_calls_eval(tmp_path):
    from medix_fast.config import ConfigError, load_config
    from medix_fast.metrics import read_metrics
    from medix_fast.train import main as train_main

    with pytest.raises(ConfigError, match="eval: need"):
        load_config(None, ["eval.every=1", "eval.max_new_tokens=4096"])
    with pytest.raises(ConfigError, match="'train.eval_every' is now 'eval.every'"):
        load_config(None, ["train.eval_every=5"])
    out = tmp_path / "run"
    assert train_main(["train.steps=1", "train.prompts_per_step=2", "train.mini_batch_prompts=2",
                       "sampling.group_size=2", "sampling.max_new_tokens=16", "algorithm.dynamic_sampling=false",
                       "eval.every=1", "eval.limit=3", "checkpoint.every=0",
                       "logging.progress=false", "logging.plot=false", "logging.tensorboard=false",
                       f"train.output_dir={out}"]) == 0
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1]  # eval.at_start: the initial weights as step 0
    for record in records:
        assert 0.0 <= record["eval/sample_test/accuracy"] <= 1.0
        assert record["eval/mean_accuracy"] == record["eval/sample_test/accuracy"] == record["eval/accuracy"]
        assert {"eval/overall", "eval/format", "eval/modality", "eval/semantic"} <= set(record)
        step = out / "eval" / f"step_{record['step']:08d}"
        scores = [r["scores"]["overall"] for r in read_records(step / "generations.jsonl")]
        assert len(scores) == 3 and record["eval/overall"] == pytest.approx(sum(scores) / 3)


def test_bad_image_names_the_row_and_column(tmp_path):
    write_jsonl(tmp_path / "x.jsonl", [{"problem": "q1", "solution": "<X_RAY> a", "img": "scan.png"}])
    (tmp_path / "t.yaml").write_text("- {name: a, file: x.jsonl, columns: {image: img}}")
    with pytest.raises(TaskError) as err:
        load_tasks(tmp_path / "t.yaml")
    assert "x.jsonl:1: column 'img' (columns.image)" in str(err.value)
    assert str(tmp_path / "scan.png") in str(err.value)  # resolved against the task file's folder


def test_vl_eval_feeds_each_item_its_image(tmp_path, monkeypatch):
    """tiny-vl on the bundled image split: each prompt's <|image_pad|> run is expanded to its image's
    token count, the sampler gets that item's pixels, and the command line runs end to end."""
    from medix_fast.demo.cache import resolve_model_path
    from medix_fast.eval.tasks import data_tasks
    from medix_fast.model.loading import load_image_processor, load_model
    from medix_fast.generate import Sampler
    from medix_fast.data.vision import Vision, image_size, load_image

    model, tokenizer = load_model(resolve_model_path("tiny-vl"))
    vision = Vision(load_image_processor(resolve_model_path("tiny-vl")), model.config.image_token_id)
    items = data_tasks("sample:train_vl", limit=3)[0].items
    evaluator = Evaluator(data_tasks("sample:train_vl", limit=3), tokenizer, EvalSettings(), vision=vision)
    for it, ids in zip(items, evaluator.prompt_ids):
        assert ids.count(vision.image_token_id) == vision.tokens(image_size(it.image)) > 0

    seen = []
    real = Sampler.generate

    def spy(self, prompts, *args, images=None, **kwargs):
        seen.extend(zip(prompts, images))
        return real(self, prompts, *args, images=images, **kwargs)

    monkeypatch.setattr(Sampler, "generate", spy)
    out = tmp_path / "vl"
    assert main(["--model", "tiny-vl", "--data", "sample:train_vl", "--limit", "3", "--max-new-tokens", "4",
                 "--out", str(out)]) == 0
    assert len(read_records(out / "generations.jsonl")) == 3 and len(seen) == 3
    by_prompt = {tuple(ids): it for it, ids in zip(items, evaluator.prompt_ids)}
    for ids, pix in seen:
        want = vision.encode([load_image(by_prompt[tuple(ids)].image)])
        assert torch.equal(pix.pixel_values, want.pixel_values) and pix.tokens == want.tokens
