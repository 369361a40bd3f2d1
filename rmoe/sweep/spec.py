"""The sweep file (keys: :mod:`rmoe.sweep`): parsing, checking, expanding the grid, ``--only`` and ``--set``.

Every error is a :class:`SweepError` naming the file and the key.
"""

from __future__ import annotations

import difflib
import itertools
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rmoe.runs import CAUSAL_TEST_DIR, FIT_DIR, LOG_FILE, MARKER_FILE, PLAN_FILE, TEST_DIR

_KEYS = (
    "name",
    "description",
    "root",
    "configs",
    "grid",
    "overrides",
    "after_fit",
    "test_checkpoint",
    "checkpoint_every_n_steps",
)
_AFTER_FIT = (None, "test")
_TEST_CHECKPOINTS = ("best", "last")
_NAME = re.compile(r"^[\w.]+$")  # sweep names and grid labels: no '-', which joins labels into run names
_GRID_KEY = re.compile(r"^[A-Za-z_]\w*$")
_OVERRIDE = re.compile(r"^(--)?[A-Za-z_][\w.]*\+?=")
_CONFIG_SUFFIXES = (".yaml", ".yml")


class SweepError(Exception):
    """A bad sweep file or option: one paragraph naming the key, reported without a traceback."""


_Fail = Callable[[str], SweepError]  # builds the error for a message about the sweep file


@dataclass(frozen=True)
class Value:
    """What one grid label adds to a run: config files and ``key=value`` overrides."""

    configs: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Sweep:
    """A parsed, checked sweep file.

    Attributes:
        root: One sub-directory per run (one TensorBoard root).
        grid: ``key -> label -> Value``, in file order; runs are the cartesian product.
        overrides: ``key=value`` overrides every run gets (after the grid's).
        test_checkpoint: Which checkpoint ``rmoe test`` evaluates: ``best`` (by ``val/loss``) or ``last``.
        checkpoint_every_n_steps: Interval of the appended resume checkpoint (None: not appended).
    """

    name: str
    root: Path
    configs: tuple[str, ...]
    grid: dict[str, dict[str, Value]]
    overrides: tuple[str, ...] = ()
    after_fit: str | None = None
    test_checkpoint: str = "best"
    checkpoint_every_n_steps: int | None = 100
    description: str = ""


@dataclass(frozen=True)
class GridRun:
    """One point of a sweep's grid: a run to make (:class:`rmoe.runs.RunDir` reads a run directory back).

    Attributes:
        name: Labels joined with ``-``, e.g. ``gru-s0``; the run's directory name under the root.
        configs, overrides: The run's config files and ``key=value`` overrides, in command-line order.
        dir: ``<root>/<name>``.
        extra: The overrides that came from ``--set``, not the sweep file (recorded in the run's plan).
    """

    name: str
    labels: dict[str, str]
    configs: tuple[str, ...]
    overrides: tuple[str, ...]
    dir: Path
    extra: tuple[str, ...] = ()

    @property
    def fit_dir(self) -> Path:
        return self.dir / FIT_DIR

    @property
    def test_dir(self) -> Path:
        return self.dir / TEST_DIR

    @property
    def causal_test_dir(self) -> Path:
        return self.dir / CAUSAL_TEST_DIR

    @property
    def log(self) -> Path:
        return self.dir / LOG_FILE

    @property
    def marker(self) -> Path:
        return self.dir / MARKER_FILE

    @property
    def plan(self) -> Path:
        return self.dir / PLAN_FILE


# ----------------------------------------------------------------------------------------------
# Parsing


