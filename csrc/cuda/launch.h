// Launchers of the CUDA kernels, callable from host C++ without torch (csrc/cuda/ops.cpp wraps them
// as the CUDA implementations of the medix_fast ops). All pointers are device pointers to
// contiguous float32 (int64 for tokens); each returns the launch's cudaError_t.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../policy_loss.h"

namespace medix_fast {

inline int64_t policy_loss_workspace(int64_t B) { return B * (2 + kNumRowSums) + 1; }

cudaError_t launch_policy_loss(const PolicyLossArgs& a, cudaStream_t stream);

cudaError_t launch_group_advantages(const float* rewards, int64_t groups, int64_t group_size, int64_t estimator,
                                    float eps, float* adv, float* mean, float* std, cudaStream_t stream);

cudaError_t launch_sample_tokens(const float* logits, const float* uniform, int64_t B, int64_t V, float temperature,
                                 int64_t top_k, float top_p, int64_t* tokens, float* logprobs, cudaStream_t stream);

}  // namespace medix_fast
