"""Balance losses on the routers' decisions (one value per model, averaged over MoE layers)."""

from __future__ import annotations

import torch

from rmoe.routers import RoutingOutput


def load_balancing_loss(routing: RoutingOutput, num_experts: int) -> torch.Tensor:
    """Switch/GShard auxiliary loss of one MoE layer, normalised so perfect balance gives 1.0.

    ``E * sum_e f_e * P_e`` (Switch Transformer, Fedus et al., arXiv 2101.03961, Eqs. 4-6), with
    ``f_e`` the fraction of the T*K routed (token, expert) assignments that went to expert e
    (normalised by top-k, so ``sum_e f_e = 1``) and ``P_e`` the mean router probability of e.
    Uniform routing gives exactly 1.0 for any K; all tokens on one expert gives E.
    Only ``P_e`` carries gradient (``f_e`` comes from a top-k).

    transformers' ``load_balancing_loss_func`` differs in two ways: it divides the counts by T (not
    T*K), so a balanced layer scores K rather than 1, and it pools the assignments of all layers
    before taking the product, whereas we take the product per layer and average over layers.
    """
    T, K = routing.expert_ids_TK.shape
    counts_E = torch.zeros(num_experts, device=routing.probs_TE.device, dtype=torch.float32)
    counts_E.scatter_add_(0, routing.expert_ids_TK.reshape(-1), torch.ones(T * K, device=counts_E.device))
    fraction_E = counts_E / (T * K)
    mean_prob_E = routing.probs_TE.float().mean(dim=0)
    return num_experts * torch.sum(fraction_E * mean_prob_E)


def router_z_loss(routing: RoutingOutput) -> torch.Tensor:
    """ST-MoE router z-loss (Zoph et al., arXiv 2202.08906, Eq. 5): mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(routing.logits_TE.float(), dim=-1).pow(2).mean()


def average_over_layers(routing: list[RoutingOutput], num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean load-balancing loss, mean z-loss) over the MoE layers; zeros for a dense model."""
    if not routing:
        zero = torch.zeros(())
        return zero, zero
    aux = torch.stack([load_balancing_loss(r, num_experts) for r in routing]).mean()
    z = torch.stack([router_z_loss(r) for r in routing]).mean()
    return aux, z
