// One group's advantages, for the CPU op (advantage.cpp).
// The arithmetic of kernels/advantage.py: rewards shifted by the group's first one (a constant
// group centres to exactly 0), mean and unbiased std, sums in double.
#pragma once

#include <cmath>
#include <cstdint>

namespace medix_fast {

// estimator: 0 grpo (r - mean) / (std + eps), 1 dr_grpo r - mean, 2 rloo G / (G - 1) * (r - mean).
inline void group_advantage(const float* x, int64_t G, int64_t estimator, float eps, float* adv, float* mean,
                            float* std) {
  double shifted_sum = 0;
  for (int64_t i = 0; i < G; ++i) shifted_sum += static_cast<double>(x[i] - x[0]);
  const float mean_shifted = static_cast<float>(shifted_sum / G);
  double sq = 0;
  for (int64_t i = 0; i < G; ++i) {
    const double c = (x[i] - x[0]) - mean_shifted;
    sq += c * c;
  }
  const float s = static_cast<float>(sqrt(sq / (G - 1)));
  *mean = x[0] + mean_shifted;
  *std = s;
  const float denom = s + eps;
  const float rloo = static_cast<float>(static_cast<double>(G) / (G - 1.0));
  for (int64_t i = 0; i < G; ++i) {
    const float c = (x[i] - x[0]) - mean_shifted;
    adv[i] = estimator == 0 ? c / denom : estimator == 1 ? c : c * rloo;
  }
}

}  // namespace medix_fast
