"""Results table and plots of a sweep: mean ± std over seeds of each router (or any grid group).

Reads a sweep root written by ``experiments/sweep.py`` (``<root>/<run>/run.json`` names each run's
grid labels; ``<run>/version_0/`` holds the fit's TensorBoard events and checkpoints, ``<run>/test/``
the ``rmoe test`` events) and writes, into ``--out``:

- ``results.md`` / ``results.csv``: one row per group (by default every grid key but ``seed``):
  ``n`` (runs with validation results), best ``val/loss``, final ``val/bpb``, ``test/bpb``, final
  routing metrics (``--metric`` patterns; by default layer means of the last validation's gate
  entropy, MaxVio and cross-layer top-1 MI, when ``RoutingAnalytics`` logged them), the router's
  trainable parameters, total and active parameters (rebuilt from the checkpoint's
  hyper-parameters), the median step time (wall time between logged training steps) and tokens/s,
  the training steps and tokens; mean ± sample standard deviation (ddof 1) over the group's runs;
- ``runs.csv``: the same per run;
- ``val_loss.png`` / ``val_bpb.png``: validation curves, one line per group (the mean over seeds)
  with a band (min-max over seeds, or ± std);
- ``final_val_bpb.png``: final validation bpb per group, mean with ± std error bars.

A run without any ``val/loss`` (failed, or not started) is listed as incomplete and left out.

Usage::

    python experiments/report.py runs/sweeps/table1_cpu --out docs/results/table1_cpu
    python experiments/report.py runs/sweeps/fig2_depth_cpu --out docs/results/fig2 --group-by router depth
    python experiments/report.py ROOT --out DIR --metric 'moe/val/(load_cv)/layer_\\d+$' --band std
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import re
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

DEFAULT_METRICS = (r"moe/val/(gate_entropy_mean|router_logit_std|load_max_vio|top1_mi)/layer_\d+(?:_\d+)?$",)
"""Routing metrics: the tags matching a pattern are grouped by its first capture group (the column
name) and their final values averaged (here: over layers, or consecutive layer pairs for the MI)."""

RUN_FILE = "run.json"
DONE_FILE = "done.json"  # the sweep's marker of a finished run (experiments/sweep.py)
SWEEP_FILE = "sweep.yaml"
TEST_DIR = "test"
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
)
COST_COLUMNS = (
    Column("router_params", "router params", "int"),
    Column("active_params", "active params", "params"),
    Column("total_params", "total params", "params"),
    Column("step_time_ms", "step time (ms)", "rate"),
    Column("tokens_per_sec", "tokens/s", "rate"),
    Column("steps", "steps", "int"),
    Column("tokens", "tokens", "params"),
)
NON_CAUSAL_KEY = "non_causal_eval"
"""1.0 when the run's router is not causal in evaluation (``rmoe.routers.causality_of``): its val/test
loss reads later tokens through the routing and is not comparable with causal models' (marked ``*``)."""
EXTRA_KEYS = ("final_val_loss", "test_loss", NON_CAUSAL_KEY)  # in the CSVs only


@dataclass
class RunResult:
    """What one run's event files and checkpoint say.

    Attributes:
        name: The run's directory name.
        path: The run's directory.
        labels: Its grid labels (``{"router": "gru", "seed": "s0"}``), or ``{"run": name}``.
        metrics: Final quantities by column key (NaN when not logged).
        curves: ``tag -> (steps, values)`` for ``val/loss`` and ``val/bpb``.
    """

    name: str
    path: Path
    labels: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)
    curves: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """Logged a validation and, for a sweep's run (it has ``run.json``), finished (``done.json``):
        a run still training, or interrupted, would enter the table with a shorter budget."""
        if (self.path / RUN_FILE).is_file() and not (self.path / DONE_FILE).is_file():
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


