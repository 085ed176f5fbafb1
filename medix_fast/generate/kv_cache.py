"""Static, prefix-shared KV cache of the in-process sampler, and the decode attention that reads it.

Two regions per decoder layer, allocated on the first prefill (dtype, device, KV-head count and
head size come from the model's own K/V) and then only written in place:
- prompt K/V (prompt rows, kv_heads, max_seq_len, head_dim): each distinct prompt once, left-padded
  to the batch's longest prompt T, so prompt p's token at position i is in column pad_p + i;
- completion K/V (max_batch_size, kv_heads, max_seq_len, head_dim): one row per sample, the token
  of decode step t in column t for every row (one ``index_copy_`` per layer and step).
The G samples of a prompt read its K/V from the single prompt row: a prompt is stored and read
once per step instead of G times (cascade / shared-prefix attention). The prompt region grows
(is reallocated) when a batch has more distinct prompts than it holds.

Decode attention (``attend``) runs inside the Hugging Face forward as the attention back-end
"medix_sampler" (registered here; the sampler switches the model to it for the call): the query of
each row is scored against its prompt's K/V through a (prompts, group) grid of rows, and against
its own completion K/V, with one softmax over both. Prefill uses SDPA with ``prefill_mask``.

    cache.prefill(n_prompts)                 # then model(ids, attention_mask=prefill_mask(pad, T), ...,
    cache.set_prompts(valid)                 #      past_key_values=cache, medix_kv_cache=cache)
    cache.decode(rows, col, grid, slot, ...) # then model(tok[:, None], position_ids=..., same kwargs)
"""
from __future__ import annotations

from collections import Counter

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ATTN_IMPLEMENTATION = "medix_sampler"


