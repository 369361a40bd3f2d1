"""Balance losses on the routers' decisions (one value per model, averaged over MoE layers).

Shape legend: T tokens, E experts, K top-k, L MoE layers.
"""

from __future__ import annotations

import torch

from rmoe.routers import RoutingOutput, tokens_per_expert


def expert_counts(routing: RoutingOutput, num_experts: int) -> torch.Tensor:
    """Chosen (token, expert) pairs per expert before any capacity drop: ``(E,)`` fp32, no gradient, on the
    probabilities' device."""
    device = routing.probs_TE.device
    chosen_TK = None if routing.chosen_TK is None else routing.chosen_TK.to(device)
    return tokens_per_expert(routing.expert_ids_TK.to(device), num_experts, chosen_TK).float()


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
        fraction_E = counts_E / counts_E.sum().clamp(min=1.0)  # a layer where no pair was chosen: 0, not NaN
    mean_prob_E = routing.probs_TE.float().mean(dim=0)
    return num_experts * torch.sum(fraction_E.to(mean_prob_E.device) * mean_prob_E)


def sequence_balancing_loss(routing: RoutingOutput, num_experts: int, num_sequences: int) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss (arXiv 2412.19437, Eqs. 17-20): :func:`load_balancing_loss` of
    each sequence's tokens alone, averaged over the B sequences. With ``f`` normalised to sum to 1 over experts,
    ``E * sum_e f_e P_e`` is DeepSeek's ``sum_i f_i P_i`` (their ``f_i`` carries the factor ``E / K``); ``P``
    is the mean of ``probs_TE``, which a sigmoid router normalises per token as DeepSeek's ``s'``."""
    probs_BSE = routing.probs_TE.float().view(num_sequences, -1, num_experts)
    B, S, E = probs_BSE.shape
    ids_BSK = routing.expert_ids_TK.to(probs_BSE.device).view(B, S, -1)
    chosen = (
        torch.ones_like(ids_BSK, dtype=probs_BSE.dtype)
        if routing.chosen_TK is None
        else routing.chosen_TK.to(probs_BSE.device).view(B, S, -1).to(probs_BSE.dtype)
    )
    counts_BE = torch.zeros(B, E, dtype=probs_BSE.dtype, device=probs_BSE.device)
    counts_BE.scatter_add_(1, ids_BSK.reshape(B, -1), chosen.reshape(B, -1))
    fraction_BE = counts_BE / counts_BE.sum(dim=-1, keepdim=True).clamp(min=1.0)
    return (E * (fraction_BE * probs_BSE.mean(dim=1)).sum(dim=-1)).mean()


def router_z_loss(routing: RoutingOutput) -> torch.Tensor:
    """ST-MoE router z-loss (Zoph et al., arXiv 2202.08906, Eq. 5): mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(routing.logits_TE.float(), dim=-1).pow(2).mean()


def average_over_layers(
    routing: list[RoutingOutput],
    num_experts: int,
    fraction_LE: torch.Tensor | None = None,
    num_sequences: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(load-balancing loss, z-loss, the routers' own loss), each the mean over the MoE layers; zeros for a dense
    model or a router without a loss of its own. ``fraction_LE``: per MoE layer, the ``f_e`` to use instead of
    each batch's own (see :func:`load_balancing_loss`); ``num_sequences``: the balance loss per sequence
    (:func:`sequence_balancing_loss`) over that many sequences."""
    zero = torch.zeros(())
    if not routing:
        return zero, zero, zero
    if num_sequences is not None:
        aux = torch.stack([sequence_balancing_loss(r, num_experts, num_sequences) for r in routing]).mean()
    else:
        fractions = [None] * len(routing) if fraction_LE is None else list(fraction_LE)
        losses = [load_balancing_loss(r, num_experts, f) for r, f in zip(routing, fractions, strict=True)]
        aux = torch.stack(losses).mean()
    z = torch.stack([router_z_loss(r) for r in routing]).mean()
    own = [r.router_loss for r in routing if r.router_loss is not None]
    router_loss = torch.stack(own).mean() if own else zero.to(z.device)
    return aux, z, router_loss
