"""Top-p routing (Huang et al., "Harder Tasks Need More Experts: Dynamic Routing in MoE Models", arXiv 2403.07652).

Each token takes its most probable experts until their probability mass reaches the threshold p, so a confident
token uses one expert and an uncertain one several::

    P_t = softmax(x_t W^T),   S_t = the smallest prefix of the experts sorted by P_t with sum_{e in S_t} P_te >= p

(at most ``top_k`` of them: ``model.arch.top_k`` is the number of slots; set it to E for no cap). The paper's dynamic
loss, the entropy of P averaged over tokens, pushes the router to be confident and so to use fewer experts; it is
this router's ``router_loss``, weighted by ``entropy_loss_coef`` (the paper: 1e-4). Combine weights are the chosen
probabilities, renormalised when ``model.arch.norm_topk_prob`` (the paper does not: ``configs/router/top_p.yaml``
sets it false). With ``bias_update_rate`` the order adds the balancing bias, the mass stays the unbiased one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rmoe.routers.base import CapacityOptions, RoutingOutput, TokenChoiceRouter, fp32_linear
from rmoe.routers.registry import register_router

if TYPE_CHECKING:
    from rmoe.routers.base import RouterContext


@dataclass
class TopPOptions(CapacityOptions):
    """Args:
    threshold: p, in (0, 1]: a token takes experts, most probable first, until their probabilities reach it
        (1: all ``top_k``).
    entropy_loss_coef: Weight of the dynamic loss (mean entropy of the router probabilities, nats); 0: off.
    """

    threshold: float = 0.4
    entropy_loss_coef: float = 1e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold={self.threshold} must be in (0, 1]")
        if self.entropy_loss_coef < 0:
            raise ValueError(f"entropy_loss_coef={self.entropy_loss_coef} must be >= 0 (0: off)")


@register_router("top_p")
class TopPRouter(TokenChoiceRouter):
    """Top-p routing: each token's most probable experts until their mass reaches ``threshold`` (module doc)."""

    Options = TopPOptions

    def __init__(self, config: RouterContext, layer_idx: int, shared: nn.Module | None = None) -> None:
        super().__init__(config, layer_idx, shared)
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))  # (E, D)

    def select(self, logits_TE: torch.Tensor, token_ids_BS: torch.Tensor | None = None) -> RoutingOutput:
        logits_TE = logits_TE.float()
        probs_TE = torch.softmax(logits_TE, dim=-1)
        choice_TE = probs_TE if self.balance_bias_E is None else probs_TE + self.balance_bias_E.float()
        expert_ids_TK = torch.topk(choice_TE, self.top_k, dim=-1).indices  # best first
        top_TK = probs_TE.gather(1, expert_ids_TK)
        chosen_TK = top_TK.cumsum(dim=-1) - top_TK < self.options.threshold  # the mass before it; the first: 0
        weights_TK = top_TK.masked_fill(~chosen_TK, 0.0)
        if self.config.norm_topk_prob:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        if self.training and self.balance_bias_E is not None:
            self._count_load(expert_ids_TK, chosen_TK)
        router_loss = None
        if self.options.entropy_loss_coef > 0:
            entropy_T = -(probs_TE * torch.log(probs_TE.clamp(min=torch.finfo(probs_TE.dtype).tiny))).sum(dim=-1)
            router_loss = self.options.entropy_loss_coef * entropy_T.mean()
        keep_TK = self.capacity_keep(expert_ids_TK, top_TK, token_ids_BS, chosen_TK)
        return RoutingOutput(
            logits_TE, probs_TE, weights_TK, expert_ids_TK, keep_TK, chosen_TK=chosen_TK, router_loss=router_loss
        )

    def forward(
        self, x_TD: torch.Tensor, state: Any, token_ids_BS: torch.Tensor | None = None
    ) -> tuple[RoutingOutput, Any]:
        return self.select(fp32_linear(x_TD, self.weight), token_ids_BS), state
