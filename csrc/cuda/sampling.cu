// CUDA kernel of medix_fast::sample_tokens: one block per row, no sort and no host sync.
// Same semantics as the CPU op (../sampling.cpp): top-k keeps scaled >= the k-th largest value,
// top-p keeps every token whose strictly more likely tokens hold less than top_p of the top-k
// mass, ties are kept together; inverse-CDF draw in vocabulary order with the row's uniform u.
// Both cuts are found by bisection on the order-preserving 32-bit key of the float values
// (32 block-wide counting / summing passes at most), the draw by a block-wide scan in tiles.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <cfloat>
#include <cstdint>

#include "launch.h"

namespace medix_fast {
namespace {

constexpr int kThreads = 1024;

// Order-preserving map float -> uint32 (larger float, larger key), and back.
__device__ __forceinline__ uint32_t key_of(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

struct ArgMax {
  float value;
  int64_t index;
};

struct ArgMaxOp {  // larger value; first index on ties
  __device__ ArgMax operator()(const ArgMax& a, const ArgMax& b) const {
    return (a.value > b.value || (a.value == b.value && a.index < b.index)) ? a : b;
  }
};

struct SumOp {
  __device__ float operator()(float a, float b) const { return a + b; }
};
struct MinOp {
  __device__ int64_t operator()(int64_t a, int64_t b) const { return a < b ? a : b; }
};
struct MaxOp {
  __device__ int64_t operator()(int64_t a, int64_t b) const { return a > b ? a : b; }
};

// Reduction over the block, returned to every thread (reusable: ends with a barrier).
template <typename T, typename Op>
__device__ T block_reduce(const T& x, Op op) {
  using Reduce = cub::BlockReduce<T, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ T result;
  const T r = Reduce(tmp).Reduce(x, op);
  if (threadIdx.x == 0) result = r;
  __syncthreads();
  const T out = result;
  __syncthreads();
  return out;
}

__device__ float block_sum(float x) { return block_reduce(x, SumOp()); }

// 1,024 threads need <= 64 registers each on every arch: the bound makes ptxas hold to it.
__global__ void __launch_bounds__(kThreads)
    sample_kernel(const float* logits, const float* uniform, int64_t V, float temperature, int64_t top_k, float top_p,
                  int64_t* tokens, float* logprobs) {
  const float* x = logits + blockIdx.x * V;
  const float div = temperature == 0.f ? 1.f : temperature;  // greedy: log_softmax(logits)

  ArgMax best = {-FLT_MAX, V};
  for (int64_t j = threadIdx.x; j < V; j += kThreads) {
    const float s = x[j] / div;
    if (best.index == V || s > best.value) best = {s, j};
  }
  best = block_reduce(best, ArgMaxOp());
  const float vmax = best.value;
  float z_all = 0.f;
  for (int64_t j = threadIdx.x; j < V; j += kThreads) z_all += expf(x[j] / div - vmax);
  const float log_z = logf(block_sum(z_all));
  auto finish = [&](int64_t token) {
    if (threadIdx.x == 0) tokens[blockIdx.x] = token, logprobs[blockIdx.x] = (x[token] / div - vmax) - log_z;
  };
  if (temperature == 0.f) return finish(best.index);

  uint32_t keep = 0;  // keep key(scaled) >= keep
  if (top_k > 0 && top_k < V) {  // the largest key with at least top_k values at or above it
    for (int bit = 31; bit >= 0; --bit) {
      const uint32_t cand = keep | (1u << bit);
      float count = 0.f;
      for (int64_t j = threadIdx.x; j < V; j += kThreads) count += key_of(x[j] / div) >= cand ? 1.f : 0.f;
      if (block_sum(count) >= static_cast<float>(top_k)) keep = cand;
    }
  }
  if (top_p < 1.f) {  // the smallest key v whose strictly larger values hold less than top_p of the mass
    float z_k = 0.f;
    for (int64_t j = threadIdx.x; j < V; j += kThreads) {
      const float s = x[j] / div;
      z_k += key_of(s) >= keep ? expf(s - vmax) : 0.f;
    }
    const float target = top_p * block_sum(z_k);
    uint32_t lo = keep, hi = key_of(vmax);
    while (lo < hi) {
      const uint32_t mid = lo + (hi - lo) / 2;
      float above = 0.f;
      for (int64_t j = threadIdx.x; j < V; j += kThreads) {
        const float s = x[j] / div;
        const uint32_t k = key_of(s);
        above += (k >= keep && k > mid) ? expf(s - vmax) : 0.f;
      }
      if (block_sum(above) < target) hi = mid; else lo = mid + 1;
    }
    keep = lo;
  }

  float z = 0.f;
  int64_t last = -1;  // the last kept token with mass: catches rounding at the top end
  for (int64_t j = threadIdx.x; j < V; j += kThreads) {
    const float s = x[j] / div;
    const float e = key_of(s) >= keep ? expf(s - vmax) : 0.f;
    z += e;
    if (e > 0.f) last = j;
  }
  const float target = uniform[blockIdx.x] * block_sum(z);
  last = block_reduce(last, MaxOp());

  using Scan = cub::BlockScan<float, kThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  float running = 0.f;
  for (int64_t base = 0; base < V; base += kThreads) {
    const int64_t j = base + threadIdx.x;
    float e = 0.f;
    if (j < V) {
      const float s = x[j] / div;
      e = key_of(s) >= keep ? expf(s - vmax) : 0.f;
    }
    float inclusive, tile_total;
    Scan(scan_tmp).InclusiveSum(e, inclusive, tile_total);
    __syncthreads();
    const int64_t hit = block_reduce((e > 0.f && running + inclusive > target) ? j : INT64_MAX, MinOp());
    if (hit != INT64_MAX) return finish(hit);
    running += tile_total;
  }
  finish(last);
}

}  // namespace

cudaError_t launch_sample_tokens(const float* logits, const float* uniform, int64_t B, int64_t V, float temperature,
                                 int64_t top_k, float top_p, int64_t* tokens, float* logprobs, cudaStream_t stream) {
  if (B > 0) sample_kernel<<<B, kThreads, 0, stream>>>(logits, uniform, V, temperature, top_k, top_p, tokens, logprobs);
  return cudaGetLastError();
}

}  // namespace medix_fast
