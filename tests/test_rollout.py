"""The rollout as a unit (``medix_fast.rl.rollout.Rollout``), with a stub sampler and stub rewards.

The stub sampler writes each response's identity into its tokens (``[prompt code, 2000 + sample]``,
then a stop token on even samples) and derives its log-probs from them; the stub reward reads the
identity back from the decoded text and looks the reward up in a table. The tests then recompute,
from each returned row's own tokens, what that row's reward, advantage (``tests/reference.py``) and
log-probs must be, so a row paired with another row's values fails. A last test builds the real
trainer on the embedded tiny model and checks which stop tokens reach its sampler.

Run: pytest tests/test_rollout.py
"""
from __future__ import annotations

import pytest
import torch

from medix_fast.config import Config
from medix_fast.data import Prompt, PromptLoader
from medix_fast.distributed import DistInfo
from medix_fast.generate.sampler import SamplerOutput
from medix_fast.rl.rollout import Rollout
from reference import group_advantages as ref_advantages
from syncs import count_syncs

G, STOP, N_PROMPTS = 4, 7, 12
CODE, SAMPLE = 1000, 2000  # token = CODE + prompt index, SAMPLE + sample index


def reward_table(kind: str) -> torch.Tensor:
    """(prompts, G) rewards: ``distinct`` values, or ``filter``: prompt k % 3 == 0 all 0,
    k % 3 == 1 all 1, k % 3 == 2 distinct (the only groups DAPO's filter keeps)."""
    values = torch.rand(N_PROMPTS, G, generator=torch.Generator().manual_seed(3)) * 0.9 + 0.05
    if kind == "filter":
        values[0::3] = 0.0
        values[1::3] = 1.0
    return values


def identity(completion: list[int]) -> tuple[int, int]:
    """(prompt index, sample index) written into a stub completion."""
    return completion[0] - CODE, completion[1] - SAMPLE


def stub_logprobs(completion: list[int]) -> torch.Tensor:
    k, j = identity(completion)
    return -(torch.arange(len(completion)) + 10 * k + j + 1) / 100.0


class StubSampler:
    """Records each call; prompt-major completions that name their prompt and sample."""

    def __init__(self):
        self.calls = []

    def generate(self, prompt_ids, n, **kwargs):
        self.calls.append({"prompts": [p[0] - CODE for p in prompt_ids], "n": n, **kwargs})
        comps = [[p[0], SAMPLE + j] + ([STOP] if j % 2 == 0 else []) for p in prompt_ids for j in range(n)]
        return SamplerOutput(comps, [stub_logprobs(c) for c in comps],
                             ["stop" if c[-1] == STOP else "length" for c in comps])


class StubTokenizer:
    def batch_decode(self, seqs, skip_special_tokens=True):
        return [" ".join(map(str, s)) for s in seqs]


class StubReward:
    """Looks each decoded response up in ``table`` by the identity in its text."""

    def __init__(self, table: torch.Tensor):
        self.table = table

    def __call__(self, texts, solutions, response_lengths=None):
        ids = [[int(t) for t in text.split()] for text in texts]
        assert all(STOP not in c for c in ids)  # the stop token is dropped before scoring
        assert all(s == f"answer {identity(c)[0]}" for s, c in zip(solutions, ids))  # each row's own solution
        overall = torch.tensor([float(self.table[identity(c)]) for c in ids])
        return {"overall": overall, "format": torch.ones_like(overall)}


def make_rollout(kind="distinct", estimator="grpo", dynamic=False, per_step=4, chunk=3, max_tries=5, rank=0,
                 world=1, shuffle=False, seed=0):
    cfg = Config()
    cfg.sampling.group_size, cfg.sampling.max_new_tokens, cfg.sampling.temperature = G, 8, 0.7
    a = cfg.algorithm
    a.advantage_estimator, a.dynamic_sampling, a.chunk_prompts, a.max_tries = estimator, dynamic, chunk, max_tries
    cfg.train.prompts_per_step, cfg.train.mini_batch_prompts, cfg.train.seed = per_step, per_step, seed
    prompts = [Prompt([CODE + k, 5, 6], f"answer {k}") for k in range(N_PROMPTS)]
    sampler = StubSampler()
    rollout = Rollout(sampler, StubReward(reward_table(kind)), StubTokenizer(), prompts,
                      PromptLoader(N_PROMPTS, seed, shuffle, rank, world), cfg, DistInfo(rank, world),
                      stop_token_ids=[STOP, 3])
    return rollout, sampler


