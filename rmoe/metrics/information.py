"""Cross-layer information metrics: entropies, mutual information, the RMoE paper's binned-probability MI
matrix, and expert paths through the depth.

Shape legend: T tokens, E experts, L MoE layers, N distinct items (paths). Entropies and MI are in nats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

NUM_PROB_BINS = 100
"""Bins over [0, 1] of the RMoE paper's binned-probability MI (Qiu et al., arXiv 2408.06793, App. A.4.2)."""

_MAX_CODE = 2**62  # mixed-radix path codes stay below this (int64 with room to spare)


# Plug-in entropy and mutual information from counts


@torch.no_grad()
def entropy_from_counts(counts_N: torch.Tensor) -> torch.Tensor:
    """Plug-in Shannon entropy ``-sum p ln p`` of ``p = counts / sum(counts)`` over the last dim, (...,) fp64;
    0 for an empty histogram. Computed as ``ln n - sum c ln c / n`` (Cover & Thomas, Eq. 2.1)."""
    counts = counts_N.double()
    total = counts.sum(dim=-1)
    c_log_c = torch.special.xlogy(counts, counts).sum(dim=-1)
    safe_total = total.clamp_min(1.0)
    return torch.where(total > 0, safe_total.log() - c_log_c / safe_total, torch.zeros_like(total))


@torch.no_grad()
def mutual_information(joint_XY: torch.Tensor) -> torch.Tensor:
    """Plug-in mutual information ``I(X;Y) = H(X) + H(Y) - H(X,Y)`` of (..., X, Y) counts, (...,) fp64 nats
    (Cover & Thomas, Eq. 2.45), clamped at 0 against rounding. Biased upwards: for independent X, Y its
    expectation is about ``(|X| - 1)(|Y| - 1) / (2 n)`` (Miller 1955; Panzeri & Treves 1996, Network 7)."""
    h_x = entropy_from_counts(joint_XY.sum(dim=-1))
    h_y = entropy_from_counts(joint_XY.sum(dim=-2))
    h_xy = entropy_from_counts(joint_XY.flatten(-2))
    return (h_x + h_y - h_xy).clamp_min(0.0)


@torch.no_grad()
def normalized_mutual_information(joint_XY: torch.Tensor) -> torch.Tensor:
    """NMI ``2 I(X;Y) / (H(X) + H(Y))`` in [0, 1] of (..., X, Y) counts, (...,) fp64.

    The arithmetic-mean normalisation (scikit-learn's default; Vinh, Epps & Bailey, JMLR 11, 2010, NMI_sum)
    stays defined when one side is constant (NMI = 0); both constant gives 1, as in scikit-learn.
    """
    h_sum = entropy_from_counts(joint_XY.sum(dim=-1)) + entropy_from_counts(joint_XY.sum(dim=-2))
    mi = mutual_information(joint_XY)
    return torch.where(h_sum > 0, (2.0 * mi / h_sum.clamp_min(1e-300)).clamp(0.0, 1.0), torch.ones_like(h_sum))


