"""Per-layer expert-load metrics of a load ``load_E``: the routed (token, expert) assignments per expert, from
:func:`rmoe.routers.tokens_per_expert` (re-exported here). Leading batch dims are allowed (the last is reduced).
"""

from __future__ import annotations

import math

import torch

from rmoe.routers.base import tokens_per_expert  # noqa: F401  (re-exported: the one count)


@torch.no_grad()
def load_coefficient_of_variation(load_E: torch.Tensor) -> torch.Tensor:
    """Coefficient of variation ``std(load) / mean(load)`` (population std), fp32: 0 for a uniform load,
    ``sqrt(E - 1)`` when one expert takes everything, NaN for an empty load. The usual imbalance measure
    (Shazeer et al., arXiv 1701.06538, Sec. 4, whose importance loss penalises the squared CV)."""
    load = load_E.float()
    return load.std(dim=-1, correction=0) / load.mean(dim=-1)


@torch.no_grad()
def max_violation(load_E: torch.Tensor) -> torch.Tensor:
    """MaxVio ``(max_e load_e - mean load) / mean load``, fp32 (Wang et al., "Auxiliary-Loss-Free Load
    Balancing", arXiv 2408.15664): 0 when balanced, E - 1 when one expert takes all, NaN for an empty load."""
    load = load_E.float()
    mean = load.mean(dim=-1)
    return (load.amax(dim=-1) - mean) / mean


@torch.no_grad()
def num_dead_experts(load_E: torch.Tensor) -> torch.Tensor:
    """Number of experts with a load of 0 (int64)."""
    return (load_E == 0).sum(dim=-1)


@torch.no_grad()
def load_entropy(load_E: torch.Tensor) -> torch.Tensor:
    """Normalised entropy ``H(load / sum load) / ln E`` in [0, 1], fp32 (Pielou's evenness, J. Theor. Biol. 13,
    1966): 1 for a uniform load (and for E = 1), 0 when one expert gets everything, NaN for an empty load."""
    load = load_E.float()
    num_experts = load.shape[-1]
    entropy = torch.special.entr(load / load.sum(dim=-1, keepdim=True)).sum(dim=-1)
    if num_experts == 1:
        return torch.ones_like(entropy)
    return entropy / math.log(num_experts)
