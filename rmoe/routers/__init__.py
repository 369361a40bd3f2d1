"""The router registry. Importing this package imports every module of it, registering every router: a new
router is one file here (a class decorated with ``@register_router``), its config and its test; no list to edit."""

from rmoe.routers.base import (
    CAUSAL,
    CapacityOptions,
    Causality,
    Router,
    RouterContext,
    RoutingOutput,
    TokenChoiceOptions,
    TokenChoiceRouter,
    expert_capacity,
    fp32_linear,
    tokens_per_expert,
    topk_softmax,
)
from rmoe.routers.registry import ALIASES, ROUTERS, discover_routers, get_router_class, register_router

discover_routers(__name__, __path__)

__all__ = [
    "ALIASES",
    "CAUSAL",
    "ROUTERS",
    "CapacityOptions",
    "Causality",
    "Router",
    "RouterContext",
    "RoutingOutput",
    "TokenChoiceOptions",
    "TokenChoiceRouter",
    "discover_routers",
    "expert_capacity",
    "fp32_linear",
    "get_router_class",
    "register_router",
    "tokens_per_expert",
    "topk_softmax",
]
