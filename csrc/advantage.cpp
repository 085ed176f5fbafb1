// CPU implementation of medix_fast::group_advantages, parallel over groups (advantage.h).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "advantage.h"
#include "common.h"

namespace medix_fast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_advantages_cpu(const at::Tensor& rewards, int64_t group_size,
                                                                    int64_t estimator, double eps) {
  check_group_advantages(rewards, group_size, estimator);
  const int64_t G = group_size, groups = rewards.numel() / G;
  at::Tensor adv = at::empty({rewards.numel()}, rewards.options());
  at::Tensor mean = at::empty({groups}, rewards.options());
  at::Tensor std = at::empty({groups}, rewards.options());
  const float* r = rewards.data_ptr<float>();
  float *a = adv.data_ptr<float>(), *mu = mean.data_ptr<float>(), *sd = std.data_ptr<float>();
  at::parallel_for(0, groups, std::max<int64_t>(1, 4096 / G), [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      group_advantage(r + g * G, G, estimator, static_cast<float>(eps), a + g * G, mu + g, sd + g);
  });
  return {adv, mean, std};
}

}  // namespace

TORCH_LIBRARY_IMPL(medix_fast, CPU, m) { m.impl("group_advantages", &group_advantages_cpu); }

}  // namespace medix_fast
