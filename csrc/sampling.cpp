// CPU implementation of medix_fast::sample_tokens: temperature, top-k, top-p and the draw of one
// token per row in a single pass per row, parallel over rows; no sort of the vocabulary.
//
// Truncation (as medix_fast/sampling.py, with ties kept together): scaled = logits / T;
// top-k keeps scaled >= the k-th largest value; top-p then keeps every token whose strictly more
// likely tokens (under the top-k renormalised softmax) hold less than top_p of the mass, so the
// most likely token is always kept. The token is drawn by inverse CDF in vocabulary order with
// the row's uniform u in [0, 1): the first kept token whose cumulative mass exceeds u * total.
// Its log-prob is log_softmax(scaled) (the untruncated "raw" log-prob a trainer recomputes).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <vector>

#include "common.h"

namespace medix_fast {
namespace {

// Smallest kept value of the top-p nucleus of vals (unordered; reordered in place), with masses
// exp(v - vmax) / total. Quickselect on the mass: expected O(len), not O(len log len).
float nucleus_threshold(std::vector<float>& vals, float vmax, double total, double top_p) {
  auto mass = [&](size_t lo, size_t hi) {
    double s = 0;
    for (size_t i = lo; i < hi; ++i) s += std::exp(vals[i] - vmax);
    return s / total;
  };
  float thr = vmax;  // the most likely token is always kept
  double above = 0;  // mass of the values already known to lie above the range [lo, hi)
  size_t lo = 0, hi = vals.size();
  while (hi - lo > 64) {
    const size_t mid = lo + (hi - lo) / 2;
    std::nth_element(vals.begin() + lo, vals.begin() + mid, vals.begin() + hi, std::greater<float>());
    const double upper = mass(lo, mid + 1);  // [lo, mid] >= vals[mid] >= (mid, hi)
    if (above + upper < top_p) {  // each of [lo, mid] has less than top_p strictly above it: kept
      thr = std::min(thr, vals[mid]);
      above += upper;
      lo = mid + 1;
    } else {  // everything below vals[mid] has at least top_p above it: the cut lies in [lo, mid]
      hi = mid + 1;
    }
  }
  std::sort(vals.begin() + lo, vals.begin() + hi, std::greater<float>());
  for (size_t i = lo; i < hi;) {
    size_t j = i;
    while (j < hi && vals[j] == vals[i]) ++j;  // one group of ties
    if (above >= top_p) break;
    thr = std::min(thr, vals[i]);
    above += mass(i, j);
    i = j;
  }
  return thr;
}

// One row: returns (token, log-prob). scaled and ex are scratch of V floats each.
std::pair<int64_t, float> sample_row(const float* x, int64_t V, float u, float temperature, int64_t top_k,
                                     double top_p, std::vector<float>& scaled, std::vector<float>& ex) {
  const float divisor = temperature == 0.f ? 1.f : temperature;  // greedy: log_softmax(logits)
  float vmax = -std::numeric_limits<float>::infinity();
  int64_t argmax = 0;  // first index on ties, as torch.argmax
  for (int64_t j = 0; j < V; ++j) {
    scaled[j] = x[j] / divisor;
    if (scaled[j] > vmax) vmax = scaled[j], argmax = j;
  }
  double z_all = 0;
  for (int64_t j = 0; j < V; ++j) z_all += (ex[j] = std::exp(scaled[j] - vmax));
  const double log_z = std::log(z_all);
  auto logprob = [&](int64_t j) { return static_cast<float>((scaled[j] - vmax) - log_z); };
  if (temperature == 0.f) return {argmax, logprob(argmax)};

  float cut = -std::numeric_limits<float>::infinity();  // keep scaled >= cut
  std::vector<float> kept;
  if (top_k > 0 && top_k < V) {
    kept.assign(scaled.begin(), scaled.begin() + V);
    std::nth_element(kept.begin(), kept.begin() + (top_k - 1), kept.end(), std::greater<float>());
    cut = kept[top_k - 1];
  }
  if (top_p < 1.0) {
    kept.clear();
    double z_kept = 0;
    for (int64_t j = 0; j < V; ++j)
      if (scaled[j] >= cut) kept.push_back(scaled[j]), z_kept += ex[j];
    cut = std::max(cut, nucleus_threshold(kept, vmax, z_kept, top_p));
  }
  double z = 0;
  for (int64_t j = 0; j < V; ++j)
    if (scaled[j] >= cut) z += ex[j];
  const double target = static_cast<double>(u) * z;
  double cum = 0;
  int64_t token = argmax;
  for (int64_t j = 0; j < V; ++j) {
    if (scaled[j] < cut || ex[j] == 0.f) continue;  // excluded, or underflowed: never drawn
    token = j;  // the last kept token catches rounding at the top end
    cum += ex[j];
    if (cum > target) break;
  }
  return {token, logprob(token)};
}

std::tuple<at::Tensor, at::Tensor> sample_tokens_cpu(const at::Tensor& logits, const at::Tensor& uniform,
                                                     double temperature, int64_t top_k, double top_p) {
  check_sample_tokens(logits, uniform, temperature, top_k, top_p);
  const int64_t B = logits.size(0), V = logits.size(1);
  at::Tensor tokens = at::empty({B}, logits.options().dtype(at::kLong));
  at::Tensor logprobs = at::empty({B}, logits.options());
  const float *x = logits.data_ptr<float>(), *u = uniform.data_ptr<float>();
  int64_t* tok = tokens.data_ptr<int64_t>();
  float* lp = logprobs.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> scaled(V), ex(V);
    for (int64_t b = b0; b < b1; ++b) {
      const auto [t, l] = sample_row(x + b * V, V, u[b], static_cast<float>(temperature), top_k, top_p, scaled, ex);
      tok[b] = t;
      lp[b] = l;
    }
  });
  return {tokens, logprobs};
}

}  // namespace

TORCH_LIBRARY_IMPL(medix_fast, CPU, m) { m.impl("sample_tokens", &sample_tokens_cpu); }

}  // namespace medix_fast
