// CUDA implementations of the medix_fast ops: argument checks (../common.h), output allocation
// and the launch of the kernels in this folder on the current stream. Built only with a CUDA torch.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common.h"
#include "launch.h"

namespace medix_fast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> policy_loss_cuda(
    const at::Tensor& logp, const std::optional<at::Tensor>& old, const at::Tensor& adv, const at::Tensor& mask,
    const std::optional<at::Tensor>& ref, const std::optional<at::Tensor>& entropy,
    const std::optional<at::Tensor>& sampling, const std::optional<at::Tensor>& num_items, int64_t loss_type,
    int64_t level, double epsilon_low, double epsilon_high, std::optional<double> clip_ratio_c, double beta,
    double entropy_coef, int64_t max_completion_length, std::optional<double> tis_cap) {
  const c10::cuda::CUDAGuard guard(logp.device());
  PolicyLossCall call = prepare_policy_loss(logp, old, adv, mask, ref, entropy, sampling, num_items, loss_type, level,
                                            epsilon_low, epsilon_high, clip_ratio_c, beta, entropy_coef,
                                            max_completion_length, tis_cap);
  at::Tensor workspace = at::empty({policy_loss_workspace(call.args.B)}, logp.options());
  call.args.workspace = workspace.data_ptr<float>();
  C10_CUDA_CHECK(launch_policy_loss(call.args, c10::cuda::getCurrentCUDAStream()));
  return {call.loss, call.grad_logp, call.grad_entropy, call.metrics};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_advantages_cuda(const at::Tensor& rewards, int64_t group_size,
                                                                     int64_t estimator, double eps) {
  check_group_advantages(rewards, group_size, estimator);
  const c10::cuda::CUDAGuard guard(rewards.device());
  const int64_t groups = rewards.numel() / group_size;
  at::Tensor adv = at::empty({rewards.numel()}, rewards.options());
  at::Tensor mean = at::empty({groups}, rewards.options());
  at::Tensor std = at::empty({groups}, rewards.options());
  C10_CUDA_CHECK(launch_group_advantages(rewards.data_ptr<float>(), groups, group_size, estimator,
                                         static_cast<float>(eps), adv.data_ptr<float>(), mean.data_ptr<float>(),
                                         std.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  return {adv, mean, std};
}

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
  m.impl("policy_loss", &policy_loss_cuda);
  m.impl("group_advantages", &group_advantages_cuda);
  m.impl("sample_tokens", &sample_tokens_cuda);
}

}  // namespace medix_fast
