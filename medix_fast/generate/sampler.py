"""In-process KV-cached sampler: G completions per prompt from the live training weights.

    sampler = Sampler(model, max_batch_size=64, max_seq_len=2048)
    out = sampler.generate(prompt_ids, n=8, max_new_tokens=512, temperature=1.0, top_p=1.0,
                           top_k=0, stop_token_ids=[eos], seed=0)
    out.completion_ids[i * 8 + j]  # prompt i's sample j (prompt-major), stop token included
    out.logprobs[i * 8 + j]        # (len,) fp32 log-probs of those tokens, see medix_fast.generate.tokens
    out.finish_reasons[i * 8 + j]  # "stop" | "length"
    # VL model (Qwen2.5-VL / Qwen3-VL): images=[PixelBatch or None per prompt] (medix_fast.data.vision),
    # prompt_ids with each image's <|image_pad|> run already expanded

Algorithm (gpt-fast's static cache and no-sync sampling, nano-vllm's batch buckets and CUDA
graphs, cascade attention over shared prompts; all on the Hugging Face forward of the module the
optimizer updates: no weight copy, no second engine):
1. Rows are (prompt, sample) pairs in prompt-major order, taken in chunks of max_batch_size.
2. Each distinct prompt of a chunk is prefilled once (left-padded, SDPA) into the prompt region of
   the static cache (``kv_cache.py``): no G-fold prefill, and its K/V is stored once.
3. Decode: one token per live row per step, written in place into the row's completion region;
   attention (the "medix_sampler" back-end) reads each prompt's K/V once for all its samples.
   Tokens are sampled on the device (``tokens.py``) and stop tokens detected there.
   Every ``sync_every`` steps (1 on CPU, where a sync is free) the host looks at which rows
   finished and compacts the cache and the batch onto the rest (prompts whose samples all
   finished leave too), so finished rows stop costing compute. On CUDA the batch is compacted
   when it fits a smaller bucket and each shape's step replays a CUDA graph
   (``cuda_graphs.py``).
4. Completions end at the first stop token (included, "stop") or at max_new_tokens ("length").
5. VL models: the prefill also runs the vision tower on the chunk's distinct prompts' images
   (each image encoded once per prompt, not once per sample) with the multimodal rotary
   positions (3, P, T) of ``model.forward.mrope_positions``; decode positions continue from the
   prompt's largest mrope position + 1 (HF's rope deltas), the same on all three axes, so
   decode is the text path. Only the language model switches to the "medix_sampler" back-end.

Departures from ``model.generate``: prompts share their prefill and their K/V; the attention
back-end is switched to "medix_sampler" for the call (prefill runs SDPA whatever the model's
own back-end) and switched back; the model is in eval mode for the call and every module's
training flag is restored after. Greedy (temperature 0) output equals ``generate(do_sample=False)``.
Seeded sampling is reproducible for the same inputs and sampler settings (the batch layout,
which depends on max_batch_size, decode_mode and the device, changes the random stream).
"""
from __future__ import annotations

import operator
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..model.forward import mrope_positions
from .cuda_graphs import StaticDecoder
from .kv_cache import ATTN_IMPLEMENTATION, StaticKVCache, build_grid, prefill_mask
from .tokens import METHODS, SamplingParams, sample_tokens

DECODE_MODES = ("auto", "eager", "static", "cuda_graph")


@dataclass
class SamplerOutput:
    completion_ids: list[list[int]]  # prompt-major: prompt i's sample j at i * n + j
    logprobs: list[torch.Tensor]  # same layout, (len,) fp32 on the model's device
    finish_reasons: list[str]  # "stop" | "length"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under DDP/FSDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


