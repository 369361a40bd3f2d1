"""HyperRouter (Do et al., "HyperRouter: Towards Efficient Training and Inference of Sparse Mixture
of Experts via HyperNetwork", EMNLP 2023, arXiv 2312.07035).

The router weight of layer l is generated, ``W_l = H(e_l)``, by a hypernetwork ``H`` that is
drawn at random and frozen, from a small trainable embedding ``e_l``: the router is trained only
through a low-dimensional bottleneck, between a free router and a frozen random one (RandomSMoE).

Choices the paper leaves open, made here: ``H`` is a two-layer ReLU MLP without biases,
``d_e -> hidden -> E * D``, shared by all layers (frozen, so sharing costs no expressivity and
saves memory; each layer has its own ``e_l``); ``e_l ~ N(0, 1)``, the first hypernetwork layer
``~ N(0, 1/d_e)`` and the second ``~ N(0, 2 std^2 / hidden)`` so that the generated ``W_l`` has
entries of std about ``model.arch.initializer_range``, like a freshly initialised linear router.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from rmoe.routers.base import RoutingOutput, TokenChoiceOptions, TokenChoiceRouter, fp32_linear
from rmoe.routers.registry import register_router

if TYPE_CHECKING:
    from rmoe.routers.base import RouterContext


@dataclass
class HyperOptions(TokenChoiceOptions):
    """Args:
    embedding_dim: Width d_e of each layer's trainable embedding (the only trainable router part).
    hypernet_hidden_dim: Hidden width of the frozen hypernetwork.
    """

    embedding_dim: int = 32
    hypernet_hidden_dim: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.embedding_dim <= 0 or self.hypernet_hidden_dim <= 0:
            raise ValueError("embedding_dim and hypernet_hidden_dim must be positive integers")


class FrozenHypernetwork(nn.Module):
    """``W_ED = (w2 relu(w1 e)).view(E, D)``; both matrices are persistent buffers (frozen, saved)."""

    def __init__(self, config: RouterContext, embedding_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.num_experts, self.hidden_size = config.num_experts, config.hidden_size
        self.initializer_range = config.initializer_range
        self.register_buffer("w1", torch.empty(hidden_dim, embedding_dim))  # (H, d_e)
        self.register_buffer("w2", torch.empty(config.num_experts * config.hidden_size, hidden_dim))  # (E*D, H)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.w1, std=1.0 / math.sqrt(self.w1.shape[1]))
        nn.init.normal_(self.w2, std=self.initializer_range * math.sqrt(2.0 / self.w2.shape[1]))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        hidden_H = F.relu(fp32_linear(embedding, self.w1))
        return fp32_linear(hidden_H, self.w2).view(self.num_experts, self.hidden_size)


@register_router("hyper")
class HyperRouter(TokenChoiceRouter):
    """``logits = x H(e_l)^T`` with ``H`` frozen and shared, ``e_l`` trainable; softmax top-k.

    The state passes through untouched.
    """

    Options = HyperOptions

    def __init__(self, config: RouterContext, layer_idx: int, shared: nn.Module | None = None) -> None:
        super().__init__(config, layer_idx, shared)
        if shared is None:
            raise ValueError("HyperRouter needs the shared hypernetwork from HyperRouter.build_shared")
        self.embedding = nn.Parameter(torch.empty(self.options.embedding_dim))  # (d_e,)

    @classmethod
    def saved_bytes(cls, config: RouterContext, num_tokens: int, num_sequences: int, act_bytes: int) -> int:
        """The generated fp32 gate (E, D) and the hypernetwork's hidden layer: once per layer, not per token."""
        return 4 * (config.num_experts * config.hidden_size + 2 * config.options.hypernet_hidden_dim)

    @classmethod
    def extra_flops_per_token(cls, config: RouterContext, seq_len: int) -> float:
        """The logits' product with a weight that is not a parameter, 2 * D * E."""
        return 2.0 * config.hidden_size * config.num_experts

    @classmethod
    def build_shared(cls, config: RouterContext) -> nn.Module:
        o = config.options
        return FrozenHypernetwork(config, o.embedding_dim, o.hypernet_hidden_dim)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.normal_(self.embedding)

    def forward(self, x_TD: torch.Tensor, state: Any) -> tuple[RoutingOutput, Any]:
        weight_ED = self.shared(self.embedding)
        return self.select(fp32_linear(x_TD, weight_ED)), state