def read_events(directory: Path) -> dict[str, list[tuple[int, float, float]]]:
    """Every scalar series of a directory's event files: ``tag -> [(step, value, wall_time), ...]``.

    Later files win where a (tag, step) repeats (a resumed run re-logs the steps after its
    checkpoint); series are sorted by step.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, dict[int, tuple[float, float]]] = {}
    for events in sorted(directory.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(
            str(events), size_guidance={"scalars": 0, "images": 1, "histograms": 1, "tensors": 1}
        )
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            points = series.setdefault(tag, {})
            for event in accumulator.Scalars(tag):
                points[event.step] = (event.value, event.wall_time)
    return {tag: [(s, v, w) for s, (v, w) in sorted(points.items())] for tag, points in series.items()}


def find_runs(root: Path) -> list[tuple[Path, dict[str, str]]]:
    """The run directories under a sweep root with their grid labels, in sweep order.

    A run directory is a child of ``root`` with a ``run.json`` (written by the sweep) or with
    ``version_*`` event directories; without ``run.json`` its labels are ``{"run": <dir name>}``.
    """
    found = []
    for path in sorted(p for p in root.iterdir() if p.is_dir()):
        plan = path / RUN_FILE
        if plan.is_file():
            labels = {str(k): str(v) for k, v in json.loads(plan.read_text()).get("labels", {}).items()}
            found.append((path, labels or {"run": path.name}))
        elif any(path.glob("version_*/events.out.tfevents.*")):
            found.append((path, {"run": path.name}))
    order = _label_order(root)
    if order:
        found.sort(key=lambda item: [order.get(k, {}).get(v, len(order.get(k, {}))) for k, v in item[1].items()])
    return found


def _label_order(root: Path) -> dict[str, dict[str, int]]:
    """``key -> label -> position`` from the sweep's copy of its grid (``<root>/sweep.yaml``)."""
    path = root / SWEEP_FILE
    if not path.is_file():
        return {}
    grid = (yaml.safe_load(path.read_text()) or {}).get("grid") or {}
    return {str(k): {str(label): i for i, label in enumerate(labels)} for k, labels in grid.items()}


def fit_dir(run_dir: Path) -> Path | None:
    """``<run>/version_0``, else the newest ``version_*`` holding events."""
    candidates = [p for p in run_dir.glob("version_*") if any(p.glob("events.out.tfevents.*"))]
    if (run_dir / "version_0") in candidates:
        return run_dir / "version_0"
    return max(candidates, key=lambda p: p.stat().st_mtime_ns) if candidates else None


def read_run(run_dir: Path, labels: Mapping[str, str], metric_patterns: Sequence[str] = DEFAULT_METRICS) -> RunResult:
    """Read one run: its scalars (fit and test), its routing metrics and its parameter counts."""
    result = RunResult(run_dir.name, run_dir, dict(labels))
    nan = math.nan
    result.metrics = {c.key: nan for c in (*BASE_COLUMNS, *COST_COLUMNS)} | dict.fromkeys(EXTRA_KEYS, nan)
    fit = fit_dir(run_dir)
    scalars = read_events(fit) if fit else {}
    test_dir = run_dir / TEST_DIR
    if test_dir.is_dir():
        scalars = {**scalars, **{t: s for t, s in read_events(test_dir).items() if t.startswith(("test/", "moe/test"))}}

    def values(tag: str) -> list[float]:
        return [v for _, v, _ in scalars.get(tag, [])]

    m = result.metrics
    if values("val/loss"):
        m["best_val_loss"] = min(values("val/loss"))
        m["final_val_loss"] = values("val/loss")[-1]
    for tag, key in (("val/bpb", "final_val_bpb"), ("test/bpb", "test_bpb"), ("test/loss", "test_loss")):
        if values(tag):
            m[key] = values(tag)[-1]
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
    return result


def step_time_ms(points: Sequence[tuple[int, float, float]]) -> float:
    """Median wall time per training step (ms) between consecutive logged steps.

    The median leaves out the gaps where validation or checkpointing ran.
    """
    rates = [
        (w1 - w0) / (s1 - s0) * 1e3 for (s0, _, w0), (s1, _, w1) in itertools.pairwise(points) if s1 > s0 and w1 >= w0
    ]
    return statistics.median(rates) if rates else math.nan


