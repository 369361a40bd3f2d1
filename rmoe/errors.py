"""User-facing errors.

Everything a user can get wrong (a config value, a data file, a name) raises :class:`RmoeError`
with one paragraph that names the key, file or value and what was expected. The ``rmoe`` command
turns it into a message and exit code 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import NoReturn


class RmoeError(ValueError):
    """A problem with the user's input (config, data, names), explained in one paragraph."""


def check_choice(key: str, value: str, choices: Iterable[str]) -> None:
    """Raise :class:`RmoeError` if ``value`` is not one of ``choices``."""
    choices = sorted(choices)
    if value not in choices:
        raise RmoeError(f"{key}={value!r} is not a known choice; expected one of: {', '.join(choices)}.")


class ToolArgumentParser(argparse.ArgumentParser):
    """The argument parser of the ``rmoe`` tools (analyze, inspect, generate, export, import): a bad
    argument raises :class:`RmoeError` (one paragraph, exit 2 from ``rmoe``) instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise RmoeError(f"{message} (see `{self.prog} --help`)")
