"""Reading runs back: run directories, their TensorBoard scalars, checkpoints and ``metrics.json``.

A *run directory* is what ``rmoe fit`` writes (``runs/<name>/version_<n>/``: event files, ``config.yaml``,
``hparams.yaml``, ``checkpoints/*.ckpt``). A *sweep root* (``rmoe sweep``) holds one folder per run of its grid,
``<root>/<run>/``, with the files named below, and a copy of the grid, :data:`SWEEP_COPY`.

The one place that names those files and reads event files; it only reads (but :func:`write_json`) and imports
from ``rmoe`` only its leaf modules.
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

# The files of one sweep run folder, ``<root>/<run>/``
FIT_DIR = "version_0"  # the fit's run directory (the logger's version is fixed)
TEST_DIR = "test"  # the test of the run's best or last checkpoint
CAUSAL_TEST_DIR = "test_causal"  # the same test with the router's causal evaluation, for a non-causal router
LOG_FILE = "stdout.log"  # everything the run printed, appended to on each attempt
PLAN_FILE = "run.json"  # the run's grid labels and command lines
RUN_LOCK = "running.lock"  # flock-ed while a sweep process runs the run: a second sweep leaves it alone
FOLLOW_UP_PLAN = "run.follow-up.json"  # a stage added to a finished run (its PLAN_FILE stays); removed once done
MARKER_FILE = "done.json"  # written once fit (and test) succeeded
SWEEP_COPY = "sweep.yaml"  # the sweep root's copy of the grid (keys and labels in order)
STATUS_FILE = "status.json"  # in a run's log folder: running, finished, failed or interrupted (RunStatus)
RESUME_CHECKPOINT = "resume"  # checkpoints/resume.ckpt: the periodic checkpoint a sweep run resumes from


@dataclass
class RunDir:
    """One training run's directory, read back from disk.

    Attributes:
        path: The run directory (``<save_dir>/<name>/version_<n>``).
        label: A short name for plots: the router, plus the directory's name and version when runs share one.
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
        """The checkpoint ``name`` of this run, else its best (``best-*.ckpt``), else any; RmoeError if none."""
        directory = self.path / "checkpoints"
        for candidate in [directory / name, *sorted(directory.glob("best-*.ckpt")), *sorted(directory.glob("*.ckpt"))]:
            if candidate.is_file():
                return candidate
        raise RmoeError(f"run {self.path} has no checkpoint under {directory}.")


def find_runs(patterns: str | Iterable[str]) -> list[RunDir]:
    """Run directories matching glob patterns (e.g. ``"runs/quick/version_*"`` or ``"runs/a,runs/b"``), sorted.

    A match is a run if it holds an event file or a ``checkpoints/`` folder; a parent of runs (``runs/quick``)
    stands for every run below it. Raises RmoeError if nothing matches."""
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
    """``<save_dir>/<name>/version_<k>`` for a checkpoint in a run's ``checkpoints/`` folder, else None."""
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
    """Every scalar series of a directory's event files (not sub-directories), unsampled and sorted by step:
    ``{tag: [(step, value, wall_time), ...]}``, only tags matching ``pattern`` (``re.search``) if given.

    Later files win where a (tag, step) repeats: a resumed run re-logs the steps after its checkpoint."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    regex = re.compile(pattern) if pattern else None
    series: dict[str, dict[int, tuple[float, float]]] = {}
    for events in sorted(Path(directory).glob(EVENTS_GLOB)):
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
    """:func:`read_events` without the wall times: ``{tag: [(step, value), ...]}``."""
    return {tag: [(s, v) for s, v, _ in points] for tag, points in read_events(run_dir, pattern).items()}


def find_sweep_runs(root: str | os.PathLike[str]) -> list[tuple[Path, dict[str, str]]]:
    """The run folders under a sweep root (with a :data:`PLAN_FILE` or ``version_*`` event folders) with their
    grid labels (``{"run": <folder name>}`` without a plan), in the order of :data:`SWEEP_COPY`, else by name."""
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
    """A sweep run's fit directory: ``<run>/version_0``, else the newest ``version_*`` with events, else None."""
    run_folder = Path(run_folder)
    candidates = [p for p in run_folder.glob("version_*") if any(p.glob(EVENTS_GLOB))]
    if (run_folder / FIT_DIR) in candidates:
        return run_folder / FIT_DIR
    return max(candidates, key=lambda p: p.stat().st_mtime_ns) if candidates else None


def layer_series(
    scalars: Mapping[str, list[tuple[int, float]]], prefix: str
) -> dict[str, tuple[list[int], list[float]]]:
    """The per-layer series under ``prefix`` (e.g. ``moe/val/gate_entropy_mean``) in layer order:
    ``{"0": (steps, values), ...}`` for ``{prefix}/layer_0``, ``"0_1"`` for consecutive-layer tags."""
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
    """The newest fit :data:`STATUS_FILE` under a run folder (``{}`` if none): ``state``, ``global_step``, ..."""
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
    """Nested hyperparameters (dicts, dataclasses, Namespaces) -> ``{"a.b.c": scalar}`` for TensorBoard's HParams
    tab: scalars, short lists of scalars as JSON text; None, private keys and other objects are left out."""
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
