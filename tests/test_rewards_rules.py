"""The MediX-R1 string rules on a hand-checked table, their equivalence with the reference's regexes
(which the linear-time scans replace), robustness on junk, and solution validation.

Run: pytest tests/test_rewards_rules.py
"""
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medix_fast.rewards.rules import (answer_invalid, extract_answer, format_ok, modality_ok, normalize, parse,
                                      validate_solutions)

# (response, solution, format, modality, extracted answer, invalid, exact) written from the rules by hand.
TABLE = [
    ("<CT_SCAN><thinking>look</thinking><answer>Pneumonia</answer>", "<CT_SCAN> Pneumonia",
     1, 1, "Pneumonia", False, True),
    # spaces inside tags vanish; "Pneumonia ." strips to "Pneumonia " (spaces go before dots do)
    ("< CT_SCAN >\n< thinking > look < / thinking >\n< answer > Pneumonia . < / answer >", "<CT_SCAN> Pneumonia",
     1, 1, "Pneumonia ", False, False),
    # several <answer> blocks: the first is the answer, the lazy format pattern still matches
    ("<X_RAY><thinking>t</thinking><answer>effusion</answer><answer>edema</answer>", "<X_RAY> edema",
     1, 1, "effusion", False, False),
    # lower-case modality tag matches; the answer comparison is case-sensitive
    ("<x_ray><thinking>t</thinking><answer>edema</answer>", "<X_RAY> Edema.", 1, 1, "edema", False, False),
    # upper-case format tags are not tags: no format, no modality, the whole text is the answer
    ("<CT_SCAN><THINKING>t</THINKING><ANSWER>mass</ANSWER>", "<CT_SCAN> mass",
     0, 0, "<CT_SCAN><THINKING>t</THINKING><ANSWER>mass</ANSWER>", False, False),
    # missing thinking
    ("<MRI_SCAN><answer>glioma</answer>", "<MRI_SCAN> glioma", 0, 0, "glioma", False, True),
    # text after </answer>
    ("<MRI_SCAN><thinking>t</thinking><answer>glioma</answer> Hope this helps", "<MRI_SCAN> glioma",
     0, 1, "glioma", False, True),
    # whitespace after </answer> is normalised away
    ("<MRI_SCAN> <thinking>t</thinking>\n<answer>glioma</answer>\n\n", "<MRI_SCAN> glioma", 1, 1, "glioma", False, True),
    # ':' / '?' / '__' in the answer
    ("<CT_SCAN><thinking>t</thinking><answer>Answer: B</answer>", "<CT_SCAN> B", 1, 1, "Answer: B", True, False),
    ("<CT_SCAN><thinking>t</thinking><answer>maybe?</answer>", "<CT_SCAN> maybe", 1, 1, "maybe?", True, False),
    ("<CT_SCAN><thinking>t</thinking><answer>__</answer>", "<CT_SCAN> x", 1, 1, "__", True, False),
    # one character: invalid even when it equals the ground truth
    ("<CT_SCAN><thinking>t</thinking><answer>B</answer>", "<CT_SCAN> B", 1, 1, "B", True, False),
    # dots stripped from both ends of both answers
    ("<answer>...Cardiomegaly...</answer>", "<X_RAY> Cardiomegaly.", 0, 0, "Cardiomegaly", False, True),
    # no tags at all: the whole response is the answer
    ("Pneumonia", "<CT_SCAN> Pneumonia", 0, 0, "Pneumonia", False, True),
    # unbalanced: no </thinking>
    ("<CT_SCAN><thinking>t<answer>x-ray</answer>", "<CT_SCAN> x-ray", 0, 1, "x-ray", False, True),
    # spaces around '/' are removed in the response only, so "T1 / T2" no longer equals the solution
    ("<CT_SCAN><thinking>t</thinking><answer>T1 / T2</answer>", "<CT_SCAN> T1 / T2", 1, 1, "T1/T2", False, False),
    # text between </thinking> and <answer>
    ("<CT_SCAN><thinking>t</thinking>so<answer>mass</answer>", "<CT_SCAN> mass", 0, 1, "mass", False, True),
    # extra text before the tag
    ("The modality is <CT_SCAN><thinking>t</thinking><answer>mass</answer>", "<CT_SCAN> mass",
     1, 0, "mass", False, True),
    # empty answers
    ("<CT_SCAN><thinking>t</thinking><answer> . </answer>", "<CT_SCAN> mass", 1, 1, "", True, False),
    ("<CT_SCAN><thinking></thinking><answer></answer>", "<CT_SCAN> mass", 1, 1, "", True, False),
    ("<CT_SCAN><thinking></thinking><answer>", "<CT_SCAN> mass",
     0, 1, "<CT_SCAN><thinking></thinking><answer>", False, False),
    # nested / repeated thinking blocks still match the lazy pattern
    ("<CT_SCAN><thinking>a<thinking>b</thinking><answer>c d</answer>", "<CT_SCAN> c d", 1, 1, "c d", False, True),
    ("<CT_SCAN><thinking>a</thinking><thinking>b</thinking><answer>cd</answer>", "<CT_SCAN> cd", 1, 1, "cd", False, True),
    # answer before thinking
    ("<CT_SCAN><answer>xy</answer><thinking>t</thinking>", "<CT_SCAN> xy", 0, 0, "xy", False, True),
    # an unclosed <answer>: the whole response is the answer
    ("<OCT_SCAN><thinking>t</thinking><answer>drusen", "<OCT_SCAN> drusen",
     0, 1, "<OCT_SCAN><thinking>t</thinking><answer>drusen", False, False),
]


