"""Reading runs back: run directories, their TensorBoard scalars, checkpoints and ``metrics.json``.

A *run directory* is what ``rmoe fit`` writes under the TensorBoard logger's ``log_dir``
(``runs/<name>/version_<n>/``): ``events.out.tfevents.*``, ``config.yaml``, ``hparams.yaml``,
``checkpoints/*.ckpt``. A *sweep root* (``rmoe sweep``) holds one folder per run of its grid,
``<root>/<run>/``, with the fit's run directory :data:`FIT_DIR`, the test's :data:`TEST_DIR` (and
:data:`CAUSAL_TEST_DIR` for a router that is not causal in evaluation), the
log :data:`LOG_FILE`, the plan :data:`PLAN_FILE` and, once finished, the marker
:data:`MARKER_FILE`; the root keeps a copy of the grid, :data:`SWEEP_COPY`.

This module is the one place that names those files and reads event files: ``rmoe sweep``,
``rmoe report``, :mod:`rmoe.analysis`, ``notebooks/routing_analysis.ipynb`` and the benchmarks use
it. It only reads (except :func:`write_json`) and imports nothing from ``rmoe`` but
:mod:`rmoe.errors`.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
from argparse import Namespace
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from rmoe.errors import RmoeError
from rmoe.tags import parse_layer_tag

EVENTS_GLOB = "events.out.tfevents.*"
"""The TensorBoard event files of a run directory."""

# The folder of one sweep run, ``<root>/<run>/`` (written by ``rmoe sweep``, read by ``rmoe report``)
FIT_DIR = "version_0"
"""The ``rmoe fit`` run directory (the logger's ``version`` is set so the path is deterministic)."""
TEST_DIR = "test"
"""The ``rmoe test`` run directory (the logger's ``version``) of the run's best or last checkpoint."""
CAUSAL_TEST_DIR = "test_causal"
"""The ``rmoe test`` of the same checkpoint with the router's causal evaluation
(``ModelConfig.causal_evaluation_options``), for a run whose router is not causal in evaluation."""
LOG_FILE = "stdout.log"
"""Everything the run printed, appended to on each attempt."""
PLAN_FILE = "run.json"
"""What the run is: its grid labels and command lines."""
RUN_LOCK = "running.lock"
"""Locked (``flock``) by the sweep process running the run, so a second sweep on the same root
leaves it alone; the lock goes with the process, however it ends."""
FOLLOW_UP_PLAN = "run.follow-up.json"
"""The plan of a stage added to a finished run (its :data:`PLAN_FILE` stays as it finished); removed once done."""
MARKER_FILE = "done.json"
"""Written once fit (and test) succeeded: the run is finished."""
SWEEP_COPY = "sweep.yaml"
"""The sweep root's copy of the grid (keys and labels in order)."""
STATUS_FILE = "status.json"
"""In a run's log folder: whether it is running, finished, failed or interrupted (``RunStatus``)."""
RESUME_CHECKPOINT = "resume"
"""``checkpoints/resume.ckpt``: the periodic checkpoint a sweep run resumes from."""


@dataclass
class RunDir:
    """One training run's directory and what identifies it (read back from disk; a run a sweep plans
    is :class:`rmoe.sweep.spec.GridRun`).

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


def find_runs(patterns: str | Iterable[str]) -> list[RunDir]:
    """Run directories matching glob patterns (``os.pathsep`` or comma separated in one string).

    A match counts as a run if it holds a TensorBoard event file or a ``checkpoints/`` folder; a
    match that is a parent of runs (e.g. ``runs/quick``) stands for every run below it.

    Args:
        patterns: E.g. ``"runs/quick/version_*"`` or ``"runs/a,runs/b"``; ``~`` is expanded.

    Returns:
        The runs, sorted by path, labelled by router (see :class:`RunDir`).

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
                found.update(p.parent.resolve() for p in path.rglob(EVENTS_GLOB))
    if not found:
        raise RmoeError(f"no run directory matches {list(patterns)!r} (a run holds events.out.tfevents.* files).")
    runs = [RunDir(path, "", _read_yaml(path / "config.yaml")) for path in sorted(found)]
    routers = [run.router for run in runs]
    for run in runs:
        shared = routers.count(run.router) > 1
        run.label = f"{run.router} ({run.path.parent.name}/{run.path.name})" if shared else run.router
    return runs


def _is_run(path: Path) -> bool:
    return path.is_dir() and (any(path.glob(EVENTS_GLOB)) or (path / "checkpoints").is_dir())


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text()) or {}


def run_folder_of_checkpoint(ckpt: str | os.PathLike[str]) -> Path | None:
    """``<save_dir>/<name>/version_<k>`` for a checkpoint in the ``checkpoints/`` folder of a run written by
    ``rmoe fit``, else None: the one definition of a checkpoint's run folder."""
    path = Path(ckpt).resolve()
    run = path.parent.parent
    return run if path.parent.name == "checkpoints" and re.fullmatch(r"version_\d+", run.name) else None