def routing_metrics(
    scalars: Mapping[str, Sequence[tuple[int, float, float]]], patterns: Iterable[str]
) -> dict[str, float]:
    """Final values of the tags matching each pattern, averaged per column (the first capture group).

    A pattern without a group makes one column named after the pattern. Absent tags give no column
    value (the report leaves it blank).
    """
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

    The model is rebuilt (on the meta device: no memory, no init) from the checkpoint's
    ``hyper_parameters["arch"]`` so tied weights count once and ``MoeLM.num_parameters(active=True)``
    counts top-k of the experts; router parameters are the trainable parameters whose name contains
    ``router`` (every layer's router and the shared part, e.g. RMoE's GRU cell; frozen ones, as
    RandomSMoE's, are not counted). Without a usable config, the counts come from the state dict
    (unique tensors; no active count).
    """
    candidates = [checkpoint_dir / "last.ckpt", *sorted(checkpoint_dir.glob("*.ckpt"))]
    ckpt_path = next((p for p in candidates if p.is_file()), None)
    if ckpt_path is None:
        return {}
    import torch

    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    try:
        from rmoe.model.config import ModelConfig
        from rmoe.model.decoder import MoeLM
        from rmoe.routers import causality_of

        config = ModelConfig(**checkpoint["hyper_parameters"]["arch"])
        with torch.device("meta"):
            model = MoeLM(config)
        router = sum(p.numel() for n, p in model.named_parameters() if "router" in n and p.requires_grad)
        return {
            "total_params": float(model.num_parameters()),
            "active_params": float(model.num_parameters(active=True)),
            "router_params": float(router),
            NON_CAUSAL_KEY: float(causality_of(config).evaluation is not None),
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
# Grouping and writing


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


# Two-sided 95% quantiles of Student's t for 1..10 degrees of freedom; beyond 10 the approximation
# 1.96 + 2.4 / df is within 1.5% (2.20 vs 2.228 at 10, 2.08 vs 2.086 at 20).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def t_quantile_95(df: int) -> float:
    """Two-sided 95% quantile of Student's t with ``df`` degrees of freedom."""
    return _T95.get(df, 1.96 + 2.4 / df)


@dataclass
class Paired:
    """Same-seed differences ``metric(run) - metric(baseline run)`` for one group of runs.

    Two runs pair when all their labels but ``key`` are equal (so the same seed: same initialisation
    and data order). The verdict is the paired t-interval's: ``better`` (lower) or ``worse`` when the
    95% interval of the mean difference excludes 0, otherwise ``indistinguishable``.
    """

    labels: dict[str, str]
    differences: list[float]

    @property
    def n(self) -> int:
        return len(self.differences)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.differences) if self.differences else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.differences) if self.n > 1 else math.nan

    @property
    def half_width(self) -> float:
        """Half-width of the 95% t-interval of the mean difference (NaN with fewer than 2 pairs)."""
        return t_quantile_95(self.n - 1) * self.std / math.sqrt(self.n) if self.n > 1 else math.nan

    @property
    def verdict(self) -> str:
        if not math.isfinite(self.half_width):
            return "too few pairs"
        if self.mean + self.half_width < 0:
            return "better"
        if self.mean - self.half_width > 0:
            return "worse"
        return "indistinguishable"


def paired_comparisons(
    runs: Sequence[RunResult], key: str, baseline: str, metric: str = "final_val_bpb"
) -> list[Paired]:
    """For every non-baseline label of ``key``, the same-seed differences against the baseline's runs.

    Groups are the runs' labels without ``seed`` (e.g. ``router=gru, depth=l12``), in first-run order.

    Raises:
        ReportError: If no run has ``key=baseline``.
    """
    others = [k for k in dict.fromkeys(k for r in runs for k in r.labels) if k != key]
    base = {tuple(r.labels.get(k) for k in others): r for r in runs if r.labels.get(key) == baseline}
    if not base:
        raise ReportError(f"--paired {key}={baseline}: no complete run has {key}={baseline}.")
    groups: dict[tuple[str | None, ...], Paired] = {}
    for run in runs:
        if run.labels.get(key) == baseline:
            continue
        partner = base.get(tuple(run.labels.get(k) for k in others))
        value = run.metrics.get(metric, math.nan)
        if partner is None or not math.isfinite(value) or not math.isfinite(partner.metrics.get(metric, math.nan)):
            continue
        labels = {k: v for k, v in run.labels.items() if k != SEED_KEY}
        groups.setdefault(tuple(labels.values()), Paired(labels, [])).differences.append(
            value - partner.metrics[metric]
        )
    return list(groups.values())


