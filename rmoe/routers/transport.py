"""Balanced assignment plans for routing: entropic (Sinkhorn) and squared-L2 (sparse) optimal transport.

Both solve, for router scores ``s`` (the logits, T x E), the regularised transport problem

    max_P  <P, s> - Omega(P)   subject to   P >= 0,  P 1_E = r = 1_T,  P^T 1_T = c = (T / E) 1_E,

i.e. every token sends one unit of mass and every expert receives the same T/E: a balanced
assignment ("Routers in Vision Mixture of Experts", Liu, Blondel, Riquelme, Puigcerver, arXiv
2401.15969, Sec. 3.1-3.2). Each is solved through its dual, by exact block-coordinate ascent: the
row potentials given the column ones, then the column potentials given the row ones, for a fixed
number of iterations (one iteration = one row update and one column update; it ends with the
column update, so the column sums are exact and the row sums carry the remaining error). No host
synchronisation, no data-dependent stopping, and no autograd through the iterations: the
potentials are computed under ``no_grad`` and the plan is then a differentiable function of the
scores with the potentials held fixed.

* :func:`sinkhorn_potentials`: ``Omega(P) = eps sum P log P`` (Cuturi, "Sinkhorn Distances",
  arXiv 1306.0895). The plan is ``P = exp(s / eps + f 1^T + 1 g^T)`` and the block updates are
  the Sinkhorn-Knopp scalings, here in the log domain (stable for any scale of the scores):
  ``f = log r - logsumexp_e(s / eps + g)``, ``g = log c - logsumexp_t(s / eps + f)``.
* :func:`sparse_potentials`: ``Omega(P) = (gamma / 2) ||P||^2`` (Blondel, Seguy, Rolet, "Smooth
  and Sparse Optimal Transport", AISTATS 2018, arXiv 1710.06276: the smoothed dual of their Sec. 3
  with the squared 2-norm, whose ``delta(x) = ||[x]_+||^2 / (2 gamma)`` and gradient
  ``[x]_+ / gamma`` they tabulate). With cost ``C = -s`` the dual is
  ``max_{alpha, beta} <alpha, r> + <beta, c> - sum_{t,e} [alpha_t + beta_e + s_te]_+^2 / (2 gamma)``,
  and the optimal plan is its gradient, ``P = [alpha 1^T + 1 beta^T + s]_+ / gamma``: sparse, since
  every entry below the threshold is exactly 0. Blondel et al. solve the dual with L-BFGS; we use
  its exact block-coordinate ascent (the Gauss-Seidel method for this dual of Lorenz, Manns,
  Meyer, "Quadratically Regularized Optimal Transport", arXiv 1903.01112), which needs no line
  search and no host synchronisation. With ``f = alpha / gamma``, ``g = beta / gamma``
  and ``z = s / gamma``: maximising over ``f_t`` alone sets row t's sum to ``r_t``, which is the
  Euclidean projection of ``z_t + g`` onto the simplex of mass ``r_t`` (``[z_t + g + f_t]_+``
  with ``-f_t`` its threshold); the column step is the same over tokens. Each projection is the
  sort-based algorithm of Held, Wolfe, Crowder (1974) / Duchi et al. (2008): sort, cumulative sum,
  the largest ``k`` with ``y_(k) > (sum_{j<=k} y_(j) - mass) / k``.

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

    Rows of the plan sum to 1 and columns to T/E (columns exactly after the last iteration).

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
    """``theta_N`` with ``sum_m [y_nm - theta_n]_+ = mass`` for every row: the threshold of the
    Euclidean projection of each row onto ``{x >= 0, sum x = mass}`` (mass > 0), sort-based."""
    sorted_NM = torch.sort(y_NM, dim=-1, descending=True).values
    cumsum_NM = torch.cumsum(sorted_NM, dim=-1)
    k_M = torch.arange(1, y_NM.shape[-1] + 1, device=y_NM.device, dtype=y_NM.dtype)
    support_NM = sorted_NM * k_M > cumsum_NM - mass  # True on a prefix of each row (never empty)
    rho_N1 = support_NM.sum(dim=-1, keepdim=True)
    return ((cumsum_NM.gather(-1, rho_N1 - 1) - mass) / rho_N1.to(y_NM.dtype)).squeeze(-1)


@torch.no_grad()
def sparse_potentials(scores_TE: torch.Tensor, num_iters: int, gamma: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Dual potentials ``(f_T, g_E)`` of the squared-L2 plan ``[s / gamma + f + g]_+``, by exact
    block-coordinate ascent on the smoothed dual (two simplex projections per iteration).

    Args:
        scores_TE: Router scores (logits), any dtype; computed in fp32.
        num_iters: Number of (row, column) update pairs, >= 1.
        gamma: Strength of the squared-L2 regularisation; smaller is sparser (gamma -> 0: the
            unregularised, vertex plan; large: a dense plan close to uniform).
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
