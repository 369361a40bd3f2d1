"""Two-layer MLP router (the "SMoE-MLP" baseline of RMoE, Qiu et al., arXiv 2408.06793)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from rmoe.routers.base import CapacityOptions, RoutingOutput, TokenChoiceRouter, fp32_linear
from rmoe.routers.registry import register_router

if TYPE_CHECKING:
    from rmoe.routers.base import RouterContext


@dataclass
class MlpOptions(CapacityOptions):
    """Args:
    hidden_dim: Width H of the hidden layer (128: the per-layer parameters of RMoE's projector + gate).
    """

    hidden_dim: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden_dim <= 0:
            raise ValueError(f"hidden_dim={self.hidden_dim} must be a positive integer")


@register_router("mlp")
class MlpRouter(TokenChoiceRouter):
    """``logits = W2 gelu(W1 x)`` (D -> H -> E, no biases), in fp32, then softmax top-k."""

    Options = MlpOptions

    def __init__(self, config: RouterContext, layer_idx: int, shared: nn.Module | None = None) -> None:
        super().__init__(config, layer_idx, shared)
        self.up_proj = nn.Parameter(torch.empty(self.options.hidden_dim, config.hidden_size))  # (H, D)
        self.out_proj = nn.Parameter(torch.empty(config.num_experts, self.options.hidden_dim))  # (E, H)

    @classmethod
    def saved_bytes(cls, config: RouterContext, num_tokens: int, num_sequences: int, act_bytes: int) -> int:
        """The fp32 hidden layer before and after the GELU, and its gradient's input (T, H) x 3."""
        return 3 * num_tokens * config.options.hidden_dim * 4

    def forward(
        self, x_TD: torch.Tensor, state: Any, token_ids_BS: torch.Tensor | None = None
    ) -> tuple[RoutingOutput, Any]:
        hidden_TH = F.gelu(fp32_linear(x_TD, self.up_proj))
        logits_TE = fp32_linear(hidden_TH, self.out_proj)
        return self.select(logits_TE, token_ids_BS), state
