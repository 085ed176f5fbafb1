"""Policy updates: micro-batches packed by token budget, old / reference log-probs, PPO epochs.

For one rollout (this rank's sequences with their advantages) :meth:`Updater.update` runs
``ppo_epochs`` passes over mini-batches of whole groups; each mini-batch is one optimizer step,
its gradient accumulated over micro-batches of whole groups, at most ``micro_batch_tokens``
padded prompt + completion tokens each (groups sorted by length, so little padding); each
group's prompt runs through the decoder once for its G completions (``share_prompt``). Every loss is normalised over the whole
mini-batch as if it were one batch: ``dapo`` by the mini-batch's valid-token count over all
micro-batches and ranks (``num_items_in_batch``; also ``cispo``, ``vespo``), ``grpo`` / ``dr_grpo``
(``sapo``, ``luspo``) by its global sequence
count, ``bnpo`` by this rank's token count (TRL's "local batch"): each loss type's ``normaliser``
(kernels/loss_specs.py). The loss options come from the config by ``rl/loss_options.py``. Ranks pad to the same number
of micro-batches with zero-weight ones, so DDP / FSDP collectives always line up.

A step is :meth:`Updater.prepare` (the plan and the old / reference log-probs: no-grad forwards,
under FSDP2 one unit gathered at a time as in training, so no rank holds the unsharded policy) then
:meth:`Updater.run` (the optimizer steps); :meth:`Updater.update` does both. The micro-batches are
device slices of the rollout's tensors; the loss gets each row's valid-token count from the host,
and one reduction per optimizer step brings its loss, metrics and gradient norm to the host.

Old log-probs (``algorithm.old_logprobs``): ``recompute`` trains the first mini-batch of a
single epoch on-policy (``old=None``: ratio 1, exactly the policy that sampled, no extra
forward, also under ``tis_cap``) and recomputes the others under ``no_grad`` before the first
optimizer step;
``sampler`` uses the sampler's log-probs for every mini-batch (no extra forward at all).
With ``beta > 0`` the reference log-probs come from the frozen copy of the initial policy.

With ``recompute`` the trainer's log-probs are compared with the sampler's (``mismatch/*``,
``rl/mismatch.py``; ``mismatch_metrics`` adds the first mini-batch's no-grad forward for it) and,
with ``mis_level``, sequences whose trainer / sampler ratio leaves ``[1/mis_cap, mis_cap]`` lose
their policy-gradient term (``kernels/importance.py``: their advantage times 0; the loss's token
mask, normalisers and its KL / entropy terms stay those of the rollout, so no host read).
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from .. import distributed as D
from ..kernels import fused_linear_logprobs, fused_linear_policy_loss
from ..kernels.exact import token_logprobs
from ..kernels.importance import mis_keep
from ..kernels.loss_specs import LOSS_SPECS
from ..kernels.policy_loss import METRICS
from ..model.exact import is_exact
from ..model.forward import (continuation_hidden_states, head_logits, hidden_states, left_pad_positions, lm_head,
                             prompt_hidden_states)
from ..model.moe import RouterLogits
from ..model.routing import RouterReplay
from .batch import MicroBatch, Sequences, collate, pack, padding_batch
from .loss_options import kernel_options
from .mismatch import Mismatch

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """One step's mini-batches of micro-batches (equal counts on every rank) and each mini-batch's
    completion tokens and sequences over all ranks (the loss normalisers)."""

    minis: list[list[MicroBatch]]
    tokens: list[float]
    seqs: list[float]
    seconds: float = 0.0  # spent preparing it (old / reference log-probs)
    mismatch: Mismatch | None = None  # the trainer-vs-sampler sums (recompute), read with the first reduction


def _checkpointing(model: nn.Module) -> bool:
    """Whether activation (gradient) checkpointing is on (the newer transformers name first)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(model, name):
            return bool(getattr(model, name))
    return False


def _repeat_images(mb: MicroBatch, g: int) -> dict:
    """The micro-batch's image inputs for its B = groups x G rows: a prompt has at most one image
    (``Prompt.image``) and rows are group-major, so each image is repeated G times in place."""
    pieces = torch.split(mb.pixel_values, mb.image_patches)
    return {"pixel_values": torch.cat([p for p in pieces for _ in range(g)]),  # (G * patches, D)
            "image_grid_thw": mb.image_grid_thw.repeat_interleave(g, 0)}  # (G * n_images, 3)


