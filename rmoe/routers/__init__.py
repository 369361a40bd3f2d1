"""The router registry. Importing this package registers every router (one module each)."""

from rmoe.routers import (  # noqa: F401  (registers)
    cosine,
    expert_choice,
    hyper,
    linear,
    locmoe,
    mlp,
    random_router,
    recurrent,
    sinkhorn,
    soft_moe,
)
from rmoe.routers.base import (
    CAUSAL,
    Causality,
    Router,
    RoutingOutput,
    TokenChoiceOptions,
    TokenChoiceRouter,
    fp32_linear,
    topk_softmax,
)
from rmoe.routers.registry import ROUTERS, causality_of, get_router_class, register_router

__all__ = [
    "CAUSAL",
    "ROUTERS",
    "Causality",
    "Router",
    "RoutingOutput",
    "TokenChoiceOptions",
    "TokenChoiceRouter",
    "causality_of",
    "fp32_linear",
    "get_router_class",
    "register_router",
    "topk_softmax",
]
