"""Reading runs back: run directories, their TensorBoard scalars, checkpoints and ``metrics.json``.

A *run directory* is what ``rmoe fit`` writes under the TensorBoard logger's ``log_dir``
(``runs/<name>/version_<n>/``): ``events.out.tfevents.*``, ``config.yaml``, ``hparams.yaml``,
``checkpoints/*.ckpt``. These helpers are what ``notebooks/routing_analysis.ipynb`` and
:mod:`rmoe.analysis` use to find and load them; they only read (except :func:`write_json`).
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from rmoe.errors import RmoeError

_LAYER_TAG = re.compile(r"^(?P<prefix>.+)/layer_(?P<layer>\d+(?:_\d+)?)$")


@dataclass
class Run:
    """One training run's directory and what identifies it.

    Attributes:
        path: The run directory (``<save_dir>/<name>/version_<n>``).
        label: A short name for plots: the router (``model.arch.router`` of ``config.yaml``) plus
            the directory's name and version when several runs share a router.
        config: The run's resolved ``config.yaml`` ({} if absent).
    """

    path: Path
    label: str
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def router(self) -> str:
        """The run's router name (``"?"`` if the config does not say)."""
        return str(self.config.get("model", {}).get("arch", {}).get("router", "?"))

    def checkpoint(self, name: str = "last.ckpt") -> Path:
        """The checkpoint ``name`` of this run, else its best (``best-*.ckpt``), else any ``*.ckpt``.

        Raises:
            RmoeError: If the run has no checkpoint.
        """
        directory = self.path / "checkpoints"
        for candidate in [directory / name, *sorted(directory.glob("best-*.ckpt")), *sorted(directory.glob("*.ckpt"))]:
            if candidate.is_file():
                return candidate
        raise RmoeError(f"run {self.path} has no checkpoint under {directory}.")


def find_runs(patterns: str | Iterable[str]) -> list[Run]:
    """Run directories matching glob patterns (``os.pathsep`` or comma separated in one string).

    A match counts as a run if it holds a TensorBoard event file or a ``checkpoints/`` folder; a
    match that is a parent of runs (e.g. ``runs/quick``) stands for every run below it.

    Args:
        patterns: E.g. ``"runs/quick/version_*"`` or ``"runs/a,runs/b"``; ``~`` is expanded.

    Returns:
        The runs, sorted by path, labelled by router (see :class:`Run`).

    Raises:
        RmoeError: If nothing matches.
    """
    if isinstance(patterns, str):
        patterns = [p for p in re.split(rf"[,{re.escape(os.pathsep)}]", patterns) if p.strip()]
    found: set[Path] = set()
    for pattern in patterns:
        for match in glob.glob(os.path.expanduser(pattern.strip())):
            path = Path(match)
            if _is_run(path):
                found.add(path.resolve())
            elif path.is_dir():
                found.update(p.parent.resolve() for p in path.rglob("events.out.tfevents.*"))
    if not found:
        raise RmoeError(f"no run directory matches {list(patterns)!r} (a run holds events.out.tfevents.* files).")
    runs = [Run(path, "", _read_yaml(path / "config.yaml")) for path in sorted(found)]
    routers = [run.router for run in runs]
    for run in runs:
        shared = routers.count(run.router) > 1
        run.label = f"{run.router} ({run.path.parent.name}/{run.path.name})" if shared else run.router
    return runs


def _is_run(path: Path) -> bool:
    return path.is_dir() and (any(path.glob("events.out.tfevents.*")) or (path / "checkpoints").is_dir())


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text()) or {}


def run_dir_of_checkpoint(ckpt: str | os.PathLike[str]) -> Path:
    """The run directory of a checkpoint: ``<run>`` for ``<run>/checkpoints/x.ckpt``, else its folder."""
    path = Path(ckpt).resolve()
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def read_scalars(run_dir: str | os.PathLike[str], pattern: str | None = None) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of a run's TensorBoard event files: ``{tag: [(step, value), ...]}``.

    Reads all ``events.out.tfevents.*`` files of the directory (not sub-directories) with
    TensorBoard's ``EventAccumulator`` (no sampling: every point is kept); later files win where
    a (tag, step) repeats, and each series is sorted by step.

    Args:
        run_dir: The run directory.
        pattern: Keep only tags matching this regular expression (``re.search``).
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    regex = re.compile(pattern) if pattern else None
    series: dict[str, dict[int, float]] = {}
    for events in sorted(Path(run_dir).glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            if regex is None or regex.search(tag):
                series.setdefault(tag, {}).update({e.step: e.value for e in accumulator.Scalars(tag)})
    return {tag: sorted(points.items()) for tag, points in sorted(series.items())}


def layer_series(
    scalars: Mapping[str, list[tuple[int, float]]], prefix: str
) -> dict[str, tuple[list[int], list[float]]]:
    """The per-layer series under ``prefix`` (e.g. ``moe/val/gate_entropy_mean``), by layer label.

    Returns:
        ``{"0": (steps, values), "1": ...}`` for tags ``{prefix}/layer_0`` ..., and ``"0_1"`` ... for
        consecutive-layer tags ``{prefix}/layer_0_1``; in layer order.
    """
    out: dict[str, tuple[list[int], list[float]]] = {}
    for tag, points in scalars.items():
        match = _LAYER_TAG.match(tag)
        if match and match["prefix"] == prefix.rstrip("/"):
            out[match["layer"]] = ([s for s, _ in points], [v for _, v in points])
    return dict(sorted(out.items(), key=lambda item: [int(i) for i in item[0].split("_")]))


def to_jsonable(value: Any) -> Any:
    """Tensors, numpy values, tuples and nested containers -> plain JSON values (NaN/inf -> None)."""
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.detach().cpu().tolist())
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy arrays and scalars
        return to_jsonable(value.tolist())
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(data: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``to_jsonable(data)`` as strict JSON (indented); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(data), indent=1, allow_nan=False) + "\n")
    return path


def read_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``metrics.json`` written by ``rmoe analyze``."""
    return json.loads(Path(path).read_text())
