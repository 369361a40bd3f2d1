"""Linear softmax top-k router (Switch / Mixtral / Qwen2-MoE)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rmoe.routers.base import RoutingOutput, TokenChoiceRouter, fp32_linear
from rmoe.routers.registry import register_router

if TYPE_CHECKING:
    from rmoe.routers.base import RouterContext


@register_router("linear")
class LinearRouter(TokenChoiceRouter):
    """``logits = x W^T`` (D -> E, no bias), fp32 softmax, top-k, optional renormalisation.

    Equal to transformers' ``Qwen2MoeTopKRouter`` (its ``weight`` has the same name and shape).
    The state passes through untouched. Options: :class:`~rmoe.routers.base.TokenChoiceOptions`.
    """

    def __init__(self, config: RouterContext, layer_idx: int, shared: nn.Module | None = None) -> None:
        super().__init__(config, layer_idx, shared)
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))  # (E, D)

    def forward(self, x_TD: torch.Tensor, state: Any) -> tuple[RoutingOutput, Any]:
        logits_TE = fp32_linear(x_TD, self.weight)
        return self.select(logits_TE), state
