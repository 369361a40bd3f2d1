"""Routers by name: ``register_router`` adds one, ``get_router_class`` finds one, and
``discover_routers`` imports every module of a package so that their decorators run."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from rmoe.errors import check_choice

if TYPE_CHECKING:
    from rmoe.routers.base import Causality, Router, RouterContext

ROUTERS: dict[str, type[Router]] = {}


def register_router(name: str) -> Callable[[type[Router]], type[Router]]:
    """Class decorator: make a router available as ``model.arch.router: <name>``."""

    def wrap(cls: type[Router]) -> type[Router]:
        if name in ROUTERS and ROUTERS[name] is not cls:
            raise ValueError(f"router {name!r} is registered twice ({ROUTERS[name].__module__} and {cls.__module__})")
        cls.name = name
        ROUTERS[name] = cls
        return cls

    return wrap


def discover_routers(package: str, path: Iterable[str]) -> list[str]:
    """Import every module of ``package`` (its ``__path__`` is ``path``), registering their routers.

    Returns the names of the modules imported, in alphabetical order.
    """
    names = sorted(info.name for info in pkgutil.iter_modules(list(path)) if not info.name.startswith("_"))
    for name in names:
        importlib.import_module(f"{package}.{name}")
    return names


def get_router_class(name: str) -> type[Router]:
    check_choice("model.arch.router", name, ROUTERS)
    return ROUTERS[name]


def causality_of(context: RouterContext) -> Causality:
    """The causality the context's router declares with its options (training and evaluation).

    ``causality_of(config.router_context()).evaluation`` is None when the model decodes token by
    token exactly as its evaluation forward routes (export, generation); otherwise it says why not.
    """
    return get_router_class(context.router).causality(context)
