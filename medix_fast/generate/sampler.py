"""In-process rollout engine: G completions per prompt from the live training weights.

    sampler = Sampler(model, max_num_seqs=256, gpu_memory_utilization=0.85)   # CUDA
    sampler = Sampler(model, max_num_seqs=64, kv_cache_gb=1.0)                # CPU
    out = sampler.generate(prompt_ids, n=8, max_new_tokens=512, temperature=1.0, top_p=1.0,
                           top_k=0, stop_token_ids=[eos], seed=0)
    out.completion_ids[i * 8 + j]  # prompt i's sample j (prompt-major), stop token included
    out.logprobs[i * 8 + j]        # (len,) fp32 log-probs of those tokens, see medix_fast.generate.tokens
    out.finish_reasons[i * 8 + j]  # "stop" | "length" ("partial": a call with stop_share, partial.py)
    sampler.release()              # the K/V pool, weights copy and graphs back (keep=True: held for the next;
                                   # with VMM on CUDA, vmm.py: pool and copy asleep, graphs kept)
    # VL model (Qwen2.5-VL / Qwen3-VL): images=[PixelBatch or None per prompt] (medix_fast.data.vision),
    # prompt_ids with each image's <|image_pad|> run already expanded
    # n=[2, 8]: rows per prompt; continued=, stop_share=, required=: rows carried across calls (partial.py)

Design (vLLM's paged K/V and continuous batching, nano-vllm's layout, FlashInfer's cascade
attention, gpt-fast's sync-free sampling; on the Hugging Face forward of the module the optimizer
updates: no weight copy, no second engine):
- K/V in fixed-size blocks of one pool per call (``kv_cache.py``, ``blocks.py``), sized by a
  budget: on CUDA ``gpu_memory_utilization`` x the free device memory (after weights, optimizer
  shards and whatever else is resident) minus an activation reserve, on the CPU ``kv_cache_gb``;
  never more than the call can use. Kept across calls, given back by ``release()``.
- Each prompt's K/V is stored once and shared by its n samples (reference-counted blocks);
  samples write only their own blocks (``sequence.py``).
- Continuous batching (``scheduler.py``): up to ``max_num_seqs`` rows decode together; finished
  rows leave every step and waiting ones are prefilled (packed, no padding) and join; when blocks
  run out the newest rows are preempted and later recomputed.
- Decode attention (``attention.py``): each group's rows read their prompt's blocks once, each
  row its own blocks, merged by log-sum-exp; only live tokens are read. Back-ends: flash-attn,
  the Triton paged kernel (``medix_fast.kernels.triton_decode``) or PyTorch.
- CUDA graphs of the decode step per batch bucket (``cuda_graphs.py``), kept across steps where the
  pool and weights can sleep through the update at fixed addresses (``vmm.py``).
- Sampling with one counter-based uniform per row and step (``tokens.py``): a row's tokens do not
  depend on its batch, so scheduling choices (``max_num_seqs``, preemption) do not change them.
  The host reads the sampled tokens once per step (stop tokens, scheduling): one sync per step.

Greedy (temperature 0) output equals ``generate(do_sample=False)``. The model is in eval mode for
the call with the attention back-end switched to "medix_paged" (its language model only, for a VL
model); both are restored after.
"""
from __future__ import annotations

import contextlib
import operator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..config import block_size_error
from ..model.exact import is_exact
from ..model.forward import mrope_positions
from ..model.loading import stop_ids
from . import vmm
from .attention import default_block_size, select_backend
from .blocks import BlockPool
from .kv_cache import ATTN_IMPLEMENTATION, KVPool
from .memory import activation_reserve, kv_budget, kv_bytes_per_token
from .partial import PARTIAL, StopRule, check_continued
from .routing import RoutingLog
from .runner import Runner
from .scheduler import Scheduler
from .sequence import Group, Row
from .tokens import PREFILTER, SamplingParams, row_key, sample_tokens, uniforms
from .weights import EngineWeights, merged_adapters

GROUP_SLACK = 4  # group-table rows beyond max_num_seqs (prompts held for rows not admitted yet)


@dataclass
class SamplerOutput:
    completion_ids: list[list[int]]  # prompt-major: prompt i's sample j at i * n + j
    logprobs: list[torch.Tensor]  # same layout, (len,) fp32 on the model's device
    finish_reasons: list[str]  # "stop" | "length" | "partial"
    routing: list[torch.Tensor] | None = None  # record_routing: (len(prompt) + len - 1, layers, k) int8/16 ids