class Sampler:
    """Batched sampling from a Hugging Face causal LM (Qwen2, Qwen3, Llama, ...) with a static KV cache.

    max_batch_size: rows (prompt x sample) decoded at once; max_seq_len: prompt + completion
    tokens a row may hold. decode_mode: "eager"; "static" (the fixed-shape, bucketed step of the
    CUDA graphs, run eagerly); "cuda_graph"; "auto" = "cuda_graph" on CUDA, else "eager".
    share_prefix=False prefills every row separately (for comparison). sync_every: decode steps
    between host checks for finished rows (default 1 on CPU, 8 on CUDA). sample_method: "race" |
    "cdf" (see medix_fast.generate.tokens); "auto" = "race" on CUDA, "cdf" elsewhere.
    """

    def __init__(
        self,
        model: nn.Module,
        max_batch_size: int = 64,
        max_seq_len: int = 2048,
        decode_mode: str = "auto",
        share_prefix: bool = True,
        sync_every: int | None = None,
        sample_method: str = "auto",
    ):
        self.model = unwrap_model(model)
        if max_batch_size < 1 or max_seq_len < 2:
            raise ValueError(f"need max_batch_size >= 1 and max_seq_len >= 2, got {max_batch_size}, {max_seq_len}")
        if decode_mode not in DECODE_MODES:
            raise ValueError(f"decode_mode must be one of {DECODE_MODES}, got {decode_mode!r}")
        self.vl = getattr(self.model.config, "image_token_id", None) is not None
        text_config = self.model.config.get_text_config()
        layer_types = set(getattr(text_config, "layer_types", None) or ["full_attention"])
        if layer_types != {"full_attention"}:
            raise ValueError(f"only full-attention decoders are supported, the model has layer types {sorted(layer_types)}")
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        if sample_method not in ("auto", *METHODS):
            raise ValueError(f"sample_method must be one of {('auto', *METHODS)}, got {sample_method!r}")
        self.decode_mode, self.share_prefix, self.sync_every = decode_mode, share_prefix, sync_every
        self.sample_method = sample_method
        self.vocab_size = self.model.get_input_embeddings().num_embeddings
        self._images: list = []  # this call's PixelBatch (or None) per prompt, VL models
        self._cache: StaticKVCache | None = None
        self._decoder: StaticDecoder | None = None
        self._weights: tuple = ()  # (dtype, device, parameter addresses) the cache and graphs were built for

    # ------------------------------------------------------------------ public
    def generate(
        self,
        prompt_ids: list[list[int]],
        n: int = 1,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop_token_ids: list[int] | None = None,
        seed: int | None = None,
        logprobs_mode: str = "raw",
        images: list | None = None,
    ) -> SamplerOutput:
        """Sample ``n`` completions for each prompt. stop_token_ids=None takes the model's
        eos_token_id (generation config, else config), [] disables stopping. seed=None draws one
        from torch's global generator (so ``torch.manual_seed`` makes calls reproducible).
        ``images`` (VL models): one ``medix_fast.data.vision.PixelBatch`` or None per prompt."""
        params = SamplingParams(temperature, top_p, top_k, logprobs_mode)
        stops = self._stop_ids(stop_token_ids)
        prompts = self._validate(prompt_ids, n, max_new_tokens)
        self._images = self._validate_images(prompts, images)
        param = next(self.model.parameters())
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        generator = torch.Generator(param.device).manual_seed(seed)
        stop_t = torch.tensor(stops, dtype=torch.long, device=param.device)
        rows = len(prompts) * n
        chunks = []
        # inference_mode(False) turns grad mode back on, so no_grad must come after it
        with torch.inference_mode(False), torch.no_grad(), _sampling_mode(self.model):
            self._prepare(param)
            for start in range(0, rows, self.max_batch_size):
                row_prompt = [r // n for r in range(start, min(rows, start + self.max_batch_size))]
                chunks.append(self._generate_chunk(prompts, row_prompt, max_new_tokens, params, stop_t, generator))
        return _collect(torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks]), stop_t)

    # ------------------------------------------------------------------ checks
    def _validate(self, prompt_ids, n: int, max_new_tokens: int) -> list[list[int]]:
        if int(n) != n or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n}")
        if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens}")
        if prompt_ids is None or len(prompt_ids) == 0:
            raise ValueError("prompt_ids is empty: give at least one prompt")
        prompts = []
        for i, prompt in enumerate(prompt_ids):
            ids = prompt.tolist() if torch.is_tensor(prompt) else list(prompt)
            if not ids:
                raise ValueError(f"prompt {i} is empty")
            if len(ids) + max_new_tokens > self.max_seq_len:
                raise ValueError(
                    f"prompt {i}: {len(ids)} tokens + max_new_tokens={max_new_tokens} exceed max_seq_len={self.max_seq_len}"
                )
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
            gen_config = getattr(self.model, "generation_config", None)
            stop_token_ids = getattr(gen_config, "eos_token_id", None)
            if stop_token_ids is None:
                stop_token_ids = getattr(self.model.config, "eos_token_id", None)
        if stop_token_ids is None:
            return []
        stops = [stop_token_ids] if isinstance(stop_token_ids, int) else list(stop_token_ids)
        bad = [s for s in stops if not (isinstance(s, int) and 0 <= s < self.vocab_size)]
        if bad:
            raise ValueError(f"stop_token_ids {bad} are not ids in [0, {self.vocab_size})")
        return stops

    # ------------------------------------------------------------------ engine
    def _prepare(self, param: torch.Tensor) -> None:
        """(Re)build the cache when dtype or device changed; drop graphs when the weights moved."""
        weights = (param.dtype, param.device, tuple(p.data_ptr() for p in self.model.parameters()))
        if self._cache is None or weights[:2] != self._weights[:2]:
            mode = self.decode_mode
            if mode == "auto":
                mode = "cuda_graph" if param.device.type == "cuda" else "eager"
            if mode == "cuda_graph" and param.device.type != "cuda":
                raise ValueError(f"decode_mode='cuda_graph' needs a CUDA model, this one is on {param.device}")
            self._cache = StaticKVCache(self.max_batch_size, self.max_seq_len)
            self._decoder = None
            if mode != "eager":
                self._decoder = StaticDecoder(self._forward, self._cache, param.device, capture=mode == "cuda_graph")
        elif self._decoder is not None and weights != self._weights:
            self._decoder.reset()
        self._weights = weights

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor | None, pos: torch.Tensor, **vision) -> torch.Tensor:
        """ids, pos (B, T) (VL prefill: pos (3, B, T), ``vision`` the pixel inputs); prefill: boolean
        mask (B, 1, T, T), decode: None -> fp32 last-position logits (B, V)."""
        out = self.model(
            **vision,
            input_ids=ids,
            attention_mask=mask,  # 4-D: used as given by every HF decoder
            position_ids=pos,
            past_key_values=self._cache,
            use_cache=True,
            logits_to_keep=1,
            medix_kv_cache=self._cache,  # reaches the "medix_sampler" attention back-end
        )
        return out.logits[:, -1].float()

    def _bucket(self, n: int) -> int:
        return self._decoder.bucket(n) if self._decoder is not None else n

    def _set_prompts(self, valid: torch.Tensor) -> None:
        (self._decoder or self._cache).set_prompts(valid)

    def _grid(self, owner: list[int], prompts: int, group: int | None, device) -> tuple[torch.Tensor, torch.Tensor]:
        grid, slot = build_grid(owner, prompts, group if self._decoder is not None else None)
        return torch.tensor(grid, device=device), torch.tensor(slot, device=device)  # (P, G), (b,)

    def _prefill(self, prompts, row_prompt: list[int], device):
        """Prefill each distinct prompt of the chunk once. Returns the live rows' prompt index
        (host list), next-token logits (rows, V), next positions (rows,), the prompt columns
        holding tokens (P, T) and T."""
        first = row_prompt[0]
        unique = list(range(first, row_prompt[-1] + 1)) if self.share_prefix else row_prompt
        owner = [p - first for p in row_prompt] if self.share_prefix else list(range(len(row_prompt)))
        lengths = [len(prompts[p]) for p in unique]
        width = max(lengths)
        ids = torch.tensor([[0] * (width - len(prompts[p])) + prompts[p] for p in unique], device=device)  # (P, T)
        pad = width - torch.tensor(lengths, device=device)  # (P,)
        columns = torch.arange(width, device=device)
        valid = columns[None] >= pad[:, None]  # (P, T)
        pos, vision, next_pos = (columns[None] - pad[:, None]).clamp_min(0), {}, width - pad  # (P, T), (P,)
        if self.vl:
            pos, vision = self._vision_inputs(ids, valid, unique, device)  # (3, P, T)
            next_pos = pos.amax((0, 2)) + 1  # (P,): HF's rope delta continuation
        self._cache.prefill(reserve=self._bucket(len(unique)))
        logits = self._forward(ids, prefill_mask(pad, width), pos, **vision)  # (P, V)
        owner_t = torch.tensor(owner, device=device)  # (rows,)
        self._set_prompts(valid)
        return owner, logits[owner_t], next_pos[owner_t], valid, width

    def _vision_inputs(self, ids: torch.Tensor, valid: torch.Tensor, unique: list[int], device):
        """mrope positions (3, P, T) and the pixel inputs of the distinct prompts ``unique``."""
        pix = [self._images[p] for p in unique if self._images[p] is not None]
        grid = torch.cat([b.image_grid_thw for b in pix]).to(device) if pix else None  # (N, 3)
        vision = {"pixel_values": torch.cat([b.pixel_values for b in pix]).to(device), "image_grid_thw": grid} if pix else {}
        return mrope_positions(self.model, ids, valid.long(), grid), vision

    def _generate_chunk(self, prompts, row_prompt: list[int], max_new: int, params, stop_t, generator):
        """Generate for rows whose prompts are ``row_prompt``; returns tokens (rows, max_new),
        -1 past a row's end of compute, and their log-probs (rows, max_new) fp32."""
        device, cache, rows = stop_t.device, self._cache, len(row_prompt)
        owner, logits, pos, valid, width = self._prefill(prompts, row_prompt, device)  # pos (b,): next positions
        row_id = torch.arange(rows, device=device)  # (b,) chunk row of each live row
        done = torch.zeros(rows, dtype=torch.bool, device=device)  # (b,)
        tokens = torch.full((rows, max_new), -1, dtype=torch.long, device=device)
        logps = torch.zeros((rows, max_new), dtype=torch.float32, device=device)
        col = torch.zeros(1, dtype=torch.long, device=device)  # completion column of the next token
        group = max(Counter(owner).values())
        grid, slot = self._grid(owner, valid.shape[0], group, device)
        sync_every = self.sync_every or (8 if device.type == "cuda" else 1)
        method = self.sample_method if self.sample_method != "auto" else ("race" if device.type == "cuda" else "cdf")
        for step in range(max_new):
            tok, lp = sample_tokens(logits, params, generator, method)  # (b,), (b,)
            tokens[row_id, step] = tok
            logps[row_id, step] = lp
            if step == max_new - 1:
                break
            done |= torch.isin(tok, stop_t)
            if (step + 1) % sync_every == 0:
                keep = (~done).nonzero()[:, 0]  # host sync
                if keep.numel() == 0:
                    break
                if self._bucket(keep.numel()) < self._bucket(tok.numel()):
                    owner, valid = self._compact(keep, owner, valid, width, step)
                    tok, pos, row_id, done = tok[keep], pos[keep], row_id[keep], done[keep]
                    grid, slot = self._grid(owner, valid.shape[0], group, device)
            if self._decoder is not None:
                logits = self._decoder(tok, pos, col, grid, slot)
            else:
                cache.decode(tok.numel(), col, grid, slot, step + 1)
                logits = self._forward(tok[:, None], None, pos[:, None])
            col += 1
            pos += 1
        return tokens, logps

    def _compact(self, keep: torch.Tensor, owner: list[int], valid: torch.Tensor, width: int, step: int):
        """Keep rows ``keep`` (n,) in the cache, and the prompts they still use; returns the new
        owner list and prompt columns (P', T)."""
        owner = [owner[i] for i in keep.tolist()]
        live = sorted(set(owner))
        if len(live) < valid.shape[0]:  # all samples of some prompts finished: drop their K/V too
            live_t = torch.tensor(live, device=keep.device)
            self._cache.compact_prompts(live_t, used=width)
            valid = valid[live_t]
            rank = {p: i for i, p in enumerate(live)}
            owner = [rank[p] for p in owner]
            self._set_prompts(valid)
        self._cache.compact(keep, used=step)  # completion columns 0 .. step-1 are written
        return owner, valid


