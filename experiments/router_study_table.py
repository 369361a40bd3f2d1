"""The table of docs/results.md section 7: every router against the linear one, same seed, with its routing
signature. Reads the ``runs.csv`` of ``rmoe report`` (run with the training-side ``--metric`` patterns of section
7.3, so that the drop rates and realised compute are columns) and writes ``study.md``.

One row per router, sorted by the paired gap in causal test bpb (the number every causal-in-evaluation router
has; routers with no causal evaluation last): the gap's mean and 95% t-interval over seeds (``Paired``, the
report's own statistics), how many seeds are worse, the same for the final validation bpb, then the signature,
each a mean over seeds: active experts per token (last validation / last logged training step), the realised
expert FLOPs per token in training relative to the baseline's (top-2), the share of chosen (token, expert) pairs
a capacity dropped and of tokens left with no expert (training), gate entropy, MaxVio and top-1 MI (last
validation, mean over layers).

Usage::

    python experiments/router_study_table.py docs/results/routers_cpu/runs.csv --out docs/results/routers_cpu
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from rmoe.report.paired import Paired

# Expert choice picks tokens per expert: "dropped pairs" (chosen pairs a capacity removed) does not apply.
EXPERT_CHOICE = ("expert_choice", "sinkhorn_ec", "sparse_ec")

SIGNATURE = ("active_experts_mean", "train/active_experts_mean", "train/expert_flops_per_token", "train/drop_ratio",
             "train/token_drop_ratio", "gate_entropy_mean", "load_max_vio", "top1_mi")  # fmt: skip

Runs = dict[str, dict[str, dict[str, float]]]  # router -> seed -> column -> value


def read_runs(path: Path, key: str = "router") -> Runs:
    """The complete runs of a report's runs.csv, numeric columns only (blank cells are NaN)."""
    runs: Runs = defaultdict(dict)
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if row.get("complete", "1") not in ("1", "True", "true"):
                continue
            values = {}
            for column, text in row.items():
                try:
                    values[column] = float(text) if text not in ("", None) else math.nan
                except ValueError:
                    continue
            runs[row[key]][row["seed"]] = values
    return runs


def paired(runs: Runs, router: str, baseline: str, metric: str) -> Paired | None:
    """Same-seed differences ``router - baseline`` of ``metric``; None with fewer than two pairs."""
    base = runs[baseline]
    differences = [
        values[metric] - base[seed][metric]
        for seed, values in sorted(runs[router].items())
        if seed in base and math.isfinite(values.get(metric, math.nan)) and math.isfinite(base[seed][metric])
    ]
    return Paired({"router": router}, differences) if len(differences) >= 2 else None


def mean_of(runs: Runs, router: str, column: str) -> float:
    values = [v.get(column, math.nan) for v in runs[router].values()]
    values = [v for v in values if math.isfinite(v)]
    return statistics.fmean(values) if values else math.nan


def _interval(p: Paired | None) -> str:
    return f"{p.mean:+.3f} [{p.mean - p.half_width:+.3f}, {p.mean + p.half_width:+.3f}]" if p else ""


def _verdict(p: Paired | None) -> str:
    return "" if p is None else f"**{p.verdict}**" if p.verdict in ("better", "worse") else p.verdict


def _number(value: float, spec: str, suffix: str = "") -> str:
    return "–" if not math.isfinite(value) else f"{value:{spec}}{suffix}"


def table(runs: Runs, baseline: str = "linear", expert_choice: Sequence[str] = EXPERT_CHOICE) -> str:
    """The markdown table (header, one row per router)."""
    if baseline not in runs:
        raise SystemExit(f"no complete run of router={baseline!r} (the baseline) in the runs.csv")
    base_flops = mean_of(runs, baseline, "train/expert_flops_per_token")
    rows = []
    for router in runs:
        causal = None if router == baseline else paired(runs, router, baseline, "comparable_test_bpb")
        val = None if router == baseline else paired(runs, router, baseline, "final_val_bpb")
        order = (0, 0.0) if router == baseline else (0, causal.mean) if causal else (1, val.mean if val else 0.0)
        rows.append((order, router, causal, val))
    rows.sort(key=lambda r: r[0])
    lines = [
        "| router | seeds | Δ test bpb, causal evaluation [95%] | seeds worse | verdict | Δ final val bpb [95%] "
        "| verdict | active experts val / train | expert FLOPs / top-2 (train) | dropped pairs / tokens with no "
        "expert (train) | gate entropy | MaxVio | top-1 MI |",
        "|---|---:|---:|---:|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for _, router, causal, val in rows:
        if router == baseline:
            tests = [v["test_bpb"] for v in runs[router].values()]
            spread = f" ± {statistics.stdev(tests):.4f}" if len(tests) > 1 else ""
            gap = f"(baseline: test bpb {statistics.fmean(tests):.4f}{spread})"
            worse = verdict = val_gap = val_verdict = ""
        else:
            gap = _interval(causal) if causal else "none (no causal evaluation)"
            worse = f"{sum(d > 0 for d in causal.differences)}/{causal.n}" if causal else ""
            verdict, val_gap, val_verdict = _verdict(causal), _interval(val), _verdict(val)
        means = {column: mean_of(runs, router, column) for column in SIGNATURE}
        dropped = "–" if router in expert_choice else _number(100 * means["train/drop_ratio"], ".1f", "%")
        cells = [
            router,
            str(len(runs[router])),
            gap,
            worse,
            verdict,
            val_gap,
            val_verdict,
            f"{_number(means['active_experts_mean'], '.2f')} / {_number(means['train/active_experts_mean'], '.2f')}",
            _number(means["train/expert_flops_per_token"] / base_flops, ".2f"),
            f"{dropped} / {_number(100 * means['train/token_drop_ratio'], '.1f', '%')}",
            _number(means["gate_entropy_mean"], ".2f"),
            _number(means["load_max_vio"], ".2f"),
            _number(means["top1_mi"], ".2f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_csv", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="folder for study.md")
    parser.add_argument("--baseline", default="linear")
    args = parser.parse_args(argv)
    text = table(read_runs(args.runs_csv), args.baseline)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "study.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
