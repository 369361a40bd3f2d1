"""The budget axis of docs/results.md section 6: RMoE against the linear router (and NP) as training
gets longer. Reads the ``runs.csv`` of ``rmoe report`` (one per budget, or one for all) and, for the
curves within each run, a ``curves.csv`` it extracts from a sweep root; writes the tables
(``budget.md``) and two figures:

- ``bpb_vs_tokens.png``: final val bpb against training tokens (log axis), every seed and the mean,
  per router, and the mean best val bpb (dashed); beside it the authors' 12-layer enwik8 numbers
  (SMoE / RMoE val BPC after 80k steps of 48 x 512 tokens, ~1.97 B tokens);
- ``gap_curves.png``: the paired gap gru - linear and gru - NP at every validation of each long run
  (val every 10% of the run), against the fraction of the run.

Statistics: per budget, the same-seed gaps (of final val bpb, and of each routing-signature metric) with a
95% t-interval; the slope of the gap against log10(tokens), two ways. Pooled: the least-squares slope over
every (budget, seed) pair, with a 95% t-interval that treats the pairs as independent, which they are not
(the pairs of one seed at different budgets share the initialisation and the data order), so it is too
narrow if anything. Per seed: each seed's own least-squares slope over the budgets it ran, then the mean
of those slopes with a 95% t-interval over seeds (seeds are independent; one value per seed).

Usage::

    python experiments/budget_plot.py --curves-from runs/sweeps/budget_deep_cpu \\
        --curves docs/results/budget_deep_cpu/curves.csv          # once, while the runs are there
    python experiments/budget_plot.py docs/results/matched_deep_cpu/runs.csv \\
        docs/results/budget_deep_cpu/runs.csv --curves docs/results/budget_deep_cpu/curves.csv \\
        --out docs/results/budget_deep_cpu
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
from collections import defaultdict
from pathlib import Path

ROUTERS = {"linear_torch": "linear", "gru_paper": "gru (RMoE)", "gru_np": "gru NP (no state passed)"}
PAIRS = (("gru_paper", "linear_torch"), ("gru_paper", "gru_np"), ("gru_np", "linear_torch"))
SIGNATURE = {
    "router_logit_std": "router_logit_std",
    "gate_entropy_mean": "gate entropy",
    "load_max_vio": "MaxVio",
    "top1_mi": "top-1 MI",
    "vocab_specialization": "vocab. specialisation",
}
MEASURES = {
    "final_val_bpb": "final val bpb",
    "best_val_bpb": "best val bpb",
    "test_bpb": "test bpb (best checkpoint)",
}
"""What the routers are compared on. Final: the last validation; best: the lowest validation of the run (where
the runs go over the training text many times, the final one is past the best); test: ``rmoe test`` of the
best checkpoint."""
PAPER_TOKENS = 80_000 * 48 * 512  # the authors' enwik8 budget: 80k steps of 48 blocks of 512 bytes
PAPER_12_LAYERS = {"SMoE": 1.158, "RMoE": 1.151}  # val BPC, qiuzh20/RMoE layer_ablation.ipynb


def budget_of(label: str) -> int:
    """``x10`` -> 10."""
    return int(label.lstrip("x"))


def read_runs(paths: list[Path]) -> dict[tuple[str, int, str], dict[str, float]]:
    """``(router, budget, seed) -> metrics`` of the complete runs of the known routers (later files win)."""
    runs: dict[tuple[str, int, str], dict[str, float]] = {}
    for path in paths:
        with path.open() as f:
            for row in csv.DictReader(f):
                if row["router"] not in ROUTERS or row.get("complete", "1") != "1" or not row["final_val_bpb"]:
                    continue
                values = {}
                for key, value in row.items():
                    try:
                        values[key] = float(value)
                    except (TypeError, ValueError):
                        continue
                # the lowest val loss in bpb: loss and bpb differ by the run's bits per token, a constant
                if values.get("final_val_loss") and "best_val_loss" in values:
                    values["best_val_bpb"] = (
                        values["best_val_loss"] * values["final_val_bpb"] / values["final_val_loss"]
                    )
                runs[(row["router"], budget_of(row["budget"]), row["seed"])] = values
    return runs


def t_interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (nan for fewer than 2 values)."""
    from rmoe.report.paired import t_quantile_95

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, t_quantile_95(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def least_squares_slope(points: list[tuple[float, float]]) -> float:
    """The least-squares slope of y on x (at least two distinct x)."""
    mx, my = statistics.fmean(x for x, _ in points), statistics.fmean(y for _, y in points)
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def slope(points: list[tuple[float, float]]) -> tuple[float, float, int]:
    """Least-squares slope of y on x and its 95% t half-width; (nan, nan, n) below 3 points."""
    from rmoe.report.paired import t_quantile_95

    n = len(points)
    xs = {x for x, _ in points}
    if n < 3 or len(xs) < 2:
        return math.nan, math.nan, n
    b = least_squares_slope(points)
    mx, my = statistics.fmean(x for x, _ in points), statistics.fmean(y for _, y in points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    residual = sum((y - my - b * (x - mx)) ** 2 for x, y in points) / (n - 2)
    return b, t_quantile_95(n - 2) * math.sqrt(residual / sxx), n


def seed_slopes(
    runs: dict[tuple[str, int, str], dict[str, float]], a: str, b: str, key: str
) -> tuple[list[str], list[float]]:
    """The seeds with ``a - b`` at two or more budgets, and each one's least-squares slope of the gap against
    log10(tokens) over its budgets."""
    points: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for budget in sorted({bb for _, bb, _ in runs}):
        seeds, gaps = paired(runs, a, b, budget, key)
        for seed, gap in zip(seeds, gaps, strict=True):
            points[seed].append((math.log10(runs[(a, budget, seed)]["tokens"]), gap))
    seeds = sorted(s for s, p in points.items() if len({x for x, _ in p}) >= 2)
    return seeds, [least_squares_slope(points[seed]) for seed in seeds]


def fmt(mean: float, spread: float, digits: int = 4) -> str:
    if math.isnan(mean):
        return ""
    return f"{mean:.{digits}f}" if math.isnan(spread) else f"{mean:.{digits}f} ± {spread:.{digits}f}"


def bracket(mean: float, half: float, digits: int = 4) -> str:
    """``[mean - half, mean + half]`` with signs; empty when the half-width is unknown (one value)."""
    return "" if math.isnan(half) else f"[{mean - half:+.{digits}f}, {mean + half:+.{digits}f}]"


def tables(runs: dict[tuple[str, int, str], dict[str, float]]) -> str:
    """The markdown of ``budget.md``: per budget and router, then the paired gaps, then the slopes."""
    budgets = sorted({b for _, b, _ in runs})
    lines = [
        "| budget | tokens | router | n | final val bpb | best val bpb | test bpb | "
        + " | ".join(SIGNATURE.values())
        + " |",
        "|---|---:|---|---:|---:|---:|---:|" + "---:|" * len(SIGNATURE),
    ]
    for budget in budgets:
        for router in ROUTERS:
            rows = [m for (r, b, _), m in sorted(runs.items()) if r == router and b == budget]
            if not rows:
                continue

            def cell(key: str, digits: int = 4, rows: list[dict[str, float]] = rows) -> str:
                values = [m[key] for m in rows if key in m and math.isfinite(m[key])]
                if not values:
                    return "n/a"
                return fmt(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan, digits)

            tokens = statistics.fmean(m.get("tokens", math.nan) for m in rows)
            lines.append(
                f"| {budget}x | {tokens / 1e6:.1f} M | {router} | {len(rows)} | {cell('final_val_bpb')} | "
                f"{cell('best_val_bpb')} | {cell('test_bpb')} | " + " | ".join(cell(k, 3) for k in SIGNATURE) + " |"
            )
    lines += [
        "",
        "Mean ± sample std over seeds. Signature: the last validation's routing metrics, averaged over layers "
        "(consecutive layer pairs for the MI); n/a where the runs did not log it.",
        "",
        "| pair | measure | budget | per seed | mean Δ | 95% interval |",
        "|---|---|---|---|---:|---|",
    ]
    slopes = []
    for a, b in PAIRS:
        for measure, name in MEASURES.items():
            points = []
            for budget in budgets:
                seeds, gaps = paired(runs, a, b, budget, measure)
                if not gaps:
                    continue
                mean, half = t_interval(gaps)
                interval = bracket(mean, half)
                per_seed = ", ".join(f"{s} {g:+.4f}" for s, g in zip(seeds, gaps, strict=True))
                lines.append(f"| {a} - {b} | {name} | {budget}x | {per_seed} | {mean:+.4f} | {interval} |")
                tokens = statistics.fmean(runs[(a, budget, s)]["tokens"] for s in seeds)
                points += [(math.log10(tokens), g) for g in gaps]
            if points:
                slopes.append((a, b, measure, name, *slope(points)))
    lines += [
        "",
        "Slope of Δ per 10x tokens. Pooled: over every (budget, seed) pair as if independent (too narrow if "
        "anything). Per seed: each seed's own slope over its budgets; their mean and a 95% t-interval over seeds.",
        "",
        "| pair | measure | pooled slope | 95% interval | pairs | per-seed slopes | mean | 95% interval (seeds) |",
        "|---|---|---:|---|---:|---|---:|---|",
    ]
    for a, b, measure, name, b_, half, n in slopes:
        seeds, per_seed = seed_slopes(runs, a, b, measure)
        mean, spread = t_interval(per_seed) if per_seed else (math.nan, math.nan)
        listed = ", ".join(f"{s} {v:+.4f}" for s, v in zip(seeds, per_seed, strict=True))
        seed_cells = f"{listed} | {mean:+.4f} | {bracket(mean, spread)}" if per_seed else " | |"
        lines.append(f"| {a} - {b} | {name} | {b_:+.4f} | {bracket(b_, half)} | {n} | {seed_cells} |")
    lines += [
        "",
        "Same-seed differences of the routing signature (mean [95% t-interval]; n/a where a metric was not logged):",
        "",
        "| pair | budget | pairs | " + " | ".join(SIGNATURE.values()) + " |",
        "|---|---|---:|" + "---|" * len(SIGNATURE),
    ]
    for a, b in PAIRS:
        for budget in budgets:
            seeds, _ = paired(runs, a, b, budget, "final_val_bpb")
            if not seeds:
                continue
            cells = []
            for key in SIGNATURE:
                _, diffs = paired(runs, a, b, budget, key)
                mean, half = t_interval(diffs) if diffs else (math.nan, math.nan)
                cells.append("n/a" if not diffs else f"{mean:+.3f} {bracket(mean, half, 3)}".rstrip())
            lines.append(f"| {a} - {b} | {budget}x | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired(
    runs: dict[tuple[str, int, str], dict[str, float]], a: str, b: str, budget: int, key: str
) -> tuple[list[str], list[float]]:
    """The seeds where both routers ran at ``budget`` and logged ``key`` (finite), and ``a - b`` there."""
    seeds = sorted(
        s
        for (r, bb, s), m in runs.items()
        if r == a
        and bb == budget
        and math.isfinite(m.get(key, math.nan))
        and math.isfinite(runs.get((b, budget, s), {}).get(key, math.nan))
    )
    return seeds, [runs[(a, budget, s)][key] - runs[(b, budget, s)][key] for s in seeds]


def plot_bpb_vs_tokens(runs: dict[tuple[str, int, str], dict[str, float]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ours, paper) = plt.subplots(1, 2, figsize=(10, 3.8), width_ratios=(2, 1), constrained_layout=True)
    for router, label in ROUTERS.items():
        by_budget: dict[float, list[float]] = defaultdict(list)
        best: dict[float, list[float]] = defaultdict(list)
        for (r, _, _), m in runs.items():
            if r == router:
                by_budget[m["tokens"]].append(m["final_val_bpb"])
                if "best_val_bpb" in m:
                    best[m["tokens"]].append(m["best_val_bpb"])
        if not by_budget:
            continue
        tokens = sorted(by_budget)
        (line,) = ours.plot(tokens, [statistics.fmean(by_budget[t]) for t in tokens], marker="o", label=label)
        for t in tokens:
            ours.scatter([t] * len(by_budget[t]), by_budget[t], color=line.get_color(), alpha=0.35, s=14)
        if best:
            ours.plot(sorted(best), [statistics.fmean(best[t]) for t in sorted(best)], ls="--", color=line.get_color())
    ours.set_xscale("log")
    ours.set(
        title="ours: 12 layers, d=96, CPU (dots: seeds; dashed: best val)",
        xlabel="training tokens",
        ylabel="final val bpb",
    )
    ours.legend(fontsize=8)
    for name, value in PAPER_12_LAYERS.items():
        paper.scatter([PAPER_TOKENS], [value], label=f"{name} {value:.3f}", s=30)
    paper.set_xscale("log")
    paper.set(title="the authors: 12 layers, enwik8", xlabel="training tokens", ylabel="val BPC")
    paper.legend(fontsize=8)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def extract_curves(root: Path, out: Path) -> None:
    """``curves.csv``: ``run, router, budget, seed, step, max_steps, val_bpb`` of every run of a sweep root."""
    import json

    from rmoe.runs import MARKER_FILE, PLAN_FILE, fit_dir, read_scalars

    rows = []
    for plan_file in sorted(root.glob(f"*/{PLAN_FILE}")):
        plan = json.loads(plan_file.read_text())
        labels = plan["labels"]
        fit = fit_dir(plan_file.parent)
        if labels.get("router") not in ROUTERS or fit is None or not (plan_file.parent / MARKER_FILE).is_file():
            continue  # other routers, and runs that have not finished
        curve = read_scalars(fit).get("val/bpb", [])
        max_steps = budget_of(labels["budget"]) * 1000
        rows += [[plan["name"], labels["router"], labels["budget"], labels["seed"], s, max_steps, v] for s, v in curve]
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "router", "budget", "seed", "step", "max_steps", "val_bpb"])
        writer.writerows(rows)
    print(f"wrote {out}: {len(rows)} validations of {len({r[0] for r in rows})} runs")


def plot_gap_curves(curves: Path, out: Path) -> str:
    """The within-run gap figure; returns a markdown table of the gap at each tenth of the longest runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bpb: dict[tuple[str, str, str], dict[int, float]] = defaultdict(dict)
    max_steps: dict[str, int] = {}
    with curves.open() as f:
        for row in csv.DictReader(f):
            bpb[(row["router"], row["budget"], row["seed"])][int(row["step"])] = float(row["val_bpb"])
            max_steps[row["budget"]] = int(row["max_steps"])
    budgets = sorted(max_steps, key=budget_of)
    fig, axes = plt.subplots(1, len(PAIRS[:2]), figsize=(10, 3.6), constrained_layout=True, squeeze=False)
    lines = [
        "| pair | budget | " + " | ".join(f"{k / 10:.1f}" for k in range(1, 11)) + " |",
        "|---|---|" + "---:|" * 10,
    ]
    for ax, (a, b) in zip(axes[0], PAIRS[:2], strict=True):
        for budget in budgets:
            seeds = sorted({s for (r, bb, s) in bpb if r == a and bb == budget and (b, budget, s) in bpb})
            mean_gap: dict[float, list[float]] = defaultdict(list)
            for seed in seeds:
                steps = sorted(set(bpb[(a, budget, seed)]) & set(bpb[(b, budget, seed)]))
                fractions = [(s + 1) / max_steps[budget] for s in steps]
                gaps = [bpb[(a, budget, seed)][s] - bpb[(b, budget, seed)][s] for s in steps]
                ax.plot(fractions, gaps, alpha=0.35, linewidth=0.8, color=f"C{budgets.index(budget)}")
                for fraction, gap in zip(fractions, gaps, strict=True):
                    mean_gap[round(fraction, 2)].append(gap)
            if mean_gap:
                xs = sorted(mean_gap)
                ax.plot(xs, [statistics.fmean(mean_gap[x]) for x in xs], marker="o", markersize=3,
                        color=f"C{budgets.index(budget)}", label=f"{budget} ({len(seeds)} seeds)")  # fmt: skip
                tenths = [round(k / 10, 2) for k in range(1, 11)]
                cells = [f"{statistics.fmean(mean_gap[x]):+.3f}" if x in mean_gap else "" for x in tenths]
                lines.append(f"| {a} - {b} | {budget} | " + " | ".join(cells) + " |")
        ax.axhline(0, color="grey", linewidth=0.6)
        ax.set(title=f"{a} - {b}, same seed", xlabel="fraction of the run", ylabel="Δ val bpb")
        ax.legend(fontsize=8)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs_csv", type=Path, nargs="*", help="runs.csv files of rmoe report (1x, 3x, 10x)")
    p.add_argument("--curves", type=Path, help="curves.csv: written with --curves-from, read otherwise")
    p.add_argument("--curves-from", type=Path, help="a sweep root to extract the val/bpb curves from")
    p.add_argument("--out", type=Path, help="folder for budget.md and the figures")
    args = p.parse_args(argv)
    if args.curves_from:
        if not args.curves:
            p.error("--curves-from needs --curves (the CSV to write)")
        extract_curves(args.curves_from, args.curves)
        return
    if not args.runs_csv or not args.out:
        p.error("give the runs.csv files and --out")
    runs = read_runs(args.runs_csv)
    args.out.mkdir(parents=True, exist_ok=True)
    text = "# The budget axis\n\n" + tables(runs)
    plot_bpb_vs_tokens(runs, args.out / "bpb_vs_tokens.png")
    if args.curves and args.curves.is_file():
        text += "\nMean same-seed gap at each tenth of the run (val bpb):\n\n"
        text += plot_gap_curves(args.curves, args.out / "gap_curves.png")
    (args.out / "budget.md").write_text(text)
    print(text)
    print(f"wrote {args.out / 'budget.md'}, {args.out / 'bpb_vs_tokens.png'}")


if __name__ == "__main__":
    main()
