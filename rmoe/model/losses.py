"""Balance losses on the routers' decisions (one value per model, averaged over MoE layers).

Shape legend: T tokens, E experts, K top-k, L MoE layers.
"""

from __future__ import annotations

import torch

from rmoe.routers import RoutingOutput, tokens_per_expert


def expert_counts(routing: RoutingOutput, num_experts: int) -> torch.Tensor:
    """Routed (token, expert) assignments per expert before any capacity drop: ``(E,)`` fp32, no gradient, on the
    probabilities' device."""
    return tokens_per_expert(routing.expert_ids_TK.to(routing.probs_TE.device), num_experts).float()


def load_balancing_loss(
    routing: RoutingOutput, num_experts: int, fraction_E: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch/GShard auxiliary loss of one MoE layer, normalised so perfect balance gives 1.0.

    ``E * sum_e f_e * P_e`` (Switch Transformer, Fedus et al., arXiv 2101.03961, Eqs. 4-6), with ``f_e`` the
    fraction of the T*K routed assignments that went to expert e (so ``sum_e f_e = 1``) and ``P_e`` the mean router
    probability of e. Uniform routing gives 1.0 for any K, all tokens on one expert E. Only ``P_e`` carries gradient.

    ``fraction_E`` replaces this batch's ``f_e``: the global-batch loss of Qiu et al., "Demons in the Detail: On
    Implementing Load Balancing Loss for Training Specialized Mixture-of-Expert Models" (arXiv 2501.11873), passes
    the fractions counted over every data-parallel rank and micro-batch, while ``P_e`` stays this batch's mean;
    averaging the ranks' losses gives exactly ``E * sum_e f_e^global * P_e^global`` (equal batch sizes).

    transformers' ``load_balancing_loss_func`` divides the counts by T (a balanced layer scores K, not 1) and pools
    all layers before the product; here the product is per layer, averaged over layers.
    """
    if fraction_E is None:
        counts_E = expert_counts(routing, num_experts)
        fraction_E = counts_E / counts_E.sum()
    mean_prob_E = routing.probs_TE.float().mean(dim=0)
    return num_experts * torch.sum(fraction_E.to(mean_prob_E.device) * mean_prob_E)


def router_z_loss(routing: RoutingOutput) -> torch.Tensor:
    """ST-MoE router z-loss (Zoph et al., arXiv 2202.08906, Eq. 5): mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(routing.logits_TE.float(), dim=-1).pow(2).mean()


def average_over_layers(
    routing: list[RoutingOutput], num_experts: int, fraction_LE: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean load-balancing loss, mean z-loss) over the MoE layers; zeros for a dense model. ``fraction_LE``: per
    MoE layer, the ``f_e`` to use instead of each batch's own (see :func:`load_balancing_loss`)."""
    if not routing:
        zero = torch.zeros(())
        return zero, zero
    fractions = [None] * len(routing) if fraction_LE is None else list(fraction_LE)
    aux = torch.stack([load_balancing_loss(r, num_experts, f) for r, f in zip(routing, fractions, strict=True)]).mean()
    z = torch.stack([router_z_loss(r) for r in routing]).mean()
    return aux, z
