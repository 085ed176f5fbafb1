"""TRL's ``GRPOTrainer`` with medix_fast's fused policy loss: a TRL user changes one import.

    from medix_fast.integrations.trl import GRPOTrainer     # was: from trl import GRPOTrainer
    trainer = GRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)
    trainer.train()

Everything but the loss stays TRL's (generation, rewards, advantages, optimiser, logging). The loss
runs the backbone, takes its last hidden states at the positions that predict the completion
tokens (``[:, -K-1:-1]``) and hands them with the LM head to
:func:`medix_fast.kernels.fused_linear_policy_loss` (loss and gradients in one pass, never the
tokens x vocabulary logits) instead of TRL's fused log-prob head followed by its loss.

What it reproduces of TRL's ``_compute_loss`` (tests/test_integrations_trl.py checks loss,
gradients and metrics against TRL's own): every ``loss_type`` of TRL 1.16 (grpo, bnpo, dr_grpo,
dapo, cispo, sapo, luspo, vespo) with TRL's normalisers (dapo, cispo, vespo: ``num_items_in_batch /
num_processes``, rescaled to one accumulation window; the others divided by the gradient-accumulation
steps in training), ``importance_sampling_level`` token | sequence, ``epsilon`` / ``epsilon_high``,
``delta``, ``sapo_temperature_*``, ``vespo_*``, ``beta`` with the k3 KL to ``ref_per_token_logps``
(unclamped, as TRL: the kernels' ``kl_clamp=None``) and ``use_bias_correction_kl``, the entropy bonus
``entropy_coef`` (a token mean over the tokens the loss acts on) and its adaptive controller
``use_adaptive_entropy``, ``top_entropy_quantile`` (one extra forward pass of the head for the
entropies), ``off_policy_mask_threshold``, the MoE router load-balancing loss, ``temperature``,
``tool_mask``, vLLM's ``importance_sampling_ratio`` (any mode; folded into the advantages, which is
exact because every loss but vespo is positively homogeneous in the advantage), ``cast_lm_head_to_fp32``,
and the metrics ``kl``, ``entropy``, ``clip_ratio/{low,high,region}_mean``, ``cispo_clip_ratio``,
``entropy_coef``, ``aux_loss`` (token means reduced across processes; at sequence level TRL's clip
ratios are fractions of sequences, which the kernel's batch means are not, so they are logged
token-weighted as ``clip_ratio/{low,high,region}_token_mean``).
Extra: ``clip_ratio_c`` (the dual clip of EasyR1/veRL) as a constructor keyword.
The backbone runs under the accelerator's autocast (bf16/fp16 as configured, as TRL's does); the
head then gets those hidden states with autocast off, so its logits are fp32-accumulated GEMMs of
the hidden states' dtype (fp32 ones in tf32 only where ``TrainingArguments.tf32`` / torch allow it, as
TRL's own head). The loss goes through TRL's forward redirection, so DDP/FSDP/DeepSpeed
wrapper hooks fire; under ZeRO-3 the head is gathered for it, and an FSDP2-sharded head is
all-gathered (``full_tensor``). Tied heads and PEFT models (weight adapters such as LoRA) work;
a logit scale (``logit_scale``, ``output_multiplier``, ``lm_head_multiplier``, ``logits_scaling``)
becomes part of the temperature; Gemma-2/3's ``final_logit_softcapping`` c goes to the kernels'
``softcap`` (TRL's c tanh(s z / c) / T is the kernels' c' tanh(z / c') s / T with c' = c / s, the
scale s applied before the cap as TRL's head does); VLM inputs (pixel values, grid sizes, ...) go to the backbone.

Refused by name, never computed differently (:func:`unsupported_options`, :func:`unsupported_model`):
``top_entropy_quantile < 1``
on several processes (TRL takes the quantile over every process's tokens, the kernel over its own),
``loss_type="vespo"`` with vLLM's importance-sampling correction (TRL puts that ratio inside VESPO's
sequence weight, not on the loss), ``use_adaptive_entropy`` with ``top_entropy_quantile < 1``, and
prompt-learning PEFT methods (the backbone is called directly, as in TRL's Liger path).
Known differences: ``clip_ratio/low_min`` / ``clip_ratio/high_max`` (per-sequence extremes),
``vespo/phi_seq_mean`` and, with ``top_entropy_quantile < 1``, the entropy bonus's ``policy_loss``
are not logged: the kernel returns batch means only.

Supported TRL versions: :data:`SUPPORTED_TRL`, checked at import.
"""
from __future__ import annotations

import inspect

