"""Training data: every bad row named by file and row before training, formats, prompts, the loader."""
from __future__ import annotations

import json

import pytest

from medix_fast.config import DataConfig
from medix_fast.data import DataError, PromptLoader, build_prompts, load_examples, resolve_data_path


def jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from medix_fast.demo.tiny import build_tokenizer, read_train_rows

    return build_tokenizer(read_train_rows(), 2048)


GOOD = {"problem": "Which organ?", "solution": "<CT_SCAN> liver"}


def test_bundled_sample_loads():
    examples = load_examples(["sample:train"], DataConfig())
    assert len(examples) == 400 and all(e.solution.startswith("<") for e in examples)
    assert resolve_data_path("sample:test").name == "test.jsonl"


def test_each_bad_row_is_reported_with_file_and_row(tmp_path):
    path = jsonl(tmp_path / "bad.jsonl", [
        GOOD,
        {"problem": "no solution"},  # row 2
        {"problem": "q", "solution": "liver"},  # row 3: no leading tag
        "{not json",  # row 4
        {"problem": "", "solution": "<MRI_SCAN> x"},  # row 5: empty problem
        [1, 2],  # row 6: not an object
        {"problem": 3, "solution": "<MRI_SCAN> x"},  # row 7: wrong type
        GOOD,
    ])
    with pytest.raises(DataError) as info:
        load_examples([path], DataConfig())
    text = str(info.value)
    assert "6 malformed" in text
    for row, reason in [(2, "missing field 'solution'"), (3, "modality tag"), (4, "not valid JSON"),
                        (5, "'problem' is empty"), (6, "JSON object"), (7, "must be a string")]:
        assert f"bad.jsonl:{row}: " in text and reason in text.split(f"bad.jsonl:{row}: ")[1].split("\n")[0]


def test_non_strict_skips_bad_rows_with_a_count(tmp_path, caplog):
    path = jsonl(tmp_path / "mixed.jsonl", [GOOD, {"problem": "q"}, GOOD])
    examples = load_examples([path], DataConfig(strict=False))
    assert len(examples) == 2 and examples[1].source.endswith("mixed.jsonl:3")
    assert "dropped 1 malformed" in caplog.text and "mixed.jsonl:2: missing field 'solution'" in caplog.text


def test_json_errors_name_the_column_of_the_line(tmp_path):
    bad_value = '{"problem": "Which organ?", "solution": <CT_SCAN> liver}'
    cut_short = '{"problem": "Which organ?", "solution": "<CT_SCAN> liver"'
    path = jsonl(tmp_path / "c.jsonl", [GOOD, bad_value, cut_short])
    with pytest.raises(DataError) as info:
        load_examples([path], DataConfig())
    text = str(info.value)
    assert f"c.jsonl:2: not valid JSON (Expecting value: at column {bad_value.index('<') + 1})" in text
    assert f"c.jsonl:3: not valid JSON (Expecting ',' delimiter: the line ends at column {len(cut_short)}" in text


def test_every_dropped_row_is_named_and_many_go_to_a_file(tmp_path, caplog):
    path = jsonl(tmp_path / "many.jsonl", [GOOD] + [{"problem": "q"}] * 25)
    report = tmp_path / "run" / "dropped_rows.txt"
    assert len(load_examples([path], DataConfig(strict=False), report)) == 1
    assert report.read_text().splitlines() == [f"{path}:{i}: missing field 'solution'" for i in range(2, 27)]
    assert f"{path}:21: missing" in caplog.text and f"{path}:22: missing" not in caplog.text
    assert f"all 25 are listed in {report}" in caplog.text
    few = jsonl(tmp_path / "few.jsonl", [GOOD, {"problem": "q"}])
    load_examples([few], DataConfig(strict=False), tmp_path / "few.txt")
    assert not (tmp_path / "few.txt").exists()  # named in the log, no file needed


def test_long_prompts_are_named_when_dropped(tiny_tokenizer, caplog):
    from medix_fast.data import Example

    examples = [Example("Which organ?", "<CT_SCAN> liver", source="f.jsonl:1"),
                Example("long " * 400, "<CT_SCAN> liver", source="f.jsonl:2")]
    prompts, dropped = build_prompts(examples, tiny_tokenizer, 300)
    assert dropped == 1 and len(prompts) == 1
    assert "f.jsonl:2: the prompt is" in caplog.text and "data.max_prompt_length=300" in caplog.text


def test_unreadable_and_missing_files_are_named(tmp_path):
    binary = tmp_path / "junk.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage\x80")
    with pytest.raises(DataError, match="junk.jsonl: unreadable"):
        load_examples([str(binary)], DataConfig())
    with pytest.raises(DataError, match="nowhere.jsonl: unreadable"):
        load_examples([str(tmp_path / "nowhere.jsonl")], DataConfig())


