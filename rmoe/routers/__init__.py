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
)
from rmoe.routers.base import (
    Router,
    RoutingOutput,
    TokenChoiceOptions,
    TokenChoiceRouter,
    fp32_linear,
    topk_softmax,
)
from rmoe.routers.registry import ROUTERS, get_router_class, register_router

__all__ = [
    "ROUTERS",
    "Router",
    "RoutingOutput",
    "TokenChoiceOptions",
    "TokenChoiceRouter",
    "fp32_linear",
    "get_router_class",
    "register_router",
    "topk_softmax",
]
