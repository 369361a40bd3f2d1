"""Per-token and one-shot references for the streaming routing metrics of :mod:`rmoe.metrics`.

The package computes these from accumulated counts and samples (:data:`rmoe.metrics.catalog.METRICS`);
the tests check it against these direct definitions on small inputs.
"""

from __future__ import annotations

import math

import torch

from rmoe.metrics.gates import sorted_top_scores
from rmoe.metrics.information import (
    NUM_PROB_BINS,
    bin_probabilities,
    entropy_from_counts,
    path_keys,
    unique_with_counts,
)


def drop_ratio(keep_TK: torch.Tensor | None, expert_ids_TK: torch.Tensor | None = None) -> torch.Tensor:
    """Fraction of the T*K routed (token, expert) pairs that were dropped (``keep_TK`` False).

    For routers with an expert capacity (Switch/GShard-style; Fedus et al., "Switch Transformers",
    arXiv 2101.03961, Sec. 2.2 "tokens dropped"). 0 when ``keep_TK`` is None (nothing dropped).
    For expert-choice routing, where ``keep_TK`` marks which of all E experts chose the token, this
    is ``1 - (chosen pairs) / (T*E)``: the sparsity of the choice, not a loss of computation; read
    :func:`token_drop_ratio` there.

    Args:
        keep_TK: (T, K) bool mask or None.
        expert_ids_TK: Only used for its device when ``keep_TK`` is None.

    Returns:
        A 0-d fp32 tensor.
    """
    if keep_TK is None:
        device = expert_ids_TK.device if expert_ids_TK is not None else None
        return torch.zeros((), device=device)
    return 1.0 - keep_TK.float().mean()


def token_drop_ratio(keep_TK: torch.Tensor | None, expert_ids_TK: torch.Tensor | None = None) -> torch.Tensor:
    """Fraction of tokens none of whose (token, expert) pairs was kept: they skip the routed
    experts entirely and only pass through the residual (and the shared expert, if any).

    The token-level view of capacity dropping (Switch Transformers, arXiv 2101.03961, Sec. 2.2;
    for expert choice, Zhou et al., arXiv 2202.09368, Sec. 3: tokens no expert picked). 0 when
    ``keep_TK`` is None.

    Args:
        keep_TK: (T, K) bool mask or None.
        expert_ids_TK: Only used for its device when ``keep_TK`` is None.

    Returns:
        A 0-d fp32 tensor.
    """
    if keep_TK is None:
        device = expert_ids_TK.device if expert_ids_TK is not None else None
        return torch.zeros((), device=device)
    return (~keep_TK.any(dim=-1)).float().mean()


def inner_balance(probs_TE: torch.Tensor) -> torch.Tensor:
    """Per-token "inner balance": top-1 score / top-2 score (>= 1; 1 = the two tie).

    RMoE paper (Qiu et al., arXiv 2408.06793), Table 8, which reports its median over tokens.
    The scores are the full-softmax probabilities ``probs_TE``, not the renormalised combine
    weights (the ratio is the same for softmax routers, but reading ``probs_TE`` keeps it defined
    for every router). +inf where the top-2 probability underflows to 0.

    Args:
        probs_TE: (T, E) router probabilities, E >= 2.

    Returns:
        (T,) fp32 ratios.
    """
    top_T2 = sorted_top_scores(probs_TE, 2)
    return top_T2[:, 0] / top_T2[:, 1]


def outer_balance(probs_TE: torch.Tensor, top_k: int) -> torch.Tensor:
    """Per-token "outer balance": the sum of the top-k router probabilities, in (0, 1].

    RMoE paper (Qiu et al., arXiv 2408.06793), Table 8 (median over tokens): how much of the
    router's mass the chosen experts get. Read from the full softmax ``probs_TE``: the
    renormalised combine weights always sum to 1 under ``norm_topk_prob``, so they cannot show it.

    Args:
        probs_TE: (T, E) router probabilities.
        top_k: K, the number of experts each token is routed to.

    Returns:
        (T,) fp32 sums.
    """
    return sorted_top_scores(probs_TE, top_k).sum(dim=-1)


def joint_histogram(x_T: torch.Tensor, y_T: torch.Tensor, num_x: int, num_y: int) -> torch.Tensor:
    """Counts of the pairs ``(x_t, y_t)``: an (num_x, num_y) int64 contingency table."""
    return torch.bincount(x_T * num_y + y_T, minlength=num_x * num_y).view(num_x, num_y)


def binned_probability_mi(
    probs_a_TE: torch.Tensor, probs_b_TE: torch.Tensor, num_bins: int = NUM_PROB_BINS
) -> torch.Tensor:
    """Per-token binned-probability MI between two layers (see :func:`binned_probability_mi_matrix`).

    Args:
        probs_a_TE: (T, E) probabilities of one layer.
        probs_b_TE: (T, E) probabilities of another layer.
        num_bins: Bins over [0, 1].

    Returns:
        (T,) fp64 per-token MI (nats); its mean is the matrix entry.
    """
    E = probs_a_TE.shape[-1]
    bins_2TE = bin_probabilities(torch.stack([probs_a_TE.float(), probs_b_TE.float()]), num_bins)
    eq_2TEE = bins_2TE[..., :, None] == bins_2TE[..., None, :]
    log_n_a_T = eq_2TEE[0].sum(-1).double().log().sum(-1)
    log_n_b_T = eq_2TEE[1].sum(-1).double().log().sum(-1)
    log_n_ab_T = (eq_2TEE[0] & eq_2TEE[1]).sum(-1).double().log().sum(-1)
    return (math.log(E) - (log_n_a_T + log_n_b_T - log_n_ab_T) / E).clamp_min(0.0)


def expert_path_diversity(top1_LT: torch.Tensor, num_experts: int) -> tuple[int, float]:
    """Number of distinct expert paths and the plug-in entropy (nats) of the path distribution.

    The expert-selection diversity through the depth (cf. the RMoE paper, Qiu et al., arXiv
    2408.06793, Sec. 5, which argues that the recurrent router diversifies expert selection): a
    token's path is the tuple of its top-1 expert ids over all MoE layers. One path: entropy 0;
    at most ``min(T, E^L)`` paths and ``ln min(T, E^L)`` nats.

    Args:
        top1_LT: (L, T) top-1 expert ids per layer.
        num_experts: E.

    Returns:
        (number of distinct paths, path entropy).
    """
    _, counts_N = unique_with_counts(path_keys(top1_LT, num_experts))
    return int(counts_N.numel()), float(entropy_from_counts(counts_N))