def _token_ids(ids: list, vocab_size: int, where: str) -> list[int]:
    """ids as ints, or ValueError naming the first entry that is not an id in [0, vocab_size)."""
    try:
        t = torch.tensor(ids)
    except (TypeError, ValueError, RuntimeError):
        t = None
    if t is None or t.dim() != 1 or t.dtype.is_floating_point or t.dtype.is_complex:
        bad = next(j for j, tok in enumerate(ids) if not _is_id(tok, vocab_size))
    else:
        out_of_range = ((t < 0) | (t >= vocab_size)).nonzero()
        if not len(out_of_range):
            return t.tolist()
        bad = int(out_of_range[0, 0])
    raise ValueError(f"{where}: token {ids[bad]!r} at position {bad} is not an id in [0, {vocab_size})")


def _is_id(tok, vocab_size: int) -> bool:
    try:
        return 0 <= operator.index(tok) < vocab_size
    except TypeError:
        return False


def _collect(tokens: torch.Tensor, logps: torch.Tensor, stop_t: torch.Tensor) -> SamplerOutput:
    """Cut each row after its first stop token; tokens/logps (N, max_new)."""
    max_new = tokens.shape[1]
    is_stop = torch.isin(tokens, stop_t)  # (N, max_new)
    stopped = is_stop.any(1)
    length = torch.where(stopped, is_stop.int().argmax(1) + 1, max_new)  # (N,)
    lengths, stopped_list, token_list = length.tolist(), stopped.tolist(), tokens.tolist()
    return SamplerOutput(
        completion_ids=[row[:k] for row, k in zip(token_list, lengths)],
        logprobs=[logps[r, :k] for r, k in enumerate(lengths)],
        finish_reasons=["stop" if s else "length" for s in stopped_list],
    )


@contextmanager
def _sampling_mode(model: nn.Module):
    """Eval mode and the sampler's attention back-end for the duration; every module's training
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
