// Per-token math of the clipped-ratio policy loss of the CPU op (policy_loss.cpp).
//
// Mirrors kernels/policy_loss.py value for value and, for the gradient, PyTorch autograd's rules:
// clamp passes the gradient on the closed interval, maximum splits it in half on ties, the dual
// clip and the truncated-importance-sampling factor are constants. Everything is float32; the
// caller accumulates sums in double.
#pragma once

#include <cmath>
#include <cstdint>

namespace medix_fast {

// The cpp_id of each loss type in kernels/loss_specs.py LOSS_SPECS (tests/test_loss_specs.py compares this enum
// with it); a loss type without one (vespo) runs on the PyTorch path (kernels/dispatch.py LACKS).
enum LossType : int64_t {
  kGrpo = 0, kBnpo = 1, kDrGrpo = 2, kDapo = 3, kCispo = 4, kSapo = 5, kLuspo = 6,
  kNumLossTypes  // the count, not a loss type
};
enum Level : int64_t { kToken = 0, kSequence = 1, kSequenceToken = 2 };

// Each loss type's row of kernels/loss_specs.py on this side: its policy term (TERMS) and normaliser
// (NORMALISERS), one case per loss type (tests/test_loss_specs.py compares them with the table).
enum class Term { kClip, kCispo, kSapo };
enum class Normaliser { kSequenceMean, kBatchTokens, kMaxLength, kNumItems, kSequences };

inline Term term_of(int64_t loss_type) {
  switch (loss_type) {
    case kGrpo: return Term::kClip;
    case kBnpo: return Term::kClip;
    case kDrGrpo: return Term::kClip;
    case kDapo: return Term::kClip;
    case kCispo: return Term::kCispo;
    case kSapo: return Term::kSapo;
    case kLuspo: return Term::kClip;
    default: return Term::kClip;  // unreachable: prepare_policy_loss checks the id
  }
}

inline Normaliser normaliser_of(int64_t loss_type) {
  switch (loss_type) {
    case kGrpo: return Normaliser::kSequenceMean;
    case kBnpo: return Normaliser::kBatchTokens;
    case kDrGrpo: return Normaliser::kMaxLength;
    case kDapo: return Normaliser::kNumItems;
    case kCispo: return Normaliser::kNumItems;
    case kSapo: return Normaliser::kSequenceMean;
    case kLuspo: return Normaliser::kSequences;
    default: return Normaliser::kBatchTokens;  // unreachable: prepare_policy_loss checks the id
  }
}

// Scalar options of one call, already resolved (epsilon_high defaulted, logs taken).
struct LossParams {
  Term term;                   // term_of(loss_type)
  Normaliser normaliser;       // normaliser_of(loss_type)
  int64_t level;
  float log_lo, log_hi;        // log1p(-epsilon_low), log1p(epsilon_high): the ratio clip
  float ratio_lo, ratio_hi;    // 1 - epsilon_low, 1 + epsilon_high: the clip-fraction metrics
  bool has_dual;               // clip_ratio_c given
  float clip_c;
  bool has_tis;                // tis_cap given (needs sampling; old defaults to logp)
  float tis_cap;
  bool has_ref;                // ref given: the KL is computed (and reported)
  float beta;                  // KL enters the loss when beta > 0
  bool has_kl_clamp;           // kl_clamp given: low_var_kl (ref - logp to [-20, 20], KL to [-kl_clamp, kl_clamp])
  float kl_clamp;
  bool has_lr_clamp;           // log_ratio_clamp given: log_w to [-lr_clamp, lr_clamp] before exp
  float lr_clamp;
  bool has_delta;              // delta given: the unclipped ratio capped at delta (two-sided clipping)
  float delta;
  bool bias_kl;                // use_bias_correction_kl: the KL times the ratio
  float cispo_cap;             // epsilon_high: cispo's cap of the ratio
  float sapo_pos, sapo_neg;    // sapo's temperatures for A > 0 and A <= 0
  float entropy_coef;          // entropy enters the loss when != 0
};

// One call: options, shapes, device (or host) pointers of the inputs and outputs.
struct PolicyLossArgs {
  LossParams p;
  int64_t B, T, max_completion_length;
  const float *logp, *old, *adv, *mask, *ref, *entropy, *sampling;  // old..sampling may be null
  const float* num_items;                                            // (1,) or null
  bool adv_per_token;
  float *grad_logp, *grad_entropy;  // (B, T); grad_entropy may be null
  float *loss, *metrics;            // (), (kNumMetrics,)
};

// What one valid token contributes: its loss, d loss / d log_w (the importance-weight path,
// before the aggregation scale), d loss / d logp not through log_w (the KL, cispo's REINFORCE
// term), and the metric terms.
struct TokenTerms {
  float loss;
  float dlog_w;
  float dlogp_direct;
  float ratio;
  float kl;
  bool clip_low, clip_high, dual;
};

inline float clampf(float x, float lo, float hi) { return fminf(fmaxf(x, lo), hi); }

// log_w: the token's log importance weight (value); logp/old/ref/sampling/entropy: its inputs.
inline TokenTerms token_terms(const LossParams& p, float log_w, float adv, float logp, float old,
                              float ref, float sampling, float entropy) {
  TokenTerms t;
  const bool in_lr = !p.has_lr_clamp || (log_w >= -p.lr_clamp && log_w <= p.lr_clamp);
  const float ratio = expf(p.has_lr_clamp ? clampf(log_w, -p.lr_clamp, p.lr_clamp) : log_w);
  const float lw_clip = clampf(log_w, p.log_lo, p.log_hi);
  const bool in_clip = log_w >= p.log_lo && log_w <= p.log_hi;
  const float clipped = (in_lr && in_clip) ? ratio : expf(lw_clip);
  const float na = -adv;
  float pg, g, direct = 0.f, shown = ratio;  // g: d pg / d log_w; shown: the ratio the clip metrics read
  t.dual = false;
  if (p.term == Term::kCispo) {  // -sg[min(ratio, cap)] * A * logp
    const float w = fminf(ratio, p.cispo_cap);
    pg = na * w * logp;
    g = 0.f;
    direct = na * w;
  } else if (p.term == Term::kSapo) {  // -4 / tau * sigmoid(tau * (ratio - 1)) * A
    const float tau = adv > 0.f ? p.sapo_pos : p.sapo_neg;
    const float s = 1.f / (1.f + expf(-tau * (ratio - 1.f)));
    pg = na * s * 4.f / tau;
    g = in_lr ? na * 4.f * s * (1.f - s) * ratio : 0.f;
  } else {
    const bool capped = p.has_delta && ratio > p.delta;  // clamp(max=delta): gradient where ratio <= delta
    shown = capped ? p.delta : ratio;
    const float p1 = na * shown, p2 = na * clipped;
    pg = fmaxf(p1, p2);
    const float w1 = p1 > p2 ? 1.f : (p1 == p2 ? 0.5f : 0.f);
    g = w1 * (in_lr && !capped ? p1 : 0.f) + (1.f - w1) * (in_clip ? p2 : 0.f);
  }
  if (p.has_dual && p.term == Term::kClip) {
    const float cap = na * p.clip_c;
    if (adv < 0.f && pg > cap) {
      t.dual = true;
      pg = cap;
      g = 0.f;
    }
  }
  if (p.has_tis) {
    const float w = fminf(expf(old - sampling), p.tis_cap);
    pg *= w;
    g *= w;
    direct *= w;
  }
  float loss = pg;
  t.kl = 0.f;
  if (p.has_ref) {
    const float d = ref - logp;
    const float dc = p.has_kl_clamp ? clampf(d, -20.f, 20.f) : d;
    const float e = expf(dc);
    const float kl_raw = e - dc - 1.f;
    t.kl = p.has_kl_clamp ? clampf(kl_raw, -p.kl_clamp, p.kl_clamp) : kl_raw;
    const float kl_factor = p.bias_kl ? ratio : 1.f;
    if (p.beta > 0.f) {
      const bool pass = !p.has_kl_clamp || (d >= -20.f && d <= 20.f && kl_raw >= -p.kl_clamp && kl_raw <= p.kl_clamp);
      loss = loss + p.beta * t.kl * kl_factor;
      direct += pass ? -p.beta * (e - 1.f) * kl_factor : 0.f;
      if (p.bias_kl && in_lr) g += p.beta * t.kl * ratio;  // through the ratio
    }
    t.kl *= kl_factor;
  }
  if (p.entropy_coef != 0.f) loss = loss - p.entropy_coef * entropy;
  t.loss = loss;
  t.dlog_w = g;
  t.dlogp_direct = direct;
  t.ratio = shown;
  const bool clips = p.term == Term::kClip;
  t.clip_low = clips && shown < p.ratio_lo && adv < 0.f;
  t.clip_high = adv > 0.f && (p.term == Term::kCispo ? ratio > p.cispo_cap : clips && shown > p.ratio_hi);
  return t;
}

// Order of the per-row sums (row_sums[b][k]) and of the metrics output.
enum RowSum : int { kLoss = 0, kRatio, kClipLow, kClipHigh, kDual, kKl, kEntropy, kMask, kNumRowSums };
constexpr int kNumMetrics = 6;  // ratio_mean, clip_low, clip_high, clip_dual, kl, entropy

// One token of row b at flat index i: writes its gradients (already scaled; at the sequence level
// without the mean's term, which the caller adds once the row is summed) and adds its terms to
// acc[kNumRowSums + 1]: the row sums (RowSum order) and sum_t mask * d loss_t / d log_w.
template <typename Acc>
inline void token_step(const PolicyLossArgs& a, int64_t b, int64_t i, float seq_logw, float scale, Acc* acc) {
  const LossParams& p = a.p;
  const float m = a.mask[i];
  if (m == 0.f) {
    a.grad_logp[i] = 0.f;
    if (a.grad_entropy) a.grad_entropy[i] = 0.f;
    return;
  }
  const float logp = a.logp[i];
  const float old = a.old ? a.old[i] : logp;
  const float adv = a.adv_per_token ? a.adv[i] : a.adv[b];
  const float ent = a.entropy ? a.entropy[i] : 0.f;
  const TokenTerms k = token_terms(p, p.level == kToken ? logp - old : seq_logw, adv, logp, old,
                                   a.ref ? a.ref[i] : 0.f, a.sampling ? a.sampling[i] : 0.f, ent);
  acc[kLoss] += m * k.loss;
  acc[kRatio] += m * k.ratio;
  acc[kClipLow] += k.clip_low ? m : 0.f;
  acc[kClipHigh] += k.clip_high ? m : 0.f;
  acc[kDual] += k.dual ? m : 0.f;
  acc[kKl] += m * k.kl;
  acc[kEntropy] += m * ent;
  if (p.level == kSequence) {
    acc[kNumRowSums] += m * k.dlog_w;
    a.grad_logp[i] = scale * m * k.dlogp_direct;
  } else {
    a.grad_logp[i] = scale * m * (k.dlog_w + k.dlogp_direct);
  }
  if (a.grad_entropy) a.grad_entropy[i] = -p.entropy_coef * scale * m;
}

// Aggregation scale of every token of a row: loss = sum_b scale_b * sum_t mask * loss_t.
// row_mask: that row's mask sum; total_mask: the batch's; num_items: num_items_in_batch, or < 0.
inline double row_scale(Normaliser normaliser, double row_mask, double total_mask, int64_t batch,
                        int64_t max_completion_length, double num_items) {
  switch (normaliser) {
    case Normaliser::kSequenceMean: return 1.0 / (static_cast<double>(batch) * fmax(row_mask, 1.0));
    case Normaliser::kMaxLength: return 1.0 / (static_cast<double>(batch) * static_cast<double>(max_completion_length));
    case Normaliser::kSequences: return 1.0 / static_cast<double>(batch);
    case Normaliser::kNumItems: return 1.0 / (num_items >= 0 ? num_items : fmax(total_mask, 1.0));
    case Normaliser::kBatchTokens: return 1.0 / fmax(total_mask, 1.0);
  }
  return 1.0 / fmax(total_mask, 1.0);  // unreachable: every normaliser is a case
}

}  // namespace medix_fast
