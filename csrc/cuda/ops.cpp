// CUDA implementation of medix_fast::sample_tokens: argument checks (../common.h), output
// allocation and the launch of the kernel (sampling.cu) on the current stream. Built only with a
// CUDA torch. policy_loss and group_advantages have no CUDA op: on CUDA tensors the Triton kernels
// (and the fused LM-head path) run them (see the README's back-ends paragraph).
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common.h"
#include "launch.h"

namespace medix_fast {
namespace {

std::tuple<at::Tensor, at::Tensor> sample_tokens_cuda(const at::Tensor& logits, const at::Tensor& uniform,
                                                      double temperature, int64_t top_k, double top_p) {
  check_sample_tokens(logits, uniform, temperature, top_k, top_p);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t B = logits.size(0), V = logits.size(1);
  at::Tensor tokens = at::empty({B}, logits.options().dtype(at::kLong));
  at::Tensor logprobs = at::empty({B}, logits.options());
  C10_CUDA_CHECK(launch_sample_tokens(logits.data_ptr<float>(), uniform.data_ptr<float>(), B, V,
                                      static_cast<float>(temperature), top_k, static_cast<float>(top_p),
                                      tokens.data_ptr<int64_t>(), logprobs.data_ptr<float>(),
                                      c10::cuda::getCurrentCUDAStream()));
  return {tokens, logprobs};
}

}  // namespace

TORCH_LIBRARY_IMPL(medix_fast, CUDA, m) {
  m.impl("sample_tokens", &sample_tokens_cuda);
}

}  // namespace medix_fast
