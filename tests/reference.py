"""fp64 references for the kernel tests, written from the published formulas and independently
of medix_fast.kernels: full logits, explicit loops over sequences, TRL's min() formulation."""
from __future__ import annotations

import math

import torch


def logprobs_entropy(hidden, weight, targets, bias=None, temperature=1.0, softcap=None):
    """Materialised fp64 logits -> (logp, entropy), each hidden.shape[:-1]; ``softcap``: the logits
    become softcap * tanh(logits / softcap) before the temperature (transformers' Gemma-2, then TRL)."""
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logsm = torch.log_softmax(logits / temperature, dim=-1)
    logp = logsm.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    entropy = -(logsm.exp() * logsm).sum(-1)
    return logp, entropy


def policy_loss(logp, old, adv, mask, *, ref=None, entropy=None, sampling=None, loss_type="grpo",
                importance_sampling_level="token", epsilon_low=0.2, epsilon_high=None, clip_ratio_c=None,
                beta=0.0, entropy_coef=0.0, max_completion_length=None, num_items_in_batch=None,
                tis_cap=None, kl_clamp=None, log_ratio_clamp=None, delta=None, use_bias_correction_kl=False,
                entropy_aggregation="loss", top_entropy_quantile=1.0, off_policy_mask_threshold=None,
                sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0,
                vespo_k_neg=3.0, vespo_lambda_neg=2.0):
    """Row-by-row fp64 policy loss in TRL 1.16's formulation; returns (loss, per_token_loss)."""
    logp = logp.double()
    old = logp.detach() if old is None else old.double()
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    keep = torch.ones_like(logp)
    if top_entropy_quantile < 1:  # TRL's get_high_entropy_mask on one process
        ent = entropy.detach().double()
        threshold = torch.quantile(ent[mask.bool()], 1 - top_entropy_quantile)
        keep = ((ent * mask >= threshold) & mask.bool()).double()
    rows = []
    for i in range(logp.shape[0]):
        m = mask[i].double()
        a = adv[i].double() if adv.dim() == 2 else adv[i].double().expand(logp.shape[1])
        delta_i = logp[i] - old[i]
        n_i = max(float(m.sum()), 1.0)
        seq = (delta_i * m).sum() / n_i
        if importance_sampling_level == "token":
            log_w = delta_i
        elif importance_sampling_level == "sequence":
            log_w = seq.expand(logp.shape[1])
        else:
            log_w = seq.detach() + logp[i] - logp[i].detach()
        coef_1 = torch.exp(log_w if log_ratio_clamp is None else torch.clamp(log_w, -log_ratio_clamp,
                                                                              log_ratio_clamp))
        if loss_type == "cispo":
            per_tok = -torch.clamp(coef_1, max=eps_high).detach() * a * logp[i]
        elif loss_type == "sapo":
            tau = torch.where(a > 0, sapo_temperature_pos, sapo_temperature_neg).double()
            per_tok = -torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau * a
        elif loss_type == "vespo":
            seq_log_ratio = (torch.clamp(delta_i, -20, 20) * m).sum().detach()
            log_w_seq = torch.clamp(seq_log_ratio, math.log(1e-8), 20)
            k = torch.where(a >= 0, vespo_k_pos, vespo_k_neg).double()
            lam = torch.where(a >= 0, vespo_lambda_pos, vespo_lambda_neg).double()
            phi = torch.exp(lam + k * log_w_seq - lam * torch.exp(log_w_seq))
            per_tok = -phi * a * logp[i]
        else:
            coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + eps_high)
            capped = coef_1 if delta is None else torch.clamp(coef_1, max=delta)
            per_tok = -torch.min(capped * a, coef_2 * a)
            if clip_ratio_c is not None:
                per_tok = torch.where(a < 0, torch.min(per_tok, -a * clip_ratio_c), per_tok)
        if off_policy_mask_threshold is not None:  # TRL's get_off_policy_mask
            behaviour = old[i] if sampling is None else sampling[i].double()
            seq_kl = ((behaviour - logp[i].detach()) * m).sum() / n_i
            per_tok = per_tok * ((a >= 0) | (seq_kl <= off_policy_mask_threshold)).double()
        per_tok = per_tok * keep[i]
        if tis_cap is not None:
            per_tok = per_tok * torch.clamp(torch.exp(old[i] - sampling[i].double()), max=tis_cap)
        if beta:
            d = ref[i].double() - logp[i]
            if kl_clamp is None:  # k3 exactly (TRL, Liger)
                kl = torch.exp(d) - d - 1
            else:  # low_var_kl (veRL, EasyR1)
                d = torch.clamp(d, -20, 20)
                kl = torch.clamp(torch.exp(d) - d - 1, -kl_clamp, kl_clamp)
            per_tok = per_tok + beta * (kl * coef_1 if use_bias_correction_kl else kl)
        if entropy_coef and entropy_aggregation == "loss":
            per_tok = per_tok - entropy_coef * entropy[i].double()
        rows.append(per_tok * m)
    per_token = torch.stack(rows)
    valid = float(mask.double().sum())
    if loss_type in ("grpo", "sapo"):
        loss = sum(per_token[i].sum() / max(float(mask[i].double().sum()), 1.0)
                   for i in range(len(rows))) / len(rows)
    elif loss_type == "bnpo":
        loss = per_token.sum() / max(valid, 1.0)
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / (len(rows) * max_completion_length)
    elif loss_type == "luspo":
        loss = per_token.sum(-1).mean()
    else:
        loss = per_token.sum() / (max(valid, 1.0) if num_items_in_batch is None else num_items_in_batch)
    if entropy_coef and entropy_aggregation == "token_mean":  # TRL: the mean over the tokens the loss acts on
        acting = mask.double() * keep
        loss = loss - entropy_coef * (entropy.double() * acting).sum() / max(float(acting.sum()), 1.0)
    return loss, per_token