@torch.no_grad()
def consecutive_joint_histograms(top1_LT: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Joint histograms of consecutive layers' top-1 expert ids, (L-1, E, E) int64: ``[l, a, b]`` counts the
    tokens whose top-1 expert is a at MoE layer l and b at l+1."""
    L, _ = top1_LT.shape
    E = num_experts
    if L < 2:
        return torch.zeros(0, E, E, dtype=torch.int64, device=top1_LT.device)
    pair_offset_L1 = torch.arange(L - 1, device=top1_LT.device)[:, None] * (E * E)
    codes = (pair_offset_L1 + top1_LT[:-1] * E + top1_LT[1:]).reshape(-1)
    return torch.bincount(codes, minlength=(L - 1) * E * E).view(L - 1, E, E)


# The RMoE paper's binned-probability MI (App. A.4.2)


@torch.no_grad()
def bin_probabilities(probs_TE: torch.Tensor, num_bins: int = NUM_PROB_BINS) -> torch.Tensor:
    """Equal-width bin index (int64) of each probability over [0, 1]: ``min(floor(p * bins), bins - 1)``
    (the last bin is closed, as in ``numpy.histogram``)."""
    return (probs_TE.float() * num_bins).floor().long().clamp(0, num_bins - 1)


def _byte_counts(words: torch.Tensor) -> torch.Tensor:
    """Sum of the 8 bytes of int64 words whose bytes are each 0 or 1 (shift-add, no overflow)."""
    s = words + (words >> 32)  # a new tensor: the in-place steps below never touch ``words``
    s += s >> 16
    s += s >> 8
    return s.bitwise_and_(0xFF)


@torch.no_grad()
def binned_log_count_sums(
    probs_LTE: torch.Tensor, num_bins: int = NUM_PROB_BINS, max_chunk_bytes: int = 1 << 25
) -> torch.Tensor:
    """Sufficient statistic of the binned-probability MI matrix, (L, L) fp64 symmetric:
    ``S[i, j] = sum_t sum_e ln n_ij(t, e)``, where ``n_ij(t, e)`` counts the experts f whose probability is
    in the same bin as expert e's at layer i *and* at layer j. Sums over batches add up.

    No (T, bins, bins) histogram: each layer's (T, E, E) bool matrix "f shares e's bin" is viewed as int64
    words (one byte per expert), so "same bin at i and at j" is one AND per word and ``n_ij`` a byte count.
    ``max_chunk_bytes`` bounds the memory of those matrices.
    """
    bins_LTE = bin_probabilities(probs_LTE, num_bins)
    bins_LTE = bins_LTE.to(torch.uint8 if num_bins <= 256 else torch.int32)  # cheaper comparisons
    L, T, E = bins_LTE.shape
    num_words = -(-E // 8)
    pad = 8 * num_words - E
    log_n = torch.arange(E + 1, device=probs_LTE.device).float().clamp_min(1.0).log()  # ln n, n = 0..E
    sums_LL = torch.zeros(L, L, dtype=torch.float64, device=probs_LTE.device)
    chunk = max(1, max_chunk_bytes // (L * E * 8 * num_words))
    for start in range(0, T, chunk):
        b_LtE = bins_LTE[:, start : start + chunk]
        same_LtEE = b_LtE[..., :, None] == b_LtE[..., None, :]
        if pad:
            same_LtEE = torch.cat([same_LtEE, same_LtEE.new_zeros(*same_LtEE.shape[:-1], pad)], dim=-1)
        words_LtEW = same_LtEE.view(torch.int64)  # byte f of word w: expert 8w + f shares e's bin
        for i in range(L):
            n_JtEW = _byte_counts(words_LtEW[i][None] & words_LtEW[i:])
            n_JtE = n_JtEW.squeeze(-1) if num_words == 1 else n_JtEW.sum(dim=-1)
            sums_J = log_n[n_JtE].sum(dim=(1, 2), dtype=torch.float64)
            sums_LL[i, i:] += sums_J
            sums_LL[i + 1 :, i] += sums_J[1:]
    return sums_LL


@torch.no_grad()
def binned_mi_from_log_count_sums(sums_LL: torch.Tensor, num_tokens: int, num_experts: int) -> torch.Tensor:
    """Token-averaged binned MI matrix from :func:`binned_log_count_sums` over ``num_tokens`` tokens.

    With E samples per token, ``H_i(t) = ln E - (1/E) sum_e ln n_ii(t, e)`` (likewise ``H_ij``), so the mean
    of ``I_ij(t) = H_i + H_j - H_ij`` is ``ln E - (S_ii + S_jj - S_ij) / (T E)``.
    """
    diag_L = sums_LL.diagonal()
    mi_LL = math.log(num_experts) - (diag_L[:, None] + diag_L[None, :] - sums_LL) / (num_tokens * num_experts)
    mi_LL = mi_LL.clamp_min(0.0)
    return (mi_LL + mi_LL.T) / 2  # exactly symmetric


@torch.no_grad()
def binned_probability_mi_matrix(
    probs: Sequence[torch.Tensor] | torch.Tensor, num_bins: int = NUM_PROB_BINS
) -> torch.Tensor:
    """The RMoE paper's cross-layer MI of router probabilities (Qiu et al., arXiv 2408.06793, App. A.4.2, the
    heat map of Sec. 5): (L, L) fp64 nats, symmetric, on the inputs' device.

    Probabilities are binned into ``num_bins`` (the paper: 100) equal-width bins over [0, 1]. Our reading of
    the paper: for one token, the E binned probabilities of layers i and j are E paired samples
    ``(x_e, y_e)``; ``I_ij(t)`` is the plug-in MI of their joint histogram (as ``sklearn``'s
    ``mutual_info_score``); the entry is its mean over tokens. The diagonal is the mean binned entropy;
    every entry is at most ln E. With only E samples per token the estimate is strongly biased upwards
    (independent random layers score well above 0): compare entries, not against 0.

    Args:
        probs: L tensors (T, E) (e.g. ``[r.probs_TE for r in routing]``) or one (L, T, E) tensor.
    """
    probs_LTE = probs if isinstance(probs, torch.Tensor) else torch.stack([p.float() for p in probs])
    _, T, E = probs_LTE.shape
    return binned_mi_from_log_count_sums(binned_log_count_sums(probs_LTE, num_bins), T, E)


# Expert paths through the depth


@torch.no_grad()
def path_keys(top1_LT: torch.Tensor, num_experts: int) -> torch.Tensor:
    """A key per token for its path (its top-1 experts over the L layers): the mixed-radix code
    ``sum_l id_l E^(L-1-l)`` (T,) int64 when ``E^L <= 2^62``, else the rows (T, L) (unique with ``dim=0``)."""
    L, T = top1_LT.shape
    if num_experts**L > _MAX_CODE:
        return top1_LT.T.contiguous()
    code_T = torch.zeros(T, dtype=torch.int64, device=top1_LT.device)
    for l in range(L):  # Horner
        code_T = code_T * num_experts + top1_LT[l]
    return code_T


@torch.no_grad()
def unique_with_counts(keys: torch.Tensor, counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct keys (codes (N,) or rows (N, L)) and how often each occurs (or their summed ``counts``)."""
    if counts is None:
        return torch.unique(keys, dim=0 if keys.dim() == 2 else None, return_counts=True)
    unique_keys, inverse = torch.unique(keys, dim=0 if keys.dim() == 2 else None, return_inverse=True)
    totals = torch.zeros(unique_keys.shape[0], dtype=torch.int64, device=keys.device)
    return unique_keys, totals.index_add_(0, inverse, counts.long())