@pytest.mark.parametrize("response,solution,fmt,mod,answer,invalid,exact", TABLE)
def test_rules_table(response, solution, fmt, mod, answer, invalid, exact):
    p = parse([response], [solution])
    assert (p.format[0], p.modality[0], p.answers[0], p.invalid[0], p.exact[0]) == (fmt, mod, answer, invalid, exact)


# The reference's rules, as published (MediX-R1 training/examples/reward_function/medical.py).
def ref_normalize(s):
    return re.sub(r"\s*(<|>|/)\s*", r"\1", s)


def ref_format(s):
    idx = s.find("<thinking>")
    if idx == -1:
        return False
    return re.fullmatch(r"<thinking>.*?</thinking>\s*<answer>.*?</answer>", s[idx:].strip(), re.DOTALL) is not None


def ref_answer(s):
    m = re.search(r"<answer>(.*?)</answer>", s, re.DOTALL)
    return (m.group(1).strip() if m else s.strip()).strip(".")


FRAGMENTS = ["<thinking>", "</thinking>", "<answer>", "</answer>", "<", ">", "/", " ", "\n", "\t", "a", ".",
             "b c", "< answer >", "< / thinking>", "<CT_SCAN>", "\u00a0", "?"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=14).map("".join))
def test_rules_equal_reference_regexes(text):
    assert normalize(text) == ref_normalize(text)
    norm = ref_normalize(text)
    assert format_ok(norm) == ref_format(norm)
    assert format_ok(text) == ref_format(text)  # also on text the normaliser has not touched
    assert extract_answer(norm) == ref_answer(norm)
    assert extract_answer(text) == ref_answer(text)


def test_modality_needs_thinking_and_ignores_case():
    assert modality_ok("  <ct_scan>\n<thinking>", "<CT_SCAN>")
    assert not modality_ok("<CT_SCAN>", "<CT_SCAN>")
    assert not modality_ok("<MRI_SCAN><thinking>", "<CT_SCAN>")


def test_answer_invalid_rules():
    assert [answer_invalid(a) for a in ["", "x", "xy", "a:b", "a?", "a__b", "a_b"]] == \
        [True, True, False, True, True, True, False]


def test_junk_and_huge_responses_score_zero_without_hanging():
    # Inputs that make the reference's regexes backtrack quadratically; the scans are linear.
    junk = [
        " " * 100_000 + "x",
        "<thinking>" + "</thinking><answer>" * 6_000 + "x",
        "<answer>" * 12_000,
        bytes(range(256)).decode("latin-1") * 400,
        "<CT_SCAN><thinking>" + "\t/ " * 33_000 + "</thinking><answer>" + "a" * 100_000,
    ]
    p = parse(junk, ["<CT_SCAN> pneumonia"] * len(junk))
    assert p.format == [0.0] * len(junk)
    assert p.modality == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert p.exact == [False] * len(junk)


def test_validate_solutions_names_the_row():
    validate_solutions(["<CT_SCAN> a", " <X_RAY>b"])
    with pytest.raises(ValueError, match="row 2"):
        validate_solutions(["<CT_SCAN> a", "<X_RAY> b", "pneumonia"])
    with pytest.raises(ValueError, match="row 0"):
        validate_solutions([None])