def group_advantages(rewards, group_size, estimator="grpo", eps=1e-6):
    out = []
    for g in rewards.double().split(group_size):
        mean = sum(g.tolist()) / group_size
        std = math.sqrt(sum((x - mean) ** 2 for x in g.tolist()) / (group_size - 1))
        for x in g.tolist():
            if estimator == "grpo":
                out.append((x - mean) / (std + eps))
            elif estimator == "dr_grpo":
                out.append(x - mean)
            else:
                out.append(x - (mean * group_size - x) / (group_size - 1))
    return torch.tensor(out, dtype=torch.float64)


# Importance ratios in every region of the clipped objective with epsilon_low=0.2, epsilon_high=0.28,
# clip_ratio_c=3: below 1 - eps_low, inside, above 1 + eps_high, above c (each 0.01+ from an edge).
CLIP_EDGES = dict(epsilon_low=0.2, epsilon_high=0.28, clip_ratio_c=3.0)
CLIP_RATIOS = (0.3, 0.79, 0.9, 1.0, 1.1, 1.27, 1.29, 2.0, 2.9, 3.1, 5.0, 9.0)
CLIP_ADVANTAGES = (1.3, -0.7, 0.4, -2.0)  # one row each: both signs, twice


def clip_regions(ratio, adv, mask):
    """Token counts (valid tokens) of each clip region and advantage sign; asserts every one occurs."""
    valid = mask.bool()
    a = adv[:, None].expand_as(ratio) if adv.dim() == 1 else adv
    e = CLIP_EDGES
    regions = {"low": ratio < 1 - e["epsilon_low"], "high": ratio > 1 + e["epsilon_high"], "dual": ratio > e["clip_ratio_c"]}
    counts = {(name, sign): int((valid & region & (a > 0 if sign == "+" else a < 0)).sum())
              for name, region in regions.items() for sign in "+-"}
    assert all(counts.values()), counts
    return counts
