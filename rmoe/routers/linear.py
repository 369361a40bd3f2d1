"""Linear softmax top-k router (Switch / Mixtral / Qwen2-MoE)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rmoe.routers.base import Router, RoutingOutput, fp32_linear, topk_softmax
from rmoe.routers.registry import register_router


@register_router("linear")
class LinearRouter(Router):
    """``logits = x W^T`` (D -> E, no bias), fp32 softmax, top-k, optional renormalisation.

    Equal to transformers' ``Qwen2MoeTopKRouter`` (its ``weight`` has the same name and shape).
    The state passes through untouched.
    """

    def __init__(self, config, layer_idx, shared=None) -> None:  # noqa: ANN001 (see Router)
        super().__init__(config, layer_idx, shared)
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))  # (E, D)

    def forward(self, x_TD: torch.Tensor, state: Any) -> tuple[RoutingOutput, Any]:
        logits_TE = fp32_linear(x_TD, self.weight)
        return topk_softmax(logits_TE, self.top_k, self.config.norm_topk_prob), state