def load_sweep(path: str | os.PathLike[str], base_dir: str | os.PathLike[str] | None = None) -> Sweep:
    """Read and check a sweep file; relative config paths are checked against ``base_dir`` (default: cwd).

    Raises:
        SweepError: If the file is missing, not YAML, or any key is wrong (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {str(path)!r} does not exist.")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SweepError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    return parse_sweep(doc, source=str(path), base_dir=base_dir)


def parse_sweep(doc: Any, source: str = "<sweep>", base_dir: str | os.PathLike[str] | None = None) -> Sweep:
    """Check a sweep document (the YAML's mapping) and build a :class:`Sweep`; see :func:`load_sweep`."""
    base = Path(base_dir) if base_dir is not None else Path.cwd()

    def fail(message: str) -> SweepError:
        return SweepError(f"{source}: {message}")

    if not isinstance(doc, Mapping):
        raise fail(f"expected a mapping with the keys {', '.join(_KEYS)}; got {type(doc).__name__}.")
    for key in doc:
        if key not in _KEYS:
            close = difflib.get_close_matches(str(key), _KEYS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise fail(f"unknown key {key!r}.{hint} Valid keys: {', '.join(_KEYS)}.")
    for key in ("name", "configs", "grid"):
        if doc.get(key) in (None, "", [], {}):
            raise fail(f"{key!r} is required and must not be empty.")

    name = doc["name"]
    if not isinstance(name, str) or not _NAME.match(name):
        raise fail(f"'name' must be letters, digits, '_' or '.'; got {name!r}.")
    root = doc.get("root") or f"runs/sweeps/{name}"
    if not isinstance(root, str):
        raise fail(f"'root' must be a directory path; got {root!r}.")

    configs = _strings(doc["configs"], "configs", fail)
    for i, config in enumerate(configs):
        _check_config(config, f"configs[{i}]", base, fail)

    grid_doc = doc["grid"]
    if not isinstance(grid_doc, Mapping):
        raise fail(
            "'grid' must map a key to {label: value}, e.g. {router: {gru: configs/router/gru.yaml}}; "
            f"got {grid_doc!r}."
        )
    grid: dict[str, dict[str, Value]] = {}
    for key, labels in grid_doc.items():
        where = f"grid.{key}"
        if not isinstance(key, str) or not _GRID_KEY.match(key):
            raise fail(f"grid key {key!r} must be an identifier (letters, digits, '_').")
        if not isinstance(labels, Mapping) or not labels:
            raise fail(
                f"{where!r} must map each label to a config file or a key=value override (or a list of them), "
                f"e.g. {{s0: 'seed_everything=0'}}; got {labels!r}."
            )
        grid[key] = {}
        for label, value in labels.items():
            label = str(label)
            if not _NAME.match(label):
                raise fail(f"label {label!r} of {where!r} must be letters, digits, '_' or '.' ('-' joins labels).")
            grid[key][label] = _value(value, f"{where}.{label}", base, fail)

    overrides = _strings(doc.get("overrides") or [], "overrides", fail)
    for i, override in enumerate(overrides):
        if not _OVERRIDE.match(override):
            raise fail(f"overrides[{i}]={override!r} is not a key=value override.")

    after_fit = doc.get("after_fit")
    if after_fit not in _AFTER_FIT:
        raise fail(f"'after_fit' must be 'test' or null; got {after_fit!r}.")
    test_checkpoint = doc.get("test_checkpoint", "best")
    if test_checkpoint not in _TEST_CHECKPOINTS:
        raise fail(f"'test_checkpoint' must be one of {', '.join(_TEST_CHECKPOINTS)}; got {test_checkpoint!r}.")
    every = doc.get("checkpoint_every_n_steps", 100)
    if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every < 1):
        raise fail(f"'checkpoint_every_n_steps' must be a positive integer or null; got {every!r}.")
    description = doc.get("description") or ""
    if not isinstance(description, str):
        raise fail("'description' must be text.")
    return Sweep(
        name=name,
        root=Path(root),
        configs=tuple(configs),
        grid=grid,
        overrides=tuple(overrides),
        after_fit=after_fit,
        test_checkpoint=test_checkpoint,
        checkpoint_every_n_steps=every,
        description=description.strip(),
    )


def _strings(value: Any, where: str, fail: _Fail) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise fail(f"{where!r} must be a list of non-empty strings; got {value!r}.")
    return [v.strip() for v in value]


def _check_config(path: str, where: str, base: Path, fail: _Fail) -> None:
    if not path.endswith(_CONFIG_SUFFIXES):
        raise fail(f"{where}={path!r} must be a config file (*.yaml).")
    if not (base / path).is_file():
        raise fail(
            f"{where}: config file {path!r} does not exist (relative paths are resolved from {str(base)!r}, "
            "the directory the sweep runs from: run it from the repository root)."
        )


def _value(value: Any, where: str, base: Path, fail: _Fail) -> Value:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) and v.strip() for v in items):
        raise fail(f"{where} must be a config file, a key=value override or a list of them (strings); got {value!r}.")
    configs, overrides = [], []
    for item in (v.strip() for v in items):
        if _OVERRIDE.match(item):
            overrides.append(item)
        elif item.endswith(_CONFIG_SUFFIXES):
            _check_config(item, where, base, fail)
            configs.append(item)
        else:
            raise fail(f"{where}={item!r} is neither a config file (*.yaml) nor a key=value override.")
    return Value(tuple(configs), tuple(overrides))


# ----------------------------------------------------------------------------------------------
# Expansion


def parse_only(items: Iterable[str], sweep: Sweep) -> dict[str, set[str]]:
    """``["router=gru,linear", "seed=s0"]`` -> ``{"router": {"gru", "linear"}, "seed": {"s0"}}``, checked."""
    only: dict[str, set[str]] = {}
    for item in items:
        key, sep, labels = item.partition("=")
        if not sep or key not in sweep.grid:
            raise SweepError(f"--only {item!r}: expected KEY=LABEL[,LABEL...] with KEY one of {', '.join(sweep.grid)}.")
        wanted = {label.strip() for label in labels.split(",") if label.strip()}
        unknown = sorted(wanted - set(sweep.grid[key]))
        if unknown or not wanted:
            raise SweepError(
                f"--only {item!r}: unknown label(s) {', '.join(unknown) or '(none given)'} of {key!r}; "
                f"valid: {', '.join(sweep.grid[key])}."
            )
        only.setdefault(key, set()).update(wanted)
    return only


def check_overrides(items: Iterable[str], option: str = "--set") -> tuple[str, ...]:
    """Check ``key=value`` strings (as given to ``--set``)."""
    items = tuple(items)
    for item in items:
        if not _OVERRIDE.match(item):
            raise SweepError(f"{option} {item!r}: expected key=value (an rmoe dot-list override).")
    return items


def expand(sweep: Sweep, only: Mapping[str, set[str]] | None = None, extra: Sequence[str] = ()) -> list[GridRun]:
    """The sweep's runs in grid order (the last key varies fastest); ``only`` keeps runs whose label for each
    given key is in the set, ``extra`` (``--set``) is appended to every run's overrides."""
    only = only or {}
    keys = list(sweep.grid)
    runs = []
    for labels in itertools.product(*(sweep.grid[k] for k in keys)):
        chosen = dict(zip(keys, labels))
        if any(chosen[k] not in allowed for k, allowed in only.items()):
            continue
        values = [sweep.grid[k][chosen[k]] for k in keys]
        name = "-".join(labels)
        runs.append(
            GridRun(
                name=name,
                labels=chosen,
                configs=(*sweep.configs, *(c for v in values for c in v.configs)),
                overrides=(*(o for v in values for o in v.overrides), *sweep.overrides, *extra),
                dir=sweep.root / name,
                extra=tuple(extra),
            )
        )
    return runs
