"""The router registry. Importing this package registers every router (one module each)."""

from rmoe.routers import linear  # noqa: F401  (registers)
from rmoe.routers.base import Router, RoutingOutput, topk_softmax
from rmoe.routers.registry import ROUTERS, get_router_class, register_router

__all__ = ["ROUTERS", "Router", "RoutingOutput", "get_router_class", "register_router", "topk_softmax"]
