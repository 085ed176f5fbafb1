// CUDA kernel of medix_fast::group_advantages: one thread per group (../advantage.h).
#include "../advantage.h"
#include "launch.h"

namespace medix_fast {
namespace {

__global__ void group_advantages_kernel(const float* rewards, int64_t groups, int64_t G, int64_t estimator, float eps,
                                        float* adv, float* mean, float* std) {
  const int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (g < groups) group_advantage(rewards + g * G, G, estimator, eps, adv + g * G, mean + g, std + g);
}

}  // namespace

cudaError_t launch_group_advantages(const float* rewards, int64_t groups, int64_t group_size, int64_t estimator,
                                    float eps, float* adv, float* mean, float* std, cudaStream_t stream) {
  constexpr int kThreads = 128;
  const int64_t blocks = (groups + kThreads - 1) / kThreads;
  group_advantages_kernel<<<blocks, kThreads, 0, stream>>>(rewards, groups, group_size, estimator, eps, adv, mean,
                                                           std);
  return cudaGetLastError();
}

}  // namespace medix_fast
