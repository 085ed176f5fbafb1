"""The embedded tiny model: a complete Hugging Face checkpoint built offline in under a minute.

    python -m medix_fast.demo.tiny --out DIR [--seed 0] [--steps N]

What it builds, with no download:
1. A byte-level BPE tokenizer trained with ``tokenizers`` on the bundled train split, the
   MediX instruction and the warm-start responses; the 4 format tags and 16 modality tags
   are single added tokens (kept by ``decode(skip_special_tokens=True)``), the Qwen chat
   tokens ``<|im_start|>``, ``<|im_end|>`` (eos) and ``<|endoftext|>`` (pad) are special
   tokens, and a Qwen-style chat template (``add_generation_prompt`` supported) is attached.
2. A small ``Qwen2ForCausalLM`` (1.05M parameters: hidden 128, 4 layers, 4 query / 2 KV
   heads, vocabulary 2,048, tied embeddings), randomly initialised.
3. A short supervised warm-start on the bundled train items by a deliberately unsure teacher.
   Prompt = the MediX messages through the chat template; target =
   ``"<TAG><thinking>The image is <modality>; the findings point to R, not L.</thinking><answer>A</answer>"``
   where R is the right answer, L its look-alike (``sample_data.look_alike``), and A, drawn
   afresh each time the item is shown, is R with probability 0.4 and L with 0.6
   (``TinyConfig.teacher``). The tag, the format and the reasoning are always right; only the
   final answer wavers. So the model learns to reason to the right answer and its look-alike,
   then more often than not answers the look-alike: before RL a clear fraction of held-out
   questions is answered right in some of G samples but not greedily. Answering what its own
   reasoning found is the rule RL can teach it (the default run shows pass@G becoming pass@1).
   The shared instruction prefix runs once per batch and the LM head only on the response
   (``shared_prefix_loss``): about 40 s on one CPU thread, which is all the build uses.

Deterministic given the seed (on a given CPU and torch build). ``demo.cache.ensure_tiny_model()``
caches the build as ``$XDG_CACHE_HOME/medix_fast/tiny-<recipe digest>-seed<seed>`` (default
root ``~/.cache/medix_fast``); ``model.path: tiny`` in a config means that checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import time
from dataclasses import asdict, dataclass

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import DynamicCache, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from ..data.loader import sample_path
from ..data.prompt import FORMAT_TAGS, INSTRUCTION, MODALITY_TAGS, build_messages, split_solution
from ..errors import ArgumentParser, UserError, run_command
from ..model.compat import cache_kwargs
from .sample_data import look_alike

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


@dataclass(frozen=True)
class TinyConfig:
    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 1024
    steps: int = 500         # warm-start AdamW steps: 20 epochs of the train split
    batch_size: int = 16
    lr: float = 6e-3         # peak; cosine decay to a tenth
    warmup_steps: int = 5
    teacher: tuple[float, ...] = (0.4, 0.6)  # the teacher's final answer: P(right), P(look-alike)


def warm_start_response(solution: str, answer: str | None = None) -> str:
    """The MediX-format target the warm-start teaches for ``"<TAG> answer"``: the reasoning names
    the right answer and its look-alike; the final answer is ``answer`` (default: the right one)."""
    tag, right = split_solution(solution)
    modality = tag.strip("<>").lower().replace("_", " ")
    alike = look_alike(tag, right)
    answer = right if answer is None else answer
    return (f"{tag}<thinking>The image is {modality}; the findings point to {right}, not {alike}.</thinking>"
            f"<answer>{answer}</answer>")


def teacher_answers(solution: str) -> list[str]:
    """The final answers the teacher picks from, in ``TinyConfig.teacher`` order: right, look-alike."""
    tag, right = split_solution(solution)
    return [right, look_alike(tag, right)]


def read_train_rows() -> list[dict]:
    return [json.loads(line) for line in sample_path("train").read_text().splitlines()]


def build_tokenizer(rows: list[dict], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the sample rows; chat tokens special, MediX tags added whole."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = [PAD, IM_START, IM_END]
    tags = [*FORMAT_TAGS, *MODALITY_TAGS]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special + tags, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [INSTRUCTION] + [r["problem"] for r in rows] + [warm_start_response(r["solution"]) for r in rows]
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in tags])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=PAD,
                                   chat_template=CHAT_TEMPLATE, padding_side="right")


def build_model(tokenizer: PreTrainedTokenizerFast, cfg: TinyConfig) -> Qwen2ForCausalLM:
    """A randomly initialised tiny Qwen2 (call after seeding torch)."""
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id], bos_token_id=None,
    )
    return Qwen2ForCausalLM(config)


def encode_examples(tokenizer: PreTrainedTokenizerFast, rows: list[dict]) -> list[tuple[list[int], list[list[int]]]]:
    """(prompt ids, [response ids ending in <|im_end|> for each of ``teacher_answers``]) per row."""
    examples = []
    for row in rows:
        prompt = tokenizer.apply_chat_template(build_messages(row["problem"]), tokenize=False,
                                               add_generation_prompt=True)
        responses = [warm_start_response(row["solution"], a) + IM_END for a in teacher_answers(row["solution"])]
        examples.append((tokenizer(prompt, add_special_tokens=False).input_ids,
                         tokenizer(responses, add_special_tokens=False).input_ids))
    return examples


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels are -100 on the prompt and the padding."""
    width = max(len(p) + len(r) for p, r in examples)
    ids = torch.full((len(examples), width), pad_id)  # (B, T)
    labels = torch.full((len(examples), width), -100)  # (B, T)
    mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
    for i, (p, r) in enumerate(examples):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r)
        labels[i, len(p):n] = torch.tensor(r)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def common_prefix_len(examples: list) -> int:
    """Tokens shared by every prompt, leaving at least the last prompt token (it predicts the tag)."""
    first = examples[0][0]
    n = min(len(p) for p, _ in examples) - 1
    for p, _ in examples:
        n = next((i for i in range(n) if p[i] != first[i]), n)
    return n


