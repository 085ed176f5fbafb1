"""The LLM judge of the accuracy reward: a local causal LM scores a whole batch in one forward.

The reference (MediX-R1) sends each (predicted, ground truth) pair to a vLLM server running
Qwen3-4B-Instruct-2507 with the prompt below, greedy, thinking off, 4 tokens, and scores 1 when the
reply contains "YES". Here the judge runs in-process: all prompts go through the judge's chat
template (``enable_thinking=False``), are left-padded into one batch, and one forward gives the
logits of the first reply token; the verdict is 1 when the "YES" token outscores the "NO" token.
"""
from __future__ import annotations

import torch

from medix_fast.errors import ConfigError
from medix_fast.model.forward import left_pad_positions
from medix_fast.rewards.batching import padded_chunks


def judge_prompt(predicted: str, ground_truth: str) -> str:
    """The reference's judge prompt (verbatim, including its spacing)."""
    return f"""You are a helpful assistant.
Given a predicted answer and the ground truth answer, respond with exactly "YES" if the content matches, otherwise respond with "NO".
Start your response with "YES" or "NO" in uppercase.

Predicted:{predicted}
Ground Truth:{ground_truth}
"""


class Judge:
    """A frozen causal LM that answers YES/NO; ``margin(pairs)`` -> logit(YES) - logit(NO)."""

    def __init__(self, path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 max_batch_tokens: int | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        if self.tokenizer.chat_template is None:
            raise ConfigError(f"rewards.judge_model: the tokenizer at {path} has no chat template")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.yes, self.no = (self.tokenizer.encode(w, add_special_tokens=False)[0] for w in ("YES", "NO"))
        if self.yes == self.no:
            raise ConfigError(f"rewards.judge_model: the tokenizer at {path} gives YES and NO the same first token")
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval().requires_grad_(False)
        self.max_batch_tokens = max_batch_tokens

    @property
    def device(self) -> torch.device:
        return self.model.device

    def render(self, predicted: str, ground_truth: str) -> str:
        """The chat-templated judge input, ending where the assistant's reply starts."""
        messages = [{"role": "user", "content": judge_prompt(predicted, ground_truth)}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  enable_thinking=False)

    @torch.inference_mode()
    def margin(self, predicted: list[str], ground_truth: list[str]) -> torch.Tensor:
        """(N,) float32 logit(YES) - logit(NO) at the first reply token; one left-padded forward
        unless the batch exceeds ``max_batch_tokens``."""
        texts = [self.render(p, g) for p, g in zip(predicted, ground_truth)]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        out = torch.zeros(len(texts), device=self.device)  # (N,)
        for rows, batch in padded_chunks(self.tokenizer, ids, self.max_batch_tokens, self.device):
            mask = batch["attention_mask"]  # (B, T)
            positions = left_pad_positions(mask)  # (B, T): left padding must not shift positions
            logits = self.model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions,
                                use_cache=False, logits_to_keep=1).logits[:, -1].float()  # (B, V)
            out[torch.tensor(rows, device=out.device)] = logits[:, self.yes] - logits[:, self.no]
        return out

    def verdict(self, predicted: list[str], ground_truth: list[str]) -> torch.Tensor:
        """(N,) float32: 1 where YES beats NO."""
        return (self.margin(predicted, ground_truth) > 0).float()