def paired_table(paired: Sequence[Paired], key: str, baseline: str, metric: str) -> str:
    if not paired:
        return ""
    keys = list(paired[0].labels)
    header = [*keys, "pairs", f"mean Δ {metric}", "std of Δ", "95% interval", "per seed", f"vs {baseline}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(keys) + ["---:"] * 5 + ["---"]) + "|"]
    for p in paired:
        interval = f"[{p.mean - p.half_width:+.4f}, {p.mean + p.half_width:+.4f}]" if p.n > 1 else ""
        per_seed = ", ".join(f"{d:+.3f}" for d in p.differences)
        std = f"{p.std:.4f}" if p.n > 1 else ""
        lines.append(
            "| "
            + " | ".join([*p.labels.values(), str(p.n), f"{p.mean:+.4f}", std, interval, per_seed, p.verdict])
            + " |"
        )
    return "\n".join(lines)


def format_value(value: float, kind: str) -> str:
    if not math.isfinite(value):
        return ""
    if kind == "int":
        return f"{round(value):,}"
    if kind == "params":
        for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
            if abs(value) >= scale:
                return f"{value / scale:.3g}{suffix}"
        return f"{value:.0f}"
    if kind == "rate":
        return f"{value:.4g}"
    return f"{value:.4f}"


def format_mean_std(mean: float, std: float, kind: str) -> str:
    if not math.isfinite(mean):
        return "–"
    text = format_value(mean, kind)
    if math.isfinite(std) and kind in ("float", "rate"):
        text += f" ± {format_value(std, kind)}"
    return text


def write_csvs(groups: Sequence[Group], runs: Sequence[RunResult], columns: Sequence[Column], out: Path) -> None:
    keys = list(groups[0].labels) if groups else []
    all_keys = [c.key for c in columns] + list(EXTRA_KEYS)
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*keys, "n", *(f"{k}_{s}" for k in all_keys for s in ("mean", "std"))])
        for group in groups:
            cells: list[Any] = [*group.labels.values(), len(group.runs)]
            for key in all_keys:
                cells += [_csv_number(v) for v in group.mean_std(key)]
            writer.writerow(cells)
    label_keys = list(dict.fromkeys(k for r in runs for k in r.labels))
    with (out / "runs.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", *label_keys, *all_keys])
        for run in runs:
            writer.writerow(
                [
                    run.name,
                    *(run.labels.get(k, "") for k in label_keys),
                    *(_csv_number(run.metrics.get(k, math.nan)) for k in all_keys),
                ]
            )


def _csv_number(value: float) -> str:
    return repr(float(value)) if math.isfinite(value) else ""


