"""Same-seed paired comparisons of a sweep's runs against a baseline, with 95% t-intervals."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from rmoe.report.collect import SEED_KEY, ReportError, RunResult

# Two-sided 95% quantiles of Student's t for 1..10 degrees of freedom; beyond, 1.96 + 2.4 / df is within 1.5%.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def t_quantile_95(df: int) -> float:
    """Two-sided 95% quantile of Student's t with ``df`` degrees of freedom."""
    return _T95.get(df, 1.96 + 2.4 / df)


@dataclass
class Paired:
    """Same-seed differences ``metric(run) - metric(baseline run)`` for one group of runs.

    Runs pair when all their labels but ``key`` are equal (same seed: same initialisation and data order). The
    verdict is ``better`` / ``worse`` (``lower`` / ``higher`` when not ``lower_is_better``) when the 95%
    t-interval of the mean difference excludes 0, else ``indistinguishable``.
    """

    labels: dict[str, str]
    differences: list[float]
    lower_is_better: bool = True

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
            return "better" if self.lower_is_better else "lower"
        if self.mean - self.half_width > 0:
            return "worse" if self.lower_is_better else "higher"
        return "indistinguishable"


LOWER_IS_BETTER = frozenset({"best_val_loss", "final_val_loss", "final_val_bpb", "test_bpb", "test_loss",
                             "comparable_test_bpb", "causal_test_bpb", "step_time_ms"})  # fmt: skip


def paired_comparisons(
    runs: Sequence[RunResult], key: str, baseline: str, metric: str = "final_val_bpb"
) -> list[Paired]:
    """Same-seed differences against the ``key=baseline`` runs (ReportError if none), grouped by the labels but
    ``seed`` (e.g. ``router=gru, depth=l12``) in first-run order."""
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
        groups.setdefault(tuple(labels.values()), Paired(labels, [], metric in LOWER_IS_BETTER)).differences.append(
            value - partner.metrics[metric]
        )
    return list(groups.values())
