"""Reading a sweep root (through :mod:`rmoe.runs`) for the report: each run's final metrics, curves and
parameter counts; groups."""

from __future__ import annotations

import itertools
import json
import math
import re
import statistics
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rmoe.metrics.catalog import metrics
from rmoe.runs import CAUSAL_TEST_DIR, MARKER_FILE, PLAN_FILE, TEST_DIR, fit_dir, fit_status, read_events
from rmoe.tags import layer_pattern, scalar_pattern, series

# Routing-metric patterns: matching tags are grouped by the first capture group (the column) and their final
# values averaged (over layers); the defaults are the catalog's metrics declared with report=True.
DEFAULT_METRICS = (
    layer_pattern("val", [m.name for m in metrics(flag="report") if m.kind != "scalar"]),
    scalar_pattern("val", [m.name for m in metrics(flag="report", kind="scalar")]),
    r"^(downstream/.+)$",  # lm-eval scores logged during fit (rmoe.training.downstream.DownstreamEval)
)

SEED_KEY = "seed"


class ReportError(Exception):
    """Nothing to report, or a bad option: one paragraph, no traceback."""


@dataclass(frozen=True)
class Column:
    """A reported quantity: its key in the metrics dicts, its heading and how to format it."""

    key: str
    heading: str
    kind: str = "float"  # "float" (4 decimals), "int" (thousands separators), "params" (K/M), "rate"


BASE_COLUMNS = (
    Column("best_val_loss", "best val loss"),
    Column("final_val_bpb", "final val bpb"),
    Column("test_bpb", "test bpb"),
    Column("causal_test_bpb", "causal test bpb"),
)
OPTIONAL_KEYS = ("causal_test_bpb",)  # left out of the tables when no run has them


def base_columns(runs: Iterable[RunResult]) -> list[Column]:
    """:data:`BASE_COLUMNS`, less the optional ones that no run has."""
    present = {k for r in runs for k in OPTIONAL_KEYS if math.isfinite(r.metrics.get(k, math.nan))}
    return [c for c in BASE_COLUMNS if c.key not in OPTIONAL_KEYS or c.key in present]


COST_COLUMNS = (
    Column("router_params", "router params", "int"),
    Column("active_params", "active params", "params"),
    Column("total_params", "total params", "params"),
    Column("step_time_ms", "step time (ms)", "rate"),
    Column("tokens_per_sec", "tokens/s", "rate"),
    Column("steps", "steps", "int"),
    Column("tokens", "tokens", "params"),
)
# 1.0 when the router is not causal in evaluation (``ModelConfig.causality``): its val/test loss reads later
# tokens and is not comparable with causal models' (marked ``*``).
NON_CAUSAL_KEY = "non_causal_eval"
# The test bpb comparable across every run: test_bpb of a causal router, else causal_test_bpb (or NaN).
COMPARABLE_TEST_KEY = "comparable_test_bpb"
EXTRA_KEYS = ("final_val_loss", "test_loss", NON_CAUSAL_KEY, COMPARABLE_TEST_KEY)  # in the CSVs only


@dataclass
class RunResult:
    """What one run's event files and checkpoint say.

    Attributes:
        labels: Its grid labels (``{"router": "gru", "seed": "s0"}``), or ``{"run": name}``.
        metrics: Final quantities by column key (NaN when not logged).
        curves: ``tag -> (steps, values)`` for ``val/loss`` and ``val/bpb``.
        overrides: The ``--set`` overrides the sweep command gave the run (from its ``run.json``).
    """

    name: str
    path: Path
    labels: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)
    curves: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)

    @property
    def state(self) -> str:
        """What happened to the run, in a few words, from its ``status.json`` (and the sweep's marker)."""
        status, step = self.status, self.status.get("global_step")
        at = f" at step {step}" if step is not None else ""
        state = status.get("state")
        error = " ".join(str(status.get("error", "")).split())
        if state == "failed":
            return f"diverged{at}" if "training diverged" in error else f"failed{at}: {error[:160]}"
        if state == "interrupted":
            return f"interrupted ({status.get('signal', 'a signal')}){at}"
        if state == "running":
            return f"running or killed{at} (pid {status.get('pid')}; no end written)"
        if state == "finished":
            if not math.isfinite(self.metrics.get("best_val_loss", math.nan)):
                return f"finished{at} without a validation"
            if (self.path / PLAN_FILE).is_file() and not (self.path / MARKER_FILE).is_file():
                return f"finished{at}, its sweep stages not all done"
            return f"finished{at}"
        return "not started"

    @property
    def complete(self) -> bool:
        """Logged a validation and, for a sweep's run, finished (``done.json``): an unfinished run would enter the
        table with a shorter budget."""
        if (self.path / PLAN_FILE).is_file() and not (self.path / MARKER_FILE).is_file():
            return False
        return math.isfinite(self.metrics.get("best_val_loss", math.nan))


