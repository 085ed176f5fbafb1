// Host-side argument checks and option parsing of the ops (the CPU ones; sample_tokens on CUDA too).
// The ops take float32 contiguous tensors; kernels/cpp.py converts before calling.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>

#include "policy_loss.h"

namespace medix_fast {

inline void check_float(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), " but logprobs on ", like.device());
}

inline void check_same_shape(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& like) {
  if (!t.has_value()) return;
  check_float(*t, name, like);
  TORCH_CHECK(t->sizes() == like.sizes(), name, " must have the shape of logprobs ", like.sizes(), ", got ",
              t->sizes());
}

// The outputs of one policy-loss call and the arguments (pointers into its tensors) of its kernel.
struct PolicyLossCall {
  PolicyLossArgs args;
  at::Tensor loss, grad_logp, grad_entropy, metrics;
};

// Validates the policy-loss op's arguments, resolves its options and allocates its outputs.
inline PolicyLossCall prepare_policy_loss(const at::Tensor& logp, const std::optional<at::Tensor>& old,
                                          const at::Tensor& adv, const at::Tensor& mask,
                                          const std::optional<at::Tensor>& ref,
                                          const std::optional<at::Tensor>& entropy,
                                          const std::optional<at::Tensor>& sampling,
                                          const std::optional<at::Tensor>& num_items, int64_t loss_type,
                                          int64_t level, double epsilon_low, double epsilon_high,
                                          std::optional<double> clip_ratio_c, double beta, double entropy_coef,
                                          int64_t max_completion_length, std::optional<double> tis_cap,
                                          std::optional<double> kl_clamp, std::optional<double> log_ratio_clamp,
                                          std::optional<double> delta, bool use_bias_correction_kl,
                                          double sapo_temperature_pos, double sapo_temperature_neg) {
  TORCH_CHECK(logp.dim() == 2, "logprobs must be (B, T), got ", logp.sizes());
  check_float(logp, "logprobs", logp);
  check_same_shape(old, "old_logprobs", logp);
  check_same_shape(mask, "mask", logp);
  check_same_shape(ref, "ref_logprobs", logp);
  check_same_shape(entropy, "entropy", logp);
  check_same_shape(sampling, "sampling_logprobs", logp);
  check_float(adv, "advantages", logp);
  TORCH_CHECK((adv.dim() == 1 && adv.size(0) == logp.size(0)) || adv.sizes() == logp.sizes(),
              "advantages must be (", logp.size(0), ",) or ", logp.sizes(), ", got ", adv.sizes());
  if (num_items.has_value()) {
    check_float(*num_items, "num_items_in_batch", logp);
    TORCH_CHECK(num_items->numel() == 1, "num_items_in_batch must hold one number, got ", num_items->sizes());
  }
  TORCH_CHECK(loss_type >= 0 && loss_type < kNumLossTypes, "loss_type id must be 0..",
              static_cast<int64_t>(kNumLossTypes) - 1, " (kernels/loss_specs.py cpp_id), got ", loss_type);
  TORCH_CHECK(level >= kToken && level <= kSequenceToken,
              "level id must be 0..2 (token, sequence, sequence_token), got ", level);
  TORCH_CHECK(epsilon_low >= 0 && epsilon_low < 1 && epsilon_high >= 0,
              "need 0 <= epsilon_low < 1 and epsilon_high >= 0, got ", epsilon_low, ", ", epsilon_high);
  TORCH_CHECK(normaliser_of(loss_type) != Normaliser::kMaxLength || max_completion_length > 0,
              "loss_type id ", loss_type, " (normaliser max_length) needs max_completion_length > 0");
  TORCH_CHECK(!clip_ratio_c.has_value() || *clip_ratio_c > 1, "clip_ratio_c must be > 1");
  TORCH_CHECK(!tis_cap.has_value() || (*tis_cap > 0 && sampling.has_value()),
              "tis_cap must be > 0 and needs sampling_logprobs");  // no old: on-policy, old = logp
  TORCH_CHECK(beta <= 0 || ref.has_value(), "beta > 0 needs ref_logprobs");
  TORCH_CHECK(!kl_clamp.has_value() || *kl_clamp > 0, "kl_clamp must be > 0");
  TORCH_CHECK(!log_ratio_clamp.has_value() || *log_ratio_clamp > 0, "log_ratio_clamp must be > 0");
  TORCH_CHECK(!delta.has_value() || *delta > 0, "delta must be > 0");
  TORCH_CHECK(sapo_temperature_pos > 0 && sapo_temperature_neg > 0, "sapo temperatures must be > 0");
  TORCH_CHECK(entropy_coef == 0 || entropy.has_value(), "entropy_coef != 0 needs entropy");

  PolicyLossCall c;
  LossParams& p = c.args.p;
  p.term = term_of(loss_type);
  p.normaliser = normaliser_of(loss_type);
  p.level = level;
  p.log_lo = static_cast<float>(std::log1p(-epsilon_low));
  p.log_hi = static_cast<float>(std::log1p(epsilon_high));
  p.ratio_lo = static_cast<float>(1.0 - epsilon_low);
  p.ratio_hi = static_cast<float>(1.0 + epsilon_high);
  p.has_dual = clip_ratio_c.has_value();
  p.clip_c = p.has_dual ? static_cast<float>(*clip_ratio_c) : 0.f;
  p.has_tis = tis_cap.has_value();
  p.tis_cap = p.has_tis ? static_cast<float>(*tis_cap) : 0.f;
  p.has_ref = ref.has_value();
  p.beta = static_cast<float>(beta);
  p.entropy_coef = static_cast<float>(entropy_coef);
  p.has_kl_clamp = kl_clamp.has_value();
  p.kl_clamp = p.has_kl_clamp ? static_cast<float>(*kl_clamp) : 0.f;
  p.has_lr_clamp = log_ratio_clamp.has_value();
  p.lr_clamp = p.has_lr_clamp ? static_cast<float>(*log_ratio_clamp) : 0.f;
  p.has_delta = delta.has_value();
  p.delta = p.has_delta ? static_cast<float>(*delta) : 0.f;
  p.bias_kl = use_bias_correction_kl;
  p.cispo_cap = static_cast<float>(epsilon_high);
  p.sapo_pos = static_cast<float>(sapo_temperature_pos);
  p.sapo_neg = static_cast<float>(sapo_temperature_neg);

  const int64_t B = logp.size(0), T = logp.size(1);
  const bool entropy_grad = entropy.has_value() && entropy_coef != 0;
  c.loss = at::empty({}, logp.options());
  c.grad_logp = at::empty({B, T}, logp.options());
  c.grad_entropy = at::empty(entropy_grad ? at::IntArrayRef{B, T} : at::IntArrayRef{0}, logp.options());
  c.metrics = at::empty({kNumMetrics}, logp.options());

  auto ptr = [](const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; };
  PolicyLossArgs& a = c.args;
  a.B = B;
  a.T = T;
  a.max_completion_length = max_completion_length;
  a.logp = logp.data_ptr<float>();
  a.old = ptr(old);
  a.adv = adv.data_ptr<float>();
  a.mask = mask.data_ptr<float>();
  a.ref = ptr(ref);
  a.entropy = ptr(entropy);
  a.sampling = ptr(sampling);
  a.num_items = ptr(num_items);
  a.adv_per_token = adv.dim() == 2;
  a.grad_logp = c.grad_logp.data_ptr<float>();
  a.grad_entropy = entropy_grad ? c.grad_entropy.data_ptr<float>() : nullptr;
  a.loss = c.loss.data_ptr<float>();
  a.metrics = c.metrics.data_ptr<float>();
  return c;
}

