// CPU implementation of medix_fast::exact_attention, the attention of sampling.exact
// (kernels/exact.py): every (sequence, query, head) computed as if alone, its keys in position
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
#include <cstdint>
#include <cstring>
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

// e^x for x <= 0 (a score minus its row's max), in straight-line float arithmetic the compiler can
// vectorise: x = n ln2 + r (Cody-Waite), e^r by a degree-6 polynomial, 2^n put in the exponent;
// within 2 ulp of expf, and one fixed computation per input whatever the loop it runs in.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = (p * r) * r + r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, 4);
  bits += static_cast<int32_t>(n) << 23;
  std::memcpy(&p, &bits, 4);
  return p;
}

constexpr int64_t QB = 16;  // queries per work item: they share each key's and value's conversion to float

// Work item: sequence si, KV head g, queries [t0, t0 + QB) with the R heads sharing g. Each
// (query, head) keeps its own running max, sum and output, updated key after key in position order,
// so its arithmetic is the one it would get alone; the item only shares the loads.
template <typename scalar_t>
void kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const int64_t* seen, float scale,
            float* out) {
  const int64_t S = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3), L = k.size(1), KV = k.size(2);
  const int64_t R = H / KV, blocks = (T + QB - 1) / QB;
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  const int64_t qs = q.stride(0), qt = q.stride(1), qh = q.stride(2);
  const int64_t ks = k.stride(0), kl = k.stride(1), kh = k.stride(2);
  const int64_t vs = v.stride(0), vl = v.stride(1), vh = v.stride(2);
  at::parallel_for(0, S * KV * blocks, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> qf(QB * R * D), acc(QB * R * D), s(QB * R * L), m(QB * R), denom(QB * R), kf(D);
    std::vector<int64_t> n(QB * R);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t si = w / (KV * blocks), g = (w / blocks) % KV, t0 = (w % blocks) * QB;
      const int64_t M = std::min(QB, T - t0) * R;  // (query, head) pairs: mq = (t - t0) * R + r
      int64_t longest = 0;
      for (int64_t mq = 0; mq < M; ++mq) {
        const int64_t t = t0 + mq / R, h = g * R + mq % R;
        n[mq] = std::min(seen[si * T + t], L);
        longest = std::max(longest, n[mq]);
        const scalar_t* src = qp + si * qs + t * qt + h * qh;
        for (int64_t d = 0; d < D; ++d) qf[mq * D + d] = static_cast<float>(src[d]);
        m[mq] = -std::numeric_limits<float>::infinity();
        denom[mq] = 0;
        std::fill(acc.begin() + mq * D, acc.begin() + (mq + 1) * D, 0.0f);
      }
      for (int64_t j = 0; j < longest; ++j) {
        const scalar_t* kj = kp + si * ks + j * kl + g * kh;
        for (int64_t d = 0; d < D; ++d) kf[d] = static_cast<float>(kj[d]);
        for (int64_t mq = 0; mq < M; ++mq) {
          if (j >= n[mq]) continue;
          const float x = dot(qf.data() + mq * D, kf.data(), D) * scale;
          s[mq * L + j] = x;
          m[mq] = std::max(m[mq], x);
        }
      }
      for (int64_t mq = 0; mq < M; ++mq) {
        float* row = s.data() + mq * L;
        const float top = m[mq];
        for (int64_t j = 0; j < n[mq]; ++j) row[j] = exp_nonpositive(row[j] - top);
        for (int64_t j = 0; j < n[mq]; ++j) denom[mq] += row[j];
      }
      for (int64_t j = 0; j < longest; ++j) {
        const scalar_t* vj = vp + si * vs + j * vl + g * vh;
        for (int64_t d = 0; d < D; ++d) kf[d] = static_cast<float>(vj[d]);
        for (int64_t mq = 0; mq < M; ++mq) {
          if (j >= n[mq]) continue;
          const float p = s[mq * L + j];
          float* __restrict__ a = acc.data() + mq * D;
          const float* __restrict__ x = kf.data();
          for (int64_t d = 0; d < D; ++d) a[d] += p * x[d];
        }
      }
      for (int64_t mq = 0; mq < M; ++mq) {
        if (n[mq] <= 0) continue;
        float* o = out + ((si * T + t0 + mq / R) * H + g * R + mq % R) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = acc[mq * D + d] / denom[mq];
      }
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
