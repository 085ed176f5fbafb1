"""The decode step's memory traffic on paper (``medix_fast.generate.decode_traffic``;
``python -m medix_fast.generate --plan`` without ``--config``): every shipped config printed, the
minimum (weights + live K/V) counted by hand for one, and the ratio goal (<= 1.10 at 64 and 320
rows) held.

Run: pytest tests/test_decode_traffic.py
"""
from __future__ import annotations

import pytest

from medix_fast.generate.__main__ import main
from medix_fast.generate.decode_shapes import shipped
from medix_fast.generate.decode_traffic import BANDWIDTH, ROWS, TYPICAL, step_traffic


@pytest.fixture(scope="module")
def shapes():
    return shipped()


def test_the_8b_step_by_hand(shapes):
    """Qwen3-VL-8B: 36 layers x 8 kv heads x 128 x (K, V) x 2 bytes = 147,456 B per token; 64 rows
    in 13 groups of 5 at 512 + 512 tokens: 13 x 512 prompt + 64 x 512 own tokens read."""
    shape = next(s for s in shapes if s.model == "Qwen3-VL-8B-Instruct")
    assert (shape.layers, shape.kv_heads, shape.dim, shape.group) == (36, 8, 128, 5)
    assert 15.0e9 < shape.weight_bytes < 15.3e9  # 7.57 B bf16 parameters without the vision tower and embedding
    t = step_traffic(shape, 64, 512, 512)
    assert t.kv == 147_456 * (13 * 512 + 64 * 512)
    assert t.ratio == (t.weights + t.kv + t.partials + t.other) / (t.weights + t.kv)
    assert t.tokens_per_s(BANDWIDTH["H200"]) == pytest.approx(64 * 4.8e12 / t.total)


@pytest.mark.parametrize("rows", ROWS)
def test_the_ratio_goal_holds_for_every_shipped_config(shapes, rows):
    for shape in shapes:
        for lengths in (TYPICAL, (shape.prompt_len, shape.new_len)):
            t = step_traffic(shape, rows, *lengths)
            assert 1 < t.ratio <= 1.10, (shape.name, rows, lengths, t.ratio)


def test_cli_prints_every_shipped_config(capsys, shapes):
    assert main(["--plan"]) == 0
    out = capsys.readouterr().out
    for shape in shapes:
        assert sum(line.startswith(shape.name) for line in out.splitlines()) == 2 * len(ROWS)