def shared_prefix_loss(model: Qwen2ForCausalLM, examples: list, prefix_len: int, pad_id: int) -> torch.Tensor:
    """Mean response-token cross-entropy of a batch whose prompts share their first ``prefix_len`` tokens.

    The shared prefix (chat header and instruction, ~60 % of the prompt) runs once at batch 1
    and its KV cache is repeated over the batch; the LM head runs on the response positions
    only. Same loss and gradients as the padded full batch through ``model(labels=...)``, at
    about 40 % of its compute.
    """
    prefix = torch.tensor([examples[0][0][:prefix_len]])  # (1, P)
    cache = DynamicCache()
    model.model(input_ids=prefix, **cache_kwargs(model.model, cache), use_cache=True)
    cache.batch_repeat_interleave(len(examples))
    batch = collate([(p[prefix_len:], r) for p, r in examples], pad_id)
    B, T = batch["input_ids"].shape
    mask = torch.cat([torch.ones(B, prefix_len, dtype=torch.long), batch["attention_mask"]], 1)  # (B, P + T)
    positions = torch.arange(prefix_len, prefix_len + T).expand(B, T)  # (B, T)
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions,
                         **cache_kwargs(model.model, cache)).last_hidden_state  # (B, T, H)
    targets = batch["labels"][:, 1:]  # (B, T - 1): position t predicts token t + 1
    keep = targets != -100  # (B, T - 1)
    logits = model.lm_head(hidden[:, :-1][keep])  # (N, V)
    return torch.nn.functional.cross_entropy(logits, targets[keep])


def warm_start(model: Qwen2ForCausalLM, examples: list, cfg: TinyConfig, seed: int, pad_id: int) -> list[float]:
    """``cfg.steps`` AdamW steps over seeded epochs of the examples (``encode_examples``), each
    item's target answer drawn from ``cfg.teacher`` every time it is shown; returns the losses."""
    prefix_len = common_prefix_len(examples)
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.tensor(cfg.teacher)  # (5,)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * s / cfg.steps))))
    model.train()
    order: list[int] = []
    losses = []
    for _ in range(cfg.steps):
        if len(order) < cfg.batch_size:
            order += torch.randperm(len(examples), generator=gen).tolist()
        batch, order = order[:cfg.batch_size], order[cfg.batch_size:]
        picks = torch.multinomial(teacher, len(batch), replacement=True, generator=gen).tolist()
        shown = [(examples[i][0], examples[i][1][k]) for i, k in zip(batch, picks)]
        loss = shared_prefix_loss(model, shown, prefix_len, pad_id)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def build_tiny(out: str | os.PathLike, seed: int = 0, cfg: TinyConfig = TinyConfig()) -> pathlib.Path:
    """Build the tokenizer and warm-started model and save both to ``out``; returns the path.

    Runs on one CPU thread: at this size a second thread gains little, loses a lot when the
    cores are shared (spinning OpenMP workers), and would make the weights depend on the
    machine's thread count.
    """
    out = pathlib.Path(out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = read_train_rows()
        tokenizer = build_tokenizer(rows, cfg.vocab_size)
        torch.manual_seed(seed)
        model = build_model(tokenizer, cfg)
        losses = warm_start(model, encode_examples(tokenizer, rows), cfg, seed, tokenizer.pad_token_id)
    finally:
        torch.set_num_threads(threads)
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    meta = {"seed": seed, "config": asdict(cfg), "losses": losses}
    (out / "medix_tiny.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out


def _main(argv: list[str] | None) -> int:
    parser = ArgumentParser(prog="python -m medix_fast.demo.tiny",
                            description="Build the embedded tiny MediX checkpoint (no download).")
    parser.add_argument("--out", required=True, type=pathlib.Path, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=TinyConfig.steps, help="warm-start steps")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    held = sorted(p.name for p in args.out.iterdir()) if args.out.is_dir() else []
    if held and not (args.out / "medix_tiny.json").is_file():  # a previous tiny build may be replaced
        raise UserError(f"--out {args.out} holds other files ({', '.join(held[:5])}{' ...' if len(held) > 5 else ''}): "
                        "give a new or empty directory, nothing is written over them")
    start = time.perf_counter()
    try:
        build_tiny(args.out, args.seed, TinyConfig(steps=args.steps))
    except OSError as err:
        raise UserError(f"cannot write the tiny model to {args.out}: {err}") from err
    print(f"built {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command: 0 when built, 2 on a user error (one ``error:`` line)."""
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
