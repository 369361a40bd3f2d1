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


@torch.no_grad()
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


@torch.no_grad()
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
