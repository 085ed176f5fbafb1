"""The MediX-R1 composite reward: model loading and batched scoring of a rollout batch (its config,
``RewardConfig``, lives in ``medix_fast/config.py`` with the trainer's).

    overall = sum_k weights[k] * component_k
            = 0.9 * (0.575 accuracy + 0.375 semantic + 0.05 modality) + 0.1 format   (defaults)

Components: ``format`` and ``modality`` (string rules), ``accuracy`` (LLM judge, or normalised
exact match when no judge is configured), ``semantic`` (embedding cosine >= threshold),
``overlong`` (DAPO shaping, off by default) and any user function named ``"pkg.mod:func"`` in
``RewardConfig.custom``. A component whose weight is 0 is neither loaded nor computed, and its key
is absent from the result. Both model components score only the rows that are valid and not an
exact match, all of them in one forward per model.

    from medix_fast.rewards import RewardConfig, build_reward
    reward = build_reward(RewardConfig(judge_model="/models/Qwen3-4B-Instruct-2507"), device="cuda",
                          dtype=torch.bfloat16)
    scores = reward(responses, solutions)   # {"format": (N,), ..., "overall": (N,)} float32, on "cuda"

Scores come back on the scorer's ``device`` (the training device in training), so the rollout's
advantages and filters run there without a copy back; the string rules are scored on the host and
moved in one copy.
"""
from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from medix_fast.config import RewardConfig
from medix_fast.distributed import to_device
from medix_fast.errors import ConfigError
from medix_fast.rewards.judge import Judge
from medix_fast.rewards.overlong import overlong_penalty
from medix_fast.rewards.rules import parse, validate_solutions
from medix_fast.rewards.semantic import SentenceEncoder, default_model_path

logger = logging.getLogger(__name__)


def _import_component(name: str, target: str) -> Callable:
    module, sep, attr = target.partition(":")
    if not sep or not module or not attr:
        raise ConfigError(f"rewards.custom.{name}: expected 'pkg.mod:func', got {target!r}")
    try:
        fn = getattr(importlib.import_module(module), attr, None)
    except ImportError as err:
        raise ConfigError(f"rewards.custom.{name}: cannot import {module!r} ({err})") from err
    if not callable(fn):
        raise ConfigError(f"rewards.custom.{name}: {target!r} is not a callable")
    return fn


