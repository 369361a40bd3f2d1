"""Routers by name: ``register_router`` adds one, ``get_router_class`` finds one."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from rmoe.errors import check_choice

if TYPE_CHECKING:
    from rmoe.routers.base import Router

ROUTERS: dict[str, type[Router]] = {}


def register_router(name: str) -> Callable[[type[Router]], type[Router]]:
    """Class decorator: make a router available as ``model.arch.router: <name>``."""

    def wrap(cls: type[Router]) -> type[Router]:
        if name in ROUTERS:
            raise ValueError(f"router {name!r} is registered twice")
        cls.name = name
        ROUTERS[name] = cls
        return cls

    return wrap


def get_router_class(name: str) -> type[Router]:
    check_choice("model.arch.router", name, ROUTERS)
    return ROUTERS[name]
