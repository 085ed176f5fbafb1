"""Trainer-sampler mismatch (``medix_fast/rl/mismatch.py``): the ``mismatch/*`` figures against
their fp64 definitions, and logged every step by real runs of the tiny dense, VL and MoE models,
where in fp32 on the CPU the sampler's log-probs equal the trainer's within 1e-5. A change of the
decode path's cast order (its logits rounded through bf16) moves the figure past that bound.

Run: pytest tests/test_mismatch.py
"""
from __future__ import annotations

import math

import pytest
import torch

from medix_fast.config import load_config
from medix_fast.generate.runner import Runner
from medix_fast.metrics import read_metrics
from medix_fast.rl.mismatch import Mismatch
from medix_fast.train import Trainer, main

FIGURES = ("abs_mean", "abs_max", "k3_kl", "pearson", "frac_above_1e-3")
SMALL = ["eval.every=0", "train.prompts_per_step=4", "train.mini_batch_prompts=4", "sampling.group_size=4",
         "sampling.max_new_tokens=16", "algorithm.dynamic_sampling=false", "checkpoint.every=0",
         "logging.tensorboard=false", "logging.plot=false", "logging.progress=false"]


def reference(s: torch.Tensor, t: torch.Tensor) -> dict:
    """The figures of 1-D fp64 sampler / trainer log-probs, by their definitions."""
    d = t - s
    p, q = s.exp(), t.exp()
    pearson = torch.corrcoef(torch.stack([p, q]))[0, 1].item()
    return {"abs_mean": d.abs().mean().item(), "abs_max": d.abs().max().item(),
            "k3_kl": (d.exp() - 1 - d).mean().item(), "pearson": pearson,
            "frac_above_1e-3": (d.abs() > 1e-3).double().mean().item()}


def test_figures_match_their_fp64_definitions_per_kind():
    """Two micro-batches, rows of both kinds, padding masked out: the totals and each kind's figures."""
    g = torch.Generator().manual_seed(0)
    m = Mismatch(torch.device("cpu"))
    rows = {"text": ([], []), "image": ([], [])}
    for b, c in ((5, 7), (3, 11)):
        s = -torch.rand(b, c, generator=g, dtype=torch.float64) * 3
        t = s + torch.randn(b, c, generator=g, dtype=torch.float64) * 1e-2
        lengths = torch.randint(1, c + 1, (b,), generator=g)
        mask = (torch.arange(c) < lengths[:, None]).float()
        image = torch.randint(0, 2, (b,), generator=g)
        image[0], image[1] = 0, 1
        m.add(s.float(), t.float(), mask, image)
        for r in range(b):
            kind = rows["image" if image[r] else "text"]
            kind[0].append(s.float()[r, :lengths[r]].double())
            kind[1].append(t.float()[r, :lengths[r]].double())
    stats = {k: v.item() for k, v in m.scalars(world=1).items()}
    got = Mismatch.finish(stats)
    every = reference(torch.cat(rows["text"][0] + rows["image"][0]), torch.cat(rows["text"][1] + rows["image"][1]))
    for name in FIGURES:
        assert got[f"mismatch/{name}"] == pytest.approx(every[name], rel=1e-9, abs=1e-15), name
        for kind, (s, t) in rows.items():
            want = reference(torch.cat(s), torch.cat(t))[name]
            assert got[f"mismatch/{kind}/{name}"] == pytest.approx(want, rel=1e-9, abs=1e-15), (kind, name)
    assert 0 < got["mismatch/frac_above_1e-3"] < 1


def test_one_kind_logs_no_split_and_no_tokens_log_nothing():
    m = Mismatch(torch.device("cpu"))
    assert Mismatch.finish({k: v.item() for k, v in m.scalars(1).items()}) == {}
    s = torch.tensor([[-1.0, -2.0]])
    m.add(s, s, torch.ones(1, 2), torch.zeros(1))
    got = Mismatch.finish({k: v.item() for k, v in m.scalars(1).items()})
    assert set(got) == {f"mismatch/{n}" for n in FIGURES} and got["mismatch/abs_max"] == 0


