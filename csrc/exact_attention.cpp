// CPU implementation of medix_fast::exact_attention, the attention of sampling.exact
// (kernels/exact.py): every (sequence, query, head) alone, parallel over them, its keys in position
// order and each sum in one fixed order (the dot product over D in 8 lanes, then the keys one after another),
// so a query's output depends on its own query and keys only: never on the other queries, the
// padding past its keys, or how the caller laid them out (the sampler's paged decode and packed
// prefill, the trainer's padded rows).
#include <ATen/Parallel.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"

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

// q (S, Tq, H, D), k / v (S, L, kv, D) float32 contiguous, seen (S, Tq) int64: query t of sequence s
// attends to keys [0, seen[s, t]). Returns (S, Tq, H, D) float32; a query that sees no key gets 0.
at::Tensor exact_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& seen,
                               double scale) {
  check_float(q, "q", q);
  check_float(k, "k", q);
  check_float(v, "v", q);
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes(), "q (S, Tq, H, D), k and v (S, L, kv, D)");
  TORCH_CHECK(seen.scalar_type() == at::kLong && seen.is_contiguous(), "seen must be int64 contiguous");
  const int64_t S = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3), L = k.size(1), KV = k.size(2);
  TORCH_CHECK(k.size(0) == S && k.size(3) == D && H % KV == 0 && seen.numel() == S * T, "shapes do not match");
  auto out = at::zeros_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int64_t* np = seen.data_ptr<int64_t>();
  float* out_p = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, S * T * H, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> s(L);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t si = w / (T * H), t = (w / H) % T, h = w % H, kh = h / (H / KV);
      const int64_t n = std::min(np[si * T + t], L);
      if (n <= 0) continue;
      const float* qw = qp + w * D;
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < n; ++j) {
        const float* kj = kp + ((si * L + j) * KV + kh) * D;
        s[j] = dot(qw, kj, D) * sc;
        m = std::max(m, s[j]);
      }
      float denom = 0;
      float* ow = out_p + w * D;
      for (int64_t j = 0; j < n; ++j) {
        const float p = std::exp(s[j] - m);
        denom += p;
        const float* vj = vp + ((si * L + j) * KV + kh) * D;
        for (int64_t d = 0; d < D; ++d) ow[d] += p * vj[d];
      }
      for (int64_t d = 0; d < D; ++d) ow[d] /= denom;
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(medix_fast, CPU, m) { m.impl("exact_attention", &exact_attention_cpu); }

}  // namespace medix_fast
