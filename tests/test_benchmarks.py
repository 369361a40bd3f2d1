"""The benchmark scripts run and report what they claim (tiny shapes, one repetition: not timings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import load_script

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def load(name: str):
    return load_script("benchmarks", name)


def test_bench_moe_times_every_implementation_with_its_peak_memory(tmp_path):
    bench = load("bench_moe")
    out = tmp_path / "moe.json"
    shape = ["--tokens", "64", "--seq-len", "32", "--hidden-size", "16", "--num-experts", "4", "--expert-size", "8"]
    bench.main([*shape, "--repeats", "2", "--warmup", "0", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["matmul_floor"]["dense_ms"] > 0 and report["matmul_floor"]["experts_ms"] > 0
    results = report["results"]
    assert {"dense", "ours", "ours-tiled", "ours-grouped_mm", "hf-eager", "hf-grouped_mm"} <= set(results)
    for name, r in results.items():
        assert r["median_ms"] > 0 and r["peak_mib"] > 0, name
        if name != "dense":
            assert r["max_abs_diff_vs_ours"] < 1e-5, name  # the same function as ours
    # the dense MLP holds fewer activations than any MoE block of the same active width
    assert results["dense"]["peak_mib"] < results["ours"]["peak_mib"]


def test_bench_moe_sweep_covers_the_three_shapes():
    bench = load("bench_moe")
    assert set(bench.SWEEP_SHAPES) == {"default", "fine-grained", "small batch"}
    assert bench.SWEEP_SHAPES["fine-grained"]["num_experts"] == 64 and bench.SWEEP_SHAPES["fine-grained"]["top_k"] == 8


def test_bench_step_times_dense_moe_and_gru_and_splits_the_step(tmp_path):
    bench = load("bench_step")
    out = tmp_path / "step.json"
    router = str(ROOT / "configs/router/expert_choice.yaml")
    bench.main(["--shapes", "small", "--repeats", "2", "--warmup", "0", "--routers", router, "--json", str(out)])
    report = json.loads(out.read_text())["small"]
    assert set(report["timings"]) == {
        "dense",
        "moe-linear",
        "moe-linear+foreach-adamw",
        "moe-gru",
        "router:expert_choice",
    }
    active = {n: t["active_params"] for n, t in report["timings"].items()}
    assert abs(active["moe-linear"] - active["dense"]) / active["dense"] < 0.01  # same active parameters
    assert sum(report["breakdown"].values()) == pytest.approx(1.0)
    assert report["breakdown"]["expert matmuls"] > 0 and report["breakdown"]["optimizer"] > 0
    assert report["router_flops_share"]["moe-gru"] > report["router_flops_share"]["moe-linear"]
    peaks = {n: t["peak_mib"] for n, t in report["timings"].items()}
    # the MoE holds 4x the dense model's MLP weights (and their gradients and AdamW moments)
    assert peaks["moe-linear"] > peaks["dense"] > 0


def test_device_check_script_parses_and_rejects_an_unknown_mode():
    """benchmarks/device_check.sh (the one-command GPU check): valid bash; a wrong mode exits 2 with usage."""
    import subprocess

    script = ROOT / "benchmarks" / "device_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    wrong = subprocess.run(["bash", str(script), "--gpus"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "usage: bash benchmarks/device_check.sh" in wrong.stderr
    assert "--gpus" in wrong.stderr


def test_bench_moe_leaves_out_a_row_that_fails_and_says_why(tmp_path, monkeypatch, capsys):
    """On another torch/transformers (a GPU image) one implementation may not run: its row goes,
    printed with the error, and the others are still timed."""
    bench = load("bench_moe")
    real = bench.build_hf

    def build_hf(ours, config, implementation):
        module = real(ours, config, implementation)
        if implementation == "grouped_mm":
            module.experts.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no kernel here"))
        return module

    monkeypatch.setattr(bench, "build_hf", build_hf)
    out = tmp_path / "moe.json"
    shape = ["--tokens", "64", "--seq-len", "32", "--hidden-size", "16", "--num-experts", "4", "--expert-size", "8"]
    bench.main([*shape, "--repeats", "1", "--warmup", "0", "--json", str(out)])
    report = json.loads(out.read_text())
    assert "hf-grouped_mm" not in report["results"] and {"dense", "ours", "hf-eager"} <= set(report["results"])
    assert report["left_out"] == {"hf-grouped_mm": "RuntimeError: no kernel here"}
    assert "hf-grouped_mm    left out: it failed here (RuntimeError: no kernel here)" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_memory_estimate_is_a_lower_bound_of_the_measured_peak():
    """The estimate ``rmoe fit`` refuses by is below the measured peak of a real step (a fresh process),
    and within the margin it warns by (docs/speed.md has the table of nine shapes)."""
    bench = load("bench_memory")
    from rmoe.model.config import ModelConfig
    from rmoe.training.memory import UNDERESTIMATE, estimate_step_bytes

    arch = ModelConfig(**{**bench.base_arch(), **bench.DEEP_CPU})
    measured, estimated = bench.measure_step_bytes(arch, 16, 128), estimate_step_bytes(arch, 16, 128)
    assert measured / UNDERESTIMATE <= estimated <= 1.05 * measured, (estimated, measured)
