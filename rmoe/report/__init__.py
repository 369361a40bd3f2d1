"""``rmoe report``: results table and plots of a sweep: mean ± std over seeds of each router (or any grid group).

Reads a sweep root written by ``rmoe sweep`` and writes, into ``--out``:

- ``results.md`` / ``results.csv``: one row per group (by default every grid key but ``seed``): ``n``, best
  ``val/loss``, final ``val/bpb``, ``test/bpb``, final routing metrics (``--metric`` patterns; by default layer
  means of the metrics ``RoutingAnalytics`` logged), router / total / active parameters, median step time,
  tokens/s, steps and tokens; mean ± sample standard deviation (ddof 1) over the group's runs;
- ``runs.csv``: the same per run, with ``complete`` = 0 for runs left out of the tables (no ``val/loss``);
- ``val_loss.png`` / ``val_bpb.png``: validation curves, the mean over seeds per group with a min-max or ± std band;
- ``final_val_bpb.png``: final validation bpb per group, mean with ± std error bars.

Modules: :mod:`rmoe.report.collect` (reading runs, metrics, parameter counts, grouping),
:mod:`rmoe.report.paired` (same-seed paired comparisons), :mod:`rmoe.report.render` (markdown, CSV, plots),
:mod:`rmoe.report.report_cli` (:func:`report` and the command line).

Usage::

    rmoe report runs/sweeps/table1_cpu --out docs/results/table1_cpu
    rmoe report runs/sweeps/fig2_depth_cpu --out docs/results/fig2 --group-by router depth
    rmoe report ROOT --out DIR --metric 'moe/val/(load_cv)/layer_\\d+$' --band std
"""

from rmoe.report.collect import (
    BASE_COLUMNS,
    COMPARABLE_TEST_KEY,
    COST_COLUMNS,
    DEFAULT_METRICS,
    EXTRA_KEYS,
    NON_CAUSAL_KEY,
    SEED_KEY,
    Column,
    Group,
    ReportError,
    RunResult,
    base_columns,
    default_group_keys,
    group_runs,
    metric_columns,
    parameter_counts,
    parse_only,
    read_run,
    routing_metrics,
    step_time_ms,
)
from rmoe.report.paired import Paired, paired_comparisons, t_quantile_95
from rmoe.report.render import (
    format_mean_std,
    format_value,
    markdown_table,
    paired_table,
    plot_bars,
    plot_curves,
    write_csvs,
    write_markdown,
)
from rmoe.report.report_cli import build_parser, main, report

__all__ = [
    "BASE_COLUMNS",
    "COMPARABLE_TEST_KEY",
    "COST_COLUMNS",
    "DEFAULT_METRICS",
    "EXTRA_KEYS",
    "NON_CAUSAL_KEY",
    "SEED_KEY",
    "Column",
    "Group",
    "Paired",
    "ReportError",
    "RunResult",
    "base_columns",
    "build_parser",
    "default_group_keys",
    "format_mean_std",
    "format_value",
    "group_runs",
    "main",
    "markdown_table",
    "metric_columns",
    "paired_comparisons",
    "paired_table",
    "parameter_counts",
    "parse_only",
    "plot_bars",
    "plot_curves",
    "read_run",
    "report",
    "routing_metrics",
    "step_time_ms",
    "t_quantile_95",
    "write_csvs",
    "write_markdown",
]
