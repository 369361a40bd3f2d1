"""The analyses of "A Closer Look into Mixture-of-Experts in Large Language Models" (Lo et al.,
arXiv 2406.18219; formulas as in the authors' notebooks, github.com/kamanphoebe/Look-into-MoEs,
``static_analysis.ipynb`` and ``dynamic_analysis.ipynb``), as pure functions on tensors.

- dynamic: every expert run on every token (:func:`all_expert_outputs`); the gate-score rank vs
  output-norm rank count matrix (:func:`score_norm_rank_counts`, Sec. 4.2); the angular
  similarity of the experts' outputs (:func:`expert_output_similarity`, Sec. 4.1);
- static: the experts' weight similarity at the neuron level, by averaging the neurons
  (:func:`averaged_neuron_similarity`, Sec. 3.1) or by matching them with the Hungarian
  algorithm (:func:`reordered_neuron_similarity`, with Kendall's tau of the matching), and the
  gate-embedding similarity with its squared Pearson correlation against the expert similarities
  (:func:`gate_embedding_similarity`, :func:`squared_pearson_offdiagonal`, Sec. 3.2, Table 3).

Shape legend: T tokens, D model width, F expert width (neurons), E experts, M the three expert
matrices in the paper's order (up ``w3``, gate ``w1``, down ``w2``).
Everything runs under ``torch.no_grad()`` and leaves its inputs untouched.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

MATRICES = ("up", "gate", "down")
"""The expert matrices in the order of the paper's figures (``w3``, ``w1``, ``w2``)."""


def expert_matrices(gate_up_proj_E2FD: torch.Tensor, down_proj_EDF: torch.Tensor) -> dict[str, torch.Tensor]:
    """Our 3-D expert weights as the paper's three matrices, one row per neuron: ``up`` and ``gate``
    (E, F, D) (rows of ``w3``, ``w1``) and ``down`` (E, F, D) (the columns of ``w2`` (D, F))."""
    gate_EFD, up_EFD = gate_up_proj_E2FD.float().chunk(2, dim=1)
    return {"up": up_EFD, "gate": gate_EFD, "down": down_proj_EDF.float().transpose(1, 2)}


@torch.no_grad()
def all_expert_outputs(
    x_TD: torch.Tensor, gate_up_proj_E2FD: torch.Tensor, down_proj_EDF: torch.Tensor
) -> torch.Tensor:
    """Every SwiGLU expert applied to every token, unweighted: ``y_e(x) = W2_e (silu(W1_e x) * W3_e x)``.

    Returns:
        ``y_ETD`` (E, T, D) fp32 (the paper sets top-k to E to record them).
    """
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
    """The paper's norm-score rank counting (Sec. 4.2, Fig. "rank count"): per token, rank the E
    experts by gate score and by the norm of their output ``||y_e(x)||``, and count
    ``counts[score rank, norm rank]`` over (token, expert) pairs.

    Ranks are 0 = largest (the authors' code counts ascending ranks, rank E-1 = largest: their
    cell (i, j) is our (E-1-i, E-1-j)). Mass on the diagonal means the router scores experts in
    the order of their output norms (its finding on Mixtral: the expert with the i-th largest norm
    is most likely to get the i-th highest score); a router whose scores are the norms gives a
    diagonal matrix.

    Args:
        scores_TE: Router scores (logits or probabilities: the same ranking for softmax routers).
        output_norms_TE: ``||y_e(x_t)||`` (:func:`all_expert_outputs`, norm over D).

    Returns:
        (E, E) int64; each row and column sums to T.
    """
    E = scores_TE.shape[1]
    flat = _ranks(scores_TE.float()) * E + _ranks(output_norms_TE.float())
    return torch.bincount(flat.reshape(-1), minlength=E * E).view(E, E)


@torch.no_grad()
def angular_similarity(a_ND: torch.Tensor, b_MD: torch.Tensor) -> torch.Tensor:
    """``1 - arccos(cos(a, b)) / pi`` for every pair of rows: (N, M) in [0, 1] (1: same direction,
    0.5: orthogonal, 0: opposite), as the authors' ``get_angular_similarity``."""
    cos = F.normalize(a_ND.float(), dim=-1) @ F.normalize(b_MD.float(), dim=-1).T
    return 1.0 - torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