@dataclass
class Group:
    """Runs sharing the labels of the group-by keys."""

    labels: dict[str, str]
    runs: list[RunResult]

    @property
    def name(self) -> str:
        return " / ".join(self.labels.values())

    def values(self, key: str) -> list[float]:
        return [r.metrics[key] for r in self.runs if math.isfinite(r.metrics.get(key, math.nan))]

    @property
    def non_causal(self) -> bool:
        """Some run's router is not causal in evaluation (see :data:`NON_CAUSAL_KEY`)."""
        return any(r.metrics.get(NON_CAUSAL_KEY, 0.0) == 1.0 for r in self.runs)

    def mean_std(self, key: str) -> tuple[float, float]:
        """Mean and sample standard deviation (ddof 1; NaN with fewer than 2 values) of a metric."""
        values = self.values(key)
        mean = statistics.fmean(values) if values else math.nan
        std = statistics.stdev(values) if len(values) > 1 else math.nan
        return mean, std


# ----------------------------------------------------------------------------------------------
# Reading


def read_run(run_dir: Path, labels: Mapping[str, str], metric_patterns: Sequence[str] = DEFAULT_METRICS) -> RunResult:
    """Read one run: its scalars (fit and test), its routing metrics and its parameter counts."""
    result = RunResult(run_dir.name, run_dir, dict(labels), status=fit_status(run_dir))
    try:
        plan = json.loads((run_dir / PLAN_FILE).read_text())
        result.overrides = [str(o) for o in plan.get("set") or []] if isinstance(plan, dict) else []
    except (OSError, ValueError):
        pass
    nan = math.nan
    result.metrics = {c.key: nan for c in (*BASE_COLUMNS, *COST_COLUMNS)} | dict.fromkeys(EXTRA_KEYS, nan)
    fit = fit_dir(run_dir)
    scalars = read_events(fit) if fit else {}
    test_dir = run_dir / TEST_DIR
    if test_dir.is_dir():
        scalars = {
            **scalars,
            **{t: s for t, s in read_events(test_dir).items() if t.startswith(("test/", series("test") + "/"))},
        }

    causal_test_dir = run_dir / CAUSAL_TEST_DIR
    causal_scalars = read_events(causal_test_dir) if causal_test_dir.is_dir() else {}

    def values(tag: str) -> list[float]:
        return [v for _, v, _ in scalars.get(tag, [])]

    m = result.metrics
    if values("val/loss"):
        m["best_val_loss"] = min(values("val/loss"))
        m["final_val_loss"] = values("val/loss")[-1]
    for tag, key in (("val/bpb", "final_val_bpb"), ("test/bpb", "test_bpb"), ("test/loss", "test_loss")):
        if values(tag):
            m[key] = values(tag)[-1]
    if causal_scalars.get("test/bpb"):
        m["causal_test_bpb"] = causal_scalars["test/bpb"][-1][1]
    if values("train/tokens_per_sec"):
        m["tokens_per_sec"] = statistics.median(values("train/tokens_per_sec"))
    m["step_time_ms"] = step_time_ms(scalars.get("train/loss", []))
    if scalars.get("train/loss"):
        m["steps"] = float(scalars["train/loss"][-1][0] + 1)
    if values("train/tokens_seen"):
        m["tokens"] = values("train/tokens_seen")[-1]
    m.update(routing_metrics(scalars, metric_patterns))
    for tag in ("val/loss", "val/bpb"):
        if tag in scalars:
            result.curves[tag] = ([s for s, _, _ in scalars[tag]], [v for _, v, _ in scalars[tag]])
    if fit is not None:
        m.update(parameter_counts(fit / "checkpoints"))
    non_causal = m.get(NON_CAUSAL_KEY, nan)
    if math.isfinite(non_causal):
        m[COMPARABLE_TEST_KEY] = m["causal_test_bpb"] if non_causal == 1.0 else m["test_bpb"]
    return result


