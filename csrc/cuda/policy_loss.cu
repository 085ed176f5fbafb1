// CUDA kernels of medix_fast::policy_loss: one block per row, the same per-token math as the CPU
// op (../policy_loss.h), forward and backward in one pass.
//   row_prepare  per row: mask sum and masked log-ratio sum (sequence levels)
//   total_mask   one block: the batch's mask sum
//   loss_rows    per row: token losses, gradients (already scaled), the row's sums
//   finalize     one block: loss and metrics, rows reduced in a fixed order (deterministic)
#include <cub/block/block_reduce.cuh>

#include "launch.h"

namespace medix_fast {
namespace {

constexpr int kThreads = 256;

template <typename T, int N>
struct Vec {
  T v[N];
};

struct VecSum {
  template <typename T, int N>
  __device__ Vec<T, N> operator()(const Vec<T, N>& a, const Vec<T, N>& b) const {
    Vec<T, N> r;
#pragma unroll
    for (int k = 0; k < N; ++k) r.v[k] = a.v[k] + b.v[k];
    return r;
  }
};

// Sum over the block, returned to every thread.
template <typename T, int N>
__device__ Vec<T, N> block_sum(const Vec<T, N>& x) {
  using Reduce = cub::BlockReduce<Vec<T, N>, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ Vec<T, N> result;
  const Vec<T, N> r = Reduce(tmp).Reduce(x, VecSum());
  if (threadIdx.x == 0) result = r;
  __syncthreads();
  return result;
}

__global__ void row_prepare(PolicyLossArgs a, float* row_mask, float* row_logw) {
  const int64_t o = blockIdx.x * a.T;
  Vec<float, 2> s = {{0.f, 0.f}};
  for (int64_t t = threadIdx.x; t < a.T; t += kThreads) {
    const float m = a.mask[o + t];
    s.v[0] += m;
    if (a.p.level != kToken && a.old && m != 0.f) s.v[1] += m * (a.logp[o + t] - a.old[o + t]);
  }
  s = block_sum(s);
  if (threadIdx.x == 0) row_mask[blockIdx.x] = s.v[0], row_logw[blockIdx.x] = s.v[1];
}

__global__ void total_mask(int64_t B, const float* row_mask, float* total) {
  Vec<float, 1> s = {{0.f}};
  for (int64_t b = threadIdx.x; b < B; b += kThreads) s.v[0] += row_mask[b];
  s = block_sum(s);
  if (threadIdx.x == 0) *total = s.v[0];
}

__global__ void loss_rows(PolicyLossArgs a, const float* row_mask, const float* row_logw, const float* total,
                          float* row_sums) {
  const LossParams& p = a.p;
  const int64_t b = blockIdx.x, o = b * a.T;
  const float n = fmaxf(row_mask[b], 1.f);
  const double num_items = a.num_items ? static_cast<double>(*a.num_items) : -1.0;
  const float scale =
      static_cast<float>(row_scale(p.loss_type, row_mask[b], *total, a.B, a.max_completion_length, num_items));
  const float seq_logw = row_logw[b] / n;
  Vec<float, kNumRowSums + 1> acc = {};  // the row sums, then sum_t mask * d loss_t / d log_w
  for (int64_t t = threadIdx.x; t < a.T; t += kThreads) token_step(a, b, o + t, seq_logw, scale, acc.v);
  acc = block_sum(acc);
  if (p.level == kSequence) {  // d log_w / d logp_t = mask_t / n; each thread revisits its own tokens
    const float per_mask = scale * acc.v[kNumRowSums] / n;
    for (int64_t t = threadIdx.x; t < a.T; t += kThreads) a.grad_logp[o + t] += a.mask[o + t] * per_mask;
  }
  if (threadIdx.x == 0) {
    acc.v[kMask] = row_mask[b];
    for (int k = 0; k < kNumRowSums; ++k) row_sums[b * kNumRowSums + k] = acc.v[k];
  }
}

__global__ void finalize(PolicyLossArgs a, const float* row_mask, const float* total, const float* row_sums) {
  const double num_items = a.num_items ? static_cast<double>(*a.num_items) : -1.0;
  Vec<double, kNumRowSums> s = {};  // the loss (scaled), then the metric sums
  for (int64_t b = threadIdx.x; b < a.B; b += kThreads) {
    const float* r = row_sums + b * kNumRowSums;
    s.v[kLoss] += row_scale(a.p.loss_type, row_mask[b], *total, a.B, a.max_completion_length, num_items) * r[kLoss];
    for (int k = kRatio; k < kNumRowSums; ++k) s.v[k] += r[k];
  }
  s = block_sum(s);
  if (threadIdx.x == 0) {
    *a.loss = static_cast<float>(s.v[kLoss]);
    const double denom = fmax(static_cast<double>(*total), 1.0);
    for (int k = 0; k < kNumMetrics; ++k) a.metrics[k] = static_cast<float>(s.v[kRatio + k] / denom);
  }
}

}  // namespace

cudaError_t launch_policy_loss(const PolicyLossArgs& a, cudaStream_t stream) {
  float* row_mask = a.workspace;
  float* row_logw = row_mask + a.B;
  float* row_sums = row_logw + a.B;
  float* total = row_sums + a.B * kNumRowSums;
  if (a.B > 0) {
    row_prepare<<<a.B, kThreads, 0, stream>>>(a, row_mask, row_logw);
    total_mask<<<1, kThreads, 0, stream>>>(a.B, row_mask, total);
    loss_rows<<<a.B, kThreads, 0, stream>>>(a, row_mask, row_logw, total, row_sums);
  } else {
    total_mask<<<1, kThreads, 0, stream>>>(0, row_mask, total);
  }
  finalize<<<1, kThreads, 0, stream>>>(a, row_mask, total, row_sums);
  return cudaGetLastError();
}

}  // namespace medix_fast
