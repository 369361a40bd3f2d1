"""``rmoe report`` (also ``python -m rmoe.report``): :func:`report` and the command line."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from rmoe.checkpoints import check_can_create, describe_os_error
from rmoe.errors import RmoeError, ToolArgumentParser
from rmoe.report.collect import (
    COMPARABLE_TEST_KEY,
    COST_COLUMNS,
    DEFAULT_METRICS,
    EXTRA_KEYS,
    Group,
    ReportError,
    RunResult,
    base_columns,
    default_group_keys,
    group_runs,
    metric_columns,
    parse_only,
    read_run,
)
from rmoe.report.paired import paired_comparisons
from rmoe.report.render import (
    markdown_table,
    paired_table,
    plot_bars,
    plot_curves,
    plot_paired,
    write_csvs,
    write_markdown,
)
from rmoe.runs import PLAN_FILE, find_sweep_runs


def report(
    root: str | Path,
    out: str | Path,
    group_by: Sequence[str] | None = None,
    metric_patterns: Sequence[str] = DEFAULT_METRICS,
    band: str = "minmax",
    only: Mapping[str, set[str]] | None = None,
    paired: tuple[str, str] | None = None,
    paired_metrics: Sequence[str] = ("final_val_bpb",),
) -> tuple[list[Group], list[RunResult]]:
    """Read a sweep root and write the table, CSVs and plots into ``out``; returns the groups (complete runs
    only) and every run read.

    ``only`` keeps the runs with those labels; ``paired = (key, label)`` adds the same-seed comparison of every
    other ``key`` label against ``label``. Raises ReportError for an empty root or an unknown group-by key.
    """
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise ReportError(f"sweep root {str(root)!r} is not a directory.")
    try:  # before reading every run: an output folder that cannot be written fails at once
        check_can_create(out, "--out")
    except RmoeError as err:
        raise ReportError(str(err)) from None
    for pattern in metric_patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ReportError(f"--metric {pattern!r} is not a regular expression: {err}.") from None
    found = find_sweep_runs(root)
    if not found:
        raise ReportError(
            f"no run under {str(root)!r} (expected <root>/<run>/{PLAN_FILE} or <root>/<run>/version_*/ events)."
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
    columns = [*base_columns(complete), *metric_columns(metric_patterns, complete), *COST_COLUMNS]

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
        known = [c.key for c in columns] + list(EXTRA_KEYS)
        unknown = [m for m in paired_metrics if m not in known]
        if unknown:
            raise ReportError(
                f"--paired-metric {', '.join(unknown)}: not a column of these runs; any of: {', '.join(known)}."
            )
        comparisons = {m: paired_comparisons(complete, key, baseline, m) for m in paired_metrics}
        tables = [(m, paired_table(comparisons[m], key, baseline, m)) for m in paired_metrics]
        tables = [(m, t) for m, t in tables if t]
        for m, comparison in comparisons.items():
            if plot_paired(comparison, f"{key}={baseline}", m, out / f"paired_{m}.png"):
                plots.append(f"paired_{m}.png")
        if tables:
            paired_text = (
                f"Paired against `{key}={baseline}` (same seed: same initialisation and data order); Δ = run - "
                f"baseline; the verdict is the 95% t-interval's when it excludes 0: better / worse for a loss, bpb "
                f"or step time (negative is better), lower / higher for any other column."
            )
            paired_text += "".join(f"\n\n{text}" for _, text in tables)
        # the same, on the one number every row can be compared by (unless asked for by name above)
        if any(g.non_causal for g in groups) and COMPARABLE_TEST_KEY not in paired_metrics:
            causal = paired_table(
                paired_comparisons(complete, key, baseline, COMPARABLE_TEST_KEY), key, baseline, "causal test bpb"
            )
            if causal:
                paired_text += (
                    "\n\nPaired on the test bpb with causal evaluation (`test bpb` of a causal router, `causal test "
                    "bpb` of the others; a router with no causal evaluation has no row): the comparison valid for "
                    f"every router.\n\n{causal}"
                )
    write_markdown(root, groups, columns, incomplete, out, plots, band, paired_text)
    return groups, runs


def build_parser() -> argparse.ArgumentParser:
    """The options of ``rmoe report``."""
    parser = ToolArgumentParser(
        prog="rmoe report", description="Results table (markdown, CSV) and plots of a sweep root."
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
    parser.add_argument(
        "--paired-metric",
        action="append",
        default=None,
        metavar="COLUMN",
        help="the column --paired compares (repeatable; default: final_val_bpb); any column of runs.csv, "
        "e.g. best_val_loss, test_bpb, load_cv, tokens_per_sec",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 nothing to report or a bad option)."""
    try:
        args = build_parser().parse_args(argv)
    except RmoeError as err:
        print(f"rmoe: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
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
            tuple(args.paired_metric or ("final_val_bpb",)),
        )
    except ReportError as err:
        print(f"rmoe: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except OSError as err:  # a disk that filled up while writing
        print(f"rmoe: error: --out: {' '.join(describe_os_error(err, args.out, 'write the report to').split())}",
              file=sys.stderr)  # fmt: skip
        return 2
    complete = sum(len(g.runs) for g in groups)
    print(
        f"rmoe report: {len(groups)} group(s) from {complete} run(s) ({len(runs) - complete} incomplete) "
        f"-> {args.out}/results.md"
    )
    print(markdown_table(groups, base_columns(r for g in groups for r in g.runs)))
    return 0