class RewardFunction:
    """Frozen reward models plus the rules; ``__call__`` scores a batch. Build with ``build_reward``."""

    def __init__(self, cfg: RewardConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        cfg.check()
        if cfg.active("overlong"):
            overlong_penalty([], cfg.overlong_max_length, cfg.overlong_buffer)  # validates L and C now
        for key in ("semantic_model", "judge_model"):
            path = getattr(cfg, key)
            if cfg.active("semantic" if key == "semantic_model" else "accuracy") and path is not None \
                    and not Path(path).expanduser().is_dir():
                raise ConfigError(f"rewards.{key}: {path!r} is not a directory (give a local model folder)")
        self.cfg, self.device = cfg, torch.device(device)
        home = "cpu" if cfg.offload else self.device
        self.encoder = (SentenceEncoder(cfg.semantic_model or default_model_path(), home, dtype, cfg.max_batch_tokens)
                        if cfg.active("semantic") else None)
        self.judge = (Judge(cfg.judge_model, home, dtype, cfg.max_batch_tokens)
                      if cfg.active("accuracy") and cfg.judge_model else None)
        if cfg.active("accuracy") and self.judge is None:
            logger.warning("no judge_model configured: the accuracy reward falls back to normalised exact match")
        self.custom = {name: _import_component(name, target) for name, target in cfg.custom.items()
                       if cfg.active(name)}

    def _models(self) -> list[torch.nn.Module]:
        return [m.model for m in (self.encoder, self.judge) if m is not None]

    def _place(self, device: torch.device) -> None:
        for model in self._models():
            model.to(device)
        if device.type == "cpu" and torch.cuda.is_available():
            torch.cuda.empty_cache()

    @contextmanager
    def placed(self):
        """The reward models on the scorer's device for the block; with ``offload``, back on the
        host after it (the judge of ``eval.protocol: medix_r1`` runs inside one too)."""
        if not self.cfg.offload:
            yield
            return
        self._place(self.device)
        try:
            yield
        finally:
            self._place(torch.device("cpu"))

    def __call__(self, responses: Sequence[str], solutions: Sequence[str],
                 response_lengths: Sequence[int] | torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """N responses and their ``"<TAG> answer"`` solutions -> {component: (N,) float32 on the
        scorer's device}, plus ``"overall"``. ``response_lengths`` (token counts) is needed only by ``overlong``."""
        responses, solutions = list(responses), list(solutions)
        if len(responses) != len(solutions):
            raise ValueError(f"{len(responses)} responses but {len(solutions)} solutions")
        bad = next((i for i, r in enumerate(responses) if not isinstance(r, str)), None)
        if bad is not None:
            raise ValueError(f"response row {bad}: expected a string, got {type(responses[bad]).__name__}")
        validate_solutions(solutions)
        with self.placed():
            out = self._score(responses, solutions, response_lengths)
        out["overall"] = sum((self.cfg.weights[k] * v for k, v in out.items()),
                             torch.zeros(len(responses), device=self.device))  # (N,)
        return out

    def _score(self, responses, solutions, response_lengths) -> dict[str, torch.Tensor]:
        cfg, n, dev = self.cfg, len(responses), self.device
        p = parse(responses, solutions)
        rules = {"format": p.format, "modality": p.modality, "exact": p.exact}
        host = torch.tensor([rules[k] for k in rules], dtype=torch.float32).reshape(len(rules), n)  # (3, N)
        ruled = dict(zip(rules, to_device(host, dev)))
        out: dict[str, torch.Tensor] = {k: ruled[k] for k in ("format", "modality") if cfg.active(k)}
        rows = p.pending()
        left, right = [p.answers[i] for i in rows], [p.references[i] for i in rows]
        index = to_device(torch.tensor(rows, dtype=torch.long), dev)  # (pending,)
        if cfg.active("accuracy"):
            out["accuracy"] = ruled["exact"].clone()
            if self.judge is not None and rows:
                out["accuracy"].index_copy_(0, index, self.judge.verdict(left, right).to(dev))
        if cfg.active("semantic"):
            out["semantic"] = ruled["exact"].clone()
            if rows:
                out["semantic"].index_copy_(0, index, (self.encoder.cosine(left, right) >= cfg.threshold).float().to(dev))
        if cfg.active("overlong"):
            if response_lengths is None:
                raise ValueError("the overlong component needs response_lengths (token counts)")
            out["overlong"] = overlong_penalty(response_lengths, cfg.overlong_max_length, cfg.overlong_buffer).to(dev)
            if out["overlong"].shape != (n,):
                raise ValueError(f"response_lengths has shape {tuple(out['overlong'].shape)}, expected ({n},)")
        for name, fn in self.custom.items():
            value = torch.as_tensor(fn(responses, solutions), dtype=torch.float32)
            if value.shape != (n,):
                raise ValueError(f"custom component {name!r} returned shape {tuple(value.shape)}, expected ({n},)")
            out[name] = value.to(dev)
        return out


def build_reward(cfg: RewardConfig | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> RewardFunction:
    """Load the reward models once (eval mode, no gradients, ``dtype``) and return the scorer."""
    return RewardFunction(cfg or RewardConfig(), device, dtype)


_BUILT: dict[str, RewardFunction] = {}


def score(responses: Sequence[str], solutions: Sequence[str], *, response_lengths=None,
          device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, **config) -> dict[str, torch.Tensor]:
    """One-call scoring: ``config`` holds ``RewardConfig`` fields; the built scorer is cached per config."""
    cfg = RewardConfig(**config)
    key = repr((cfg, str(device), dtype))
    if key not in _BUILT:
        _BUILT[key] = build_reward(cfg, device, dtype)
    return _BUILT[key](responses, solutions, response_lengths)
