"""The analysis scripts of experiments/ on data with known answers."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from tiny import load_script


def load(name: str):
    return load_script("experiments", name)


FIELDS = [
    "run",
    "seed",
    "budget",
    "router",
    "complete",
    "final_val_bpb",
    "test_bpb",
    "tokens",
    "load_max_vio",
    "top1_mi",
    "final_val_loss",
    "best_val_loss",
]


LN2 = math.log(2)


def write_runs(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_budget_plot_gaps_and_slope_have_the_known_values(tmp_path):
    """gru - linear = 0.02 - 0.01 * log10(budget) + seed noise 0.002 * (-1, +1): the per-budget means
    and the slope against log10(tokens) (-0.01 per 10x) come out exactly; NP equals linear + 0.005."""
    budget_plot = load("budget_plot")
    rows_by_file: dict[str, list[dict]] = {"x1": [], "x3": []}
    for budget in (1, 3, 10):
        for seed, noise in (("s0", -0.002), ("s1", 0.002)):
            linear = 2.2 - 0.1 * math.log10(budget) + noise
            values = {"linear_torch": linear, "gru_paper": linear + 0.02 - 0.01 * math.log10(budget) + noise,
                      "gru_np": linear + 0.005, "other": 9.0}  # fmt: skip
            for router, bpb in values.items():
                row = dict(run=f"{seed}-x{budget}-{router}", seed=seed, budget=f"x{budget}", router=router,
                           complete="1", final_val_bpb=bpb, test_bpb=bpb + 0.1, tokens=2.048e6 * budget,
                           load_max_vio=0.5, top1_mi=0.6 + (0.1 + 10 * noise) * (router == "gru_paper"),
                           final_val_loss=bpb * LN2, best_val_loss=(bpb - 0.01 * budget) * LN2)  # fmt: skip
                rows_by_file["x1" if budget == 1 else "x3"].append(row)
    files = [write_runs(tmp_path / f"{k}.csv", v) for k, v in rows_by_file.items()]
    runs = budget_plot.read_runs(files)
    assert len(runs) == 18  # "other" is not one of the three routers
    text = budget_plot.tables(runs)
    # at 10x: 0.02 - 0.01 = 0.01, the seeds' noise (-0.002, +0.002) once on top
    assert "| gru_paper - linear_torch | final val bpb | 10x | s0 +0.0080, s1 +0.0120 | +0.0100 |" in text
    assert (
        "| gru_np - linear_torch | final val bpb | 3x | s0 +0.0050, s1 +0.0050 | +0.0050 | [+0.0050, +0.0050] |" in text
    )
    # best val bpb: each run's final bpb - 0.01 x budget, so the gaps are the final ones
    assert "| gru_paper - linear_torch | best val bpb | 10x | s0 +0.0080, s1 +0.0120 | +0.0100 |" in text
    assert "| 10x | 20.5 M | linear_torch | 2 | 2.1000 ± 0.0028 | 2.0000 ± 0.0028 | 2.2000 ± 0.0028 |" in text
    for name in ("final val bpb", "best val bpb", "test bpb (best checkpoint)"):
        row = next(
            line for line in text.splitlines() if line.startswith(f"| gru_paper - linear_torch | {name} | -0.0100 |")
        )
        # pooled over the 6 pairs, and per seed: both seeds' own slopes are -0.01 (the noise is a per-seed offset)
        assert row.endswith("| 6 | s0 -0.0100, s1 -0.0100 | -0.0100 | [-0.0100, -0.0100] |")
    slope, half, n = budget_plot.slope([(math.log10(t), 0.02 - 0.01 * math.log10(t)) for t in (1, 3, 10)])
    assert slope == pytest.approx(-0.01) and half == pytest.approx(0, abs=1e-12) and n == 3
    assert "| 10x | 20.5 M | gru_np | 2 |" in text and "n/a" in text  # signature metrics not in the CSV: n/a
    # MaxVio is 0.5 for every run: every difference is 0; gru's MI is linear's + 0.1 -/+ 0.02: a t-interval
    # with 1 degree of freedom, 12.706 * 0.02; vocabulary specialisation is not in the CSV
    assert (
        "| gru_paper - linear_torch | 3x | 2 | n/a | n/a | +0.000 [+0.000, +0.000] | +0.100 [-0.154, +0.354] | n/a |"
        in text
    )
    budget_plot.plot_bpb_vs_tokens(runs, tmp_path / "bpb.png")
    assert (tmp_path / "bpb.png").read_bytes()[:4] == b"\x89PNG"


def test_budget_plot_per_seed_slopes_are_one_value_per_seed():
    """Seed s0's gap falls 0.01 per 10x tokens, s1's 0.03, s2 ran one budget only (no slope): the per-seed
    slopes are -0.01 and -0.03, their mean -0.02 with a t-interval of 12.706 * 0.01 (1 degree of freedom)."""
    budget_plot = load("budget_plot")
    runs = {}
    for seed, per_decade, budgets in (("s0", -0.01, (1, 3, 10)), ("s1", -0.03, (1, 10)), ("s2", 0.5, (3,))):
        for budget in budgets:
            tokens = 2.048e6 * budget
            runs[("linear_torch", budget, seed)] = {"final_val_bpb": 2.0, "tokens": tokens}
            gap = 0.1 + per_decade * math.log10(tokens)
            runs[("gru_paper", budget, seed)] = {"final_val_bpb": 2.0 + gap, "tokens": tokens}
    seeds, slopes = budget_plot.seed_slopes(runs, "gru_paper", "linear_torch", "final_val_bpb")
    assert seeds == ["s0", "s1"] and slopes == pytest.approx([-0.01, -0.03])
    mean, half = budget_plot.t_interval(slopes)
    assert mean == pytest.approx(-0.02) and half == pytest.approx(12.706 * 0.01, rel=1e-4)
    text = budget_plot.tables(runs)
    row = next(line for line in text.splitlines() if "| final val bpb | " in line and "s1 -0.0300" in line)
    assert row.endswith("| s0 -0.0100, s1 -0.0300 | -0.0200 | [-0.1471, +0.1071] |")


def test_budget_plot_gap_curves_from_a_curves_csv(tmp_path):
    budget_plot = load("budget_plot")
    path = tmp_path / "curves.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "router", "budget", "seed", "step", "max_steps", "val_bpb"])
        for router, offset in (("linear_torch", 0.0), ("gru_paper", 0.01), ("gru_np", 0.03)):
            for step in range(299, 3000, 300):
                writer.writerow([f"s0-x3-{router}", router, "x3", "s0", step, 3000, 2.0 + offset])
    table = budget_plot.plot_gap_curves(path, tmp_path / "gaps.png")
    assert "| gru_paper - linear_torch | x3 | " + " | ".join(["+0.010"] * 10) + " |" in table
    assert "| gru_paper - gru_np | x3 | " + " | ".join(["-0.020"] * 10) + " |" in table
    assert (tmp_path / "gaps.png").is_file()


def test_router_study_table_has_the_known_gaps_signatures_and_order(tmp_path):
    """Two routers against linear over three seeds: gaps with the t-interval of the known differences, seeds
    worse counted, a router with no causal evaluation last, expert choice without a dropped-pairs share."""
    study = load("router_study_table")
    fields = ["run", "seed", "router", "complete", "final_val_bpb", "test_bpb", "comparable_test_bpb",
              "active_experts_mean", "train/active_experts_mean", "train/expert_flops_per_token",
              "train/drop_ratio", "train/token_drop_ratio", "gate_entropy_mean", "load_max_vio", "top1_mi"]  # fmt: skip
    rows = []
    for i, seed in enumerate(("s0", "s1", "s2")):
        base = {"seed": seed, "complete": "1", "active_experts_mean": 2, "train/active_experts_mean": 2,
                "train/expert_flops_per_token": 100, "train/drop_ratio": 0, "train/token_drop_ratio": 0,
                "gate_entropy_mean": 1.5, "load_max_vio": 0.4, "top1_mi": 0.6}  # fmt: skip
        test = 2.2 + i / 100
        rows.append(base | {"run": f"{seed}-linear", "router": "linear", "final_val_bpb": 2.0, "test_bpb": test,
                            "comparable_test_bpb": test})  # fmt: skip
        # gaps 0.1, 0.2, 0.3 on test; expert choice leaves 1% of tokens without an expert and uses 90% of the FLOPs
        rows.append(base | {"run": f"{seed}-expert_choice", "router": "expert_choice", "final_val_bpb": 2.0 - 0.1,
                            "test_bpb": 2.3 + 0.11 * i, "comparable_test_bpb": 2.3 + 0.11 * i,
                            "train/expert_flops_per_token": 90, "train/drop_ratio": 0.75,
                            "train/token_drop_ratio": 0.01})  # fmt: skip
        rows.append(base | {"run": f"{seed}-soft_moe", "router": "soft_moe", "final_val_bpb": 3.0, "test_bpb": 3.0,
                            "comparable_test_bpb": ""})  # fmt: skip
    rows.append(rows[1] | {"run": "s3-expert_choice", "seed": "s3", "complete": "0", "comparable_test_bpb": 9.0})
    path = tmp_path / "runs.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)

    runs = study.read_runs(path)
    assert sorted(runs["expert_choice"]) == ["s0", "s1", "s2"]  # the incomplete run is left out
    gap = study.paired(runs, "expert_choice", "linear", "comparable_test_bpb")
    assert gap.differences == pytest.approx([0.1, 0.2, 0.3])
    # mean 0.2, std 0.1, 95% half-width t(2) * 0.1 / sqrt(3) = 4.303 * 0.0577
    assert gap.half_width == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert study.paired(runs, "soft_moe", "linear", "comparable_test_bpb") is None

    study.main([str(path), "--out", str(tmp_path / "out")])
    lines = (tmp_path / "out" / "study.md").read_text().splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| linear", "| expert_choice", "| soft_moe"]
    cells = lines[3].split(" | ")
    assert cells[2] == "+0.200 [-0.048, +0.448]" and cells[3] == "3/3" and cells[4] == "indistinguishable"
    assert cells[5] == "-0.100 [-0.100, -0.100]" and cells[6] == "**better**"
    assert cells[7] == "2.00 / 2.00" and cells[8] == "0.90" and cells[9] == "– / 1.0%"
    assert "none (no causal evaluation)" in lines[4] and "+1.000 [+1.000, +1.000]" in lines[4]
    assert "(baseline: test bpb 2.2100 ± 0.0100)" in lines[2]