@torch.no_grad()
def expert_output_similarity(y_ETD: torch.Tensor) -> torch.Tensor:
    """The paper's expert-output similarity (Sec. 4.1): per token, the angular similarity of every
    pair of experts' outputs, summed over tokens (divide by T for the average heat map).

    Returns:
        (E, E) fp64 sum over the T tokens, diagonal exactly T (the authors fill it with 1 per token
        to avoid arccos's rounding at 1). Identical experts give T everywhere.
    """
    E, T, _ = y_ETD.shape
    y_TED = F.normalize(y_ETD.float().transpose(0, 1), dim=-1)
    cos_TEE = (y_TED @ y_TED.transpose(1, 2)).clamp(-1.0, 1.0)
    sim_TEE = 1.0 - torch.arccos(cos_TEE) / math.pi
    sim_EE = sim_TEE.double().sum(dim=0)
    return sim_EE.fill_diagonal_(float(T))


@torch.no_grad()
def averaged_neuron_similarity(gate_up_proj_E2FD: torch.Tensor, down_proj_EDF: torch.Tensor) -> torch.Tensor:
    """Neuron-level expert similarity by averaging (Sec. 3.1, "neuron-level", averaging): each
    expert matrix is averaged over its F neurons (``mean(w1, dim=0)``, ``mean(w2, dim=1)`` in the
    authors' layout) to one D-vector, and the cosine of every pair of experts is taken.

    Returns:
        (M, E, E) fp32 cosine matrices for up, gate, down (:data:`MATRICES`); identical experts give 1.
    """
    mats = expert_matrices(gate_up_proj_E2FD, down_proj_EDF)
    out = []
    for name in MATRICES:
        mean_ED = F.normalize(mats[name].mean(dim=1), dim=-1)
        out.append(mean_ED @ mean_ED.T)
    return torch.stack(out)


def linear_sum_assignment_max(score_NN: np.ndarray) -> np.ndarray:
    """The permutation ``p`` maximising ``sum_i score[i, p[i]]`` (the assignment problem), exactly.

    scipy's ``linear_sum_assignment`` (the shortest-augmenting-path Hungarian algorithm of Crouse,
    IEEE TAES 2016), maximising.

    Args:
        score_NN: A square matrix of finite scores.

    Returns:
        ``p`` (N,) int64: row i is matched to column p[i].
    """
    from scipy.optimize import linear_sum_assignment

    return np.asarray(linear_sum_assignment(score_NN, maximize=True)[1], dtype=np.int64)


def kendall_tau(permutation_N: np.ndarray) -> float:
    """Kendall's tau between a permutation and the identity, ``(concordant - discordant) / (N(N-1)/2)``
    (no ties: it equals ``scipy.stats.kendalltau(p, arange(N)).statistic``, which the authors use).
    1: neurons matched in their own order; -1: reversed; about 0: unrelated orders."""
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
    """Neuron-level expert similarity by reordering (Sec. 3.1, "neuron-level", reordering): for each
    pair of experts (j, k) and each matrix, the F x F cosine similarity of their neurons, the
    permutation of k's neurons that maximises its trace (Hungarian algorithm,
    :func:`linear_sum_assignment_max`), then the cosine of j's flattened matrix with k's permuted
    one, and Kendall's tau of the permutation.

    Returns:
        ``(similarity_MEE, kendall_tau_MEE)`` fp32, diagonals 1 (as the authors set them). Experts
        that are the same neurons in another order give similarity 1 and the tau of that order.
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
    """Cosine similarity of every pair of gate embeddings (Sec. 3.2): the rows of the router's
    output matrix, one per expert (our linear router's ``weight`` (E, D); for RMoE the head
    ``G_i`` (E, p) on the GRU state). (E, E) fp32."""
    unit_EH = F.normalize(gate_embeddings_EH.float(), dim=-1)
    return unit_EH @ unit_EH.T


@torch.no_grad()
def squared_pearson_offdiagonal(a_EE: torch.Tensor, b_EE: torch.Tensor) -> float:
    """The paper's Table 3 statistic: the squared Pearson correlation (R^2 of the linear regression)
    between the strictly lower-triangular entries of two similarity matrices (e.g. gate-embedding
    similarity vs the averaged-neuron similarity of the gate matrices). NaN for E < 3 or a constant."""
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