def markdown_table(groups: Sequence[Group], columns: Sequence[Column]) -> str:
    keys = list(groups[0].labels) if groups else []
    header = [*keys, "n", *(c.heading for c in columns)]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * len(keys) + ["---:"] * (len(header) - len(keys))) + "|",
    ]
    for group in groups:
        labels = list(group.labels.values())
        if labels and group.non_causal:
            labels[0] += " \\*"
        cells = [*labels, str(len(group.runs))]
        cells += [format_mean_std(*group.mean_std(c.key), c.kind) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(
    root: Path,
    groups: Sequence[Group],
    columns: Sequence[Column],
    incomplete: Sequence[RunResult],
    out: Path,
    plots: Sequence[str],
    band: str,
    paired: str = "",
) -> None:
    sweep: dict[str, Any] = {}
    if (root / SWEEP_FILE).is_file():
        sweep = yaml.safe_load((root / SWEEP_FILE).read_text()) or {}
    title = sweep.get("name") or root.name
    num_runs = sum(len(g.runs) for g in groups)
    keys = list(groups[0].labels) if groups else []
    parts = [f"# Results: {title}", ""]
    if sweep.get("description"):
        parts += [str(sweep["description"]).strip(), ""]
    parts += [
        f"{num_runs} runs from `{root}`, grouped by {', '.join(f'`{k}`' for k in keys)}; "
        f"written {datetime.now(timezone.utc).astimezone().isoformat(timespec='minutes')}.",
        "",
        markdown_table(groups, columns),
        "",
        "Mean ± sample standard deviation (ddof 1) over the group's runs (`n`). Best val loss: the lowest "
        "`val/loss` of the run; final val bpb: `val/bpb` at its last validation; test bpb: `rmoe test` of the "
        "best checkpoint (when the sweep ran it). Routing metrics: the last validation's values averaged over "
        "layers (or consecutive layer pairs for the MI), blank when not logged. Router params: trainable "
        "parameters whose name contains `router`. Step time: median wall time between logged training steps.",
        "",
    ]
    if any(g.non_causal for g in groups):
        parts += [
            "\\* Not causal in evaluation (`rmoe.routers.causality_of`): the router reads later tokens, so its "
            "validation and test losses are not comparable with the causal rows'.",
            "",
        ]
    if paired:
        parts += [paired, ""]
    if incomplete:
        parts += [
            "Left out (failed, unfinished or still running: no sweep marker or no validation yet): "
            + ", ".join(f"`{r.name}`" for r in incomplete),
            "",
        ]
    band_text = "min-max over seeds" if band == "minmax" else "± one standard deviation"
    for plot in plots:
        parts += [f"![{plot}]({plot})", ""]
    if plots:
        parts += [f"Curves: mean over a group's runs, band {band_text}; bars: mean ± std.", ""]
    (out / "results.md").write_text("\n".join(parts))


def plot_curves(groups: Sequence[Group], tag: str, path: Path, band: str) -> bool:
    """Validation curves: a group's mean over runs at the steps all its runs logged, with a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
    drawn = False
    for i, group in enumerate(groups):
        curves = [dict(zip(*r.curves[tag])) for r in group.runs if tag in r.curves]
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        if not steps:
            continue
        values = [[c[s] for c in curves] for s in steps]
        mean = [statistics.fmean(v) for v in values]
        if band == "std":
            spread = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
            low, high = [m - s for m, s in zip(mean, spread)], [m + s for m, s in zip(mean, spread)]
        else:
            low, high = [min(v) for v in values], [max(v) for v in values]
        color = colors(i % colors.N)
        ax.plot(steps, mean, color=color, label=f"{group.name} (n={len(curves)})", marker="o", markersize=3)
        if len(curves) > 1:
            ax.fill_between(steps, low, high, color=color, alpha=0.2, linewidth=0)
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel("training step")
    ax.set_ylabel(tag)
    ax.set_title(f"{tag} ({'min-max' if band == 'minmax' else '± std'} over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_bars(groups: Sequence[Group], key: str, label: str, path: Path) -> bool:
    """Bar chart of a metric per group: mean with ± std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [(g, *g.mean_std(key)) for g in groups if g.values(key)]
    if not shown:
        return False
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(shown) + 2), 4.5))
    xs = range(len(shown))
    means = [m for _, m, _ in shown]
    errors = [s if math.isfinite(s) else 0.0 for _, _, s in shown]
    ax.bar(xs, means, yerr=errors, capsize=4, color="tab:blue", alpha=0.8)
    ax.set_xticks(list(xs), [f"{g.name}\n(n={len(g.values(key))})" for g, _, _ in shown], fontsize=8)
    low = min(m - e for m, e in zip(means, errors))
    high = max(m + e for m, e in zip(means, errors))
    pad = (high - low) * 0.3 or abs(high) * 0.05 or 1.0
    ax.set_ylim(low - pad, high + pad)  # differences between routers are small: do not start at 0
    ax.set_ylabel(label)
    ax.set_title(f"{label} (mean ± std over seeds)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def report(
    root: str | Path,
    out: str | Path,
    group_by: Sequence[str] | None = None,
    metric_patterns: Sequence[str] = DEFAULT_METRICS,
    band: str = "minmax",
    only: Mapping[str, set[str]] | None = None,
    paired: tuple[str, str] | None = None,
) -> tuple[list[Group], list[RunResult]]:
    """Read a sweep root and write the table, CSVs and plots into ``out``.

    ``only`` keeps the runs with those labels; ``paired = (key, label)`` adds the same-seed
    comparison of every other ``key`` label against ``label`` (:func:`paired_comparisons`).

    Returns:
        The groups (complete runs only) and every run read (complete or not).

    Raises:
        ReportError: If the root holds no run, or a group-by key is no run's label.
    """
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise ReportError(f"sweep root {str(root)!r} is not a directory.")
    for pattern in metric_patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ReportError(f"--metric {pattern!r} is not a regular expression: {err}.") from None
    found = find_runs(root)
    if not found:
        raise ReportError(
            f"no run under {str(root)!r} (expected <root>/<run>/run.json or <root>/<run>/version_*/ events)."
        )
    if only:
        found = [(path, labels) for path, labels in found if all(labels.get(k) in v for k, v in only.items())]
        if not found:
            raise ReportError(f"--only {only}: no run under {str(root)!r} has those labels.")
    runs = [read_run(path, labels, metric_patterns) for path, labels in found]
    complete = [r for r in runs if r.complete]
    incomplete = [r for r in runs if not r.complete]
    if not complete:
        raise ReportError(f"no run under {str(root)!r} has logged val/loss yet ({len(runs)} incomplete).")
    keys = list(group_by) if group_by else default_group_keys(complete)
    available = list(dict.fromkeys(k for r in complete for k in r.labels))
    unknown = [k for k in keys if k not in available]
    if unknown:
        raise ReportError(
            f"--group-by {', '.join(unknown)}: not a grid key of these runs; available: {', '.join(available)}."
        )
    groups = group_runs(complete, keys)
    columns = [*BASE_COLUMNS, *metric_columns(metric_patterns, complete), *COST_COLUMNS]

    out.mkdir(parents=True, exist_ok=True)
    write_csvs(groups, runs, columns, out)
    plots = []
    for tag, name in (("val/loss", "val_loss.png"), ("val/bpb", "val_bpb.png")):
        if plot_curves(groups, tag, out / name, band):
            plots.append(name)
    if plot_bars(groups, "final_val_bpb", "final val bpb", out / "final_val_bpb.png"):
        plots.append("final_val_bpb.png")
    paired_text = ""
    if paired:
        key, baseline = paired
        comparisons = paired_comparisons(complete, key, baseline)
        paired_text = paired_table(comparisons, key, baseline, "final_val_bpb")
        if paired_text:
            paired_text = (
                f"Paired against `{key}={baseline}` (same seed: same initialisation and data order); Δ = run - "
                f"baseline, negative is better; the verdict is the 95% t-interval's (better / worse when it "
                f"excludes 0).\n\n{paired_text}"
            )
    write_markdown(root, groups, columns, incomplete, out, plots, band, paired_text)
    return groups, runs


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 nothing to report or a bad option)."""
    parser = argparse.ArgumentParser(
        prog="python experiments/report.py", description="Results table (markdown, CSV) and plots of a sweep root."
    )
    parser.add_argument("root", help="the sweep root, e.g. runs/sweeps/table1_cpu")
    parser.add_argument("--out", required=True, help="output directory, e.g. docs/results/table1_cpu")
    parser.add_argument(
        "--group-by", nargs="+", default=None, metavar="KEY", help="grid keys that make a row (default: all but seed)"
    )
    parser.add_argument(
        "--metric",
        action="append",
        default=None,
        metavar="REGEX",
        help="routing-metric tag pattern; its first group names the column (repeatable; replaces the defaults: "
        + ", ".join(DEFAULT_METRICS)
        + ")",
    )
    parser.add_argument("--band", choices=("minmax", "std"), default="minmax", help="seed band of the curves")
    parser.add_argument(
        "--only", action="append", default=[], metavar="KEY=LABEL[,LABEL]", help="keep these runs (repeatable)"
    )
    parser.add_argument(
        "--paired", default=None, metavar="KEY=LABEL", help="same-seed differences against this baseline"
    )
    args = parser.parse_args(argv)
    group_by = [k for item in args.group_by or [] for k in item.split(",") if k]
    try:
        paired = None
        if args.paired:
            key, sep, label = args.paired.partition("=")
            if not sep or not key or not label:
                raise ReportError(f"--paired {args.paired!r}: expected KEY=LABEL, e.g. router=linear.")
            paired = (key, label)
        groups, runs = report(
            args.root,
            args.out,
            group_by or None,
            tuple(args.metric or DEFAULT_METRICS),
            args.band,
            parse_only(args.only),
            paired,
        )
    except ReportError as err:
        print(f"report: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    complete = sum(len(g.runs) for g in groups)
    print(
        f"report: {len(groups)} group(s) from {complete} run(s) ({len(runs) - complete} incomplete) "
        f"-> {args.out}/results.md"
    )
    print(markdown_table(groups, [*BASE_COLUMNS]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
