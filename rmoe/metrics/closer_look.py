"""The analyses of "A Closer Look into Mixture-of-Experts in Large Language Models" (Lo et al., arXiv 2406.18219),
as pure functions on tensors; formulas as in the authors' notebooks (github.com/kamanphoebe/Look-into-MoEs,
``static_analysis.ipynb`` and ``dynamic_analysis.ipynb``).

Shape legend: T tokens, D model width, F expert width (neurons), E experts, M the three expert matrices
in the paper's order (up ``w3``, gate ``w1``, down ``w2``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

MATRICES = ("up", "gate", "down")
"""The expert matrices in the order of the paper's figures (``w3``, ``w1``, ``w2``)."""


def expert_matrices(gate_up_proj_E2FD: torch.Tensor, down_proj_EDF: torch.Tensor) -> dict[str, torch.Tensor]:
    """Our 3-D expert weights as the paper's three matrices (E, F, D), one row per neuron: ``up`` and ``gate``
    (rows of ``w3``, ``w1``) and ``down`` (the columns of ``w2`` (D, F))."""
    gate_EFD, up_EFD = gate_up_proj_E2FD.float().chunk(2, dim=1)
    return {"up": up_EFD, "gate": gate_EFD, "down": down_proj_EDF.float().transpose(1, 2)}


@torch.no_grad()
def all_expert_outputs(
    x_TD: torch.Tensor, gate_up_proj_E2FD: torch.Tensor, down_proj_EDF: torch.Tensor
) -> torch.Tensor:
    """Every SwiGLU expert on every token, unweighted: ``y_e(x) = W2_e (silu(W1_e x) * W3_e x)``, ``y_ETD`` fp32
    (the paper sets top-k to E to record them)."""
    gate_up_ET2F = torch.einsum("td,efd->etf", x_TD.float(), gate_up_proj_E2FD.float())
    gate_ETF, up_ETF = gate_up_ET2F.chunk(2, dim=-1)
    return torch.einsum("etf,edf->etd", F.silu(gate_ETF) * up_ETF, down_proj_EDF.float())


def _ranks(values_TE: torch.Tensor) -> torch.Tensor:
    """Rank of each entry in its row, 0 = largest (ties broken by the lower expert index)."""
    order_TE = torch.sort(values_TE, dim=-1, descending=True, stable=True).indices
    ranks_TE = torch.empty_like(order_TE)
    ranks_TE.scatter_(1, order_TE, torch.arange(values_TE.shape[1], device=values_TE.device).expand_as(order_TE))
    return ranks_TE


@torch.no_grad()
def score_norm_rank_counts(scores_TE: torch.Tensor, output_norms_TE: torch.Tensor) -> torch.Tensor:
    """The paper's norm-score rank counts (Sec. 4.2): per token, rank the E experts by gate score and by
    their output norm ``||y_e(x)||``; count ``counts[score rank, norm rank]`` over (token, expert) pairs.

    Ranks are 0 = largest (the authors' cell (i, j) is our (E-1-i, E-1-j)). Mass on the diagonal: the
    router scores experts in the order of their output norms. ``scores_TE``: logits or probabilities
    (same ranking for softmax routers). Returns (E, E) int64; each row and column sums to T.
    """
    E = scores_TE.shape[1]
    flat = _ranks(scores_TE.float()) * E + _ranks(output_norms_TE.float())
    return torch.bincount(flat.reshape(-1), minlength=E * E).view(E, E)


@torch.no_grad()
def angular_similarity(a_ND: torch.Tensor, b_MD: torch.Tensor) -> torch.Tensor:
    """``1 - arccos(cos(a, b)) / pi`` for every pair of rows: (N, M) in [0, 1] (0.5: orthogonal), as the
    authors' ``get_angular_similarity``."""
    cos = F.normalize(a_ND.float(), dim=-1) @ F.normalize(b_MD.float(), dim=-1).T
    return 1.0 - torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


@torch.no_grad()
def expert_output_similarity(y_ETD: torch.Tensor) -> torch.Tensor:
    """The paper's expert-output similarity (Sec. 4.1): the angular similarity of every pair of experts'
    outputs, summed over tokens: (E, E) fp64, diagonal exactly T (the authors fill it with 1 per token
    to avoid arccos's rounding at 1). Divide by T for the average heat map."""
    E, T, _ = y_ETD.shape
    y_TED = F.normalize(y_ETD.float().transpose(0, 1), dim=-1)
    cos_TEE = (y_TED @ y_TED.transpose(1, 2)).clamp(-1.0, 1.0)
    sim_TEE = 1.0 - torch.arccos(cos_TEE) / math.pi
    sim_EE = sim_TEE.double().sum(dim=0)
    return sim_EE.fill_diagonal_(float(T))


