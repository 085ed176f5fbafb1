"""The composite reward: the overall formula, weights (0 = not computed, not loaded), DAPO overlong
shaping, custom components, the exact-match fallback without a judge, and input errors.

Run: pytest tests/test_rewards_composite.py
"""
import logging

import pytest
import torch

from medix_fast.rewards import RewardConfig, build_reward, medix_weights, score
from medix_fast.rewards.overlong import overlong_penalty

GOOD = "<CT_SCAN><thinking>dense consolidation</thinking><answer>pneumonia</answer>"
ROWS = [  # response, solution
    (GOOD, "<CT_SCAN> pneumonia"),  # everything right
    ("<mri_scan> <thinking>x</thinking> <answer>B</answer>", "<CT_SCAN> B"),  # format only (1-char answer)
    ("<CT_SCAN><thinking>t</thinking><answer>pneumonia</answer> ok", "<CT_SCAN> pneumonia"),  # no format
    ("\x00\xff<<</answer>" * 20_000, "<X_RAY> effusion"),  # 240K characters of junk
    ("<CT_SCAN><thinking>t</thinking><answer>lung cancer</answer>", "<CT_SCAN> lung carcinoma"),
]


@pytest.fixture(scope="module")
def default_reward():
    return build_reward()


def test_overall_is_medix_formula(default_reward):
    out = default_reward([r for r, _ in ROWS], [s for _, s in ROWS])
    assert set(out) == {"format", "modality", "accuracy", "semantic", "overall"}
    formula = 0.9 * (0.575 * out["accuracy"] + 0.375 * out["semantic"] + 0.05 * out["modality"]) + 0.1 * out["format"]
    torch.testing.assert_close(out["overall"], formula)
    # by hand: row 0 scores 1 everywhere; row 1 has the format only; row 2 all but format;
    # row 3 nothing; row 4 has format and modality, no exact match and no judge configured
    torch.testing.assert_close(out["format"], torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0]))
    torch.testing.assert_close(out["modality"], torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0]))
    torch.testing.assert_close(out["accuracy"], torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(out["overall"][:4], torch.tensor([1.0, 0.1, 0.9, 0.0]))
    assert all(v.dtype == torch.float32 and v.shape == (5,) for v in out.values())


def test_weights_are_configurable_and_zero_weight_is_not_loaded():
    reward = build_reward(RewardConfig(weights={"format": 0.3, "modality": 0.7, "semantic": 0.0}))
    assert reward.encoder is None and reward.judge is None
    out = reward([r for r, _ in ROWS], [s for _, s in ROWS])
    assert set(out) == {"format", "modality", "overall"}
    torch.testing.assert_close(out["overall"], 0.3 * out["format"] + 0.7 * out["modality"])
    assert medix_weights(format_weight=0.2)["accuracy"] == pytest.approx(0.8 * 0.575)


def test_no_judge_falls_back_to_exact_match_and_logs_once(caplog):
    with caplog.at_level(logging.WARNING, logger="medix_fast.rewards"):
        reward = build_reward(RewardConfig(weights={"accuracy": 1.0}))
        reward([GOOD], ["<CT_SCAN> pneumonia"])
        out = reward([GOOD, GOOD], ["<CT_SCAN> Pneumonia", "<CT_SCAN> pneumonia."])
    assert [r.message for r in caplog.records].count(
        "no judge_model configured: the accuracy reward falls back to normalised exact match") == 1
    torch.testing.assert_close(out["accuracy"], torch.tensor([0.0, 1.0]))


def test_overlong_shaping_by_hand():
    # L = 100, C = 20: 0 up to 80 tokens, then linear to -1 at 100, -1 beyond
    got = overlong_penalty([0, 80, 81, 90, 100, 101, 5000], max_length=100, buffer=20)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, -0.05, -0.5, -1.0, -1.0, -1.0]))
    reward = build_reward(RewardConfig(weights={"format": 1.0, "overlong": 0.5}, overlong_max_length=100,
                                       overlong_buffer=20))
    out = reward([GOOD, GOOD], ["<CT_SCAN> x y", "<CT_SCAN> x y"], response_lengths=torch.tensor([50, 90]))
    torch.testing.assert_close(out["overall"], torch.tensor([1.0, 0.75]))
    with pytest.raises(ValueError, match="response_lengths"):
        reward([GOOD], ["<CT_SCAN> x y"])
    with pytest.raises(ValueError, match="buffer"):
        build_reward(RewardConfig(weights={"overlong": 1.0}, overlong_max_length=10, overlong_buffer=20))


def test_custom_component_by_dotted_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def brevity(responses, solutions):\n    return [float(len(r) < 80) for r in responses]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = RewardConfig(weights={"format": 0.5, "brevity": 0.5}, custom={"brevity": "my_rewards:brevity"})
    out = build_reward(cfg)([GOOD, GOOD + " " * 100], ["<CT_SCAN> a b", "<CT_SCAN> a b"])
    torch.testing.assert_close(out["brevity"], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(out["overall"], torch.tensor([1.0, 0.5]))  # the padded one also loses format
    with pytest.raises(ValueError, match="pkg.mod:func"):
        build_reward(RewardConfig(weights={"x": 1.0}, custom={"x": "my_rewards.brevity"}))
    with pytest.raises(ValueError, match="unknown components"):
        build_reward(RewardConfig(weights={"acuracy": 1.0}))


def test_score_caches_the_built_function_and_reports_bad_rows():
    out = score([GOOD], ["<CT_SCAN> pneumonia"], weights={"format": 1.0})
    torch.testing.assert_close(out["overall"], torch.tensor([1.0]))
    with pytest.raises(ValueError, match="solution row 1"):
        score([GOOD, GOOD], ["<CT_SCAN> pneumonia", "pneumonia"], weights={"format": 1.0})
    with pytest.raises(ValueError, match="2 responses but 1 solutions"):
        score([GOOD, GOOD], ["<CT_SCAN> pneumonia"], weights={"format": 1.0})
    with pytest.raises(ValueError, match="response row 0"):
        score([b"<answer>x</answer>"], ["<CT_SCAN> x"], weights={"format": 1.0})
    assert score([], [], weights={"format": 1.0})["overall"].shape == (0,)