class StaticKVCache:
    """Preallocated prompt and completion K/V; see the module docstring for the layout."""

    def __init__(self, max_batch_size: int, max_seq_len: int):
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.prompt_rows = 0
        self.prompt_k: list[torch.Tensor] = []  # per layer (prompt_rows, kv_heads, max_seq_len, head_dim)
        self.prompt_v: list[torch.Tensor] = []
        self.comp_k: list[torch.Tensor] = []  # per layer (max_batch_size, kv_heads, max_seq_len, head_dim)
        self.comp_v: list[torch.Tensor] = []
        self.generation = 0  # bumped when buffers are reallocated (captured graphs hold their addresses)
        self.prefilling = True
        self.prompt_valid: torch.Tensor | None = None  # (P, Wp) bool: column holds a prompt token
        self.rows = 0  # decode: batch rows in the forward
        self.col: torch.Tensor | None = None  # decode: (1,) long, completion column written
        self.grid: torch.Tensor | None = None  # decode: (P, G) long, batch row in each (prompt, group) slot
        self.slot: torch.Tensor | None = None  # decode: (rows,) long, flat grid slot of each row
        self.comp_width = 0  # decode: completion columns attended
        self.comp_valid: torch.Tensor | None = None  # decode: (rows, comp_width) bool, or None = all

    # -------------------------------------------------------------- state
    def prefill(self, reserve: int) -> None:
        """Next forward prefills distinct prompts from row 0, column 0 of the prompt region, which
        is grown to hold at least ``reserve`` prompts."""
        if reserve > self.prompt_rows:
            self.prompt_rows = reserve
            self.prompt_k, self.prompt_v = [], []
            self.generation += 1
        self.prefilling = True

    def set_prompts(self, valid: torch.Tensor) -> None:
        """valid (P, Wp) bool: which prompt-region columns of the live prompts hold tokens."""
        self.prompt_valid = valid

    def decode(self, rows: int, col: torch.Tensor, grid: torch.Tensor, slot: torch.Tensor,
               comp_width: int, comp_valid: torch.Tensor | None = None) -> None:
        """Next forwards feed one token for each of the first ``rows`` rows, written at completion
        column ``col`` ((1,) tensor); see the attribute comments for grid, slot and comp_valid."""
        self.prefilling = False
        self.rows, self.col, self.grid, self.slot = rows, col, grid, slot
        self.comp_width, self.comp_valid = comp_width, comp_valid

    # -------------------------------------------------------------- transformers Cache protocol
    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store this layer's new K/V (B, kv_heads, T, head_dim); return the K/V to attend over."""
        if self.prefilling:
            if layer_idx == len(self.prompt_k):
                self._allocate(key, value)
            prompts, width = key.shape[0], key.shape[2]
            self.prompt_k[layer_idx][:prompts, :, :width] = key
            self.prompt_v[layer_idx][:prompts, :, :width] = value
            return key, value  # prefill attends over its own fresh states
        k_buf, v_buf = self.comp_k[layer_idx][: self.rows], self.comp_v[layer_idx][: self.rows]
        k_buf.index_copy_(2, self.col, key)
        v_buf.index_copy_(2, self.col, value)
        return k_buf[:, :, : self.comp_width], v_buf[:, :, : self.comp_width]

    def _allocate(self, key: torch.Tensor, value: torch.Tensor) -> None:
        heads, opts = key.shape[1], dict(dtype=key.dtype, device=key.device)
        self.prompt_k.append(torch.zeros(self.prompt_rows, heads, self.max_seq_len, key.shape[3], **opts))
        self.prompt_v.append(torch.zeros(self.prompt_rows, heads, self.max_seq_len, value.shape[3], **opts))
        if len(self.comp_k) < len(self.prompt_k):
            self.comp_k.append(torch.zeros(self.max_batch_size, heads, self.max_seq_len, key.shape[3], **opts))
            self.comp_v.append(torch.zeros(self.max_batch_size, heads, self.max_seq_len, value.shape[3], **opts))
            self.generation += 1

    # -------------------------------------------------------------- compaction
    def compact(self, keep: torch.Tensor, used: int) -> None:
        """Move completion rows ``keep`` (n,) to the front, in order (their first ``used`` columns),
        so finished rows stop costing compute."""
        for buf in (*self.comp_k, *self.comp_v):
            buf[: keep.numel(), :, :used] = buf[keep, :, :used]

    def compact_prompts(self, keep: torch.Tensor, used: int) -> None:
        """Move prompt rows ``keep`` (n,) to the front (their first ``used`` columns)."""
        for buf in (*self.prompt_k, *self.prompt_v):
            buf[: keep.numel(), :, :used] = buf[keep, :, :used]

    # -------------------------------------------------------------- decode attention
    def attend(self, layer_idx: int, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """One query per row (rows, heads, 1, D) against its prompt's and its own K/V -> (rows, 1, heads, D)."""
        rows, heads, _, dim = query.shape
        prompts, group = self.grid.shape
        width = self.prompt_valid.shape[1]
        k_prompt = self.prompt_k[layer_idx][:prompts, :, :width]  # (P, kv, Wp, D)
        v_prompt = self.prompt_v[layer_idx][:prompts, :, :width]
        k_comp = self.comp_k[layer_idx][:rows, :, : self.comp_width]  # (rows, kv, Wc, D)
        v_comp = self.comp_v[layer_idx][:rows, :, : self.comp_width]
        kv = k_prompt.shape[1]
        q = (query * scaling).reshape(rows, kv, heads // kv, dim)  # (rows, kv, r, D): head i uses KV head i // r
        flat_grid = self.grid.reshape(-1)

        s_prompt = _matmul32(_to_grid(q[flat_grid], prompts), k_prompt.transpose(-1, -2))  # (P, kv, G*r, Wp)
        s_prompt = s_prompt.masked_fill(~self.prompt_valid[:, None, None, :], float("-inf"))
        s_prompt = _from_grid(s_prompt, group)[self.slot]  # (rows, kv, r, Wp)
        s_comp = _matmul32(q, k_comp.transpose(-1, -2))  # (rows, kv, r, Wc)
        if self.comp_valid is not None:
            s_comp = s_comp.masked_fill(~self.comp_valid[:, None, None, :], float("-inf"))
        weights = torch.softmax(torch.cat([s_prompt, s_comp], -1), -1).to(q.dtype)  # fp32 softmax
        w_prompt, w_comp = weights.split([width, self.comp_width], -1)

        out = _from_grid(_matmul32(_to_grid(w_prompt[flat_grid], prompts), v_prompt), group)[self.slot]  # (rows, kv, r, D)
        out = out + _matmul32(w_comp, v_comp)
        return out.to(q.dtype).reshape(rows, 1, heads, dim)


def _matmul32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (..., M, K) @ b (..., K, N) in at least fp32: fp16/bf16 CUDA GEMMs write fp32 directly
    (as flash attention keeps its scores); other inputs are computed in their dtype."""
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16):
        out = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), out_dtype=torch.float32)
        return out.view(*a.shape[:-1], b.shape[-1])
    return torch.matmul(a, b).to(torch.promote_types(a.dtype, torch.float32))


def _to_grid(x: torch.Tensor, prompts: int) -> torch.Tensor:
    """(P*G, kv, r, X) in grid order -> (P, kv, G*r, X): a prompt's queries side by side."""
    _, kv, r, last = x.shape
    return x.view(prompts, -1, kv, r, last).transpose(1, 2).reshape(prompts, kv, -1, last)


def _from_grid(x: torch.Tensor, group: int) -> torch.Tensor:
    """(P, kv, G*r, X) -> (P*G, kv, r, X), the inverse of ``_to_grid``."""
    prompts, kv, _, last = x.shape
    return x.view(prompts, kv, group, -1, last).transpose(1, 2).reshape(prompts * group, kv, -1, last)


def sampler_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      medix_kv_cache: StaticKVCache | None = None, **kwargs):
    """Attention back-end "medix_sampler": SDPA for prefill, ``StaticKVCache.attend`` for decode."""
    if medix_kv_cache is None or medix_kv_cache.prefilling:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    return medix_kv_cache.attend(module.layer_idx, query, scaling), None


AttentionInterface.register(ATTN_IMPLEMENTATION, sampler_attention)


def build_grid(owner: list[int], prompts: int, group: int | None = None) -> tuple[list[list[int]], list[int]]:
    """Place rows in a (prompts, group) grid by their prompt ``owner[row]``; group defaults to
    the most rows any prompt has. Empty slots point at row 0 (computed, never read back).
    Returns the grid (batch row per slot) and each row's flat slot."""
    group = group or max(Counter(owner).values())
    grid, slot, filled = [[0] * group for _ in range(prompts)], [], [0] * prompts
    for row, p in enumerate(owner):
        grid[p][filled[p]] = row
        slot.append(p * group + filled[p])
        filled[p] += 1
    return grid, slot


def prefill_mask(pad: torch.Tensor, length: int) -> torch.Tensor:
    """Boolean causal mask (B, 1, T, T), True = visible, for left-padded prompts; ``pad`` (B,)
    counts each row's padding. A padding query sees itself only, so no softmax row is empty."""
    i = torch.arange(length, device=pad.device)
    ok = (i[None, None, :] <= i[None, :, None]) & (i[None, None, :] >= pad[:, None, None])  # (B, T, T)
    return (ok | torch.eye(length, dtype=torch.bool, device=pad.device))[:, None]