@torch.no_grad()
def averaged_neuron_similarity(gate_up_proj_E2FD: torch.Tensor, down_proj_EDF: torch.Tensor) -> torch.Tensor:
    """Neuron-level expert similarity by averaging (Sec. 3.1): the cosine of every pair of experts' matrices
    averaged over their F neurons, (M, E, E) fp32 in :data:`MATRICES` order."""
    mats = expert_matrices(gate_up_proj_E2FD, down_proj_EDF)
    out = []
    for name in MATRICES:
        mean_ED = F.normalize(mats[name].mean(dim=1), dim=-1)
        out.append(mean_ED @ mean_ED.T)
    return torch.stack(out)


def linear_sum_assignment_max(score_NN: np.ndarray) -> np.ndarray:
    """The permutation ``p`` (N,) int64 maximising ``sum_i score[i, p[i]]``, exactly (scipy's
    ``linear_sum_assignment``, the Hungarian algorithm of Crouse, IEEE TAES 2016)."""
    from scipy.optimize import linear_sum_assignment

    return np.asarray(linear_sum_assignment(score_NN, maximize=True)[1], dtype=np.int64)


def kendall_tau(permutation_N: np.ndarray) -> float:
    """Kendall's tau between a permutation and the identity, ``(concordant - discordant) / (N(N-1)/2)``
    (= ``scipy.stats.kendalltau(p, arange(N))``, which the authors use): 1 same order, -1 reversed."""
    p = np.asarray(permutation_N, dtype=np.int64)
    n = p.shape[0]
    if n < 2:
        return float("nan")
    upper = np.triu(np.ones((n, n), dtype=bool), k=1)
    sign = np.sign(p[None, :] - p[:, None])[upper]
    return float(sign.sum() / upper.sum())


@torch.no_grad()
def reordered_neuron_similarity(
    gate_up_proj_E2FD: torch.Tensor, down_proj_EDF: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neuron-level expert similarity by reordering (Sec. 3.1): for each pair of experts (j, k) and matrix,
    permute k's neurons to maximise the trace of their F x F cosine similarity with j's (Hungarian
    algorithm), then take the cosine of the flattened matrices and Kendall's tau of the permutation.

    Returns ``(similarity_MEE, kendall_tau_MEE)`` fp32, diagonals 1 (as the authors set them).
    """
    mats = expert_matrices(gate_up_proj_E2FD, down_proj_EDF)
    E = gate_up_proj_E2FD.shape[0]
    sims = torch.ones(len(MATRICES), E, E)
    taus = torch.ones(len(MATRICES), E, E)
    for m, name in enumerate(MATRICES):
        w_EFD = mats[name]
        unit_EFD = F.normalize(w_EFD, dim=-1)
        for j in range(E):
            for k in range(j + 1, E):
                neuron_sim_FF = (unit_EFD[j] @ unit_EFD[k].T).double().cpu().numpy()
                perm_F = linear_sum_assignment_max(neuron_sim_FF)
                permuted_FD = w_EFD[k][torch.as_tensor(perm_F, device=w_EFD.device)]
                sims[m, j, k] = sims[m, k, j] = F.cosine_similarity(w_EFD[j].flatten(), permuted_FD.flatten(), dim=0)
                taus[m, j, k] = taus[m, k, j] = kendall_tau(perm_F)
    return sims, taus


@torch.no_grad()
def gate_embedding_similarity(gate_embeddings_EH: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every pair of gate embeddings (Sec. 3.2), the router's output-matrix rows
    (linear: ``weight`` (E, D); RMoE: the head ``G_i`` (E, p)): (E, E) fp32."""
    unit_EH = F.normalize(gate_embeddings_EH.float(), dim=-1)
    return unit_EH @ unit_EH.T


@torch.no_grad()
def squared_pearson_offdiagonal(a_EE: torch.Tensor, b_EE: torch.Tensor) -> float:
    """The paper's Table 3 statistic: the squared Pearson correlation (R^2) between the strictly
    lower-triangular entries of two similarity matrices. NaN for E < 3 or a constant."""
    E = a_EE.shape[0]
    rows, cols = torch.tril_indices(E, E, offset=-1)
    x, y = a_EE[rows, cols].double(), b_EE[rows, cols].double()
    if x.numel() < 2:
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    denom = float(x.square().sum().sqrt() * y.square().sum().sqrt())
    return float((x * y).sum()) ** 2 / denom**2 if denom > 0 else float("nan")


__all__ = [
    "MATRICES",
    "all_expert_outputs",
    "angular_similarity",
    "averaged_neuron_similarity",
    "expert_matrices",
    "expert_output_similarity",
    "gate_embedding_similarity",
    "kendall_tau",
    "linear_sum_assignment_max",
    "reordered_neuron_similarity",
    "score_norm_rank_counts",
    "squared_pearson_offdiagonal",
]