def check_rows(seqs, table: torch.Tensor, estimator: str) -> list[int]:
    """Each row's prompt, log-probs and advantage are its own; returns the groups' prompt indices."""
    ids = [identity(c) for c in seqs.completion_ids]
    groups = [ids[i:i + G] for i in range(0, len(ids), G)]
    for group in groups:  # a whole group: one prompt, each of its G samples once
        assert sorted(j for _, j in group) == list(range(G)) and len({k for k, _ in group}) == 1
    for (k, _), prompt, logp, comp in zip(ids, seqs.prompt_ids, seqs.sampling_logprobs, seqs.completion_ids):
        assert prompt == [CODE + k, 5, 6]
        torch.testing.assert_close(logp[:len(comp)], stub_logprobs(comp))
        assert not logp[len(comp):].any()  # padded with zeros
    rewards = torch.tensor([float(table[i]) for i in ids])
    torch.testing.assert_close(seqs.advantages.double(), ref_advantages(rewards, G, estimator), rtol=1e-5, atol=1e-5)
    return [group[0][0] for group in groups]


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_each_row_gets_the_advantage_of_its_own_reward_under_the_configured_estimator(estimator, dynamic):
    kind = "filter" if dynamic else "distinct"
    rollout, _ = make_rollout(kind, estimator, dynamic, shuffle=True)
    seqs, metrics = rollout.collect(step=1)
    assert len(seqs.completion_ids) == 4 * G
    check_rows(seqs, reward_table(kind), estimator)
    assert metrics["advantage/abs_mean"] == pytest.approx(seqs.advantages.abs().mean().item(), rel=1e-6)


def test_dynamic_sampling_drops_constant_groups_and_draws_until_enough():
    """Draws of 4, then 3 prompts (no shuffle: 0..3, 4..6, 7..9, 10, 11, 0): one mixed group per draw."""
    rollout, sampler = make_rollout("filter", dynamic=True, per_step=4, chunk=3, max_tries=5)
    seqs, metrics = rollout.collect(step=1)
    assert [c["prompts"] for c in sampler.calls] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 0]]
    assert check_rows(seqs, reward_table("filter"), "grpo") == [2, 5, 8, 11]
    assert metrics["rollout/tries"] == 4
    assert metrics["rollout/kept_group_fraction"] == pytest.approx(4 / 13)
    assert metrics["reward/overall"] == pytest.approx(reward_table("filter")[[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0]]
                                                      .mean().item(), rel=1e-6)  # every sampled response counts


def test_dynamic_sampling_stops_after_max_tries_with_what_it_kept():
    rollout, sampler = make_rollout("filter", dynamic=True, per_step=4, chunk=3, max_tries=2)
    seqs, metrics = rollout.collect(step=1)
    assert len(sampler.calls) == 2 and metrics["rollout/tries"] == 2
    assert check_rows(seqs, reward_table("filter"), "grpo") == [2, 5]


def test_dapo_filter_keeps_group_means_strictly_inside_its_bounds():
    """A group mean exactly on filter_low or filter_high carries no signal DAPO keeps: dropped."""
    from types import SimpleNamespace

    this = SimpleNamespace(cfg=SimpleNamespace(algorithm=SimpleNamespace(filter_low=0.25, filter_high=0.75)))
    scores = torch.tensor([0.0, 0.5, 0.0, 0.5, 1.0, 0.5, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0])  # means .25 .75 .5 .0 1.
    means = scores.view(-1, 2).mean(1).tolist()
    assert means == [0.25, 0.25, 0.75, 0.5, 0.0, 1.0]
    assert Rollout._informative(this, scores, 2) == [3]


def test_without_dynamic_sampling_every_group_is_kept_after_one_draw():
    rollout, sampler = make_rollout("filter", dynamic=False, per_step=4)
    seqs, metrics = rollout.collect(step=1)
    assert len(sampler.calls) == 1 and metrics["rollout/kept_group_fraction"] == 1.0
    assert check_rows(seqs, reward_table("filter"), "grpo") == [0, 1, 2, 3]
    assert seqs.advantages[:2 * G].abs().max() == 0  # the constant groups carry no signal


def test_sampler_gets_the_sampling_config_and_the_stop_tokens():
    rollout, sampler = make_rollout()
    rollout.collect(step=1)
    (call,) = sampler.calls
    assert call["n"] == G and call["stop_token_ids"] == [STOP, 3]
    assert (call["temperature"], call["max_new_tokens"], call["images"]) == (0.7, 8, None)


