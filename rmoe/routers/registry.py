"""Routers by name: ``register_router`` adds one, ``get_router_class`` finds one."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from rmoe.errors import check_choice

if TYPE_CHECKING:
    from rmoe.model.config import ModelConfig
    from rmoe.routers.base import Causality, Router

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


def causality_of(config: ModelConfig) -> Causality:
    """The causality ``config``'s router declares with ``config``'s options (training and evaluation).

    ``causality_of(config).evaluation`` is None when the model decodes token by token exactly as its
    evaluation forward routes (export, generation); otherwise it says why not.
    """
    return get_router_class(config.router).causality(config)