import torch
import transformers
import trl
from accelerate.utils import is_peft_model
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from trl.models.utils import _ForwardRedirection
from trl.trainer.utils import maybe_gather_lm_head_ctx

from medix_fast.distributed import full_tensor
from medix_fast.kernels import LossOptions, fused_linear_policy_loss
from medix_fast.kernels.loss_specs import LOSS_SPECS, LOSS_TYPES

SUPPORTED_TRL = SpecifierSet(">=1.15,<1.17")
LEVELS = ("token", "sequence")
TRL_OPTIONS = ("delta", "use_bias_correction_kl", "top_entropy_quantile", "off_policy_mask_threshold",
               "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg",
               "vespo_lambda_neg")
# multimodal fields TRL's batch may carry, passed to the backbone as they are (one chunk: no slicing)
VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
               "token_type_ids", "mm_token_type_ids", "image_position_ids")

if Version(trl.__version__) not in SUPPORTED_TRL:
    raise ImportError(f"medix_fast.integrations.trl supports trl{SUPPORTED_TRL}, found trl {trl.__version__}")


def unsupported_options(args, num_processes: int = 1) -> list[str]:
    """The ``GRPOConfig`` settings this adapter does not implement, each named with why."""
    problems = []
    if args.loss_type not in LOSS_TYPES:
        problems.append(f"loss_type={args.loss_type!r} (supported: {', '.join(LOSS_TYPES)})")
    if args.importance_sampling_level not in LEVELS:
        problems.append(f"importance_sampling_level={args.importance_sampling_level!r} (supported: token, sequence)")
    quantile = getattr(args, "top_entropy_quantile", 1.0) < 1.0
    if quantile and num_processes > 1:
        problems.append(f"top_entropy_quantile={args.top_entropy_quantile} on {num_processes} processes (TRL's "
                        "quantile spans every process's tokens, the kernel's its own)")
    if quantile and getattr(args, "use_adaptive_entropy", False):
        problems.append("use_adaptive_entropy with top_entropy_quantile < 1 (the controller's entropy of the "
                        "masked tokens is not returned by the kernel)")
    if args.loss_type == "vespo" and getattr(args, "use_vllm", False) and getattr(
            args, "vllm_importance_sampling_correction", False):
        problems.append("loss_type='vespo' with vllm_importance_sampling_correction (TRL puts the ratio inside "
                        "VESPO's sequence weight)")
    return problems


def unsupported_model(model) -> list[str]:
    """What about ``model`` (possibly PEFT-wrapped) this adapter cannot compute, each named."""
    problems = []
    text_config = model.config.get_text_config()
    if not logit_scale(text_config) > 0:
        problems.append(f"a logit scale of {logit_scale(text_config)} (must be > 0)")
    if is_peft_model(model) and any(getattr(c, "is_prompt_learning", False) for c in model.peft_config.values()):
        problems.append("a prompt-learning PEFT method (prefix/prompt tuning: the backbone is called directly)")
    return problems


def logit_scale(text_config) -> float:
    """The factor the model multiplies its logits by (1.0 for most models)."""
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        if getattr(text_config, name, None) is not None:
            return float(getattr(text_config, name))
    scaling = getattr(text_config, "logits_scaling", None)  # Granite, MiniCPM3 divide; HyperCLOVA X multiplies
    if scaling is not None:
        return float(scaling) if text_config.model_type == "hyperclovax" else 1.0 / float(scaling)
    return 1.0


def _refuse(problems: list[str]) -> None:
    if problems:
        raise ValueError("medix_fast.integrations.trl.GRPOTrainer does not implement: " + "; ".join(problems)
                         + ". Use trl.GRPOTrainer for these.")