@pytest.mark.parametrize("strict", [True, False])
def test_a_missing_or_unreadable_file_is_an_error_in_every_mode(tmp_path, strict):
    good = jsonl(tmp_path / "good.jsonl", [{"problem": "Which organ?", "solution": "<CT_SCAN> liver"}])
    binary = tmp_path / "junk.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage\x80")
    for bad in (tmp_path / "mistyped.jsonl", binary):  # strict=false skips rows, never whole files
        with pytest.raises(DataError, match=f"^{bad}: unreadable .*data.strict=false skips bad rows, not files"):
            load_examples([str(good), str(bad)], DataConfig(strict=strict))


def test_column_names_are_configurable(tmp_path):
    path = jsonl(tmp_path / "cols.jsonl", [{"question": "Which organ?", "answer": "<CT_SCAN> liver", "img": None}])
    cfg = DataConfig(problem_key="question", solution_key="answer", image_key="img")
    (example,) = load_examples([path], cfg)
    assert (example.problem, example.solution) == ("Which organ?", "<CT_SCAN> liver")
    with pytest.raises(DataError, match="missing field 'problem'"):
        load_examples([path], DataConfig())


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"problem": ["a?", "b?"], "solution": ["<X_RAY> yes", "no tag"]}), path)
    with pytest.raises(DataError, match=r"d\.parquet:2: field 'solution'"):
        load_examples([str(path)], DataConfig())
    assert len(load_examples([str(path)], DataConfig(strict=False))) == 1


def test_datasets_directory(tmp_path):
    import datasets
    data = datasets.Dataset.from_list([GOOD, {"problem": "q", "solution": "<OCT_SCAN> drusen"}])
    data.save_to_disk(str(tmp_path / "ds"))
    assert [e.solution for e in load_examples([str(tmp_path / "ds")], DataConfig())] == [GOOD["solution"],
                                                                                          "<OCT_SCAN> drusen"]
    datasets.DatasetDict({"train": data}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="point at one split"):
        load_examples([str(tmp_path / "dd")], DataConfig())


def test_prompts_use_the_chat_template_and_drop_long_ones(tiny_tokenizer, caplog):
    examples = load_examples(["sample:test"], DataConfig())
    prompts, dropped = build_prompts(examples, tiny_tokenizer, max_length=10_000)
    assert dropped == 0 and len(prompts) == len(examples)
    text = tiny_tokenizer.decode(prompts[0].ids)
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
    assert examples[0].problem.strip() in text
    lengths = sorted(len(p.ids) for p in prompts)
    limit = lengths[len(lengths) // 2]
    short, dropped = build_prompts(examples, tiny_tokenizer, max_length=limit)
    assert dropped == sum(n > limit for n in lengths) > 0 and len(short) + dropped == len(examples)
    assert f"dropped {dropped} of {len(examples)}" in caplog.text
    with pytest.raises(DataError, match="max_prompt_length"):
        build_prompts(examples, tiny_tokenizer, max_length=5)


def test_loader_epochs_are_permutations_and_seeded():
    loader = PromptLoader(10, seed=3)
    first, second = loader.next(10), loader.next(10)
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    assert PromptLoader(10, seed=3).next(10) == first
    assert PromptLoader(10, seed=4).next(10) != first
    assert PromptLoader(5, shuffle=False).next(7) == [0, 1, 2, 3, 4, 0, 1]


def test_loader_resumes_exactly():
    a = PromptLoader(7, seed=1)
    a.next(5)
    state = a.state_dict()
    expected = [a.next(3) for _ in range(4)]
    b = PromptLoader(7, seed=1)
    b.load_state_dict(state)
    assert [b.next(3) for _ in range(4)] == expected
    with pytest.raises(ValueError, match="seed"):
        PromptLoader(7, seed=2).load_state_dict(state)


def test_loader_resumed_in_a_later_epoch_continues_that_epochs_order():
    a = PromptLoader(7, seed=1)
    a.next(12)  # epoch 1, position 5
    state = a.state_dict()
    assert state["epoch"] == 1
    expected = [a.next(3) for _ in range(4)]  # the rest of epoch 1, then epoch 2
    b = PromptLoader(7, seed=1)
    b.load_state_dict(state)
    assert [b.next(3) for _ in range(4)] == expected


def test_loader_ranks_split_one_global_stream():
    whole = PromptLoader(13, seed=0)
    ranks = [PromptLoader(13, seed=0, rank=r, world=2) for r in range(2)]
    for _ in range(5):
        assert ranks[0].next(3) + ranks[1].next(3) == whole.next(6)
