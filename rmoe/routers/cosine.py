"""Cosine routers: ``cosine`` (in model space) and ``xmoe`` (after a down-projection).

X-MoE (Chi et al., "On the Representation Collapse of Sparse Mixture of Experts", arXiv 2204.09179):
``s_e = cos(W x, k_e) / tau`` with ``W`` a D -> 16 projection, ``k_e`` learnable expert embeddings and ``tau`` a
learnable temperature. The recurrent router reuses :class:`CosineScorer` on its GRU state ("XMoE + GRU", RMoE Table 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from rmoe.routers.base import CapacityOptions, RoutingOutput, TokenChoiceRouter, fp32_linear
from rmoe.routers.registry import register_router

if TYPE_CHECKING:
    from rmoe.routers.base import RouterContext


class CosineScorer(nn.Module):
    """``logits_TE = cos(P x_TI, k_E) / tau``, computed in fp32 even under autocast.

    The temperature is learned as ``log(1 / tau)`` (positive, as CLIP's logit scale) and clamped at
    ``tau >= min_temperature`` (logits within +-1/min_temperature, as Tutel's cosine gate). Expert embeddings start
    orthogonal (as X-MoE's).

    Args:
        in_dim: Width I of the scored representation (D for a token, P for a GRU state).
        num_experts: E.
        proj_dim: Width of the down-projection ``P`` (no bias); 0: no projection (cosine in I).
        init_temperature: ``tau`` at initialisation.
        min_temperature: Lower clamp of ``tau``.
        init_std: Std of the Normal init of the projection.
    """

    def __init__(
        self,
        in_dim: int,
        num_experts: int,
        proj_dim: int,
        init_temperature: float,
        min_temperature: float,
        init_std: float,
    ) -> None:
        super().__init__()
        self.init_temperature, self.init_std = init_temperature, init_std
        self.max_log_scale = math.log(1.0 / min_temperature)
        self.proj = nn.Parameter(torch.empty(proj_dim, in_dim)) if proj_dim > 0 else None  # (P, I)
        self.expert_embeddings = nn.Parameter(torch.empty(num_experts, proj_dim or in_dim))  # (E, P)
        self.log_inv_temperature = nn.Parameter(torch.empty(()))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.proj is not None:
            nn.init.normal_(self.proj, std=self.init_std)
        nn.init.orthogonal_(self.expert_embeddings)
        self.log_inv_temperature.fill_(math.log(1.0 / self.init_temperature))

    @property
    def temperature(self) -> torch.Tensor:
        return torch.exp(-self.log_inv_temperature.detach().clamp(max=self.max_log_scale))

    def forward(self, x_TI: torch.Tensor) -> torch.Tensor:
        z_TP = fp32_linear(x_TI, self.proj) if self.proj is not None else x_TI.float()
        with torch.autocast(device_type=x_TI.device.type, enabled=False):
            cos_TE = F.linear(
                F.normalize(z_TP, dim=-1, eps=1e-6), F.normalize(self.expert_embeddings.float(), dim=-1, eps=1e-6)
            )
            scale = self.log_inv_temperature.float().clamp(max=self.max_log_scale).exp()
            return cos_TE * scale


@dataclass
class CosineOptions(CapacityOptions):
    """Args:
    proj_dim: Down-projection width before the cosine (0: cosine in model space).
    init_temperature: Initial temperature ``tau`` (learned; CLIP's 0.07).
    min_temperature: ``tau`` is clamped at this value from below.
    """

    proj_dim: int = 0
    init_temperature: float = 0.07
    min_temperature: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        check_cosine_options(self.proj_dim, self.init_temperature, self.min_temperature)


def check_cosine_options(proj_dim: int, init_temperature: float, min_temperature: float) -> None:
    """Shared validation of the cosine head's options (ValueError, turned into RmoeError)."""
    if proj_dim < 0:
        raise ValueError(f"the cosine projection width {proj_dim} must be >= 0 (0: no projection)")
    if not 0 < min_temperature <= init_temperature:
        raise ValueError(
            f"the cosine temperatures need 0 < min_temperature ({min_temperature}) <= "
            f"init_temperature ({init_temperature})"
        )


@dataclass
class XMoeOptions(CosineOptions):
    """As :class:`CosineOptions`, with X-MoE's down-projection to 16 dimensions by default."""

    proj_dim: int = 16


@register_router("cosine")
class CosineRouter(TokenChoiceRouter):
    """Cosine similarity between the token and learnable expert embeddings over a learnable temperature, then
    softmax top-k."""

    Options = CosineOptions

    def __init__(self, config: RouterContext, layer_idx: int, shared: nn.Module | None = None) -> None:
        super().__init__(config, layer_idx, shared)
        o = self.options
        self.scorer = CosineScorer(
            config.hidden_size,
            config.num_experts,
            o.proj_dim,
            o.init_temperature,
            o.min_temperature,
            config.initializer_range,
        )

    @classmethod
    def saved_bytes(cls, config: RouterContext, num_tokens: int, num_sequences: int, act_bytes: int) -> int:
        """The fp32 projected token, its norm and the normalised token: (T, proj_dim or D) x 3."""
        return 3 * num_tokens * (config.options.proj_dim or config.hidden_size) * 4

    @torch.no_grad()
    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.scorer.reset_parameters()

    def forward(
        self, x_TD: torch.Tensor, state: Any, token_ids_BS: torch.Tensor | None = None
    ) -> tuple[RoutingOutput, Any]:
        return self.select(self.scorer(x_TD), token_ids_BS), state


@register_router("xmoe")
class XMoeRouter(CosineRouter):
    """X-MoE (arXiv 2204.09179): project D -> 16, cosine with the expert embeddings, divide by a learnable
    temperature. The ``cosine`` router with ``proj_dim: 16``."""

    Options = XMoeOptions