inline void check_group_advantages(const at::Tensor& rewards, int64_t group_size, int64_t estimator) {
  TORCH_CHECK(rewards.dim() == 1, "rewards must be a 1-D tensor (N,), got ", rewards.sizes());
  check_float(rewards, "rewards", rewards);
  TORCH_CHECK(group_size >= 2, "group_size must be >= 2, got ", group_size);
  TORCH_CHECK(rewards.numel() > 0 && rewards.numel() % group_size == 0, "group_size=", group_size,
              " must divide the number of rewards N=", rewards.numel(), " (N > 0)");
  TORCH_CHECK(estimator >= 0 && estimator <= 2, "estimator id must be 0..2 (grpo, dr_grpo, rloo), got ", estimator);
}

inline void check_sample_tokens(const at::Tensor& logits, const at::Tensor& uniform, double temperature,
                                int64_t top_k, double top_p) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, "logits must be (B, V) with V > 0, got ", logits.sizes());
  check_float(logits, "logits", logits);
  check_float(uniform, "uniform", logits);
  TORCH_CHECK(uniform.dim() == 1 && uniform.size(0) == logits.size(0), "uniform must be (", logits.size(0),
              ",), got ", uniform.sizes());
  TORCH_CHECK(temperature >= 0, "temperature must be >= 0, got ", temperature);
  TORCH_CHECK(top_k >= 0, "top_k must be >= 0, got ", top_k);
  TORCH_CHECK(top_p > 0 && top_p <= 1, "top_p must be in (0, 1], got ", top_p);
}

}  // namespace medix_fast
