// CPU implementation of medix_fast::exact_attention, the attention of sampling.exact
// (kernels/exact.py): every (sequence, query, head) alone, parallel over them, its keys in position
// order and each sum in one fixed order (the dot product over D in 8 lanes, then the keys one after
// another), so a query's output depends on its own query and keys only: never on the other
// queries, the padding past its keys, or how the caller laid them out (the sampler's paged decode
// and packed prefill, the trainer's padded rows). Inputs in their own dtype (bf16 read in place).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace medix_fast {
namespace {

// q . k over D in one fixed order: 8 lanes (d mod 8) summed along D, then the lanes as a fixed tree,
// then the tail; independent lanes let the compiler vectorise without reassociating anything.
inline float dot(const float* q, const float* k, int64_t D) {
  float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    for (int j = 0; j < 8; ++j) part[j] += q[d + j] * k[d + j];
  float total = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  for (; d < D; ++d) total += q[d] * k[d];
  return total;
}

template <typename scalar_t>
void kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const int64_t* seen, float scale,
            float* out) {
  const int64_t S = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3), L = k.size(1), KV = k.size(2);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  const int64_t qs = q.stride(0), qt = q.stride(1), qh = q.stride(2);
  const int64_t ks = k.stride(0), kl = k.stride(1), kh = k.stride(2);
  const int64_t vs = v.stride(0), vl = v.stride(1), vh = v.stride(2);
  at::parallel_for(0, S * T * H, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> s(L), qf(D), kf(D);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t si = w / (T * H), t = (w / H) % T, h = w % H, g = h / (H / KV);
      const int64_t n = std::min(seen[si * T + t], L);
      if (n <= 0) continue;
      const scalar_t* qw = qp + si * qs + t * qt + h * qh;
      for (int64_t d = 0; d < D; ++d) qf[d] = static_cast<float>(qw[d]);
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < n; ++j) {
        const scalar_t* kj = kp + si * ks + j * kl + g * kh;
        for (int64_t d = 0; d < D; ++d) kf[d] = static_cast<float>(kj[d]);
        s[j] = dot(qf.data(), kf.data(), D) * scale;
        m = std::max(m, s[j]);
      }
      float denom = 0;
      float* ow = out + w * D;
      for (int64_t j = 0; j < n; ++j) {
        const float p = std::exp(s[j] - m);
        denom += p;
        const scalar_t* vj = vp + si * vs + j * vl + g * vh;
        for (int64_t d = 0; d < D; ++d) ow[d] += p * static_cast<float>(vj[d]);
      }
      for (int64_t d = 0; d < D; ++d) ow[d] /= denom;
    }
  });
}

// q (S, Tq, H, D), k / v (S, L, kv, D) of one float dtype, any strides but D contiguous; seen (S, Tq)
// int64: query t of sequence s attends to keys [0, seen[s, t]). Returns (S, Tq, H, D) float32; a
// query that sees no key gets 0.
at::Tensor exact_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& seen,
                               double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes(), "q (S, Tq, H, D), k and v (S, L, kv, D)");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "q, k, v: one dtype");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "q, k, v: D must be contiguous");
  TORCH_CHECK(seen.scalar_type() == at::kLong && seen.is_contiguous(), "seen must be int64 contiguous");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3) && q.size(2) % k.size(2) == 0 &&
                  seen.numel() == q.size(0) * q.size(1),
              "shapes do not match");
  auto out = at::zeros(q.sizes(), q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "exact_attention", [&] {
    kernel<scalar_t>(q, k, v, seen.data_ptr<int64_t>(), static_cast<float>(scale), out.data_ptr<float>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(medix_fast, CPU, m) { m.impl("exact_attention", &exact_attention_cpu); }

}  // namespace medix_fast