class PolicyObjective(nn.Module):
    """Wraps the causal LM so one forward runs decoder + LM head + loss (what DDP / FSDP wrap).

    With ``share_prompt`` each group's prompt goes through the decoder once and its K/V is
    repeated for the group's G completions (the gradient flows through the shared K/V), instead
    of G times; without it (and always under gradient checkpointing, which drops the cache) every
    row is the full prompt + completion. The two give the same loss and gradients.

    ``router_aux_coef > 0`` (mixture-of-experts models) records the routers' logits in the loss
    forward and returns the model's load-balancing loss over the valid tokens as
    ``metrics["router_aux"]`` (with gradient), which :class:`Updater` weights into the mini-batch.
    ``router_replay`` routes every token the sampler recorded to its recorded experts
    (``model/routing.py``: the micro-batch's ``prompt_routing`` / ``completion_routing``).
    """

    def __init__(self, model: nn.Module, temperature: float, share_prompt: bool = True, router_aux_coef: float = 0.0,
                 router_replay: bool = False):
        super().__init__()
        self.model = model
        self.temperature = temperature
        self.share_prompt = share_prompt
        self.router_aux_coef = router_aux_coef
        self.router = RouterLogits(model) if router_aux_coef > 0 else None
        self.replay = RouterReplay(model) if router_replay else None

    def _shares_prompt(self) -> bool:
        return self.share_prompt and not _checkpointing(self.model)

    def _token_weights(self, mb: MicroBatch) -> list[torch.Tensor]:
        """Each forward's token weights for the load-balancing loss, in the order :meth:`_hidden`
        runs them: 0 on padding, G on a prompt token run once for its group's G rows."""
        completion = mb.mask.to(mb.prompt_mask.dtype)  # (B, C)
        if self._shares_prompt():
            return [mb.prompt_mask * mb.group_size, completion]  # (n_groups, P), (B, C)
        return [torch.cat([mb.prompt_mask.repeat_interleave(mb.group_size, 0), completion], 1)]  # (B, P + C)

    def _replay(self, mb: MicroBatch):
        """A context replaying the recorded experts in :meth:`_hidden`'s decoder calls, flattened as
        the routers see their tokens: shared prompt, each group's prompt (its first row's record)
        then the completions; else the full rows. Without replay (or on a rank's padding
        micro-batch, which carries none) a null context."""
        if self.replay is None or (mb.prompt_routing is None and not mb.weight):
            return contextlib.nullcontext()
        if mb.prompt_routing is None:
            raise ValueError("router replay is on but the micro-batch carries no recorded routing "
                             "(Sampler(record_routing=True) -> Sequences.routing)")
        prompt, completion = mb.prompt_routing, mb.completion_routing  # (B, P, L, k), (B, C, L, k)
        if self._shares_prompt():
            calls = [prompt[::mb.group_size], completion]
        else:
            calls = [torch.cat([prompt, completion], 1)]
        return self.replay.replaying([c.reshape(-1, *c.shape[2:]) for c in calls], keep=_checkpointing(self.model))

    def _hidden(self, mb: MicroBatch) -> torch.Tensor:
        """(B, C, H): the final hidden state that predicts each completion token."""
        g, plen = mb.group_size, mb.prompt_ids.shape[1]
        pmask = mb.prompt_mask.repeat_interleave(g, 0)  # (B, P)
        full_mask = torch.cat([pmask, mb.mask.to(pmask.dtype)], 1)  # (B, P + C)
        vision = {"pixel_values": mb.pixel_values, "image_grid_thw": mb.image_grid_thw}
        if self._shares_prompt():
            cache = DynamicCache()
            hp, start = prompt_hidden_states(self.model, mb.prompt_ids, mb.prompt_mask, cache,
                                             **vision)  # (n_groups, P, H), (n_groups,)
            cache.batch_repeat_interleave(g)
            hc = continuation_hidden_states(self.model, mb.targets, full_mask, start.repeat_interleave(g),
                                            cache)  # (B, C, H)
            return torch.cat([hp[:, -1:].repeat_interleave(g, 0), hc[:, :-1]], 1)  # (B, C, H)
        ids = torch.cat([mb.prompt_ids.repeat_interleave(g, 0), mb.targets], 1)  # (B, P + C)
        if mb.pixel_values is not None:  # every row carries its group's image; mrope from the full rows
            vision = _repeat_images(mb, g)
            pos = None
        else:
            prompt_pos = left_pad_positions(mb.prompt_mask)  # (n_groups, P)
            comp_pos = pmask.sum(1, keepdim=True) + torch.arange(mb.targets.shape[1], device=pmask.device)  # (B, C)
            pos = torch.cat([prompt_pos.repeat_interleave(g, 0), comp_pos], 1)  # (B, P + C)
        hidden = hidden_states(self.model, ids, full_mask, pos, **vision)  # (B, P + C, H)
        return hidden[:, plen - 1:-1]  # (B, C, H)

    def forward(self, mb: MicroBatch, loss_opts: dict | None = None):
        """(loss, metrics) of ``fused_linear_policy_loss``; with ``loss_opts=None`` the (B, C)
        log-probs of the completion tokens instead (zeros at padding)."""
        record = self.router is not None and loss_opts is not None
        with self.router.recording() if record else contextlib.nullcontext(), self._replay(mb):
            h = self._hidden(mb)  # (B, C, H)
        weight, bias = lm_head(self.model)
        if loss_opts is None:
            keep = mb.mask.reshape(-1).nonzero_static(size=mb.tokens).squeeze(1)  # (n_valid,): no sync
            rows, targets = h.reshape(-1, h.shape[-1]).index_select(0, keep), mb.targets.reshape(-1).index_select(0, keep)
            if is_exact(self.model):  # the sampler's LM head and log-softmax (model/exact.py)
                logp = token_logprobs(head_logits(self.model, rows), targets, 1.0 / self.temperature)  # (n_valid,)
            else:
                logp = fused_linear_logprobs(rows, weight, targets, bias=bias, temperature=self.temperature)
            return mb.mask.new_zeros(mb.mask.numel()).index_copy(0, keep, logp.float()).view_as(mb.mask)  # (B, C)
        loss, metrics = fused_linear_policy_loss(h, weight, mb.targets, mb.mask, mb.advantages, mb.old, mb.ref,
                                                 bias=bias, temperature=self.temperature, valid_lengths=mb.lengths,
                                                 sampling_logprobs=mb.sampling if loss_opts.get("tis_cap") else None,
                                                 **loss_opts)
        if record:
            metrics["router_aux"] = self.router.loss(self._token_weights(mb))
        return loss, metrics