def step_time_ms(points: Sequence[tuple[int, float, float]]) -> float:
    """Median wall time per training step (ms) between logged steps (the median skips validation gaps)."""
    rates = [
        (w1 - w0) / (s1 - s0) * 1e3 for (s0, _, w0), (s1, _, w1) in itertools.pairwise(points) if s1 > s0 and w1 >= w0
    ]
    return statistics.median(rates) if rates else math.nan


def routing_metrics(
    scalars: Mapping[str, Sequence[tuple[int, float, float]]], patterns: Iterable[str]
) -> dict[str, float]:
    """Final values of the tags matching each pattern, averaged per column (the first capture group, else the
    pattern itself); absent tags give no value."""
    found: dict[str, list[float]] = {}
    for pattern in patterns:
        regex = re.compile(pattern)
        for tag in sorted(scalars):
            match = regex.search(tag)
            if match and scalars[tag]:
                column = next((g for g in match.groups() if g), None) or pattern
                found.setdefault(column, []).append(scalars[tag][-1][1])
    return {column: statistics.fmean(values) for column, values in found.items()}


def metric_columns(patterns: Iterable[str], runs: Iterable[RunResult]) -> list[Column]:
    """The routing-metric columns: every column name a pattern produced in some run, in first-seen order."""
    known = {c.key for c in (*BASE_COLUMNS, *COST_COLUMNS)} | set(EXTRA_KEYS)
    names: dict[str, None] = {}
    for run in runs:
        for key in run.metrics:
            if key not in known:
                names[key] = None
    return [Column(name, name) for name in names]


def parameter_counts(checkpoint_dir: Path) -> dict[str, float]:
    """Total, active and trainable-router parameter counts of a run, from one of its checkpoints.

    The model is rebuilt on the meta device from ``hyper_parameters["arch"]``, so tied weights count once and
    the active count has top-k experts; router parameters are :func:`rmoe.metrics.router_parameters`'s. Without a
    usable config, the state dict's unique tensors are counted (no active count; router by the name ``router``).
    """
    candidates = [checkpoint_dir / "last.ckpt", *sorted(checkpoint_dir.glob("*.ckpt"))]
    ckpt_path = next((p for p in candidates if p.is_file()), None)
    if ckpt_path is None:
        return {}
    import torch

    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    try:
        from rmoe.metrics import router_parameters
        from rmoe.model.config import ModelConfig
        from rmoe.model.decoder import MoeLM

        config = ModelConfig(**checkpoint["hyper_parameters"]["arch"])
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. a non-causal router's start-up warning: the table marks it
            model = MoeLM(config)
        router = sum(p.numel() for p in router_parameters(model).values())
        return {
            "total_params": float(model.num_parameters()),
            "active_params": float(model.num_parameters(active=True)),
            "router_params": float(router),
            NON_CAUSAL_KEY: float(config.causality().evaluation is not None),
        }
    except Exception:  # an old or foreign checkpoint: count what the state dict holds
        state = checkpoint.get("state_dict", {})
        seen: dict[int, int] = {}
        router = 0
        for name, tensor in state.items():
            if tensor.data_ptr() in seen:
                continue
            seen[tensor.data_ptr()] = tensor.numel()
            router += tensor.numel() if "router" in name else 0
        return {"total_params": float(sum(seen.values())), "router_params": float(router)}


# ----------------------------------------------------------------------------------------------
# Grouping


def group_runs(runs: Sequence[RunResult], keys: Sequence[str]) -> list[Group]:
    """Groups of runs with equal labels for ``keys``, in the order of their first run."""
    groups: dict[tuple[str, ...], Group] = {}
    for run in runs:
        labels = {k: run.labels.get(k, "?") for k in keys}
        groups.setdefault(tuple(labels.values()), Group(labels, [])).runs.append(run)
    return list(groups.values())


def default_group_keys(runs: Sequence[RunResult]) -> list[str]:
    """Every label key but ``seed`` (all keys if that leaves none)."""
    keys = list(dict.fromkeys(k for r in runs for k in r.labels))
    return [k for k in keys if k != SEED_KEY] or keys


def parse_only(items: Iterable[str]) -> dict[str, set[str]]:
    """``["router=gru,linear", "seed=s0"]`` -> ``{"router": {"gru", "linear"}, "seed": {"s0"}}``."""
    only: dict[str, set[str]] = {}
    for item in items:
        key, sep, labels = item.partition("=")
        wanted = {label for label in labels.split(",") if label}
        if not sep or not key or not wanted:
            raise ReportError(f"--only {item!r}: expected KEY=LABEL[,LABEL...].")
        only.setdefault(key, set()).update(wanted)
    return only
