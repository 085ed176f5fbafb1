"""Sampling by groups of ranks on a tensor-parallel copy of the policy (``sampling.tensor_parallel: k``).

    sampler = GroupSampler(model, k=2, info=info, dtype=torch.bfloat16, max_num_seqs=256, ...)
    with sampler.weights():                       # every rank: the copy made from the FSDP2 shards
        out = sampler.generate(my_prompts, n=5, ..., seed=seed)   # every rank of the group calls it
    # out: this rank's prompts' completions only, as Sampler.generate returns them

Ranks are split into groups of k consecutive ranks (``distributed.consecutive_groups``). Each rank
holds a 1/k share of the policy (``tensor_parallel.TensorParallelCopy``) and the K/V of its share of
the heads, so a group decodes as one engine: the union of its ranks' prompts (in group-rank order),
each row with the random stream it has when its rank samples alone (its rank's seed and its index
there: the same tokens as ``sampling.tensor_parallel: 1`` up to rounding), the same pool size on every rank (the smallest budget),
hence the same schedule, batches and sampled tokens everywhere (all-reduced hidden states, replicated
LM head). Each rank keeps its own prompts' rows. A rank with nothing to sample still calls
``generate`` with no prompts while the rest of its group samples (``collective``: callers know).

Everything the engine does works unchanged on the copy: continuous batching, preemption, cascade
prefixes, VL images, the routing record, CUDA graphs (the all-reduces are captured with the step).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .. import distributed as D
from .sampler import Sampler, SamplerOutput, row_counts, unwrap_model
from .tensor_parallel import TensorParallelCopy


class GroupSampler:
    """A :class:`Sampler` on this rank's share of a ``k``-way tensor-parallel copy of ``model``."""

    collective = True  # every rank of a group must call generate the same number of times

    def __init__(self, model: nn.Module, k: int, info: D.DistInfo, dtype: torch.dtype, **sampler_kwargs):
        self.group, group_rank = D.consecutive_groups(k, info)
        self.info, self.k = info, k
        self.copy = TensorParallelCopy(unwrap_model(model), k, self.group, group_rank, dtype, info.device)
        self.sampler = Sampler(self.copy.model, dtype=dtype, agree=self._smallest, **sampler_kwargs)
        self.copy.driver = self.sampler.sleep_driver(info.device)  # the share sleeps with the pool (vmm.py)
        self.max_num_seqs = self.sampler.max_num_seqs

    @property
    def stats(self):
        return self.sampler.stats

    @contextlib.contextmanager
    def weights(self, keep: bool = False):
        """This rank's share made from the policy's parameters for the duration (every rank of the
        process group calls it), given back with the K/V pool and CUDA graphs after (in sleepable
        memory, ``vmm.py``: put to sleep with the pool, the graphs kept); ``keep``: all of them stay
        for the next call, the share refilled in place (its graphs stay valid)."""
        with self.copy.materialized(keep):
            try:
                yield
            finally:
                self.sampler.release(keep)  # the graphs read the copy's weights: they go first

    @property
    def held_bytes(self) -> int:
        """The sampler's pool and this rank's share of the copy, while held."""
        return self.sampler.held_bytes + sum(p.nbytes for p in self.copy.model.parameters() if not p.is_meta)

    def release(self, keep: bool = False) -> None:
        self.sampler.release(keep)

    @property
    def sleeps(self) -> bool:
        return self.sampler.sleeps

    @property
    def vmm_bytes(self) -> int:
        return self.sampler.vmm_bytes + (self.copy.memory.size if self.copy.memory is not None else 0)

    def generate(self, prompt_ids: list, n: int | list[int] = 1, max_new_tokens: int = 256, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, stop_token_ids: list[int] | None = None,
                 seed: int | None = None, logprobs_mode: str = "raw", images: list | None = None,
                 row_seeds: list | None = None, continued: list | None = None, stop_share: float | None = None,
                 required: list[bool] | None = None, on_finish=None) -> SamplerOutput:
        """:meth:`Sampler.generate` over the union of the group's prompts; this rank's rows back.
        ``stop_share`` counts the union's rows (so every rank stops at the same step)."""
        prompts = [p.tolist() if torch.is_tensor(p) else list(p) for p in prompt_ids]
        if seed is None and prompts and row_seeds is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        counts = row_counts(n, len(prompts))
        rows = sum(counts)
        if row_seeds is None:
            row_seeds = [(seed, row) for row in range(rows)]
        call = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                    stop_token_ids=stop_token_ids, logprobs_mode=logprobs_mode, stop_share=stop_share)
        tokens = None if continued is None else [None if c is None else list(c[0]) for c in continued]
        mine = (prompts, counts, images, row_seeds, tokens, required)  # log-probs stay here: only ours return
        parts = D.all_gather_objects((mine, call), self.group)
        calls = [c for (p, *_), c in parts if p]
        if any(c != calls[0] for c in calls):
            raise ValueError(f"sampling.tensor_parallel: the ranks of a group asked for different samplings: {calls}")
        if not calls:
            return SamplerOutput([], [], [])
        union = [part for part, _ in parts]
        pictures = continuing = needed = None
        if any(u[2] is not None for u in union):
            pictures = [i for u in union for i in (u[2] if u[2] is not None else [None] * len(u[0]))]
        if any(u[4] is not None for u in union):
            continuing = []
            for r, u in enumerate(union):
                if r == self.copy.rank:
                    continuing += continued or [None] * rows
                else:  # another rank's rows: its tokens, placeholder log-probs (it keeps its own)
                    continuing += [None if c is None else (c, torch.zeros(len(c))) for c in u[4] or [None] * sum(u[1])]
        if any(u[5] is not None for u in union):
            needed = [r for u in union for r in (u[5] if u[5] is not None else [False] * sum(u[1]))]
        start = sum(sum(u[1]) for u in union[:self.copy.rank])
        own_finish = None if on_finish is None else (  # this rank's rows, numbered as its own call numbers them
            lambda done: on_finish([(k - start, t) for k, t in done if start <= k < start + rows]))
        out = self.sampler.generate([p for u in union for p in u[0]], n=[c for u in union for c in u[1]],
                                    images=pictures, row_seeds=[s for u in union for s in u[3]],
                                    continued=continuing, required=needed, on_finish=own_finish, **calls[0])
        self._check_agreement(out.completion_ids)
        own = slice(start, start + rows)
        return SamplerOutput(out.completion_ids[own], out.logprobs[own], out.finish_reasons[own],
                             out.routing[own] if out.routing is not None else None)

    def _check_agreement(self, completions: list[list[int]]) -> None:
        """Every rank of the group sampled the same tokens (one small gather per call): ranks that
        drifted apart would otherwise train on rows their group never decoded."""
        digest = hash(tuple(map(tuple, completions)))
        digests = D.all_gather_objects(digest, self.group)
        if len(set(digests)) != 1:
            raise RuntimeError(f"sampling.tensor_parallel: the ranks of a group sampled different tokens "
                               f"(digests {digests}): their copies or inputs differ")

    def _smallest(self, blocks: int) -> int:
        """The K/V budget every rank of the group uses: the smallest one's (same pool, same schedule)."""
        return int(D.all_reduce([blocks], self.info.device, "min", self.group)[0].item())
