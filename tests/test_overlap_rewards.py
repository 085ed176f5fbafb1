"""Reward scoring that overlaps the decode (``rollout.overlap_rewards``, rl/overlap.py): groups are
scored on the worker thread as they finish, and the run is the one that scores after the call.

Run: pytest tests/test_overlap_rewards.py
"""
from __future__ import annotations

import threading

import pytest
import torch

from test_partial_rollout import PARTIAL
from test_train import SMALL, comparable

from medix_fast.metrics import read_metrics
from medix_fast.rl.overlap import GroupScorer
from medix_fast.rl.rollout import Rollout
from medix_fast.train import main


@pytest.mark.parametrize("extra", [[*SMALL, "eval.every=0", "sampling.max_new_tokens=48"], PARTIAL],
                         ids=["synchronous", "partial"])
def test_overlapped_scoring_equals_scoring_after_the_call(tmp_path, monkeypatch, extra):
    plain, overlapped = tmp_path / "plain", tmp_path / "overlapped"
    assert main([*extra, "train.steps=2", f"train.output_dir={plain}"]) == 0
    threads = []
    real = Rollout.score
    monkeypatch.setattr(Rollout, "score", lambda self, *a: threads.append(threading.current_thread().name)
                        or real(self, *a))
    assert main([*extra, "train.steps=2", "rollout.overlap_rewards=true", f"train.output_dir={overlapped}"]) == 0
    assert threads and all(t.startswith("medix-rewards") for t in threads)  # every score on the worker
    got = comparable(read_metrics(overlapped / "metrics.jsonl"))
    want = comparable(read_metrics(plain / "metrics.jsonl"))
    assert [{k for k in g.keys() | w.keys() if g.get(k) != w.get(k)} for g, w in zip(got, want)] == [set(), set()]


def test_groups_are_scored_in_batches_as_they_finish_and_returned_in_order():
    calls = []

    def score(groups, tokens):
        calls.append(list(groups))
        return {"overall": torch.tensor([float(tokens[r][0]) for e in groups for r in (2 * e, 2 * e + 1)])}

    scorer = GroupScorer(score, [[0, 1], [2, 3], [4, 5]], batch_groups=2, device=torch.device("cpu"))
    scorer.finished([(3, [30]), (0, [0])])
    scorer.finished([(2, [20]), (5, [50])])  # group 1 done: 1 ready, fewer than a batch
    assert not calls
    scorer.finished([(1, [10]), (4, [40])])  # groups 0 and 2 done too: 3 ready, one batch goes
    out = scorer.results([2, 0, 1])
    assert calls == [[1, 0, 2]]
    assert out["overall"].tolist() == [40.0, 50.0, 0.0, 10.0, 20.0, 30.0]
    with pytest.raises(RuntimeError, match="groups \\[0\\] were not finished"):
        GroupScorer(score, [[0, 1]], batch_groups=1, device=torch.device("cpu")).results([0])
