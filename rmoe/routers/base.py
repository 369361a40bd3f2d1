"""The router contract: the one seam every router goes through.

A router is called once per MoE layer with the layer's normalised input ``x_TD`` and the state
the previous MoE layer's router returned (``None`` at the first one). It returns the routing for
this layer and the state for the next. The decoder never looks inside the state and never
branches on router names, so a router that recurs over depth (RMoE) fits without touching it.

Shape legend: T tokens (batch x sequence, flattened), D model width, E experts, K top-k.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from rmoe.errors import RmoeError

if TYPE_CHECKING:
    from rmoe.model.config import ModelConfig


@dataclass
class RoutingOutput:
    """What a router decides for one MoE layer.

    Attributes:
        logits_TE: Router logits in fp32 (what the z-loss and the metrics read).
        probs_TE: The router's probability over experts in fp32 (softmax of the logits for
            softmax routers); the balance loss uses it.
        weights_TK: Combine weights of the chosen experts (fp32).
        expert_ids_TK: Chosen expert ids (int64).
        keep_TK: For routers with a capacity: True where the (token, expert) pair is computed,
            False where the token was dropped and passes through the residual. None: all kept.
    """

    logits_TE: torch.Tensor
    probs_TE: torch.Tensor
    weights_TK: torch.Tensor
    expert_ids_TK: torch.Tensor
    keep_TK: torch.Tensor | None = None


@dataclass
class NoOptions:
    """Routers without options."""


class Router(nn.Module):
    """Base class of every router; subclasses register with :func:`rmoe.routers.register_router`.

    Subclasses set ``Options`` to a dataclass of their YAML options (``model.router_options``)
    and implement :meth:`forward`. Routers whose parameters are shared across layers build them
    once in :meth:`build_shared`; the decoder stores that module once and hands it to every
    layer's router (which keeps a reference without registering it, so it is counted once).
    """

    Options: ClassVar[type] = NoOptions
    name: ClassVar[str] = ""

    def __init__(self, config: ModelConfig, layer_idx: int, shared: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.options = self.parse_options(config.router_options)
        # A plain attribute (not a submodule): the decoder owns and registers the shared module.
        self.__dict__["shared"] = shared

    @classmethod
    def parse_options(cls, options: dict[str, Any]) -> Any:
        """Build ``cls.Options`` from a dict, with a clear error for unknown keys or bad values."""
        valid = {f.name: f for f in dataclasses.fields(cls.Options)}
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise RmoeError(
                f"model.router_options has {', '.join(unknown)}, which router {cls.name!r} does not take; "
                f"valid options: {', '.join(valid) or '(none)'}."
            )
        try:
            return cls.Options(**options)
        except (TypeError, ValueError) as err:
            raise RmoeError(f"model.router_options for router {cls.name!r}: {err}") from None

    @classmethod
    def build_shared(cls, config: ModelConfig) -> nn.Module | None:
        """Parameters shared by the routers of all layers (None for per-layer routers)."""
        return None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Default init: Normal(0, initializer_range) for every matrix the router owns."""
        for p in self.parameters(recurse=True):
            if p.dim() >= 2:
                nn.init.normal_(p, std=self.config.initializer_range)

    def forward(self, x_TD: torch.Tensor, state: Any) -> tuple[RoutingOutput, Any]:
        raise NotImplementedError


def topk_softmax(logits_TE: torch.Tensor, top_k: int, norm_topk_prob: bool) -> RoutingOutput:
    """Softmax (fp32) over experts, top-k, optional renormalisation of the k weights."""
    logits_TE = logits_TE.float()
    probs_TE = torch.softmax(logits_TE, dim=-1)
    weights_TK, expert_ids_TK = torch.topk(probs_TE, top_k, dim=-1)
    if norm_topk_prob:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return RoutingOutput(logits_TE, probs_TE, weights_TK, expert_ids_TK)


def fp32_linear(x_TD: torch.Tensor, weight_ED: torch.Tensor) -> torch.Tensor:
    """``x @ W^T`` in fp32 even under autocast (router math stays in full precision)."""
    with torch.autocast(device_type=x_TD.device.type, enabled=False):
        return nn.functional.linear(x_TD.float(), weight_ED.float())