def _router_loss(model, router_logits, attention_mask) -> torch.Tensor:
    """The MoE load-balancing loss of the backbone's router logits, as TRL's fused head computes it
    (Mixtral's function, which every MoE family shares)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    text_config = model.config.get_text_config()
    experts = getattr(model, "num_experts", None) if text_config.model_type == "gpt_oss" else None
    experts = experts or getattr(text_config, "num_experts", None) or getattr(model, "num_experts")
    return load_balancing_loss_func(router_logits, experts, text_config.num_experts_per_tok, attention_mask)


def _backbone(model):
    """The module that returns ``last_hidden_state`` (vision tower included for VLMs)."""
    if model.config.get_text_config() is not model.config and Version(transformers.__version__) < Version("5"):
        return model.model  # VLMs before transformers 5 do not expose it as ``base_model``
    return model.base_model


class GRPOTrainer(trl.GRPOTrainer):
    """``trl.GRPOTrainer`` whose loss is medix_fast's ``fused_linear_policy_loss``.

    Same constructor as ``trl.GRPOTrainer`` plus ``clip_ratio_c`` (dual clip for negative
    advantages, > 1; None: off). Raises ``ValueError`` naming every unsupported setting.
    """

    def __init__(self, *args, clip_ratio_c: float | None = None, **kwargs):
        config = inspect.signature(trl.GRPOTrainer.__init__).bind(None, *args, **kwargs).arguments.get("args")
        if config is not None:  # before TRL builds reference models or starts vLLM
            _refuse(unsupported_options(config))
        super().__init__(*args, **kwargs)
        _refuse(unsupported_options(self.args, self.accelerator.num_processes) + unsupported_model(self.model))
        self.clip_ratio_c = clip_ratio_c
        LossOptions.from_kwargs(self._loss_options(None, "eval"))  # bad values fail here, not mid-training
        self._medix_redirect = _ForwardRedirection()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("The GRPOTrainer does not support returning outputs")
        mode = "train" if self.model.training else "eval"
        unwrapped = self.accelerator.unwrap_model(model)
        loss, metrics, mask, aux_loss = self._medix_redirect(model, unwrapped, self._fused_loss, unwrapped, inputs,
                                                             mode)
        self._log_loss_metrics(metrics, mask, mode)
        if getattr(self, "_entropy_bonus_enabled", False):
            self._entropy_controller(metrics["entropy"], mask, mode)
        if "policy_loss" in metrics:
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(metrics["policy_loss"]).nanmean().item())
        if aux_loss is not None:
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        return loss

    def _entropy_coef_now(self) -> float:
        """TRL's coefficient of this step: the adaptive one only while the entropy is below target."""
        if self.use_adaptive_entropy and self._last_world_entropy > self.args.entropy_target:
            return 0.0
        return self.entropy_coef

    def _entropy_controller(self, entropy: torch.Tensor, mask: torch.Tensor, mode: str) -> None:
        """TRL's adaptive entropy coefficient: the window's token-mean entropy over every process moves
        it by ``entropy_coef_delta`` within [min, max] at each optimizer step; ``entropy_coef`` logged."""
        if self.use_adaptive_entropy and mode == "train":
            count = mask.sum().float()
            stats = torch.stack([entropy * count, count]).detach()
            window = self._entropy_window_stats
            self._entropy_window_stats = stats if window is None else window + stats
            if self.accelerator.sync_gradients:
                totals = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                world = (totals[0] / totals[1].clamp(min=1.0)).item()
                step = self.args.entropy_coef_delta if world <= self.args.entropy_target else -self.args.entropy_coef_delta
                self.entropy_coef = min(max(self.entropy_coef + step, self.args.entropy_coef_min),
                                        self.args.entropy_coef_max)
                self._last_world_entropy = world
                self._entropy_window_stats = None
        if mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)

    def _num_items_normalised(self) -> bool:
        """TRL divides this loss type by ``num_items_in_batch``, not by the accumulation steps."""
        return LOSS_SPECS[self.loss_type].normaliser == "num_items"

    def _loss_options(self, inputs, mode: str) -> dict:
        """``GRPOConfig`` -> ``fused_linear_policy_loss`` options, with TRL's normaliser for ``loss_type``."""
        opts = dict(loss_type=self.loss_type, importance_sampling_level=self.importance_sampling_level,
                    epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high, beta=self.beta,
                    clip_ratio_c=self.clip_ratio_c)
        defaults = LossOptions()
        for name in TRL_OPTIONS:  # GRPOConfig fields of the same name and meaning (absent in older TRL: default)
            opts[name] = getattr(self.args, name, getattr(defaults, name))
        if getattr(self, "_entropy_bonus_enabled", False):  # TRL: - coef * (token mean of the entropy) / accumulation steps
            coef = self._entropy_coef_now()
            if self._num_items_normalised() and mode == "train":  # the loss is not divided below
                coef = coef / self.current_gradient_accumulation_steps
            opts.update(entropy_coef=coef, entropy_aggregation="token_mean")
        if LOSS_SPECS[self.loss_type].normaliser == "max_length":
            opts["max_completion_length"] = self.max_completion_length
        if self._num_items_normalised() and inputs is not None:
            # TRL: num_items_in_batch spans the generation batch; rescale it to one accumulation window
            items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                items = items * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            opts["num_items_in_batch"] = items
        return opts

    def _fused_loss(self, unwrapped, inputs, mode: str):
        """Runs inside the wrapper's forward: backbone, then the fused head + loss.
        -> (loss, metrics, mask, the MoE router loss or None)."""
        model = unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]  # (B, K) each
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)  # (B, P + K)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)  # (B, P + K)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]  # (B, K)
        vision = {k: inputs[k] for k in VISION_KEYS if inputs.get(k) is not None}
        if self.aux_loss_enabled:
            vision["output_router_logits"] = True
        with self.accelerator.autocast():
            out = _backbone(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **vision)
        k = completion_ids.size(1)
        head = model.get_output_embeddings()
        weight, bias = head.weight, head.bias
        hidden = out.last_hidden_state[:, -k - 1:-1].to(weight.device)  # (B, K, H): position t predicts t + 1
        if self.args.cast_lm_head_to_fp32:
            hidden = hidden.float()
        weight, bias = full_tensor(weight), None if bias is None else full_tensor(bias)  # FSDP2: its forward never runs
        advantages = inputs["advantages"]  # (B,) or (B, K)
        if self.use_vllm and self.vllm_importance_sampling_correction:  # TRL: per_token_loss * ratio, ratio >= 0
            advantages = advantages.view(advantages.shape[0], -1) * inputs["importance_sampling_ratio"]  # (B, 1|K)
            advantages = advantages.squeeze(1) if advantages.shape[1] == 1 else advantages
        chunk = None
        if self.importance_sampling_level != "token" and is_deepspeed_zero3_enabled():
            chunk = k  # whole sequences in one chunk: the one-pass path, which needs no weight in backward
        opts = self._loss_options(inputs, mode)
        text_config = model.config.get_text_config()
        scale, softcap = logit_scale(text_config), getattr(text_config, "final_logit_softcapping", None)
        with torch.autocast(hidden.device.type, enabled=False), maybe_gather_lm_head_ctx(weight, bias):
            loss, metrics = fused_linear_policy_loss(
                hidden, weight, completion_ids, mask, advantages, inputs.get("old_per_token_logps"),
                inputs.get("ref_per_token_logps") if self.beta != 0 else None, bias=bias,
                sampling_logprobs=inputs.get("sampling_per_token_logps") if self.off_policy_mask_threshold is not None
                else None,
                temperature=self.temperature / scale, softcap=None if softcap is None else softcap / scale,
                chunk_size=chunk,
                fp32_precision="tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee",  # TrainingArguments.tf32
                **opts)
        if opts.get("entropy_aggregation") == "token_mean" and self.top_entropy_quantile >= 1:
            # TRL's logged policy_loss: the loss before the bonus (its token mean = the entropy metric)
            metrics["policy_loss"] = (loss + opts["entropy_coef"] * metrics["entropy"]).detach()
        if not self._num_items_normalised() and mode == "train":
            loss = loss / self.current_gradient_accumulation_steps
        aux_loss = None
        if self.aux_loss_enabled:  # TRL: router_aux_loss_coef * load-balancing loss / accumulation steps
            aux_loss = _router_loss(model, out.router_logits, attention_mask)
            loss = loss + self.router_aux_loss_coef * aux_loss / (
                self.current_gradient_accumulation_steps if mode == "train" else 1.0)
        return loss, metrics, mask, aux_loss

    def _log_loss_metrics(self, metrics: dict, mask: torch.Tensor, mode: str) -> None:
        """TRL's loss metrics: token means over every process's tokens (one reduce, one host sync)."""
        # TRL's clip ratios are token means at token level and sequence means at sequence level,
        # where the kernel's batch means are token-weighted: those get their own names
        clip = "clip_ratio/{}_mean" if self.importance_sampling_level == "token" else "clip_ratio/{}_token_mean"
        values = {"entropy": metrics["entropy"]}
        spec = LOSS_SPECS[self.loss_type]
        if spec.term == "cispo":
            values["cispo_clip_ratio" + ("" if self.importance_sampling_level == "token" else "_token_mean")] = (
                metrics["clip_high"])
        elif spec.clips:
            values.update({clip.format("low"): metrics["clip_low"], clip.format("high"): metrics["clip_high"],
                           clip.format("region"): metrics["clip_low"] + metrics["clip_high"]})
        if self.beta != 0:
            values["kl"] = metrics["kl"]
        count = mask.sum().float()
        totals = self.accelerator.reduce(torch.stack([*(v * count for v in values.values()), count]), reduction="sum")
        means = (totals[:-1] / totals[-1].clamp(min=1.0)).tolist()
        for name, value in zip(values, means):
            self._metrics[mode][name].append(value)