@dataclass
class EngineStats:
    """What the last ``generate`` call did (for tests and benchmarks)."""
    steps: int = 0  # decode steps
    prefills: int = 0  # prefill forwards
    preemptions: int = 0
    pool_blocks: int = 0  # blocks in the pool (incl. the reserved one)
    block_bytes: int = 0
    peak_blocks: int = 0  # most blocks in use at once
    live_tokens_at_peak: int = 0  # tokens with cached K/V at that moment (shared prompts once)
    syncs: int = 0  # host reads of device values in the decode loop


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under DDP/FSDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


class Sampler:
    """Paged, continuously batched sampling from a Hugging Face decoder (Qwen2/3, Llama, Qwen-VL, ...).

    max_num_seqs: rows decoded at once. kv_cache_gb: the K/V budget on the CPU (GB);
    gpu_memory_utilization: on CUDA, the fraction of free device memory the K/V pool may take.
    block_size: tokens per K/V block (0: 256 with flash-attn, else 16). max_prefill_tokens: tokens
    per prefill forward. dtype: the compute dtype (None: bf16 on CUDA, the weights' dtype on the
    CPU). decode_mode: "eager"; "static" (the fixed-shape step of the CUDA graphs, run eagerly);
    "cuda_graph"; "auto" = "cuda_graph" on CUDA, else "eager"; the static modes read the engine's own
    copy of the weights (``weights.py``) and keep their decoder across calls and steps until
    ``release()``. record_routing (MoE models): also return each token's selected experts per
    layer (``routing.py``; in every decode mode). agree (a
    ``GroupSampler``'s): called with the K/V budget in blocks, returns the one every rank of its
    group uses (the smallest), so the ranks that decode together schedule alike. lora_merge (a
    model with LoRA adapters, ``sampling.lora_merge``): true, false or "auto" (``weights.MERGE_AUTO``
    per kind): merged adapters are folded into the engine's weight buffers at each call (in every
    decode mode), the others run their low-rank add in each forward.
    """

    def __init__(self, model: nn.Module, max_num_seqs: int = 64, kv_cache_gb: float = 1.0,
                 gpu_memory_utilization: float = 0.85, block_size: int = 0, max_prefill_tokens: int = 16384,
                 dtype: torch.dtype | None = None, decode_mode: str = "auto", record_routing: bool = False,
                 agree=None, lora_merge: str | bool = "auto"):
        self.model = unwrap_model(model)
        if max_num_seqs < 1 or max_prefill_tokens < 1:
            raise ValueError(f"need max_num_seqs >= 1 and max_prefill_tokens >= 1, got {max_num_seqs}, "
                             f"{max_prefill_tokens}")
        if not 0 < gpu_memory_utilization <= 1 or kv_cache_gb <= 0:
            raise ValueError(f"need 0 < gpu_memory_utilization <= 1 and kv_cache_gb > 0, got "
                             f"{gpu_memory_utilization}, {kv_cache_gb}")
        if block_size_error(block_size):
            raise ValueError(f"block_size {block_size_error(block_size)}")
        if decode_mode not in ("auto", "eager", "static", "cuda_graph"):
            raise ValueError(f"decode_mode must be one of auto, eager, static, cuda_graph; got {decode_mode!r}")
        self.vl = getattr(self.model.config, "image_token_id", None) is not None
        self.text_config = self.model.config.get_text_config()
        layer_types = set(getattr(self.text_config, "layer_types", None) or ["full_attention"])
        if layer_types != {"full_attention"}:
            raise ValueError(f"only full-attention decoders are supported, the model has layer types {sorted(layer_types)}")
        self.max_num_seqs, self.kv_cache_gb, self.utilization = max_num_seqs, kv_cache_gb, gpu_memory_utilization
        self.block_size, self.max_prefill_tokens, self.dtype = block_size, max_prefill_tokens, dtype
        self.decode_mode = decode_mode
        self.record_routing = record_routing
        self.agree = agree or (lambda blocks: blocks)
        self.merge = merged_adapters(self.model, lora_merge)  # adapters folded into the engine's buffers
        self.vocab_size = self.model.get_input_embeddings().num_embeddings
        self.pool: KVPool | None = None
        self.stats = EngineStats()
        self.blocks: BlockPool | None = None  # the last call's block accounting
        self._decoder = None  # cuda_graphs.StaticDecoder, kept across calls
        self.weights: EngineWeights | None = None  # what the static step reads, kept with the decoder
        self.decoders_built = 0  # StaticDecoders made (each captures its buckets again on CUDA)
        self.kept = False  # the last release kept everything (weights.py: FSDP2's slots get buffers then)
        self.driver = None  # vmm.Driver: the static modes' pool and weights in sleepable memory (first call decides)
        self._probed = False

    # ------------------------------------------------------------------ public
    def generate(
        self,
        prompt_ids: list[list[int]],
        n: int | list[int] = 1,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop_token_ids: list[int] | None = None,
        seed: int | None = None,
        logprobs_mode: str = "raw",
        images: list | None = None,
        row_seeds: list[tuple[int, int]] | None = None,
        continued: list | None = None,
        stop_share: float | None = None,
        required: list[bool] | None = None,
        on_finish=None,
    ) -> SamplerOutput:
        """Sample ``n`` completions for each prompt. stop_token_ids=None takes the model's
        eos_token_id (generation config, else config), [] disables stopping. seed=None draws one
        from torch's global generator (so ``torch.manual_seed`` makes calls reproducible).
        ``images`` (VL models): one ``medix_fast.data.vision.PixelBatch`` or None per prompt.
        ``row_seeds``: a (seed, index) per row instead of (seed, row): each row's random stream
        (``tokens.row_key``), so a row samples the same tokens in whichever call decodes it.
        ``n`` may be a count per prompt (rows prompt-major); ``continued`` / ``stop_share`` /
        ``required``: rows carried over from an earlier call and a call that stops early (``partial.py``).
        ``on_finish(rows)``: called after each decode step in which rows finished, with their (row,
        tokens) (host lists: no device read), so a caller can score them while the rest decode."""
        params = SamplingParams(temperature, top_p, top_k, logprobs_mode, is_exact(self.model))
        stops = self._stop_ids(stop_token_ids)
        prompts = self._validate(prompt_ids, max_new_tokens)
        counts = row_counts(n, len(prompts))
        rows = sum(counts)
        images = self._validate_images(prompts, images)
        continued = check_continued(continued, rows, max_new_tokens, set(stops))
        stop = StopRule(rows, stop_share, required)
        if seed is None and row_seeds is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        if row_seeds is None:
            row_seeds = [(seed, row) for row in range(rows)]
        elif len(row_seeds) != rows:
            raise ValueError(f"row_seeds has {len(row_seeds)} entries for {len(prompts)} prompts x n={n} rows")
        # inference_mode(False) turns grad mode back on, so no_grad must come after it
        with torch.inference_mode(False), torch.no_grad(), _sampling_mode(self.model), self._autocast(), \
                self._engine_weights():
            return self._run(prompts, images, counts, max_new_tokens, params, set(stops), row_seeds, continued,
                             stop, on_finish)

    def _autocast(self):
        """The compute dtype for weights kept in another one (DDP's fp32 masters: bf16 on CUDA),
        for the whole call: autocast's cache then casts each weight once per call, not per step.
        The static step never reads those copies (they die with the call): it reads the engine's
        (``_engine_weights``), which autocast finds already cast."""
        param = next(self.model.parameters())
        dtype = self._layout(param.device)[2]
        if param.dtype == dtype:
            return contextlib.nullcontext()
        return torch.autocast(param.device.type, dtype=dtype)

    def _engine_weights(self):
        """The static modes, and merged adapters in any mode: the engine's buffers (``weights.py``)
        refreshed in place and swapped in for the call, so a decoder captured in an earlier call
        reads this call's weights; eager without merged adapters: the model's own parameters (and
        autocast's per-call copies)."""
        param = next(self.model.parameters())
        if self._mode(param.device) == "eager" and not self.merge:
            return contextlib.nullcontext()
        self.sleep_driver(param.device)
        for part in (self.pool, self.weights):  # asleep since the last release: pages back before any write
            if part is not None and part.memory is not None:
                part.wake()
        if self.weights is None or not self.weights.matches(self.model, self.graphs_kept):
            self.weights = self._decoder = None  # its graphs read the old buffers
            self.weights = EngineWeights(self.model, self._layout(param.device)[2], self.graphs_kept, self.driver,
                                         self.merge)
        return self.weights.swapped()

    def sleep_driver(self, device: torch.device):
        """The ``vmm.Driver`` whose sleepable memory the static modes' pool and weights use on
        ``device`` (probed once, ``vmm.driver_for``), None in eager mode or where VMM is unavailable."""
        if not self._probed:
            self.driver = vmm.driver_for(device) if self._mode(device) != "eager" else None
            self._probed = True
        return self.driver

    @property
    def graphs_kept(self) -> bool:
        """Whether the graphs outlive a release: kept, or asleep in sleepable memory."""
        return self.kept or self.driver is not None

    @property
    def sleeps(self) -> bool:
        """``release()`` puts the pool and weights to sleep (``vmm.py``) and keeps the graphs."""
        return self.driver is not None

    @property
    def vmm_bytes(self) -> int:
        """Bytes of the pool and weights in sleepable memory, awake in a call (outside torch's allocator stats)."""
        return sum(part.memory.size for part in (self.pool, self.weights) if part is not None and part.memory)

    @property
    def held_bytes(self) -> int:
        """Device bytes the sampler holds between calls: the K/V pool and the engine's weights (the
        graphs' own activation pool is within the plan's activation reserve)."""
        return (self.pool.nbytes if self.pool is not None else 0) + (self.weights.nbytes if self.weights else 0)

    def release(self, keep: bool = False) -> None:
        """Free the K/V pool, the engine's weights and the CUDA graphs (the next call makes them
        again, a capture per bucket); in sleepable memory (``vmm.py``, CUDA) put the pool and
        weights to sleep instead (their pages given back, their addresses and the graphs kept: the
        next call wakes them); ``keep``: hold all of them for the next call (the trainer's choice
        when they fit beside the update, ``memory.keep_across_steps``)."""
        self.kept = keep
        if keep:
            return
        if self.sleeps:
            for part in (self.pool, self.weights):
                if part is not None and part.memory is not None:
                    part.memory.sleep()
            return
        self.pool, self._decoder, self.weights = None, None, None
        param = next(self.model.parameters())
        if param.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ engine
    def _run(self, prompts, images, counts: list[int], max_new: int, params: SamplingParams, stops: set[int],
             row_seeds: list[tuple[int, int]], continued: list | None, stop: StopRule, on_finish=None) -> SamplerOutput:
        device = next(self.model.parameters()).device
        groups = self._groups(prompts, images, device)
        rows = [Row(k, group, row_key(*row_seeds[k])) for k, group in enumerate(g for g, c in zip(groups, counts)
                                                                                 for _ in range(c))]
        for row, item in zip(rows, continued or ()):
            if item is not None:
                row.tokens = list(item[0])  # sampled by an earlier call: recomputed when admitted
        backend, block_size, dtype = self._layout(device)
        pool = self._pool(prompts, len(rows), max_new, backend, block_size, dtype, device)
        blocks = BlockPool(pool.num_blocks)
        self._check_fits(prompts, max_new, blocks.capacity, block_size, pool)
        width = -(-max(len(p) - 1 for p in prompts) // block_size) or 1
        runner = Runner(self.model, pool, backend, self.max_num_seqs, self.max_num_seqs + GROUP_SLACK,
                        -(-max_new // block_size), width, self.vl)
        decode = self._decode_fn(runner, max(counts))
        sched = Scheduler(blocks, block_size, self.max_num_seqs, self.max_prefill_tokens, rows,
                          self.max_num_seqs + GROUP_SLACK)
        self.stats = EngineStats(pool_blocks=pool.num_blocks, block_bytes=pool.nbytes // pool.num_blocks)
        self.blocks = blocks
        routing = RoutingLog(runner) if self.record_routing else None
        try:
            logprob_log = self._loop(sched, runner, decode, params, stops, max_new, routing, stop, on_finish)
        finally:
            sched.release_all()
            if routing is not None:
                routing.remove()
        self.stats.preemptions = sched.preemptions
        blocks.check_idle()
        for row in rows:
            row.finish = row.finish or PARTIAL  # stopped early (stop_share): carried by the caller
        out = _collect(rows, logprob_log, continued)
        if routing is not None:
            out.routing = routing.collect(rows)
        return out

    def _loop(self, sched: Scheduler, runner: Runner, decode, params: SamplingParams, stops: set[int],
              max_new: int, routing: RoutingLog | None, stop: StopRule, on_finish=None) -> list[torch.Tensor]:
        """Admit, prefill, decode and sample until every row finished (or ``stop`` is reached);
        returns the per-step log-probs."""
        stats, blocks = self.stats, sched.pool
        logprob_log: list[torch.Tensor] = []
        logged, prefilter = 0, PREFILTER
        while not sched.done and not stop.reached:
            plan = sched.admit()
            runner.apply(sched.table_writes)
            if not plan.empty:
                runner.prefill(plan)
                stats.prefills += 1
                if routing is not None:
                    routing.prefilled(plan)
            batch = sched.decode_batch()
            runner.apply(sched.table_writes)
            if not batch:
                continue
            inputs = runner.decode_inputs(batch)
            logits = decode(inputs)  # (b, V)
            if routing is not None:
                routing.decoded(batch)
            u = uniforms(inputs.row("keys"), inputs.row("steps"))
            tok, lp, fits = sample_tokens(logits, params, u, prefilter)
            host = torch.stack([tok, fits.long()]).tolist()  # the step's one host sync
            stats.syncs += 1
            if not all(host[1]):  # a top-p nucleus outgrew the candidates: exact again, more later
                prefilter = self.vocab_size
                tok, lp, _ = sample_tokens(logits, params, u, prefilter)
                host = [tok.tolist()]
                stats.syncs += 1
            logprob_log.append(lp)
            self._track(stats, blocks, sched)
            for i, (row, token) in enumerate(zip(batch, host[0])):
                row.tokens.append(token)
                row.flat.append(logged + i)
                row.computed += 1
                if token in stops:
                    sched.finish(row, "stop")
                elif len(row.tokens) == max_new:
                    sched.finish(row, "length")
                if row.finish is not None:
                    stop.finish(row.index)
            if on_finish is not None and any(row.finish is not None for row in batch):
                on_finish([(row.index, row.tokens) for row in batch if row.finish is not None])
            logged += len(batch)
            stats.steps += 1
        return logprob_log

    def _mode(self, device: torch.device) -> str:
        """The decode mode on ``device``: "eager", "static" or "cuda_graph"."""
        mode = self.decode_mode
        if mode == "auto":
            mode = "cuda_graph" if device.type == "cuda" else "eager"
        if mode == "cuda_graph" and device.type != "cuda":
            raise ValueError(f"decode_mode='cuda_graph' needs a CUDA model, this one is on {device}")
        return mode

    def _decode_fn(self, runner: Runner, n: int):
        mode = self._mode(runner.device)
        if mode == "eager":
            return runner.decode
        from .cuda_graphs import StaticDecoder
        if self._decoder is None or not self._decoder.fits(runner, n):
            self._decoder = None  # its graphs' memory goes back before the new ones are captured
            self._decoder = StaticDecoder(runner, self.max_num_seqs, n, capture=mode == "cuda_graph")
            self.decoders_built += 1
        self._decoder.bind(runner)
        return self._decoder

    @staticmethod
    def _track(stats: EngineStats, blocks: BlockPool, sched: Scheduler) -> None:
        """The most blocks in use at once, and the live tokens they held then."""
        if blocks.in_use <= stats.peak_blocks:
            return
        stats.peak_blocks = blocks.in_use
        live = sum(r.computed + 1 for r in sched.running)
        stats.live_tokens_at_peak = live + sum(g.prefix_len for g in {r.group: None for r in sched.running})

    def _layout(self, device: torch.device) -> tuple[str, int, torch.dtype]:
        """Attention back-end, block size and compute dtype for the model's device."""
        backend = select_backend(device, self.block_size or None, is_exact(self.model))
        block_size = self.block_size or default_block_size(backend)
        param = next(self.model.parameters())
        dtype = self.dtype or (torch.bfloat16 if device.type == "cuda" else param.dtype)
        return backend, block_size, dtype

    def _groups(self, prompts: list[list[int]], images: list, device) -> list[Group]:
        groups = []
        for i, (ids, image) in enumerate(zip(prompts, images)):
            if not self.vl:
                groups.append(Group(i, ids, len(ids) - 1))
                continue
            if ids[-1] == self.model.config.image_token_id:
                raise ValueError(f"prompt {i} ends with an image token: a prompt must end with text")
            grid = image.image_grid_thw.to(device) if image is not None else None
            pos = mrope_positions(self.model, torch.tensor([ids], device=device), None, grid)[:, 0]  # (3, L)
            groups.append(Group(i, ids, int(pos[0, -1]), prefix_pos=pos[:, :-1].cpu(), image=image))
        return groups

    # ------------------------------------------------------------------ memory
    def _pool(self, prompts, rows: int, max_new: int, backend: str, block_size: int, dtype, device) -> KVPool:
        """The pool for this call of ``rows`` rows: the kept one if it is big enough, else one sized
        by the budget and by what the call can use at most."""
        block_bytes = kv_bytes_per_token(self.text_config, dtype) * block_size
        rows = min(rows, self.max_num_seqs)
        prefix_blocks = sorted((-(-(len(p) - 1) // block_size) for p in prompts), reverse=True)
        usable = rows * -(-max_new // block_size) + sum(prefix_blocks[:rows + GROUP_SLACK]) + 1
        pool = self.pool
        keep = pool is not None and (pool.dtype, pool.device, pool.block_size, pool.head_major) == (
            dtype, device, block_size, backend != "flash")
        budget = self.agree(self._budget_blocks(block_bytes, device, pool.nbytes if pool is not None else 0))
        if keep and pool.num_blocks >= min(usable, budget):
            return pool
        grown = max(usable, 2 * pool.num_blocks) if keep else usable  # doubling: few new pools (and captures) a run
        if pool is not None and pool.memory is not None:
            pool.memory.sleep()  # its pages back now, its addresses when the last view goes
        self.pool = self._decoder = None  # give the old pool back before making the new one
        self.pool = KVPool(self.text_config, max(2, min(budget, grown)), block_size, dtype, device,
                           head_major=backend != "flash", driver=self.driver)
        return self.pool

    def _budget_blocks(self, block_bytes: int, device, held: int) -> int:
        """Blocks the budget allows (``held``: bytes of a pool that would be given back first)."""
        if device.type != "cuda":
            return int(self.kv_cache_gb * 2**30) // block_bytes
        torch.cuda.empty_cache()  # what the allocator caches from the update phase is free memory here
        free, _ = torch.cuda.mem_get_info(device)
        reserve = activation_reserve(self.text_config, self.max_prefill_tokens, self.max_num_seqs, self.vocab_size)
        return kv_budget(free + held, self.utilization, reserve) // block_bytes

    def _check_fits(self, prompts, max_new: int, capacity: int, block_size: int, pool: KVPool) -> None:
        """A row alone must fit the pool: its prompt's blocks and its own."""
        block = pool.nbytes // pool.num_blocks
        for i, p in enumerate(prompts):
            need = -(-(len(p) - 1) // block_size) + -(-max_new // block_size)
            if need > capacity:
                budget = (f"kv_cache_gb={self.kv_cache_gb}" if pool.device.type != "cuda"
                          else f"gpu_memory_utilization={self.utilization}")
                raise ValueError(
                    f"prompt {i}: {len(p)} tokens + max_new_tokens={max_new} need {need} K/V blocks of {block_size} "
                    f"tokens ({_size(need * block)}) but the pool holds {capacity} ({_size(capacity * block)}, "
                    f"{budget}): shorten the prompt or max_new_tokens, or raise the budget")

    # ------------------------------------------------------------------ checks
    def _validate(self, prompt_ids, max_new_tokens: int) -> list[list[int]]:
        if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens}")
        if prompt_ids is None or len(prompt_ids) == 0:
            raise ValueError("prompt_ids is empty: give at least one prompt")
        prompts = []
        for i, prompt in enumerate(prompt_ids):
            ids = prompt.tolist() if torch.is_tensor(prompt) else list(prompt)
            if not ids:
                raise ValueError(f"prompt {i} is empty")
            prompts.append(_token_ids(ids, self.vocab_size, f"prompt {i}"))
        return prompts

    def _validate_images(self, prompts: list[list[int]], images) -> list:
        """One PixelBatch or None per prompt, its image tokens matching the prompt's placeholders."""
        if images is None:
            images = [None] * len(prompts)
        if images and any(i is not None for i in images) and not self.vl:
            raise ValueError(f"images given but {type(self.model).__name__} is not a vision-language model")
        if len(images) != len(prompts):
            raise ValueError(f"images has {len(images)} entries for {len(prompts)} prompts (use None for no image)")
        token = self.model.config.image_token_id if self.vl else None
        for i, (ids, pix) in enumerate(zip(prompts, images)):
            placeholders = ids.count(token) if self.vl else 0
            given = sum(pix.tokens) if pix is not None else 0
            if placeholders != given:
                raise ValueError(f"prompt {i}: {placeholders} image tokens in the prompt but its images give {given} "
                                 "(expand each <|image_pad|> with medix_fast.data.vision.expand_image_tokens)")
        return images

    def _stop_ids(self, stop_token_ids) -> list[int]:
        if stop_token_ids is None:
            stop_token_ids = stop_ids(self.model)
        stops = [stop_token_ids] if isinstance(stop_token_ids, int) else list(stop_token_ids)
        bad = [s for s in stops if not (isinstance(s, int) and 0 <= s < self.vocab_size)]
        if bad:
            raise ValueError(f"stop_token_ids {bad} are not ids in [0, {self.vocab_size})")
        return stops


def row_counts(n, prompts: int) -> list[int]:
    """Rows per prompt: ``n`` for each, or ``n`` itself (one count per prompt)."""
    counts = [n] * prompts if not isinstance(n, (list, tuple)) else list(n)
    if len(counts) != prompts:
        raise ValueError(f"n has {len(counts)} counts for {prompts} prompts")
    for c in counts:
        if isinstance(c, bool) or int(c) != c or c < 1:
            raise ValueError(f"n must be an integer >= 1 (or one per prompt), got {n}")
    return [int(c) for c in counts]


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if nbytes < 1024:
            return f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} GiB"


def _token_ids(ids: list, vocab_size: int, where: str) -> list[int]:
    """ids as ints, or ValueError naming the first entry that is not an id in [0, vocab_size).
    Checked with numpy: host data stays on the host (no tensor op a sync counter would see)."""
    try:
        a = np.asarray(ids)
    except (TypeError, ValueError):
        a = None
    if a is None or a.ndim != 1 or a.dtype.kind not in "iu":
        bad = next(j for j, tok in enumerate(ids) if not _is_id(tok, vocab_size))
    else:
        out_of_range = np.flatnonzero((a < 0) | (a >= vocab_size))
        if not len(out_of_range):
            return a.tolist()
        bad = int(out_of_range[0])
    raise ValueError(f"{where}: token {ids[bad]!r} at position {bad} is not an id in [0, {vocab_size})")


def _is_id(tok, vocab_size: int) -> bool:
    try:
        return 0 <= operator.index(tok) < vocab_size
    except TypeError:
        return False


def _collect(rows: list[Row], logprob_log: list[torch.Tensor], continued: list | None = None) -> SamplerOutput:
    """The rows' tokens, their log-probs gathered from the per-step log in one index (a continued
    row's earlier ones first), and reasons."""
    flat = torch.cat(logprob_log) if logprob_log else torch.zeros(0)
    index = torch.tensor([i for r in rows for i in r.flat], dtype=torch.long, device=flat.device)
    logprobs = list(flat[index].split([len(r.flat) for r in rows]))
    for k, item in enumerate(continued or ()):
        if item is not None:
            logprobs[k] = torch.cat([item[1].to(logprobs[k]), logprobs[k]])
    return SamplerOutput(completion_ids=[r.tokens for r in rows], logprobs=logprobs,
                         finish_reasons=[r.finish for r in rows])


@contextmanager
def _sampling_mode(model: nn.Module):
    """Eval mode and the engine's attention back-end for the duration; every module's training
    flag and the attention implementation restored after."""
    flags = [(m, m.training) for m in model.modules()]
    text_config = model.config.get_text_config()
    vl = text_config is not model.config  # VL: only the language model switches, not the vision tower
    attn = text_config._attn_implementation
    try:
        model.eval()
        model.set_attn_implementation({"text_config": ATTN_IMPLEMENTATION} if vl else ATTN_IMPLEMENTATION)
        if text_config._attn_implementation != ATTN_IMPLEMENTATION:
            raise ValueError(f"{type(model).__name__} cannot switch its attention back-end, which the sampler needs")
        yield
    finally:
        model.set_attn_implementation({"text_config": attn} if vl else attn)
        for module, flag in flags:
            module.training = flag
