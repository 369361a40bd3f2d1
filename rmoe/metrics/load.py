"""Per-layer expert-load metrics, as pure functions of the routed ids or of a load vector.

Shape legend: T tokens, E experts, K chosen experts per token (the width of ``expert_ids_TK``).
A "load" ``load_E`` is the number of routed (token, expert) assignments per expert, as returned
by :func:`rmoe.routers.tokens_per_expert` (re-exported here), or accumulated over batches by
:class:`rmoe.metrics.RoutingStats`.
Every function runs under ``torch.no_grad()`` and leaves its inputs untouched.
"""

from __future__ import annotations

import math

import torch

from rmoe.routers.base import tokens_per_expert  # noqa: F401  (re-exported: the one count)


@torch.no_grad()
@torch.no_grad()
def load_coefficient_of_variation(load_E: torch.Tensor) -> torch.Tensor:
    """Coefficient of variation ``std(load) / mean(load)`` with the population std (ddof 0).

    The usual imbalance measure of the MoE literature (Shazeer et al., "Outrageously Large Neural
    Networks: The Sparsely-Gated Mixture-of-Experts Layer", arXiv 1701.06538, Sec. 4, whose
    importance loss penalises the squared CV). 0 for a perfectly uniform load; ``sqrt(E - 1)`` when one expert
    takes everything. NaN for an empty load.

    Args:
        load_E: (E,) load, any dtype; leading batch dims allowed (reduces the last one).

    Returns:
        The CV, fp32 (shape of ``load_E`` without its last dim).
    """
    load = load_E.float()
    return load.std(dim=-1, correction=0) / load.mean(dim=-1)


@torch.no_grad()
def max_violation(load_E: torch.Tensor) -> torch.Tensor:
    """MaxVio ``(max_e load_e - mean load) / mean load``.

    The MaxVio metric of Wang et al. (DeepSeek-AI), "Auxiliary-Loss-Free Load Balancing Strategy
    for Mixture-of-Experts", arXiv 2408.15664 (their load-balance measure). 0 when
    balanced, E - 1 when one expert takes every assignment. NaN for an empty load.

    Args:
        load_E: (E,) load; leading batch dims allowed.

    Returns:
        MaxVio, fp32.
    """
    load = load_E.float()
    mean = load.mean(dim=-1)
    return (load.amax(dim=-1) - mean) / mean


@torch.no_grad()
def num_dead_experts(load_E: torch.Tensor) -> torch.Tensor:
    """Number of experts with a load of 0 (int64); leading batch dims allowed."""
    return (load_E == 0).sum(dim=-1)


@torch.no_grad()
def load_entropy(load_E: torch.Tensor) -> torch.Tensor:
    """Normalised entropy of the load distribution, ``H(load / sum load) / ln E`` in [0, 1].

    Shannon entropy (nats) of the fraction of assignments each expert receives, divided by its
    maximum ``ln E`` (Pielou's evenness index, Pielou 1966, J. Theor. Biol. 13, "The measurement
    of diversity in different types of biological collections"): 1 for a uniform load, 0 when a
    single expert gets everything. ``0 ln 0 = 0``.
    With E = 1 the value is defined as 1 (the only possible distribution is uniform).

    Args:
        load_E: (E,) load; leading batch dims allowed.

    Returns:
        The normalised entropy, fp32 (NaN for an empty load).
    """
    load = load_E.float()
    num_experts = load.shape[-1]
    entropy = torch.special.entr(load / load.sum(dim=-1, keepdim=True)).sum(dim=-1)
    if num_experts == 1:
        return torch.ones_like(entropy)
    return entropy / math.log(num_experts)
