"""Final validation bits per byte against depth, per router, every seed and the mean: our CPU depth
sweep next to the RMoE authors' (enwik8 val BPC of SMoE and RMoE, qiuzh20/RMoE
``analysis/plot_results/layer_ablation.ipynb``), each panel on its own scale. Also prints the paired
gap (gru - linear, same seed) per depth and the least-squares slope of the gap against depth with
its 95% t-interval: the paper's claim is a gap that shrinks (negative slope) and turns negative.

Usage (after ``rmoe report ... --out docs/results/depth_deep_cpu``, which writes ``runs.csv``)::

    python experiments/depth_plot.py docs/results/depth_deep_cpu/runs.csv docs/results/depth_deep_cpu/depth.png
"""

from __future__ import annotations

import argparse
import csv
import re
import statistics
from collections import defaultdict
from pathlib import Path

PAPER = {  # layers: (SMoE, RMoE) enwik8 val BPC, the authors' depth sweep
    6: (1.214, 1.213),
    12: (1.158, 1.151),
    18: (1.133, 1.125),
    24: (1.128, 1.112),
    32: (1.110, 1.100),
}
LABELS = {"linear": "linear (SMoE)", "gru_paper": "gru (RMoE)"}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs_csv", type=Path)
    p.add_argument("out", type=Path)
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    with args.runs_csv.open() as f:
        for row in csv.DictReader(f):
            if row["router"] in LABELS and row["final_val_bpb"] and row.get("complete", "1") == "1":
                depth = int(re.sub(r"\D", "", row["depth"]))
                points[row["router"]][depth].append(float(row["final_val_bpb"]))
    fig, (ours, paper) = plt.subplots(1, 2, figsize=(9.5, 3.6), constrained_layout=True)
    for router, by_depth in points.items():
        depths = sorted(by_depth)
        means = [statistics.mean(by_depth[d]) for d in depths]
        (line,) = ours.plot(depths, means, marker="o", label=f"{LABELS[router]}, mean")
        for d in depths:
            ours.scatter([d] * len(by_depth[d]), by_depth[d], color=line.get_color(), alpha=0.35, s=14)
    ours.set(title="ours: CPU size, 1000 steps (dots: seeds)", xlabel="layers", ylabel="final val bpb")
    ours.set_xticks(sorted({d for by_depth in points.values() for d in by_depth}))
    ours.legend(fontsize=8)
    layers = sorted(PAPER)
    paper.plot(layers, [PAPER[n][0] for n in layers], marker="o", label="SMoE")
    paper.plot(layers, [PAPER[n][1] for n in layers], marker="o", label="RMoE")
    paper.set(title="the authors: enwik8, 80k steps", xlabel="layers", ylabel="val BPC")
    paper.set_xticks(layers)
    paper.legend(fontsize=8)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    print_gap_trend(args.runs_csv)


def print_gap_trend(runs_csv: Path) -> None:
    """Paired gap per depth and its slope against depth (per-seed pairs as the data points)."""
    from rmoe.report.paired import t_quantile_95

    bpb: dict[tuple[str, int, str], float] = {}
    with runs_csv.open() as f:
        for row in csv.DictReader(f):
            if row["router"] in LABELS and row["final_val_bpb"] and row.get("complete", "1") == "1":
                bpb[(row["router"], int(re.sub(r"\D", "", row["depth"])), row["seed"])] = float(row["final_val_bpb"])
    pairs = [
        (depth, bpb[("gru_paper", depth, seed)] - value)
        for (router, depth, seed), value in bpb.items()
        if router == "linear" and ("gru_paper", depth, seed) in bpb
    ]
    for depth in sorted({d for d, _ in pairs}):
        gaps = [g for d, g in pairs if d == depth]
        print(
            f"depth {depth:>2}: gap gru - linear {statistics.mean(gaps):+.4f} over {len(gaps)} seed(s): "
            + ", ".join(f"{g:+.3f}" for g in gaps)
        )
    n = len(pairs)
    if n < 3:
        return
    mean_d = statistics.mean(d for d, _ in pairs)
    mean_g = statistics.mean(g for _, g in pairs)
    sxx = sum((d - mean_d) ** 2 for d, _ in pairs)
    slope = sum((d - mean_d) * (g - mean_g) for d, g in pairs) / sxx
    residual = sum((g - mean_g - slope * (d - mean_d)) ** 2 for d, g in pairs) / (n - 2)
    half = t_quantile_95(n - 2) * (residual / sxx) ** 0.5
    print(
        f"slope of the gap: {slope * 1e3:+.2f} mbpb per layer, 95% interval [{(slope - half) * 1e3:+.2f}, "
        f"{(slope + half) * 1e3:+.2f}] over {n} pairs; mean gap {mean_g:+.4f}"
    )


if __name__ == "__main__":
    main()
