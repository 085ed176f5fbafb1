// CPU implementation of medix_fast::paged_decode: one query token per row against paged K/V,
// reading each item's live blocks in place (no gathered copy), parallel over (item, KV head).
//
// Item i owns the first lens[i] tokens of blocks table[i] of the pools (blocks, block_size,
// kv_heads, D; any strides, D contiguous) and the queries of rows rows[i] (padded with b; no rows:
// item i is row i): all heads of those rows that share KV head h form one query block, so a
// block is read once per item and KV head. Per block of tokens: scores, the block's max, one
// rescale of the running sums, then the values (flash-attention's online softmax, in the
// accumulation type: float, double for double). Outputs each row's normalised output (b, H, D)
// and log-sum-exp (b, H); rows no item covers get 0 and -inf.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace medix_fast {
namespace {

struct PagedArgs {
  int64_t b, heads, dim, kv, block, width, items, group;
  int64_t k_sb, k_st, k_sh, v_sb, v_st, v_sh;  // block, token and head strides of the pools
  double scale;
};

// q . k over D with 8 independent partial sums (so the compiler vectorises without reassociating).
template <typename scalar_t, typename acc_t>
inline acc_t dot(const acc_t* q, const scalar_t* k, int64_t D) {
  acc_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    for (int j = 0; j < 8; ++j) part[j] += q[d + j] * static_cast<acc_t>(k[d + j]);
  acc_t total = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  for (; d < D; ++d) total += q[d] * static_cast<acc_t>(k[d]);
  return total;
}

template <typename scalar_t, typename acc_t>
void paged_decode_kernel(const acc_t* q, const scalar_t* k, const scalar_t* v, const int32_t* table,
                         const int32_t* lens, const int64_t* rows, acc_t* out, acc_t* lse, const PagedArgs& a) {
  const int64_t R = a.heads / a.kv, M = a.group * R, D = a.dim, BS = a.block;
  at::parallel_for(0, a.items * a.kv, 1, [&](int64_t w0, int64_t w1) {
    std::vector<acc_t> qs(M * D), acc(M * D), m(M), l(M), s(M * BS);
    std::vector<int64_t> row_of(M);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t i = w / a.kv, h = w % a.kv;
      for (int64_t g = 0; g < a.group; ++g) {
        const int64_t row = rows ? rows[i * a.group + g] : i;
        for (int64_t r = 0; r < R; ++r) {
          const int64_t mq = g * R + r;
          row_of[mq] = row;
          const acc_t* src = q + (row * a.heads + h * R + r) * D;
          for (int64_t d = 0; d < D; ++d) qs[mq * D + d] = row < a.b ? src[d] * static_cast<acc_t>(a.scale) : 0;
        }
      }
      std::fill(acc.begin(), acc.end(), acc_t(0));
      std::fill(l.begin(), l.end(), acc_t(0));
      std::fill(m.begin(), m.end(), -std::numeric_limits<acc_t>::infinity());
      const int64_t length = lens[i];
      for (int64_t t0 = 0; t0 < length; t0 += BS) {
        const int64_t blk = table[i * a.width + t0 / BS], n = std::min(BS, length - t0);
        const scalar_t* kb = k + blk * a.k_sb + h * a.k_sh;
        const scalar_t* vb = v + blk * a.v_sb + h * a.v_sh;
        for (int64_t mq = 0; mq < M; ++mq) {
          const acc_t* qm = qs.data() + mq * D;
          acc_t* sm = s.data() + mq * BS;
          acc_t top = m[mq];
          for (int64_t t = 0; t < n; ++t) {
            sm[t] = dot(qm, kb + t * a.k_st, D);
            top = std::max(top, sm[t]);
          }
          const acc_t alpha = std::exp(m[mq] - top);  // 0 on the first block (m = -inf)
          acc_t sum = 0;
          for (int64_t t = 0; t < n; ++t) sum += (sm[t] = std::exp(sm[t] - top));
          l[mq] = l[mq] * alpha + sum;
          acc_t* am = acc.data() + mq * D;
          for (int64_t d = 0; d < D; ++d) am[d] *= alpha;
          m[mq] = top;
        }
        for (int64_t t = 0; t < n; ++t) {
          const scalar_t* vt = vb + t * a.v_st;
          for (int64_t mq = 0; mq < M; ++mq) {
            const acc_t p = s[mq * BS + t];
            acc_t* am = acc.data() + mq * D;
            for (int64_t d = 0; d < D; ++d) am[d] += p * static_cast<acc_t>(vt[d]);
          }
        }
      }
      for (int64_t mq = 0; mq < M; ++mq) {
        const int64_t row = row_of[mq];
        if (row >= a.b) continue;  // a padding slot
        const int64_t head = h * R + mq % R;
        acc_t* dst = out + (row * a.heads + head) * D;
        const bool seen = l[mq] > 0;
        for (int64_t d = 0; d < D; ++d) dst[d] = seen ? acc[mq * D + d] / l[mq] : 0;
        lse[row * a.heads + head] = seen ? m[mq] + std::log(l[mq]) : -std::numeric_limits<acc_t>::infinity();
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> paged_decode_cpu(const at::Tensor& q, const at::Tensor& k_pool,
                                                    const at::Tensor& v_pool, const at::Tensor& table,
                                                    const at::Tensor& lens, const std::optional<at::Tensor>& rows,
                                                    double scale) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q must be a contiguous (b, H, D) tensor, got ", q.sizes());
  TORCH_CHECK(k_pool.dim() == 4 && k_pool.sizes() == v_pool.sizes(), "k_pool and v_pool must be (blocks, block_size, "
              "kv_heads, D) of one shape, got ", k_pool.sizes(), " and ", v_pool.sizes());
  TORCH_CHECK(k_pool.stride(3) == 1 && v_pool.stride(3) == 1, "the pools' last dimension must be contiguous");
  TORCH_CHECK(k_pool.scalar_type() == v_pool.scalar_type(), "k_pool and v_pool must share a dtype");
  TORCH_CHECK(q.scalar_type() == at::toOpMathType(k_pool.scalar_type()), "q must be in the pool's accumulation type ",
              at::toOpMathType(k_pool.scalar_type()), ", got ", q.scalar_type());
  const int64_t b = q.size(0), heads = q.size(1), dim = q.size(2), kv = k_pool.size(2);
  TORCH_CHECK(k_pool.size(3) == dim && heads % kv == 0, "q's heads (", heads, ") must be a multiple of the pools' ",
              kv, " and head sizes must match");
  TORCH_CHECK(table.dim() == 2 && table.scalar_type() == at::kInt && table.is_contiguous(),
              "table must be contiguous (N, W) int32");
  TORCH_CHECK(lens.dim() == 1 && lens.size(0) == table.size(0) && lens.scalar_type() == at::kInt &&
              lens.is_contiguous(), "lens must be contiguous (N,) int32");
  const int64_t items = table.size(0);
  int64_t group = 1;
  if (rows.has_value()) {
    TORCH_CHECK(rows->dim() == 2 && rows->size(0) == items && rows->scalar_type() == at::kLong && rows->is_contiguous(),
                "rows must be contiguous (N, G) int64");
    group = rows->size(1);
  } else {
    TORCH_CHECK(items == b, "without rows, item i is row i: need N == b, got ", items, " and ", b);
  }
  const PagedArgs a{b, heads, dim, kv, k_pool.size(1), table.size(1), items, group, k_pool.stride(0),
                    k_pool.stride(1), k_pool.stride(2), v_pool.stride(0), v_pool.stride(1), v_pool.stride(2), scale};
  at::Tensor out = at::zeros({b, heads, dim}, q.options());
  at::Tensor lse = at::full({b, heads}, -std::numeric_limits<double>::infinity(), q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k_pool.scalar_type(), "paged_decode_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    paged_decode_kernel<scalar_t, acc_t>(q.data_ptr<acc_t>(), k_pool.data_ptr<scalar_t>(), v_pool.data_ptr<scalar_t>(),
                                         table.data_ptr<int32_t>(), lens.data_ptr<int32_t>(),
                                         rows.has_value() ? rows->data_ptr<int64_t>() : nullptr,
                                         out.data_ptr<acc_t>(), lse.data_ptr<acc_t>(), a);
  });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(medix_fast, CPU, m) { m.impl("paged_decode", &paged_decode_cpu); }

}  // namespace medix_fast