def steps(tmp_path, overrides: list[str], n: int = 2) -> list[dict]:
    t = Trainer(load_config(None, [f"train.output_dir={tmp_path}", *SMALL, *overrides]))
    return [t.train_step() for _ in range(n)]


def assert_agree(records: list[dict], kinds: tuple[str, ...] = ()) -> None:
    for r in records:
        assert r["optimizer_steps"] == 1
        for prefix in ("mismatch/", *(f"mismatch/{k}/" for k in kinds)):
            assert r[f"{prefix}abs_max"] <= 1e-5, (prefix, r[f"{prefix}abs_max"])
            assert r[f"{prefix}frac_above_1e-3"] == 0 and r[f"{prefix}k3_kl"] < 1e-10
            assert r[f"{prefix}pearson"] > 1 - 1e-9


def test_tiny_default_logs_the_mismatch_every_step_in_metrics_jsonl(tmp_path):
    """The default config (fp32, CPU), two steps through ``python -m medix_fast.train``."""
    assert main([f"train.output_dir={tmp_path}", "train.steps=2", *SMALL]) == 0
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert_agree(records)
    assert records[0]["mismatch/abs_max"] > 0  # two code paths, not one number read twice


def test_vl_text_and_image_prompts_agree_and_are_split(tmp_path):
    records = steps(tmp_path, ["model.path=tiny-vl", "data.train_files=[sample:train, sample:train_vl]",
                               "data.min_pixels=784", "data.max_pixels=12544", "train.prompts_per_step=8",
                               "train.mini_batch_prompts=8", "sampling.group_size=2", "train.seed=1"], n=1)
    assert_agree(records, ("text", "image"))


def test_moe_agrees(tmp_path):
    assert_agree(steps(tmp_path, ["model.path=tiny-moe"]))


def test_a_cast_order_change_in_the_decode_path_is_caught(tmp_path, monkeypatch):
    """The planted bug: the decode step's logits rounded through bf16 before the fp32 sampling."""
    real = Runner.decode
    monkeypatch.setattr(Runner, "decode", lambda self, inputs: real(self, inputs).bfloat16().float())
    (record,) = steps(tmp_path, [], n=1)
    assert record["mismatch/abs_max"] > 1e-3
    with pytest.raises(AssertionError):
        assert_agree([record])


def test_no_mismatch_forward_when_switched_off(tmp_path):
    """``mismatch_metrics: false`` with one on-policy mini-batch: no figure (and no extra forward)."""
    (record,) = steps(tmp_path, ["algorithm.mismatch_metrics=false"], n=1)
    assert not [k for k in record if k.startswith("mismatch/")] and math.isfinite(record["loss"])


@pytest.mark.parametrize("share", [True, False])
def test_trainer_logprobs_do_not_depend_on_the_other_rows(share):
    """Group 3 (the widest prompt and completion) alone, with groups 1, 2 and with group 4 (in
    another row order): bitwise the same fp32 log-probs. Under other padding (group 0 widened by
    groups 3 and 4) they move by rounding only: the CPU softmax / GEMM reductions follow a key's
    column, which the left padding shifts (docs/mismatch.md, "Batch invariance")."""
    from test_update import G, make_sequences, tiny_model

    from medix_fast.rl.batch import collate
    from medix_fast.rl.update import PolicyObjective

    model = tiny_model(0)
    seqs = make_sequences(6, model=model)
    objective = PolicyObjective(model, 1.0, share_prompt=share)
    cpu = torch.device("cpu")
    with torch.no_grad():
        alone = objective(collate(seqs, [3], 0, cpu))  # (G, C)
        for groups in ([1, 3, 2], [4, 3]):
            mixed = objective(collate(seqs, groups, 0, cpu))
            k = groups.index(3)
            assert mixed.shape[1] == alone.shape[1]
            assert torch.equal(mixed[k * G:(k + 1) * G], alone), groups
        alone = objective(collate(seqs, [0], 0, cpu))
        padded = objective(collate(seqs, [0, 3, 4], 0, cpu))[:G, :alone.shape[1]]
    assert (padded - alone).abs().max() < 2e-6