def seeds(step: int, rank: int = 0, world: int = 1, seed: int = 0) -> list[int]:
    rollout, sampler = make_rollout("filter", dynamic=True, per_step=2 * world, chunk=2 * world, max_tries=3,
                                    rank=rank, world=world, seed=seed)
    rollout.collect(step)
    return [c["seed"] for c in sampler.calls]


def test_each_step_try_and_rank_draws_its_own_seed_and_a_rerun_repeats_it():
    drawn = {(step, rank): seeds(step, rank, world=2) for step in (1, 2, 3) for rank in (0, 1)}
    assert all(len(s) == 3 for s in drawn.values())  # (tries: the filter keeps 1 group in 3)
    flat = [s for v in drawn.values() for s in v]
    assert len(set(flat)) == len(flat), drawn
    assert seeds(2, 1, world=2) == drawn[2, 1]  # a resumed run samples the same
    assert seeds(2, 1, world=2, seed=1) != drawn[2, 1]  # and train.seed changes it


def test_ranks_take_whole_disjoint_groups_of_the_global_batch():
    """Two ranks (no process group: the agreement all-reduce is then local) draw disjoint halves
    of the prompts one process draws, each group whole on one rank."""
    one, _ = make_rollout(per_step=4, shuffle=True)
    whole = check_rows(one.collect(1)[0], reward_table("distinct"), "grpo")
    halves = []
    for rank in (0, 1):
        rollout, _ = make_rollout(per_step=4, shuffle=True, rank=rank, world=2)
        seqs, _ = rollout.collect(1)
        assert len(seqs.completion_ids) == 2 * G
        halves.append(check_rows(seqs, reward_table("distinct"), "grpo"))
    assert not set(halves[0]) & set(halves[1])
    assert sorted(halves[0] + halves[1]) == sorted(whole)


def test_trainer_gives_the_sampler_the_tokenizer_and_generation_config_stop_tokens(tmp_path):
    """The real trainer on a copy of the tiny model whose generation config ends at <|endoftext|>
    (0) only: the tokenizer's eos <|im_end|> (2) and the generation config's both reach the sampler."""
    import json
    import shutil

    from medix_fast.config import load_config
    from medix_fast.demo.cache import ensure_tiny_model
    from medix_fast.train import Trainer

    model = shutil.copytree(ensure_tiny_model(), tmp_path / "tiny")
    gen = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [0]}))
    cfg = load_config(None, [f"model.path={model}", "train.prompts_per_step=2", "train.mini_batch_prompts=2",
                             "sampling.group_size=2", "sampling.max_new_tokens=4", "eval.every=0",
                             "rewards.weights={format: 1.0}", "algorithm.dynamic_sampling=false", "data.max_examples=4",
                             "logging.progress=false", "logging.tensorboard=false", f"train.output_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg)
    assert trainer.tokenizer.eos_token_id == 2 and trainer.model.generation_config.eos_token_id == [0]
    calls = []
    real = trainer.sampler.generate
    trainer.rollout.sampler.generate = lambda *a, **kw: calls.append(kw) or real(*a, **kw)
    trainer.rollout.collect(1)
    assert len(calls) == 1 and sorted(calls[0]["stop_token_ids"]) == [0, 2]


class TableReward(StubReward):
    """The stub reward without host reads of tensors (its table read once, up front)."""

    def __init__(self, table: torch.Tensor):
        self.rows = table.tolist()

    def __call__(self, texts, solutions, response_lengths=None):
        ids = [identity([int(t) for t in text.split()]) for text in texts]
        overall = torch.tensor([self.rows[k][j] for k, j in ids])
        return {"overall": overall, "format": torch.ones_like(overall)}


SYNC_BOUND = 6  # syncs of one DAPO try today: 4 (the filter's mask read, the ranks' agreement, two metric reads)


@pytest.mark.parametrize("per_step", [3, 12])
def test_host_syncs_of_a_rollout_do_not_grow_with_its_rows(per_step):
    """12 rows and 48: a host read per row (a log-prob or reward copied back), or per group, fails the bound."""
    rollout, _ = make_rollout(kind="filter", dynamic=True, per_step=per_step, chunk=per_step, max_tries=1)
    rollout.reward_fn = TableReward(reward_table("filter"))
    with count_syncs() as syncs:
        seqs, metrics = rollout.collect(1)
    assert metrics["rollout/kept_groups"] == per_step // 3 and len(seqs.lengths) == per_step // 3 * G
    assert syncs.count <= SYNC_BOUND, "\n".join(syncs.where)
