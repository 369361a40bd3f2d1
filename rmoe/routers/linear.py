"""Linear softmax top-k router (Switch / Mixtral / Qwen2-MoE)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from rmoe.routers.base import CapacityOptions, RoutingOutput, TokenChoiceRouter, fp32_linear, init_linear
from rmoe.routers.registry import register_router

if TYPE_CHECKING:
    from rmoe.routers.base import RouterContext


@dataclass
class LinearOptions(CapacityOptions):
    """Args:
    bias: A per-expert bias on the logits, ``x W^T + b`` (off: Qwen2-MoE's gate and the RMoE authors'
        large-scale baseline have none; their enwik8 baseline, an ``nn.Linear(d, E)``, had one).
    init: ``normal`` (N(0, initializer_range), like the rest of the model; zero bias) or ``torch`` (nn.Linear's
        default, U(+-1/sqrt(D)) for weight and bias, as the recurrent router's ``init: torch``).
    """

    bias: bool = False
    init: Literal["normal", "torch"] = "normal"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init not in ("normal", "torch"):
            raise ValueError(f"init={self.init!r}; expected one of: normal, torch")


@register_router("linear")
class LinearRouter(TokenChoiceRouter):
    """``logits = x W^T (+ b)`` (D -> E), fp32 softmax, top-k, optional renormalisation.

    Without options, equal to transformers' ``Qwen2MoeTopKRouter`` (same ``weight`` name and shape).
    """

    Options = LinearOptions

    def __init__(self, config: RouterContext, layer_idx: int, shared: nn.Module | None = None) -> None:
        super().__init__(config, layer_idx, shared)
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))  # (E, D)
        self.bias = nn.Parameter(torch.empty(config.num_experts)) if self.options.bias else None  # (E,)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        super().reset_parameters()  # the bias-balancing buffer
        init_linear(self.weight, self.bias, self.options.init, self.config.initializer_range)

    def forward(
        self, x_TD: torch.Tensor, state: Any, token_ids_BS: torch.Tensor | None = None
    ) -> tuple[RoutingOutput, Any]:
        logits_TE = fp32_linear(x_TD, self.weight, self.bias)
        return self.select(logits_TE, token_ids_BS), state
