"""Balanced assignment plans for routing: entropic (Sinkhorn) and squared-L2 (sparse) optimal transport.

Both solve, for router scores ``s`` (the logits, T x E), the regularised transport problem

    max_P  <P, s> - Omega(P)   subject to   P >= 0,  P 1_E = r = 1_T,  P^T 1_T = c = (T / E) 1_E,

i.e. every token sends one unit of mass and every expert receives the same T/E: a balanced assignment ("Routers in
Vision Mixture of Experts", Liu, Blondel, Riquelme, Puigcerver, arXiv 2401.15969, Sec. 3.1-3.2). Each is solved
through its dual by exact block-coordinate ascent (row potentials given the column ones, then the reverse) for a
fixed number of iterations, ending with the column update: column sums are exact, row sums carry the remaining
error. No host sync, no data-dependent stopping, no autograd through the iterations: the potentials are computed
under ``no_grad`` and the plan is a differentiable function of the scores with the potentials held fixed.

* :func:`sinkhorn_potentials`: ``Omega(P) = eps sum P log P`` (Cuturi, "Sinkhorn Distances", arXiv 1306.0895).
  The plan is ``P = exp(s / eps + f 1^T + 1 g^T)``; the block updates are the Sinkhorn-Knopp scalings in the log
  domain (stable at any scale): ``f = log r - logsumexp_e(s / eps + g)``, ``g = log c - logsumexp_t(s / eps + f)``.
* :func:`sparse_potentials`: ``Omega(P) = (gamma / 2) ||P||^2`` (Blondel, Seguy, Rolet, "Smooth and Sparse Optimal
  Transport", AISTATS 2018, arXiv 1710.06276, Sec. 3). With cost ``C = -s`` the dual is
  ``max_{alpha, beta} <alpha, r> + <beta, c> - sum_{t,e} [alpha_t + beta_e + s_te]_+^2 / (2 gamma)`` and the plan
  its gradient, ``P = [alpha 1^T + 1 beta^T + s]_+ / gamma``: sparse, exactly 0 below the threshold. Instead of
  Blondel et al.'s L-BFGS, exact block-coordinate ascent (Gauss-Seidel; Lorenz, Manns, Meyer, arXiv 1903.01112):
  with ``f = alpha / gamma``, ``g = beta / gamma``, ``z = s / gamma``, the row step is the Euclidean projection of
  ``z_t + g`` onto the simplex of mass ``r_t`` (``-f_t`` its threshold), the column step the same over tokens, each
  by the sort-based algorithm of Held, Wolfe, Crowder (1974) / Duchi et al. (2008).

Shape legend: T tokens, E experts.
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def sinkhorn_potentials(
    scores_TE: torch.Tensor, num_iters: int, epsilon: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-domain Sinkhorn potentials ``(f_T, g_E)`` of the entropic plan ``exp(s/eps + f + g)``.

    Args:
        scores_TE: Router scores (logits), any dtype; computed in fp32.
        num_iters: Number of (row, column) update pairs, >= 1.
        epsilon: Entropic regularisation: the plan is Sinkhorn(exp(scores / epsilon)).
    """
    z_TE = scores_TE.detach().float() / epsilon
    T, E = z_TE.shape
    log_col_mass = math.log(T / E)
    g_E = z_TE.new_zeros(E)
    f_T = z_TE.new_zeros(T)
    for _ in range(num_iters):
        f_T = -torch.logsumexp(z_TE + g_E, dim=1)  # log r = log 1
        g_E = log_col_mass - torch.logsumexp(z_TE + f_T[:, None], dim=0)
    return f_T, g_E


def sinkhorn_plan(scores_TE: torch.Tensor, num_iters: int, epsilon: float = 1.0) -> torch.Tensor:
    """The entropic plan (T, E) in fp32; differentiable in the scores with the potentials fixed."""
    f_T, g_E = sinkhorn_potentials(scores_TE, num_iters, epsilon)
    return torch.exp(scores_TE.float() / epsilon + f_T[:, None] + g_E)


def simplex_threshold(y_NM: torch.Tensor, mass: float) -> torch.Tensor:
    """``theta_N`` with ``sum_m [y_nm - theta_n]_+ = mass`` for every row: the threshold of the Euclidean
    projection of each row onto ``{x >= 0, sum x = mass}`` (mass > 0), sort-based."""
    sorted_NM = torch.sort(y_NM, dim=-1, descending=True).values
    cumsum_NM = torch.cumsum(sorted_NM, dim=-1)
    k_M = torch.arange(1, y_NM.shape[-1] + 1, device=y_NM.device, dtype=y_NM.dtype)
    support_NM = sorted_NM * k_M > cumsum_NM - mass  # True on a prefix of each row (never empty)
    rho_N1 = support_NM.sum(dim=-1, keepdim=True)
    return ((cumsum_NM.gather(-1, rho_N1 - 1) - mass) / rho_N1.to(y_NM.dtype)).squeeze(-1)


@torch.no_grad()
def sparse_potentials(scores_TE: torch.Tensor, num_iters: int, gamma: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Dual potentials ``(f_T, g_E)`` of the squared-L2 plan ``[s / gamma + f + g]_+``, by exact block-coordinate
    ascent on the smoothed dual (two simplex projections per iteration).

    Args:
        scores_TE: Router scores (logits), any dtype; computed in fp32.
        num_iters: Number of (row, column) update pairs, >= 1.
        gamma: Strength of the squared-L2 regularisation; smaller is sparser (gamma -> 0: the unregularised,
            vertex plan; large: a dense plan close to uniform).
    """
    z_TE = scores_TE.detach().float() / gamma
    T, E = z_TE.shape
    col_mass = T / E
    g_E = z_TE.new_zeros(E)
    f_T = z_TE.new_zeros(T)
    for _ in range(num_iters):
        f_T = -simplex_threshold(z_TE + g_E, 1.0)
        g_E = -simplex_threshold((z_TE + f_T[:, None]).t(), col_mass)
    return f_T, g_E


def sparse_plan(scores_TE: torch.Tensor, num_iters: int, gamma: float = 1.0) -> torch.Tensor:
    """The squared-L2 (sparse) plan (T, E) in fp32; differentiable in the scores with the potentials fixed."""
    f_T, g_E = sparse_potentials(scores_TE, num_iters, gamma)
    return torch.relu(scores_TE.float() / gamma + f_T[:, None] + g_E)
