"""Writing the report: the markdown table, the CSVs and the plots."""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from rmoe.report.collect import EXTRA_KEYS, Column, Group, RunResult
from rmoe.report.paired import Paired
from rmoe.runs import SWEEP_COPY


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
        writer.writerow(["run", *label_keys, "complete", "state", *all_keys])
        for run in runs:
            writer.writerow(
                [
                    run.name,
                    *(run.labels.get(k, "") for k in label_keys),
                    int(run.complete),  # 0: left out of the tables (unfinished or no validation)
                    run.state,
                    *(_csv_number(run.metrics.get(k, math.nan)) for k in all_keys),
                ]
            )


def incomplete_table(runs: Sequence[RunResult]) -> str:
    """One row per run left out of the tables: labels, ``RunResult.state``, steps, best val loss so far."""
    keys = list(dict.fromkeys(k for r in runs for k in r.labels))
    lines = ["| run | " + " | ".join(keys) + " | state | steps | best val loss so far |",
             "|---|" + "---|" * len(keys) + "---|---:|---:|"]  # fmt: skip
    for r in runs:
        cells = [f"`{r.name}`", *(r.labels.get(k, "") for k in keys), r.state.replace("|", "/"),
                 format_value(r.metrics.get("steps", math.nan), "int"),
                 format_value(r.metrics.get("best_val_loss", math.nan), "loss")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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


def what_ran(groups: Sequence[Group]) -> str:
    """The reported runs' steps, runs per group and ``--set`` overrides, read off the runs (the sweep file's
    description may be of another budget)."""
    runs = [r for g in groups for r in g.runs]
    steps = sorted({int(r.metrics["steps"]) for r in runs if math.isfinite(r.metrics.get("steps", math.nan))})
    sizes = sorted({len(g.runs) for g in groups})
    step_text = (
        "steps not logged"
        if not steps
        else f"{steps[0]:,} optimiser steps each"
        if len(steps) == 1
        else f"{steps[0]:,} to {steps[-1]:,} optimiser steps"
    )
    size_text = " or ".join(str(n) for n in sizes)
    text = f"As run: {step_text}, {size_text} run(s) per group"
    overrides = sorted({o for r in runs for o in r.overrides})
    if overrides:
        common = [o for o in overrides if all(o in r.overrides for r in runs)]
        some = [o for o in overrides if o not in common]
        if common:
            text += f"; every run with `--set {' '.join(common)}`"
        if some:
            text += f"; some runs with `--set {' '.join(some)}`"
        text += " (command-line overrides on top of the sweep file)"
    return text + "."


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
    if (root / SWEEP_COPY).is_file():
        sweep = yaml.safe_load((root / SWEEP_COPY).read_text()) or {}
    title = sweep.get("name") or root.name
    num_runs = sum(len(g.runs) for g in groups)
    keys = list(groups[0].labels) if groups else []
    parts = [f"# Results: {title}", ""]
    if sweep.get("description"):
        parts += [f"The sweep file's description: {' '.join(str(sweep['description']).split())}", ""]
    parts += [
        f"{num_runs} runs from `{root}`, grouped by {', '.join(f'`{k}`' for k in keys)}; "
        f"written {datetime.now(timezone.utc).astimezone().isoformat(timespec='minutes')}.",
        "",
        what_ran(groups),
        "",
        markdown_table(groups, columns),
        "",
        "Mean ± sample standard deviation (ddof 1) over the group's runs (`n`). Best val loss: the lowest "
        "`val/loss` of the run; final val bpb: `val/bpb` at its last validation; test bpb: `rmoe test` of the "
        "best checkpoint (when the sweep ran it). Routing metrics: the last validation's values averaged over "
        "layers (or consecutive layer pairs for the MI), blank when not logged. Router params: the trainable "
        "parameters of the router modules. Step time: median wall time between logged training steps.",
        "",
    ]
    if any(g.non_causal for g in groups):
        parts += [
            "\\* Not causal in evaluation (`ModelConfig.causality`): the router reads later tokens, so its "
            "validation and test losses are not comparable with the causal rows'. Causal test bpb: the same "
            "checkpoint tested with the router's causal evaluation (`eval_routing: topk`: each token's own "
            "top-K, training unchanged), which is comparable; blank where the router has none (Soft MoE).",
            "",
        ]
    if paired:
        parts += [paired, ""]
    if incomplete:
        parts += [
            "Runs left out of the tables (a row needs a finished run with a validation), and what happened to "
            "them (their `status.json`):",
            "",
            incomplete_table(incomplete),
            "",
        ]
    band_text = "min-max over seeds" if band == "minmax" else "± one standard deviation"
    for plot in plots:
        parts += [f"![{plot}]({plot})", ""]
    if plots:
        parts += [f"Curves: mean over a group's runs, band {band_text}; bars: mean ± std.", ""]
    (out / "results.md").write_text("\n".join(parts))


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (imported on first use: reports without plots need none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(groups: Sequence[Group], tag: str, path: Path, band: str) -> bool:
    """Validation curves: a group's mean over runs at the steps all its runs logged, with a band."""
    plt = _pyplot()

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
    plt = _pyplot()

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


def plot_paired(paired: Sequence[Paired], baseline: str, metric: str, path: Path) -> bool:
    """The same-seed differences against the baseline, sorted, with their 95% t-intervals (a forest plot); one
    row per group, the per-seed differences as dots. False when nothing pairs."""
    plt = _pyplot()

    shown = sorted((p for p in paired if p.n), key=lambda p: p.mean)
    if not shown:
        return False
    fig, ax = plt.subplots(figsize=(7.0, 0.35 * len(shown) + 1.6))
    for y, p in enumerate(shown):
        half = p.half_width if math.isfinite(p.half_width) else 0.0
        colour = {"better": "tab:green", "worse": "tab:red"}.get(p.verdict, "tab:gray")
        ax.errorbar(p.mean, y, xerr=half, fmt="o", color=colour, capsize=3)
        ax.scatter(p.differences, [y] * p.n, s=8, color=colour, alpha=0.4)
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_yticks(range(len(shown)), [" / ".join(p.labels.values()) + f" (n={p.n})" for p in shown], fontsize=8)
    ax.set_xlabel(f"Δ {metric} against {baseline}\n(same seed; mean and 95% t-interval)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
