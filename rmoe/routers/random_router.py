"""Frozen random linear router (RandomSMoE: Chen et al., "Sparse MoE as the New Dropout", arXiv 2303.01610)."""

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
class RandomOptions(CapacityOptions):
    """Args:
    init_std: Std of the frozen Normal weights (None: ``model.arch.initializer_range``). Only the combine weights
        depend on it, not the top-k.
    """

    init_std: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_std is not None and self.init_std <= 0:
            raise ValueError(f"init_std={self.init_std} must be > 0 (or null for model.arch.initializer_range)")


@register_router("random")
class RandomRouter(TokenChoiceRouter):
    """A linear router whose weight ``(E, D)`` is drawn once and never trained.

    The weight is a persistent buffer (saved in checkpoints), drawn from the global torch RNG: reproducible from
    the run's seed.
    """

    Options = RandomOptions

    def __init__(self, config: RouterContext, layer_idx: int, shared: nn.Module | None = None) -> None:
        super().__init__(config, layer_idx, shared)
        self.register_buffer("weight", torch.empty(config.num_experts, config.hidden_size), persistent=True)

    @classmethod
    def extra_flops_per_token(cls, config: RouterContext, seq_len: int) -> float:
        """The logits' product with a weight that is not a parameter, 2 * D * E."""
        return 2.0 * config.hidden_size * config.num_experts

    @torch.no_grad()
    def reset_parameters(self) -> None:
        super().reset_parameters()
        std = self.options.init_std if self.options.init_std is not None else self.config.initializer_range
        nn.init.normal_(self.weight, std=std)

    def forward(
        self, x_TD: torch.Tensor, state: Any, token_ids_BS: torch.Tensor | None = None
    ) -> tuple[RoutingOutput, Any]:
        logits_TE = fp32_linear(x_TD, self.weight)
        return self.select(logits_TE, token_ids_BS), state
