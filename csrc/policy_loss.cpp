// CPU implementation of medix_fast::policy_loss: forward and backward of the clipped-ratio policy
// loss in one pass over the tokens, parallel over rows (at::parallel_for, OpenMP).
//
// Pass 1 sums each row's mask (and, for sequence-level importance weights, its masked log-ratio);
// pass 2 computes every valid token's loss and its gradient, already multiplied by the
// aggregation scale, so backward is grad_output * saved gradient. Row sums are accumulated in
// double and reduced in row order: the result does not depend on the thread count.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "common.h"

namespace medix_fast {
namespace {

// Pass 2 for rows [b0, b1): writes their gradient rows and row_sums[b][kNumRowSums].
void loss_rows(const PolicyLossArgs& a, int64_t b0, int64_t b1, const double* row_mask, const double* row_logw,
               double total_mask, double num_items, double* row_sums) {
  const LossParams& p = a.p;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t o = b * a.T;
    const double n = std::fmax(row_mask[b], 1.0);
    const float scale =
        static_cast<float>(row_scale(p.normaliser, row_mask[b], total_mask, a.B, a.max_completion_length, num_items));
    const float seq_logw = static_cast<float>(row_logw[b] / n);
    double acc[kNumRowSums + 1] = {0};  // the row sums, then sum_t mask * d loss_t / d log_w
    for (int64_t t = 0; t < a.T; ++t) token_step(a, b, o + t, seq_logw, scale, acc);
    if (p.level == kSequence) {  // log_w = masked mean of the row's log-ratios: d log_w / d logp_t = mask_t / n
      const float per_mask = static_cast<float>(scale * acc[kNumRowSums] / n);
      for (int64_t t = 0; t < a.T; ++t) a.grad_logp[o + t] += a.mask[o + t] * per_mask;
    }
    acc[kMask] = row_mask[b];
    for (int k = 0; k < kNumRowSums; ++k) row_sums[b * kNumRowSums + k] = acc[k];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> policy_loss_cpu(
    const at::Tensor& logp, const std::optional<at::Tensor>& old, const at::Tensor& adv, const at::Tensor& mask,
    const std::optional<at::Tensor>& ref, const std::optional<at::Tensor>& entropy,
    const std::optional<at::Tensor>& sampling, const std::optional<at::Tensor>& num_items, int64_t loss_type,
    int64_t level, double epsilon_low, double epsilon_high, std::optional<double> clip_ratio_c, double beta,
    double entropy_coef, int64_t max_completion_length, std::optional<double> tis_cap,
    std::optional<double> kl_clamp, std::optional<double> log_ratio_clamp, std::optional<double> delta,
    bool use_bias_correction_kl, double sapo_temperature_pos, double sapo_temperature_neg) {
  const PolicyLossCall call = prepare_policy_loss(logp, old, adv, mask, ref, entropy, sampling, num_items, loss_type,
                                                  level, epsilon_low, epsilon_high, clip_ratio_c, beta, entropy_coef,
                                                  max_completion_length, tis_cap, kl_clamp, log_ratio_clamp,
                                                  delta, use_bias_correction_kl, sapo_temperature_pos,
                                                  sapo_temperature_neg);
  const PolicyLossArgs& a = call.args;
  const int64_t B = a.B, T = a.T;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(T, 1));  // rows per task

  std::vector<double> row_mask(B), row_logw(B);
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double n = 0, s = 0;
      for (int64_t t = b * T; t < (b + 1) * T; ++t) {
        const float m = a.mask[t];
        n += m;
        if (a.p.level != kToken && a.old && m != 0.f) s += m * (a.logp[t] - a.old[t]);
      }
      row_mask[b] = n;
      row_logw[b] = s;
    }
  });
  double total_mask = 0;
  for (int64_t b = 0; b < B; ++b) total_mask += row_mask[b];
  const double num = a.num_items ? static_cast<double>(*a.num_items) : -1.0;

  std::vector<double> row_sums(B * kNumRowSums);
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    loss_rows(a, b0, b1, row_mask.data(), row_logw.data(), total_mask, num, row_sums.data());
  });

  double loss = 0, sums[kNumRowSums] = {0};
  for (int64_t b = 0; b < B; ++b) {
    const double* r = &row_sums[b * kNumRowSums];
    loss += row_scale(a.p.normaliser, row_mask[b], total_mask, B, a.max_completion_length, num) * r[kLoss];
    for (int k = 0; k < kNumRowSums; ++k) sums[k] += r[k];
  }
  *a.loss = static_cast<float>(loss);
  const double denom = std::fmax(total_mask, 1.0);
  for (int k = 0; k < kNumMetrics; ++k) a.metrics[k] = static_cast<float>(sums[kRatio + k] / denom);
  return {call.loss, call.grad_logp, call.grad_entropy, call.metrics};
}

}  // namespace

TORCH_LIBRARY_IMPL(medix_fast, CPU, m) { m.impl("policy_loss", &policy_loss_cpu); }

}  // namespace medix_fast
