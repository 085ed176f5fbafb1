// Schemas of the medix_fast custom ops (torch.ops.medix_fast.*). The CPU kernels register in
// policy_loss.cpp, advantage.cpp, sampling.cpp, paged_attention.cpp and exact_attention.cpp (CPU only: CUDA runs the
// Triton paged kernel), the CUDA kernels in the matching .cu files;
// autograd and the fake (meta) implementations for torch.compile live in kernels/cpp.py.
#include <torch/library.h>

TORCH_LIBRARY(medix_fast, m) {
  // loss_type: the LossType of policy_loss.h (kernels/loss_specs.py cpp_id); level: 0 token, 1 sequence,
  // 2 sequence_token. The arguments after level are LossOptions fields of the same names (kernels/cpp.py
  // passes them by name).
  // Returns the 0-dim loss, d loss / d logp (B, T), d loss / d entropy ((B, T), or (0,) when
  // entropy is absent or entropy_coef == 0) and the metrics (6,): ratio_mean, clip_low,
  // clip_high, clip_dual, kl, entropy (masked token means).
  m.def(
      "policy_loss(Tensor logp, Tensor? old, Tensor adv, Tensor mask, Tensor? ref, Tensor? entropy, "
      "Tensor? sampling, Tensor? num_items, int loss_type, int level, float epsilon_low, float epsilon_high, "
      "float? clip_ratio_c, float beta, float entropy_coef, int max_completion_length, float? tis_cap, "
      "float? kl_clamp, float? log_ratio_clamp, float? delta, bool use_bias_correction_kl, "
      "float sapo_temperature_pos, float sapo_temperature_neg) "
      "-> (Tensor loss, Tensor grad_logp, Tensor grad_entropy, Tensor metrics)");
  // estimator: 0 grpo, 1 dr_grpo, 2 rloo. Returns advantages (N,), group mean and std (N // G,).
  m.def("group_advantages(Tensor rewards, int group_size, int estimator, float eps) "
        "-> (Tensor adv, Tensor mean, Tensor std)");
  // One token per row of logits (B, V) by inverse-CDF sampling with uniform (B,) in [0, 1) from
  // the top-k / top-p truncated softmax(logits / temperature); temperature 0 is greedy. Returns
  // tokens (B,) int64 and their log-probs (B,) under log_softmax(logits / temperature).
  m.def("sample_tokens(Tensor logits, Tensor uniform, float temperature, int top_k, float top_p) "
        "-> (Tensor tokens, Tensor logprobs)");
  // Decode attention of q (b, H, D) over paged K/V (blocks, block_size, kv_heads, D): item i's
  // rows (rows[i], padded with b; None: item i is row i) attend to the first lens[i] tokens of
  // blocks table[i]. Returns each row's output (b, H, D) and log-sum-exp (b, H) in q's dtype
  // (the pool's accumulation type); rows no item covers get 0 and -inf.
  m.def("paged_decode(Tensor q, Tensor k_pool, Tensor v_pool, Tensor table, Tensor lens, Tensor? rows, "
        "float scale) -> (Tensor out, Tensor lse)");
  // sampling.exact's attention (kernels/exact.py): q (S, Tq, H, D), k / v (S, L, kv, D) of one dtype (any
  // strides, D contiguous), query t of sequence s over keys [0, seen[s, t]) in a fixed order. Returns
  // (S, Tq, H, D) float32.
  m.def("exact_attention(Tensor q, Tensor k, Tensor v, Tensor seen, float scale) -> Tensor");
}
