"""Per-token routing metrics: gate entropy, top-k scores, router z, logit scale, the top-1 expert.

Shape legend: T tokens, E experts, K chosen experts per token. Each function returns per-token values
(T,), for means, medians and histograms.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def gate_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """Entropy ``-sum_e g_e ln g_e`` (nats, fp32) of each token's full router distribution (all E experts,
    before top-k; ``0 ln 0 = 0``): ln E for a uniform router, 0 for a one-hot one. A router-confidence
    measure (cf. the RMoE paper, arXiv 2408.06793, Sec. 5)."""
    return torch.special.entr(probs_TE.float()).sum(dim=-1)


@torch.no_grad()
def sorted_top_scores(probs_TE: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest router probabilities of each token, in decreasing order: (T, k) fp32."""
    return torch.topk(probs_TE.float(), k, dim=-1, sorted=True).values


@torch.no_grad()
def router_z(logits_TE: torch.Tensor) -> torch.Tensor:
    """Per-token ``z = logsumexp_e(logits)`` (fp32), which the ST-MoE router z-loss squares (Zoph et al.,
    arXiv 2202.08906, Eq. 5). Its mean tracks the growth of the router logits."""
    return torch.logsumexp(logits_TE.float(), dim=-1)


@torch.no_grad()
def router_logit_variance(logits_TE: torch.Tensor) -> torch.Tensor:
    """Per-token population variance (fp32) of the router logits over the E experts: the scale the softmax
    sees (a softmax ignores a constant shift of a token's logits).

    ``router_logit_std`` is ``sqrt(mean over tokens of this)``: averaging variances makes the sums add up
    exactly across batches and processes. At initialisation a linear router ``W x`` with ``W ~ N(0, s^2)``
    and ``|x|^2 = D`` has ``router_logit_std ~ s sqrt(D)``; much smaller logits start near uniform.
    """
    return logits_TE.float().var(dim=-1, unbiased=False)


@torch.no_grad()
def top1_expert_ids(
    expert_ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    probs_TE: torch.Tensor,
    keep_TK: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each token's main expert (T,) int64: the kept chosen expert with the largest combine weight (ties:
    the first column). With bias balancing this is the highest-probability expert among those chosen with
    the bias. A token with no kept pair (dropped everywhere, or picked by no expert under expert choice)
    falls back to the router's argmax ``probs_TE.argmax(-1)``."""
    weights_TK = weights_TK.float()
    if keep_TK is not None:
        weights_TK = weights_TK.masked_fill(~keep_TK, float("-inf"))
    best_T1 = weights_TK.argmax(dim=-1, keepdim=True)
    ids_T = expert_ids_TK.gather(1, best_T1).squeeze(1)
    if keep_TK is not None:
        ids_T = torch.where(keep_TK.any(dim=-1), ids_T, probs_TE.argmax(dim=-1))
    return ids_T
