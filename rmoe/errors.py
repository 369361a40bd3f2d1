"""User-facing errors: :class:`RmoeError`, one paragraph naming the key, file or value and what was expected,
which the ``rmoe`` command prints with exit code 2 instead of a traceback."""

from __future__ import annotations

import argparse
import sys
import types
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn


class RmoeError(ValueError):
    """A problem with the user's input (config, data, names), explained in one paragraph."""


def check_choice(key: str, value: str, choices: Iterable[str]) -> None:
    """Raise :class:`RmoeError` if ``value`` is not one of ``choices``."""
    choices = sorted(choices)
    if value not in choices:
        raise RmoeError(f"{key}={value!r} is not a known choice; expected one of: {', '.join(choices)}.")


class ToolArgumentParser(argparse.ArgumentParser):
    """The argument parser of the ``rmoe`` subcommands that are not Lightning's: a bad argument raises
    :class:`RmoeError`; no abbreviations (``--prompt`` is not ``--prompt-file``); ``--max_tokens`` (the spelling of
    fit/validate/test) is accepted for ``--max-tokens``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        args = list(sys.argv[1:] if args is None else args)
        known = {s for action in self._actions for s in action.option_strings}
        normalised = []
        for arg in args:
            if arg == "--":  # everything after it is positional
                normalised += args[len(normalised) :]
                break
            if arg.startswith("--"):
                name, sep, value = arg.partition("=")
                if name not in known and name.replace("_", "-") in known:
                    name = name.replace("_", "-")
                arg = name + sep + value
            normalised.append(arg)
        return super().parse_known_args(normalised, namespace)

    def error(self, message: str) -> NoReturn:
        raise RmoeError(f"{message} (see `{self.prog} --help`)")


def check_field_types(obj: Any, prefix: str) -> None:
    """Raise :class:`RmoeError` naming ``<prefix>.<field>`` for a dataclass field whose value is not of its declared
    scalar type (optionally ``| None``), rather than a later ``TypeError``."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(type(obj))
    for field in dataclasses.fields(obj):
        hint, value = hints.get(field.name), getattr(obj, field.name)
        optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
        kinds = {k for k in typing.get_args(hint) if k is not type(None)} if optional else {hint}
        if value is None and optional:
            continue
        if kinds == {bool} and not isinstance(value, bool):
            expected = "true or false"
        elif kinds == {int} and (isinstance(value, bool) or not isinstance(value, int)):
            expected = "an integer"
        elif kinds == {float} and (isinstance(value, bool) or not isinstance(value, (int, float))):
            expected = "a number"
        elif kinds == {str} and not isinstance(value, str):
            expected = "a string"
        else:
            continue
        raise RmoeError(f"{prefix}.{field.name}={value!r} is invalid; expected {expected}.")
