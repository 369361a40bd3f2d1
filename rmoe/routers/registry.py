"""Routers by name: ``register_router`` adds one, ``get_router_class`` finds one, and
``discover_routers`` imports every module of a package so that their decorators run."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from rmoe.errors import check_choice

if TYPE_CHECKING:
    from rmoe.routers.base import Router

ROUTERS: dict[str, type[Router]] = {}
ALIASES: dict[str, str] = {}
"""Other names a router answers to (``model.arch.router: <alias>``): alias -> registered name."""


def register_router(name: str, aliases: tuple[str, ...] = ()) -> Callable[[type[Router]], type[Router]]:
    """Class decorator: make a router available as ``model.arch.router: <name>`` (and each alias)."""

    def wrap(cls: type[Router]) -> type[Router]:
        for taken in (name, *aliases):
            owner = ROUTERS.get(taken) or ROUTERS.get(ALIASES.get(taken, ""))
            if owner is not None and owner is not cls:
                raise ValueError(f"router {taken!r} is registered twice ({owner.__module__} and {cls.__module__})")
        cls.name = name
        ROUTERS[name] = cls
        ALIASES.update(dict.fromkeys(aliases, name))
        return cls

    return wrap


def discover_routers(package: str, path: Iterable[str]) -> list[str]:
    """Import every module of ``package`` (its ``__path__`` is ``path``), registering their routers; return the
    names of the modules imported, in alphabetical order."""
    names = sorted(info.name for info in pkgutil.iter_modules(list(path)) if not info.name.startswith("_"))
    for name in names:
        importlib.import_module(f"{package}.{name}")
    return names


def get_router_class(name: str) -> type[Router]:
    """The router registered as ``name`` or as an alias of it."""
    check_choice("model.arch.router", name, [*ROUTERS, *ALIASES])
    return ROUTERS[ALIASES.get(name, name)]
