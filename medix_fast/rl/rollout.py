"""Rollout: draw prompts, sample G responses each, score them, group advantages, DAPO filter.

One call of :meth:`Rollout.collect` gathers this rank's ``prompts_per_step / world`` groups:

1. draw prompts from the :class:`~medix_fast.data.PromptLoader` (whole groups stay on a rank);
2. sample ``group_size`` responses per prompt with the in-process sampler on the live weights;
3. score them with the batched reward (one call for the whole chunk);
4. with ``algorithm.dynamic_sampling`` (DAPO), keep only groups whose mean ``filter_key``
   reward lies strictly between ``filter_low`` and ``filter_high`` and draw further chunks of
   ``chunk_prompts`` until every rank has its share or ``max_tries`` draws were made (the
   ranks agree through one all-reduce per try);
5. group advantages of the kept groups (``medix_fast.kernels.group_advantages``).

With ``rollout.partial`` (``carry.py``) each call also continues the groups earlier steps left
unfinished and stops once ``rollout.stop_share`` of its rows are done; only the groups done by
then are scored, filtered and trained (their number varies around ``prompts_per_step``), the rest
are carried. ``rollout/*`` then also gives the groups carried, the trained tokens by staleness and
the share of them drawn by an older policy.

Reward metrics are means over every sampled response of the step (kept or not), so they track
the policy itself; ``kept_group_fraction`` is kept / drawn groups.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .. import distributed as D
from ..data.prompt import response_texts
from ..errors import ConfigError
from ..kernels import group_advantages
from ..seeds import mix_seed
from .batch import Sequences, pad_rows
from .carry import Carry, staleness_tokens
from .overlap import GroupScorer


@dataclass
class _Draw:
    """Sampled and scored groups, flat and group-major."""

    prompt_ids: list[list[int]] = field(default_factory=list)
    images: list = field(default_factory=list)  # a medix_fast.data.vision.PixelBatch or None per response
    completion_ids: list[list[int]] = field(default_factory=list)
    logprobs: list[torch.Tensor] = field(default_factory=list)  # (len,) fp32 each, on the sampler's device
    routing: list[torch.Tensor] | None = None  # MoE routing replay: each response's recorded experts
    rewards: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # (rows,) pieces on the reward device
    staleness: list[dict[int, int]] = field(default_factory=list)  # partial: each group's tokens by staleness
    truncated: int = 0  # responses cut at max_new_tokens
    sample_s: float = 0.0
    reward_s: float = 0.0

    def extend(self, other: "_Draw", groups: list[int], g: int) -> None:
        rows = [gi * g + k for gi in groups for k in range(g)]
        self.prompt_ids += [other.prompt_ids[r] for r in rows]
        self.images += [other.images[r] for r in rows]
        self.completion_ids += [other.completion_ids[r] for r in rows]
        self.logprobs += [other.logprobs[r] for r in rows]
        if other.routing is not None:
            self.routing = (self.routing or []) + [other.routing[r] for r in rows]
        self.staleness += [other.staleness[gi] for gi in groups] if other.staleness else []
        if len(rows) == len(other.completion_ids):  # every group: no gather
            for key, value in other.rewards.items():
                self.rewards.setdefault(key, []).extend(value)
            return
        for key, value in other.rewards.items():
            index = D.to_device(torch.tensor(rows, dtype=torch.long), value[0].device)  # (rows,)
            self.rewards.setdefault(key, []).append(value[0].index_select(0, index))


def step_seed(seed: int, step: int, rank: int, attempt: int) -> int:
    """A sampler seed that depends only on (seed, step, rank, attempt): resumable runs repeat it."""
    return mix_seed(seed, step, attempt, rank)


def max_trained_groups(cfg, world: int) -> int:
    """The most groups a rank trains in one step: ``prompts_per_step / world``; with partial
    rollouts up to 1 + max_staleness steps' groups finish at once (or a later try of dynamic
    sampling adds a chunk to fewer than that)."""
    target = cfg.train.prompts_per_step // world
    if not cfg.rollout.partial:
        return target
    chunk = max(1, (cfg.algorithm.chunk_prompts or cfg.train.prompts_per_step) // world)
    return max((1 + cfg.rollout.max_staleness) * target, target - 1 + chunk)


class Rollout:
    def __init__(self, sampler, reward_fn, tokenizer, prompts, loader, cfg, info: D.DistInfo, *, stop_token_ids,
                 vision=None):
        self.sampler, self.reward_fn, self.tokenizer, self.vision = sampler, reward_fn, tokenizer, vision
        self.prompts, self.loader, self.cfg, self.info = prompts, loader, cfg, info
        self.stop_token_ids = stop_token_ids
        world = info.world
        t = cfg.train
        if t.prompts_per_step % world or t.mini_batch_prompts % world:
            raise ConfigError(f"train.prompts_per_step ({t.prompts_per_step}) and train.mini_batch_prompts "
                             f"({t.mini_batch_prompts}) must be multiples of the world size {world}")
        self.target = t.prompts_per_step // world
        self.chunk = max(1, (cfg.algorithm.chunk_prompts or t.prompts_per_step) // world)
        self.carry = Carry(cfg.sampling.group_size) if cfg.rollout.partial else None

    def pixels(self, ids: list[int]) -> list:
        """Each prompt's image decoded and patchified (a PixelBatch; None without image or VL model)."""
        return [None if self.vision is None else self.vision.pixels(self.prompts[i].image) for i in ids]

    def generate(self, ids: list[int], n: int, temperature: float, top_p: float, top_k: int, seed: int,
                 on_finish=None):
        """(prompt ids per response, completions, sampling log-probs, finish reasons, images per
        response, recorded routing per response or None), prompt-major; each image is encoded once
        for its prompt's n responses."""
        prompt_ids = [self.prompts[i].ids for i in ids]
        images = self.pixels(ids)
        out = self.sampler.generate(prompt_ids, n=n, max_new_tokens=self.cfg.sampling.max_new_tokens,
                                    temperature=temperature, top_p=top_p, top_k=top_k,
                                    stop_token_ids=self.stop_token_ids, seed=seed,
                                    images=images if self.vision is not None else None, on_finish=on_finish)
        comps = [list(c) for c in out.completion_ids]
        logps = [lp.detach().float() for lp in out.logprobs]  # stay on the device: no per-row copy
        reasons = list(out.finish_reasons)
        return ([p for p in prompt_ids for _ in range(n)], comps, logps, reasons,
                [b for b in images for _ in range(n)], out.routing)

    def score(self, ids: list[int], n: int, comps: list[list[int]]) -> dict[str, torch.Tensor]:
        """Rewards of the decoded completions (stop token dropped) against the prompts' solutions,
        (N,) float32 each on the reward function's device."""
        texts = response_texts(self.tokenizer, comps, self.stop_token_ids)
        solutions = [self.prompts[i].solution for i in ids for _ in range(n)]
        lengths = torch.tensor([len(c) for c in comps])
        return {k: v.float() for k, v in self.reward_fn(texts, solutions, response_lengths=lengths).items()}

    def _draw_partial(self, ids: list[int], seed: int, step: int, attempt: int) -> _Draw:
        """One call continuing the carried groups (first try only) beside ``ids``' fresh ones,
        stopped at ``rollout.stop_share``; the groups done by then, scored."""
        s, r, g = self.cfg.sampling, self.cfg.rollout, self.cfg.sampling.group_size
        t0 = time.perf_counter()
        call = self.carry.call(ids, step, seed, r.max_staleness, carried=attempt == 0)
        for (p, _), image in zip(call.entries[len(call.entries) - len(ids):], self.pixels(ids)):
            p.image = image  # decoded once: a carried group keeps its prompt's pixels

        def completions(e, tokens):  # the group's rows in order: this call's, and those finished before
            p, rows = call.entries[e]
            mine = dict(zip(rows, call.rows[e]))
            return [tokens[mine[j]] if j in mine else p.tokens[j] for j in range(g)]
        scorer = self._scorer(call.prompts, call.rows, completions)
        out = self._sample(call, s, r.stop_share, scorer.finished if scorer else None)
        done = self.carry.absorb(call, out, step)
        finished = [e for e, (p, _) in enumerate(call.entries) if p.done]  # ``done``'s entries, in order
        late = [p.prompt for p in done if step - p.born > r.max_staleness]
        if late:  # the required rows of a due group finish before the call stops: never reached
            raise RuntimeError(f"prompts {late}: trained more than rollout.max_staleness={r.max_staleness} steps late")
        t1 = time.perf_counter()
        comps = [c for p in done for c in p.tokens]
        draw = _Draw([self.prompts[p.prompt].ids for p in done for _ in range(g)],
                     [p.image for p in done for _ in range(g)], comps, [lp for p in done for lp in p.logprobs],
                     [x for p in done for x in p.routing] if self.cfg.model.router_replay else None,
                     staleness=[staleness_tokens([p], step) for p in done],
                     truncated=sum(x == "length" for p in done for x in p.reasons), sample_s=t1 - t0)
        scores = scorer.results(finished) if scorer and finished else self.score([p.prompt for p in done], g, comps)
        draw.rewards = {k: [v] for k, v in scores.items()}  # 0 rows too
        draw.reward_s = time.perf_counter() - t1
        return draw

    def _sample(self, call, s, share: float, on_finish=None):
        """The sampler's output for ``call`` (``carry.Call``)."""
        images = [p.image for p, _ in call.entries] if self.vision is not None else None
        return self.sampler.generate([self.prompts[i].ids for i in call.prompts], n=call.counts,
                                     max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                                     top_k=s.top_k, stop_token_ids=self.stop_token_ids, row_seeds=call.seeds,
                                     continued=call.continued, stop_share=share, required=call.required,
                                     images=images, on_finish=on_finish)

    def _scorer(self, ids: list[int], group_rows: list[list[int]], earlier=None) -> GroupScorer | None:
        """``rollout.overlap_rewards``: a scorer of group ``e`` (prompt ``ids[e]``, its rows
        ``group_rows[e]`` in the call) as soon as it finishes; ``earlier(e, tokens)``: the group's
        completions in row order, from this call's ``tokens`` and what it finished before."""
        if not self.cfg.rollout.overlap_rewards or not ids:
            return None
        g = self.cfg.sampling.group_size
        earlier = earlier or (lambda e, tokens: [tokens[r] for r in group_rows[e]])

        def score(groups, tokens):
            return self.score([ids[e] for e in groups], g, [c for e in groups for c in earlier(e, tokens)])
        return GroupScorer(score, group_rows, max(1, len(ids) // 4), self.info.device, [g] * len(ids))

    def _draw(self, ids: list[int], seed: int) -> _Draw:
        s = self.cfg.sampling
        t0 = time.perf_counter()
        g = s.group_size
        scorer = self._scorer(ids, [list(range(e * g, (e + 1) * g)) for e in range(len(ids))])
        prompts, comps, logps, reasons, images, routing = self.generate(
            ids, g, s.temperature, s.top_p, s.top_k, seed, scorer.finished if scorer else None)
        t1 = time.perf_counter()
        rewards = scorer.results(list(range(len(ids)))) if scorer else self.score(ids, g, comps)
        return _Draw(prompts, images, comps, logps, routing, {k: [v] for k, v in rewards.items()},
                     truncated=sum(r == "length" for r in reasons), sample_s=t1 - t0,
                     reward_s=time.perf_counter() - t1)

    def collect(self, step: int) -> tuple[Sequences, dict]:
        """This rank's groups for one training step and the step's rollout metrics."""
        a, g = self.cfg.algorithm, self.cfg.sampling.group_size
        kept, seen = _Draw(), _Draw()
        n_kept = drawn = attempt = 0
        while True:
            count = self.target if attempt == 0 else self.chunk
            ids = self.loader.next(count)
            if n_kept + self._in_flight(step) < self.target:
                seed = step_seed(self.cfg.train.seed, step, self.info.rank, attempt)
                draw = self._draw_partial(ids, seed, step, attempt) if self.carry else self._draw(ids, seed)
                groups = len(draw.completion_ids) // g
                good = self._informative(draw.rewards[a.filter_key][0], g) if a.dynamic_sampling and groups \
                    else list(range(groups))
                kept.extend(draw, good, g)
                seen.extend(draw, list(range(groups)), g)
                seen.truncated += draw.truncated
                seen.sample_s += draw.sample_s
                seen.reward_s += draw.reward_s
                n_kept += len(good)
                drawn += groups
            elif getattr(self.sampler, "collective", False):  # its tensor-parallel group decodes together
                s = self.cfg.sampling
                self.generate([], s.group_size, s.temperature, s.top_p, s.top_k, 0)
            attempt += 1
            if not a.dynamic_sampling:
                break
            have = n_kept + self._in_flight(step)  # partial: this step's groups still sampling count too
            done = D.reduce_scalars({"done": float(have >= self.target)}, self.info.device, "min")["done"]
            if done or attempt >= a.max_tries:
                break
        rows = (n_kept if self.carry else min(n_kept, self.target)) * g  # partial: every group done now
        rewards = {k: torch.cat(v)[:rows] for k, v in kept.rewards.items()}
        self.last_rewards = rewards  # (rows,) per component, for the rollouts sample (rollouts_log.py)
        device = self.info.device
        adv = group_advantages(rewards["overall"].to(device), g, estimator=a.advantage_estimator) if rows \
            else torch.zeros(0, device=device)  # (rows,) on the device
        seqs = Sequences(kept.prompt_ids[:rows], kept.completion_ids[:rows], pad_rows(kept.logprobs[:rows], device),
                         adv, g, kept.images[:rows], kept.routing[:rows] if kept.routing is not None else None)
        return seqs, self._metrics(seen, seqs, n_kept, drawn, attempt, kept.staleness[:rows // g])

    def _in_flight(self, step: int) -> int:
        """Groups first drawn this step and not done yet (partial rollouts): trained in a later step,
        they are not replaced by another try of dynamic sampling."""
        return sum(p.born == step for p in self.carry.pending) if self.carry else 0

    def _informative(self, scores: torch.Tensor, g: int) -> list[int]:
        """DAPO's filter: the groups whose mean score lies strictly inside (filter_low, filter_high),
        a device mask read on the host once (which rows to keep)."""
        a = self.cfg.algorithm
        means = scores.view(-1, g).mean(dim=1)  # (groups,)
        ok = (means > a.filter_low) & (means < a.filter_high)  # (groups,)
        return [k for k, keep in enumerate(ok.tolist()) if keep]

    def _metrics(self, seen: _Draw, seqs: Sequences, n_kept: int, drawn: int, attempts: int,
                 staleness: list[dict[int, int]]) -> dict:
        """The step's rollout metrics: named sums (device tensors and host numbers) reduced over the
        ranks in one all-reduce, the slowest rank's lengths and times in one more."""
        lengths = [len(c) for c in seen.completion_ids]
        adv = seqs.advantages.double()
        local = {f"reward/{k}": torch.cat(seen.rewards[k]).double().sum() for k in sorted(seen.rewards)}
        local.update(length=float(sum(lengths)), responses=float(len(lengths)), truncated=float(seen.truncated),
                     adv=adv.sum(), adv_sq=adv.pow(2).sum(), adv_abs=adv.abs().sum(), adv_n=float(adv.numel()),
                     kept=float(n_kept), drawn=float(drawn), groups=float(len(seqs.lengths) // seqs.group_size),
                     tokens=float(sum(map(len, seqs.prompt_ids)) + sum(seqs.lengths)))
        ages = range(self.cfg.rollout.max_staleness + 1) if self.carry else ()
        local.update({f"stale{k}": float(sum(d.get(k, 0) for d in staleness)) for k in ages})
        if self.carry:
            local["carried"] = float(len(self.carry.pending))
        total = D.reduce_scalars(local, self.info.device)
        slowest = D.reduce_scalars({"length": float(max(lengths, default=0)), "sample_s": seen.sample_s,
                                    "reward_s": seen.reward_s}, self.info.device, "max")
        n_resp = max(total["responses"], 1.0)
        n_adv = max(total["adv_n"], 1.0)
        adv_mean = total["adv"] / n_adv
        out = {k: total[k] / n_resp for k in local if k.startswith("reward/")}
        out.update({
            "response/length_mean": total["length"] / n_resp,
            "response/length_max": slowest["length"],
            "response/truncated_fraction": total["truncated"] / n_resp,
            "advantage/mean": adv_mean,
            "advantage/std": max(total["adv_sq"] / n_adv - adv_mean ** 2, 0.0) ** 0.5,
            "advantage/abs_mean": total["adv_abs"] / n_adv,
            "rollout/kept_group_fraction": total["kept"] / max(total["drawn"], 1.0),
            "rollout/kept_groups": min(total["kept"], float(self.cfg.train.prompts_per_step)),
            "rollout/trained_groups": total["groups"],
            "rollout/trained_tokens": total["tokens"],
            "rollout/tries": attempts,
            "throughput/sample_tokens_per_s": total["length"] / max(slowest["sample_s"], 1e-9),
            "time/sample_s": slowest["sample_s"],
            "time/reward_s": slowest["reward_s"],
        })
        if self.carry:  # partial rollouts: groups in flight, trained completion tokens by staleness (steps)
            sampled = sum(total[f"stale{k}"] for k in ages)
            out["rollout/carried_groups"] = total["carried"]
            out["rollout/offpolicy_token_fraction"] = (sampled - total["stale0"]) / max(sampled, 1.0)
            out.update({f"rollout/stale{k}_tokens": total[f"stale{k}"] for k in ages})
        return out
