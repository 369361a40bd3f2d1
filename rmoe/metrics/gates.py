"""Per-token routing metrics: gate entropy, inner/outer balance, router z, logit scale, the top-1 expert.

Shape legend: T tokens, E experts, K chosen experts per token. Each function returns the
per-token vector (T,) so callers can take means, medians and histograms; all run under
``torch.no_grad()`` and leave their inputs untouched.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def gate_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """Entropy ``-sum_e g_e ln g_e`` (nats) of each token's full router distribution.

    Over the full softmax ``probs_TE`` (all E experts, before top-k), with ``0 ln 0 = 0``: ln E
    for a uniform router, 0 for a one-hot one. Shannon entropy of the router's distribution, a
    router-confidence measure (cf. the RMoE paper's analysis of router score distributions, Qiu
    et al., "Layerwise Recurrent Router for Mixture-of-Experts", arXiv 2408.06793, Sec. 5).

    Args:
        probs_TE: (T, E) router probabilities.

    Returns:
        (T,) fp32 entropies.
    """
    return torch.special.entr(probs_TE.float()).sum(dim=-1)


@torch.no_grad()
def sorted_top_scores(probs_TE: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest router probabilities of each token, in decreasing order: (T, k) fp32."""
    return torch.topk(probs_TE.float(), k, dim=-1, sorted=True).values


@torch.no_grad()
def router_z(logits_TE: torch.Tensor) -> torch.Tensor:
    """Per-token ``z = logsumexp_e(logits)``, the quantity the ST-MoE router z-loss squares.

    Zoph et al., "ST-MoE: Designing Stable and Transferable Sparse Expert Models", arXiv
    2202.08906, Eq. 5 (z-loss = mean z^2). Its mean tracks the growth of the router logits.

    Args:
        logits_TE: (T, E) router logits.

    Returns:
        (T,) fp32.
    """
    return torch.logsumexp(logits_TE.float(), dim=-1)


@torch.no_grad()
def router_logit_variance(logits_TE: torch.Tensor) -> torch.Tensor:
    """Per-token variance of the router logits over the E experts (population variance, fp32).

    The scale the softmax sees: a softmax is invariant to adding a constant to a token's logits,
    so the spread around each token's mean is what makes its probabilities sharp or flat (all
    logits equal: uniform probabilities). The per-layer ``router_logit_std`` of the analytics is
    ``sqrt(mean over tokens of this)``, the RMS of the centred logits, whose sums add up exactly
    across batches and processes. At initialisation a linear router ``W x`` with ``W ~ N(0, s^2)``
    and ``|x|^2 = D`` has ``router_logit_std ~ s sqrt(D)``; a router whose logits start much smaller
    starts with near-uniform probabilities (the scale question of RMoE's recurrent router).

    Args:
        logits_TE: (T, E) router logits.

    Returns:
        (T,) fp32 variances.
    """
    return logits_TE.float().var(dim=-1, unbiased=False)


@torch.no_grad()
def top1_expert_ids(
    expert_ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    probs_TE: torch.Tensor,
    keep_TK: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each token's main expert: the computed (kept) chosen expert with the largest combine weight.

    For plain top-k routers this is ``expert_ids_TK[:, 0]`` (the router's argmax); with
    auxiliary-loss-free bias balancing it is the highest-probability expert among those chosen
    with the bias; with a capacity mask it skips dropped pairs. A token with no kept pair
    (dropped everywhere, or picked by no expert under expert choice) falls back to the router's
    argmax ``probs_TE.argmax(-1)``. Ties go to the first column.

    Args:
        expert_ids_TK: (T, K) chosen expert ids.
        weights_TK: (T, K) combine weights.
        probs_TE: (T, E) router probabilities (for the fallback).
        keep_TK: Optional (T, K) bool mask.

    Returns:
        (T,) int64 expert ids.
    """
    weights_TK = weights_TK.float()
    if keep_TK is not None:
        weights_TK = weights_TK.masked_fill(~keep_TK, float("-inf"))
    best_T1 = weights_TK.argmax(dim=-1, keepdim=True)
    ids_T = expert_ids_TK.gather(1, best_T1).squeeze(1)
    if keep_TK is not None:
        ids_T = torch.where(keep_TK.any(dim=-1), ids_T, probs_TE.argmax(dim=-1))
    return ids_T