class Updater:
    """Runs the PPO epochs / mini-batches / micro-batches of one training step."""

    def __init__(self, objective: PolicyObjective, wrapped: nn.Module, optimizer, algo, train, sampling,
                 info: D.DistInfo, *, pad_id: int, ref_objective: PolicyObjective | None = None,
                 autocast_dtype: torch.dtype | None = None, grad_clip: float = 1.0, max_groups: int = 0):
        self.objective, self.wrapped, self.optimizer = objective, wrapped, optimizer
        self.algo, self.train, self.sampling, self.info = algo, train, sampling, info
        self.pad_id, self.ref_objective, self.autocast_dtype = pad_id, ref_objective, autocast_dtype
        self.grad_clip = grad_clip
        # the most groups a rank trains in a step (partial rollouts: more); 0: prompts_per_step / world
        self.max_groups = max_groups or max(1, train.prompts_per_step // info.world)
        self.params = [p for p in wrapped.parameters() if p.requires_grad]
        self.nonfinite_in_a_row = 0
        self.warned = False  # the mismatch warning is given once

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.info.device.type, dtype=self.autocast_dtype)

    def _scale(self, mb: MicroBatch, local_tokens: int, global_tokens: int, global_seqs: int) -> float:
        """This micro-batch's share of the mini-batch loss (by the loss type's normaliser), times the
        world size (DDP / FSDP average gradients over ranks)."""
        if not mb.weight:
            return 0.0
        normaliser = LOSS_SPECS[self.algo.loss_type].normaliser
        if normaliser == "num_items":  # the kernel divides by the global token count already
            return float(self.info.world)
        if normaliser == "batch_tokens":
            return mb.n_tokens / max(local_tokens, 1)
        if normaliser in ("sequence_mean", "max_length", "sequences"):  # per sequence
            return self.info.world * mb.n_seqs / max(global_seqs, 1)
        raise AssertionError(f"normaliser {normaliser!r} has no micro-batch share")

    def plan(self, seqs: Sequences) -> Plan:
        """Mini-batches (whole groups) of micro-batches, padded to the same counts on every rank,
        and each mini-batch's token and sequence counts over all ranks (two reductions in all)."""
        g = seqs.group_size
        n_groups = len(seqs.completion_ids) // g
        per_mb = max(1, self.train.mini_batch_prompts // self.info.world)
        bound = -(-self.max_groups // per_mb)  # the most mini-batches any rank has
        minis = []
        for start in range(0, n_groups, per_mb):
            groups = list(range(start, min(start + per_mb, n_groups)))
            sizes = [g * (len(seqs.prompt_ids[k * g]) + max(seqs.lengths[k * g:k * g + g])) for k in groups]
            minis.append([collate(seqs, [groups[i] for i in part], self.pad_id, self.info.device)
                          for part in pack(sizes, self.train.micro_batch_tokens)])
        if len(minis) > bound:
            raise ValueError(f"{n_groups} groups on rank {self.info.rank}: more than the {self.max_groups} a rank "
                             f"may train in a step (prompts_per_step / world, times 1 + max_staleness when partial)")
        counts = D.reduce_scalars({f"micro{j}": len(minis[j]) if j < len(minis) else 0 for j in range(bound)},
                                  self.info.device, "max")
        sizes = [int(counts[f"micro{j}"]) for j in range(bound)]
        template = minis[0][0] if minis else None
        minis += [[] for _ in range(bound - len(minis))]
        minis = [m + [padding_batch(template or (m[0] if m else None), self.pad_id, self.info.device)
                      for _ in range(n - len(m))] for m, n in zip(minis, sizes) if n]
        totals = D.reduce_scalars({f"{k}{j}": sum(getattr(mb, f"n_{k}") for mb in mini)
                                   for j, mini in enumerate(minis) for k in ("tokens", "seqs")}, self.info.device)
        return Plan(minis, [totals[f"tokens{j}"] for j in range(len(minis))],
                    [totals[f"seqs{j}"] for j in range(len(minis))])

    @torch.no_grad()
    def _logprobs(self, objective: PolicyObjective, mb: MicroBatch) -> torch.Tensor:
        with self._autocast():
            return objective(mb)

    def prepare(self, seqs: Sequences) -> Plan:
        """The plan with old and reference log-probs, before any parameter changes: no-grad forwards
        of the training module as it is (under FSDP2 one unit gathered at a time, never an
        unsharded copy of the policy)."""
        t0 = time.perf_counter()
        plan = self.plan(seqs)
        a = self.algo
        recompute = a.old_logprobs == "recompute"
        plan.mismatch = Mismatch(self.info.device) if recompute and plan.minis else None
        for j, mini in enumerate(plan.minis):
            for mb in mini:
                if self.ref_objective is not None and a.beta > 0:
                    mb.ref = self._logprobs(self.ref_objective, mb)
                if not recompute:
                    mb.old = mb.sampling
                    continue
                on_policy = j == 0 and a.ppo_epochs == 1  # old = the current log-probs inside the loss (ratio 1)
                if on_policy and not (a.mismatch_metrics or a.mis_level):
                    continue
                old = self._logprobs(self.objective, mb)  # (B, C)
                if not on_policy:
                    mb.old = old
                if mb.weight:
                    plan.mismatch.add(mb.sampling, old, mb.mask, mb.image_rows)
                if a.mis_level:
                    mb.advantages = mb.advantages * mis_keep(old, mb.sampling, mb.mask, a.mis_cap, a.mis_level)
        plan.seconds = time.perf_counter() - t0
        return plan

    def update(self, seqs: Sequences) -> dict:
        """All optimizer steps of one training step (old / reference log-probs first); returns
        averaged metrics."""
        return self.run(self.prepare(seqs))

    def run(self, plan: Plan) -> dict:
        """The optimizer steps of a prepared plan; returns averaged metrics. One host read per
        optimizer step (its loss, metrics and gradient norm, reduced over the ranks together)."""
        t1 = time.perf_counter()
        totals = {k: 0.0 for k in ("loss", "grad_norm", *METRICS, "router_aux")}
        steps = skipped = 0
        tokens = 0.0
        world = self.info.world
        mismatch, mismatch_out = plan.mismatch, {}
        for epoch in range(self.algo.ppo_epochs):
            for mini, global_tokens, global_seqs in zip(plan.minis, plan.tokens, plan.seqs):
                local_tokens = sum(mb.n_tokens for mb in mini)
                opts = kernel_options(self.algo, self.sampling, num_items=global_tokens)
                loss_sum = torch.zeros((), device=self.info.device)
                sums = torch.zeros(len(METRICS), device=self.info.device)
                aux_sum = torch.zeros((), device=self.info.device)
                self.optimizer.zero_grad(set_to_none=True)
                for i, mb in enumerate(mini):
                    scale = self._scale(mb, local_tokens, global_tokens, global_seqs)
                    with D.gradient_sync(self.wrapped, i == len(mini) - 1), self._autocast():
                        loss, metrics = self.wrapped(mb, opts)
                    total = loss * scale
                    if "router_aux" in metrics:  # token-weighted over the mini-batch (all ranks), any loss type
                        aux_share = world * mb.n_tokens / max(global_tokens, 1.0)
                        total = total + self.objective.router_aux_coef * aux_share * metrics["router_aux"]
                        aux_sum += metrics["router_aux"].detach() * mb.n_tokens
                    total.backward()
                    loss_sum += loss.detach() * scale
                    sums += torch.stack([metrics[k] for k in METRICS]) * mb.n_tokens
                norm = self._clip()  # the global norm on every rank: its sum over ranks / world is itself
                first = mismatch is not None and not mismatch_out
                stats = D.reduce_scalars({"loss": loss_sum / world, **dict(zip(METRICS, sums)),
                                          "router_aux": aux_sum, "grad_norm": norm / world,
                                          **(mismatch.scalars(world) if first else {})}, self.info.device)
                if first:
                    mismatch_out = self._mismatch_figures(stats)
                loss_value, norm_value = stats["loss"], stats["grad_norm"]
                if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                    skipped += 1
                    self.nonfinite_in_a_row += 1
                    self.optimizer.zero_grad(set_to_none=True)
                    continue
                self.nonfinite_in_a_row = 0
                self.optimizer.step()
                steps += 1
                for k in ("loss", "grad_norm", *METRICS, "router_aux"):
                    totals[k] += stats[k]
                tokens += global_tokens
        self.optimizer.zero_grad(set_to_none=True)  # the rollout does not carry the gradients (4 B/param/world)
        # NaN when no update was made (every one skipped, or no group kept)
        out = {"loss": totals["loss"] / steps if steps else math.nan,
               "grad_norm": totals["grad_norm"] / steps if steps else math.nan}
        out.update({k: totals[k] / tokens if tokens else math.nan for k in METRICS})
        if self.objective.router is not None:  # the load-balancing loss, token-weighted
            out["router_aux"] = totals["router_aux"] / tokens if tokens else math.nan
        out.update({"optimizer_steps": steps, "skipped_updates": skipped, "train_tokens": tokens,
                    "time/logprobs_s": plan.seconds, "time/train_s": time.perf_counter() - t1})
        out.update(mismatch_out)
        return out

    def _mismatch_figures(self, stats: dict) -> dict:
        """The step's ``mismatch/*`` figures from the reduced sums; once per run, a warning when the
        on-policy first mini-batch of ``recompute`` trains uncorrected on a sampler this far off."""
        out = Mismatch.finish(stats)
        a = self.algo
        kl = out.get("mismatch/k3_kl", 0.0)
        if kl > a.mismatch_warn_kl and not (a.tis_cap or a.mis_level) and not self.warned:
            self.warned = True
            log.warning("trainer-sampler mismatch k3 KL %.2g > algorithm.mismatch_warn_kl (%.2g): "
                        "old_logprobs: recompute trains the first mini-batch as if the sampler were the trainer; "
                        "set algorithm.tis_cap or algorithm.mis_level to correct for it", kl, a.mismatch_warn_kl)
        return out

    def _clip(self) -> torch.Tensor:
        """Clip the gradients; their global norm as a 0-dim device tensor (no host read)."""
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
            norm = norm.full_tensor()
        return norm