def run_dir_of_checkpoint(ckpt: str | os.PathLike[str]) -> Path:
    """The folder a checkpoint belongs to: ``<run>`` for ``<run>/checkpoints/x.ckpt``, else its own folder."""
    path = Path(ckpt).resolve()
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def read_events(
    directory: str | os.PathLike[str], pattern: str | None = None
) -> dict[str, list[tuple[int, float, float]]]:
    """Every scalar series of a directory's event files: ``{tag: [(step, value, wall_time), ...]}``.

    Reads all ``events.out.tfevents.*`` files of the directory (not sub-directories) with
    TensorBoard's ``EventAccumulator`` (no sampling: every point is kept); later files win where
    a (tag, step) repeats (a resumed run re-logs the steps after its checkpoint), and each series
    is sorted by step. A directory without event files gives ``{}``.

    Args:
        directory: The run directory.
        pattern: Keep only tags matching this regular expression (``re.search``).
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    regex = re.compile(pattern) if pattern else None
    series: dict[str, dict[int, tuple[float, float]]] = {}
    for events in sorted(Path(directory).glob(EVENTS_GLOB)):
        # scalars only: every point of them, as little as possible of the rest
        guidance = {"scalars": 0, "images": 1, "histograms": 1, "tensors": 1}
        accumulator = EventAccumulator(str(events), size_guidance=guidance)
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            if regex is None or regex.search(tag):
                points = series.setdefault(tag, {})
                for event in accumulator.Scalars(tag):
                    points[event.step] = (event.value, event.wall_time)
    return {tag: [(s, v, w) for s, (v, w) in sorted(points.items())] for tag, points in sorted(series.items())}


def read_scalars(run_dir: str | os.PathLike[str], pattern: str | None = None) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of a run's TensorBoard event files: ``{tag: [(step, value), ...]}``.

    :func:`read_events` without the wall times.

    Args:
        run_dir: The run directory.
        pattern: Keep only tags matching this regular expression (``re.search``).
    """
    return {tag: [(s, v) for s, v, _ in points] for tag, points in read_events(run_dir, pattern).items()}


def find_sweep_runs(root: str | os.PathLike[str]) -> list[tuple[Path, dict[str, str]]]:
    """The run folders under a sweep root with their grid labels, in sweep order.

    A run folder is a child of ``root`` with a :data:`PLAN_FILE` (written by ``rmoe sweep``) or with
    ``version_*`` event directories; without the plan its labels are ``{"run": <folder name>}``.
    Runs are ordered as the labels are in the root's :data:`SWEEP_COPY` when there is one, else by name.
    """
    root = Path(root)
    found = []
    for path in sorted(p for p in root.iterdir() if p.is_dir()):
        plan = path / PLAN_FILE
        if plan.is_file():
            labels = {str(k): str(v) for k, v in json.loads(plan.read_text()).get("labels", {}).items()}
            found.append((path, labels or {"run": path.name}))
        elif any(path.glob(f"version_*/{EVENTS_GLOB}")):
            found.append((path, {"run": path.name}))
    order = _label_order(root)
    if order:
        found.sort(key=lambda item: [order.get(k, {}).get(v, len(order.get(k, {}))) for k, v in item[1].items()])
    return found


def _label_order(root: Path) -> dict[str, dict[str, int]]:
    """``key -> label -> position`` from the sweep's copy of its grid (``<root>/sweep.yaml``)."""
    grid = _read_yaml(root / SWEEP_COPY).get("grid") or {}
    return {str(k): {str(label): i for i, label in enumerate(labels)} for k, labels in grid.items()}


def fit_dir(run_folder: str | os.PathLike[str]) -> Path | None:
    """The fit's run directory of a sweep run folder: ``<run>/version_0``, else the newest
    ``version_*`` holding events, else None."""
    run_folder = Path(run_folder)
    candidates = [p for p in run_folder.glob("version_*") if any(p.glob(EVENTS_GLOB))]
    if (run_folder / FIT_DIR) in candidates:
        return run_folder / FIT_DIR
    return max(candidates, key=lambda p: p.stat().st_mtime_ns) if candidates else None


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
        parsed = parse_layer_tag(tag)
        if parsed and parsed[0] == prefix.rstrip("/"):
            out[parsed[1]] = ([s for s, _ in points], [v for _, v in points])
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


def fit_status(run_dir: Path) -> dict[str, Any]:
    """The newest :data:`STATUS_FILE` under a run folder (``{}`` when there is none): ``state`` (running,
    finished, failed, interrupted), ``global_step``, and ``error`` / ``signal`` where they apply."""
    found = sorted(Path(run_dir).rglob(STATUS_FILE), key=lambda p: p.stat().st_mtime)
    for path in reversed(found):
        try:
            status = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(status, dict) and status.get("command", "fit") == "fit":
            return status
    return {}


Scalar = bool | int | float | str


def flatten_hparams(value: Any, prefix: str = "") -> dict[str, Scalar]:
    """Nested hyperparameters (dicts, dataclasses, Namespaces) -> ``{"a.b.c": scalar}``.

    Keeps bool, int, float and str; short lists of those become their JSON text; None, private
    keys (``_instantiator``) and other objects are left out, so TensorBoard's HParams tab can show
    every value.
    """
    out: dict[str, Scalar] = {}

    def visit(key: str, v: Any) -> None:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            v = {f.name: getattr(v, f.name) for f in dataclasses.fields(v)}
        elif isinstance(v, Namespace):
            v = vars(v)
        if isinstance(v, Mapping):
            for k, sub in v.items():
                if not str(k).startswith("_"):
                    visit(f"{key}.{k}" if key else str(k), sub)
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (bool, int, float, str)) for x in v):
            text = json.dumps(list(v))
            if len(text) <= 200:
                out[key] = text

    visit(prefix, value)
    return out
