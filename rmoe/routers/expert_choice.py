"""Expert-choice routing (Zhou et al., "Mixture-of-Experts with Expert Choice Routing", NeurIPS 2022,
arXiv 2202.09368).

``S = softmax(X W^T)`` over experts (T, E); each expert picks its top-C tokens of the batch by
its column of S, ``C = ceil(capacity_factor * T * K / E)`` (so on average a token gets K experts;
some get none and pass through the residual, some get more). Gate values are the S entries.

NOT CAUSAL for an autoregressive LM: whether token t is processed depends on every other token
of the batch, later ones included (a warning says so at start-up). Kept for the router study.

Representation: ``expert_ids_TK`` lists all E experts for every token (K = E columns),
``keep_TK`` marks the chosen pairs and ``weights_TK`` holds the gate values (0 elsewhere). The
dispatch therefore gathers T*E rows (E times a top-k router's) before dropping the unkept ones.
``model.arch.norm_topk_prob`` does not apply (gates are not renormalised, as in the paper). With all
E experts in ``expert_ids_TK``, the Switch auxiliary loss is the constant 1 (no gradient);
per-expert token counts must read ``keep_TK``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rmoe.routers.base import Router, RoutingOutput, fp32_linear
from rmoe.routers.registry import register_router

if TYPE_CHECKING:
    from rmoe.model.config import ModelConfig


@dataclass
class ExpertChoiceOptions:
    """Args:
    capacity_factor: C = ceil(capacity_factor * T * K / E) tokens per expert; 1 matches the compute
        of top-K token choice. The paper's capacity factor c (experts per token on average) is
        ``K * capacity_factor`` here: its "EC-CF2" is ``top_k: 2, capacity_factor: 1``.
    """

    capacity_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor={self.capacity_factor} must be > 0")


@register_router("expert_choice")
class ExpertChoiceRouter(Router):
    """Each expert takes its top-C tokens of the batch (see the module docstring; not causal)."""

    Options = ExpertChoiceOptions

    def __init__(self, config: ModelConfig, layer_idx: int, shared: nn.Module | None = None) -> None:
        super().__init__(config, layer_idx, shared)
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))  # (E, D)
        moe_layers = config.moe_layers
        if not moe_layers or layer_idx == moe_layers[0]:  # once per model
            warnings.warn(
                "router expert_choice is not causal: whether a token is processed depends on the later "
                "tokens of the batch, so an autoregressive LM trained with it leaks future information "
                "and cannot decode token by token as trained. Use it for the router study only.",
                stacklevel=2,
            )

    def capacity(self, num_tokens: int) -> int:
        c = math.ceil(self.options.capacity_factor * num_tokens * self.top_k / self.num_experts)
        return max(1, min(num_tokens, c))

    def forward(self, x_TD: torch.Tensor, state: Any) -> tuple[RoutingOutput, Any]:
        T, E = x_TD.shape[0], self.num_experts
        logits_TE = fp32_linear(x_TD, self.weight)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        token_CE = torch.topk(probs_TE, self.capacity(T), dim=0).indices  # each expert's chosen tokens
        keep_TE = torch.zeros(T, E, dtype=torch.bool, device=x_TD.device).scatter_(0, token_CE, True)
        weights_TE = probs_TE.masked_fill(~keep_TE, 0.0)
        expert_ids_TE = torch.arange(E, device=x_TD.device).expand(T, E)
        return RoutingOutput(logits_TE, probs_TE, weights_TE, expert_ids_TE, keep_TE), state
