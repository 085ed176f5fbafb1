// Launcher of the CUDA kernel, callable from host C++ without torch (csrc/cuda/ops.cpp wraps it as
// the CUDA implementation of medix_fast::sample_tokens). Pointers are device pointers to contiguous
// float32 (int64 for tokens); it returns the launch's cudaError_t.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace medix_fast {

cudaError_t launch_sample_tokens(const float* logits, const float* uniform, int64_t B, int64_t V, float temperature,
                                 int64_t top_k, float top_p, int64_t* tokens, float* logprobs, cudaStream_t stream);

}  // namespace medix_fast
