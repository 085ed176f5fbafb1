"""Interruptible sampling calls (medix_fast/generate/partial.py): a call stopped at a share of its
rows and its unfinished rows continued in the next call give the tokens one uninterrupted call
gives (same weights, same row streams), with every log-prob kept, the earlier ones first."""
from __future__ import annotations

import pytest
import torch

from medix_fast.generate import Sampler
from test_sampler import make_prompts, one_thread, tiny_model  # noqa: F401 (fixture)

MAX_NEW = 24
STOP = list(range(0, 300, 10))  # stop tokens (~1 in 10 at random): the rows' lengths differ, a tail


def run_in_pieces(sampler, prompts, n, share, stops=STOP):
    """One call stopped at ``share`` of its rows, then calls continuing the unfinished rows (each
    alone as its prompt's row with its own stream) until none is left; the rows in the first call's order."""
    seeds = [(11, r) for r in range(len(prompts) * n)]
    out = sampler.generate(prompts, n=n, max_new_tokens=MAX_NEW, stop_token_ids=stops, row_seeds=seeds,
                           stop_share=share)
    tokens, logps, reasons = list(out.completion_ids), list(out.logprobs), list(out.finish_reasons)
    calls = 1
    while "partial" in reasons:
        left = [k for k, r in enumerate(reasons) if r == "partial"]
        nxt = sampler.generate([prompts[k // n] for k in left], n=1, max_new_tokens=MAX_NEW, stop_token_ids=stops,
                               row_seeds=[seeds[k] for k in left], continued=[(tokens[k], logps[k]) for k in left],
                               stop_share=share)
        for j, k in enumerate(left):
            assert nxt.completion_ids[j][:len(tokens[k])] == tokens[k]  # the earlier tokens kept, in front
            assert torch.equal(nxt.logprobs[j][:len(tokens[k])], logps[k])
            tokens[k], logps[k], reasons[k] = nxt.completion_ids[j], nxt.logprobs[j], nxt.finish_reasons[j]
        calls += 1
    return tokens, logps, reasons, calls


@pytest.mark.parametrize("share", [0.25, 0.6])
def test_a_stopped_call_continued_equals_one_call(share):
    model = tiny_model("qwen3", dtype=torch.float64)
    prompts = make_prompts([5, 9, 3])
    sampler = Sampler(model, max_num_seqs=4, kv_cache_gb=0.01)  # rows wait and are preempted too
    whole = sampler.generate(prompts, n=3, max_new_tokens=MAX_NEW, stop_token_ids=STOP,
                             row_seeds=[(11, r) for r in range(9)])
    assert len({len(c) for c in whole.completion_ids}) > 2  # lengths differ: a tail to cut
    tokens, logps, reasons, calls = run_in_pieces(sampler, prompts, 3, share)
    assert calls > 1 and tokens == whole.completion_ids and reasons == whole.finish_reasons
    for a, b in zip(logps, whole.logprobs):  # recomputed K/V vs decoded: fp64 rounding only
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


def test_the_first_stopped_call_ends_at_the_share_with_required_rows_done():
    model = tiny_model("qwen2", dtype=torch.float64)
    prompts = make_prompts([4, 6])
    sampler = Sampler(model, max_num_seqs=8, kv_cache_gb=0.01)
    whole = sampler.generate(prompts, n=4, max_new_tokens=MAX_NEW, stop_token_ids=STOP, seed=3)
    longest = max(range(8), key=lambda k: len(whole.completion_ids[k]))
    required = [k == longest for k in range(8)]
    out = sampler.generate(prompts, n=4, max_new_tokens=MAX_NEW, stop_token_ids=STOP, seed=3, stop_share=0.25,
                           required=required)
    assert out.finish_reasons[longest] != "partial" and out.completion_ids == whole.completion_ids  # ran to the end
    shortest = min(range(8), key=lambda k: len(whole.completion_ids[k]))
    out = sampler.generate(prompts, n=4, max_new_tokens=MAX_NEW, stop_token_ids=STOP, seed=3, stop_share=0.25,
                           required=[k == shortest for k in range(8)])
    assert "partial" in out.finish_reasons  # a required row that finished early does not hold the stop
    out = sampler.generate(prompts, n=4, max_new_tokens=MAX_NEW, stop_token_ids=STOP, seed=3, stop_share=0.25)
    done = [r != "partial" for r in out.finish_reasons]
    shortest = sorted(len(c) for c in whole.completion_ids)[1]  # the 2nd row to finish (ceil(0.25 * 8) = 2)
    assert sum(done) >= 2 and "partial" in out.finish_reasons
    assert max(len(c) for c in out.completion_ids) == shortest  # stopped at the step the 2nd row ended
    for k in range(8):
        assert out.completion_ids[k] == whole.completion_ids[k][:len(out.completion_ids[k])]


def test_the_routing_record_of_a_continued_row_covers_it_whole():
    """A MoE row cut and continued: its record (the recompute's and the decode's) equals one call's."""
    from medix_fast.demo.cache import resolve_model_path
    from medix_fast.model.loading import load_model

    model, _ = load_model(resolve_model_path("tiny-moe"), dtype=torch.float32, device="cpu")
    prompts = make_prompts([5, 8])
    stops = list(range(0, model.config.get_text_config().vocab_size, 12))  # ~1 in 12: lengths differ
    sampler = Sampler(model, max_num_seqs=8, kv_cache_gb=0.01, record_routing=True)
    whole = sampler.generate(prompts, n=3, max_new_tokens=MAX_NEW, stop_token_ids=stops,
                             row_seeds=[(11, r) for r in range(6)])
    tokens, _, _, calls = run_in_pieces(sampler, prompts, 3, 0.5, stops)
    assert calls > 1 and tokens == whole.completion_ids
    out = sampler.generate(prompts, n=3, max_new_tokens=MAX_NEW, stop_token_ids=stops,
                           row_seeds=[(11, r) for r in range(6)], stop_share=0.5)
    left = [k for k, r in enumerate(out.finish_reasons) if r == "partial"]
    assert left and all(out.routing[k].shape[0] == 0 for k in left)  # none for an unfinished row
    rest = sampler.generate([prompts[k // 3] for k in left], n=1, max_new_tokens=MAX_NEW, stop_token_ids=stops,
                            row_seeds=[(11, k) for k in left],
                            continued=[(out.completion_ids[k], out.logprobs[k]) for k in left])
    for j, k in enumerate(left):
        assert torch.equal(rest.routing[j], whole.routing[k]), k


def test_per_prompt_counts_and_bad_continuations_are_named():
    model = tiny_model("llama", dtype=torch.float64)
    prompts = make_prompts([4, 6])
    sampler = Sampler(model, max_num_seqs=8, kv_cache_gb=0.01)
    out = sampler.generate(prompts, n=[1, 3], max_new_tokens=4, row_seeds=[(0, 0), (0, 3), (0, 4), (0, 5)])
    both = sampler.generate(prompts, n=3, max_new_tokens=4, seed=0)  # rows (0, 0) .. (0, 5)
    assert out.completion_ids == both.completion_ids[:1] + both.completion_ids[3:]
    for kw, msg in [(dict(n=[1]), "n has 1 counts for 2 prompts"), (dict(n=[1, 0]), "integer >= 1"),
                    (dict(n=1, continued=[([1, 2], torch.zeros(1)), None]), "continued row 0: 2 tokens need"),
                    (dict(n=1, continued=[([1] * 4, torch.zeros(4)), None]), "leave nothing to sample"),
                    (dict(n=1, continued=[None]), "continued has 1 entries for 2 rows"),
                    (dict(n=1, stop_share=0.0), "stop_share must be in (0, 1]"),
                    (dict(n=1, stop_share=0.5, required=[True]), "required has 1 entries")]:
        with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            sampler.generate(prompts, max_new_tokens=4, seed=0, **kw)
    with pytest.raises(ValueError, match="holds a stop token"):
        sampler.generate(prompts, n=1, max_new_tokens=4, seed=0, stop_token_ids=[5],
                         continued=[([5], torch.zeros(1)), None])
