"""The sweep runner and the report (``rmoe sweep``, ``rmoe report``: rmoe/sweep/, rmoe/report/), end to end.

One tiny sweep (2 routers x 2 seeds of a 4-step model, fit + test) is run once for the module
through the real command line (``python -m rmoe sweep``, a process of its own), with real child
processes; the tests then re-run it (everything skipped), read its report back against the event
files (``python -m rmoe report`` once, then in-process), and resume one run next to a failing one.
The sweep files of configs/sweeps/ are checked by expanding them (``--dry-run``), without training.
"""

from __future__ import annotations

import ast
import csv
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tiny import ROOT, tiny_overrides
from tiny import scalars as tiny_scalars

from rmoe import report, runs, sweep
from rmoe.cli import main as rmoe_main

pytestmark = pytest.mark.slow  # real sweeps of whole runs

ROUTERS = ("linear", "gru")
SEEDS = ("s0", "s1")
PAPER_SWEEPS = {
    "table1_cpu": 24,
    "table1_gpu": 24,
    "table5_cpu": 12,
    "table5_gpu": 12,
    "table6_cpu": 12,
    "table6_gpu": 12,
    "table1_deep_cpu": 60,  # seeds x depths x routers; run in two --only parts (docs/results.md)
    "fig2_depth_gpu": 18,
    "router_study_cpu": 21,  # Liu et al. (arXiv 2401.15969): 6 routers + gru, 3 seeds
}
SWEEPS = ROOT / "configs/sweeps"


def rmoe_command(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """``python -m rmoe ARGS``: the real command line, in a process of its own."""
    return subprocess.run([sys.executable, "-m", "rmoe", *args], cwd=cwd, capture_output=True, text=True, timeout=900)


def sweep_overrides(tmp_path: Path) -> list[str]:
    """base.yaml + quick.yaml shrunk to seconds (tests/tiny.py): 4 steps, val at 2 and 4."""
    return [
        *tiny_overrides(tmp_path),
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2",
        "trainer.num_sanity_val_steps=0",
    ]


def write_sweep(tmp_path: Path, name: str, routers: dict[str, object]) -> Path:
    doc = {
        "name": "tiny",
        "root": str(tmp_path / "sweep"),
        "configs": [str(ROOT / "configs/base.yaml"), str(ROOT / "configs/quick.yaml")],
        "grid": {"router": routers, "seed": {s: f"seed_everything={i}" for i, s in enumerate(SEEDS)}},
        "overrides": sweep_overrides(tmp_path),
        "after_fit": "test",
        "checkpoint_every_n_steps": 2,
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


TINY_ROUTERS = {
    "linear": "model.arch.router=linear",
    "gru": [str(ROOT / "configs/router/gru.yaml"), "model.arch.router_options.state_dim=8"],
}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The tiny sweep, run once by ``rmoe sweep``: (its directory, the sweep file, what the sweep printed)."""
    tmp_path = tmp_path_factory.mktemp("sweep")
    path = write_sweep(tmp_path, "tiny.yaml", TINY_ROUTERS)
    # one override given on the command line: the runs record it and the report says so
    result = rmoe_command("sweep", str(path), "--jobs", "2", "--set", "trainer.limit_val_batches=2")
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp_path, path, result.stdout


def scalars(directory: Path, tag: str) -> list[float]:
    """A tag's values in step order."""
    values = tiny_scalars(directory, tag)
    return [values[s] for s in sorted(values)]


def test_sweep_runs_every_combination_in_its_own_directory(swept):
    tmp_path, _, printed = swept
    root = tmp_path / "sweep"
    assert "4 done, 0 skipped" in printed and "0 failed" in printed
    for router in ROUTERS:
        for seed in SEEDS:
            run = root / f"{router}-{seed}"
            marker = json.loads((run / "done.json").read_text())
            assert marker["labels"] == {"router": router, "seed": seed}
            assert (run / "version_0/checkpoints/last.ckpt").is_file()
            assert list((run / "version_0/checkpoints").glob("best-*.ckpt"))
            assert not (run / "version_0/checkpoints/resume.ckpt").exists()  # removed once done
            assert len(scalars(run / "version_0", "train/loss")) == 4
            assert scalars(run / "test", "test/bpb")  # after_fit: test on the best checkpoint
            log = (run / "stdout.log").read_text()
            assert "python -m rmoe fit" in log and "python -m rmoe test" in log and "best-" in log
            config = yaml.safe_load((run / "version_0/config.yaml").read_text())
            assert config["seed_everything"] == SEEDS.index(seed)
            # the label (the config file's name) vs the registered name
            assert config["model"]["arch"]["router"] == {"gru": "recurrent"}.get(
                router, router
            )  # the label vs the registered name
    assert (root / "sweep.yaml").is_file()
    assert f"rmoe sweep: report with: rmoe report {root} --out {root / 'report'}" in printed


def test_second_invocation_skips_finished_runs(swept, capsys):
    tmp_path, path, _ = swept
    before = sorted(str(p) for p in (tmp_path / "sweep").rglob("*") if p.is_file())
    assert sweep.main([str(path)]) == 0
    printed = capsys.readouterr().out
    assert "0 done, 4 skipped" in printed
    after = sorted(str(p) for p in (tmp_path / "sweep").rglob("*") if p.is_file())
    assert after == before


def test_report_table_and_plots_match_the_event_files(swept, tmp_path):
    sweep_dir, _, _ = swept
    root = sweep_dir / "sweep"
    result = rmoe_command("report", str(root), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stdout + result.stderr
    expected = f"rmoe report: 2 group(s) from 4 run(s) (0 incomplete) -> {tmp_path / 'out'}/results.md"
    assert result.stdout.startswith(expected)
    out = tmp_path / "out"
    for name in ("results.md", "results.csv", "runs.csv", "val_loss.png", "val_bpb.png", "final_val_bpb.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name

    rows = {row["router"]: row for row in csv.DictReader((out / "results.csv").open())}
    assert set(ROUTERS) <= set(rows)
    for router in ROUTERS:
        row = rows[router]
        assert int(row["n"]) == len(SEEDS)
        runs = [root / f"{router}-{seed}" for seed in SEEDS]
        expected = {
            "best_val_loss": [min(scalars(r / "version_0", "val/loss")) for r in runs],
            "final_val_bpb": [scalars(r / "version_0", "val/bpb")[-1] for r in runs],
            "test_bpb": [scalars(r / "test", "test/bpb")[-1] for r in runs],
        }
        for key, values in expected.items():
            assert float(row[f"{key}_mean"]) == pytest.approx(statistics.fmean(values), rel=1e-6), key
            assert float(row[f"{key}_std"]) == pytest.approx(statistics.stdev(values), rel=1e-6), key
        assert float(row["router_params_mean"]) > 0
        assert float(row["active_params_mean"]) < float(row["total_params_mean"])
        assert math.isfinite(float(row["step_time_ms_mean"]))
    assert float(rows["gru"]["router_params_mean"]) > float(rows["linear"]["router_params_mean"])

    table = (out / "results.md").read_text()
    for router in ROUTERS:
        assert sum(line.startswith(f"| {router} | 2 |") for line in table.splitlines()) == 1
    assert "![val_bpb.png](val_bpb.png)" in table
    # what ran, read off the runs (steps, seeds, the sweep command's --set), not off the sweep file
    assert "As run: 4 optimiser steps each, 2 run(s) per group; every run with `--set trainer.limit_val_batches=2`" in (
        table
    )


def test_report_only_and_paired_differences_match_the_event_files(swept, tmp_path):
    sweep_dir, _, _ = swept
    root = sweep_dir / "sweep"
    out = tmp_path / "paired"
    assert report.main([str(root), "--out", str(out), "--paired", "router=linear", "--only", "router=gru,linear"]) == 0
    diffs = [
        scalars(root / f"gru-{seed}" / "version_0", "val/bpb")[-1]
        - scalars(root / f"linear-{seed}" / "version_0", "val/bpb")[-1]
        for seed in SEEDS
    ]
    paired = (out / "results.md").read_text().split("Paired against `router=linear`")[1]
    row = next(line for line in paired.splitlines() if line.startswith("| gru | 2 | "))
    assert f"{statistics.fmean(diffs):+.4f}" in row and f"{statistics.stdev(diffs):.4f}" in row
    assert all(f"{d:+.3f}" in row for d in diffs)
    assert (out / "paired_final_val_bpb.png").stat().st_size > 0  # the forest plot of the same differences
    assert "paired_final_val_bpb.png" in (out / "results.md").read_text()
    assert report.main([str(root), "--out", str(out), "--only", "router=gru"]) == 0
    assert {r["router"] for r in csv.DictReader((out / "results.csv").open())} == {"gru"}
    assert report.main([str(root), "--out", str(out), "--only", "router=nope"]) == 2
    assert report.main([str(root), "--out", str(out), "--paired", "router=nope"]) == 2
    assert report.main([str(root), "--out", str(out), "--paired", "router"]) == 2
    # pairing on any column: a loss says better / worse, a rate lower / higher
    assert report.main([str(root), "--out", str(out), "--paired", "router=linear", "--paired-metric", "best_val_loss",
                        "--paired-metric", "tokens_per_sec"]) == 0  # fmt: skip
    text = (out / "results.md").read_text()
    assert "mean Δ best_val_loss" in text and "mean Δ tokens_per_sec" in text
    best = [min(scalars(root / f"{r}-{s}" / "version_0", "val/loss")) for r in ("gru", "linear") for s in SEEDS]
    mean = statistics.fmean(best[i] - best[i + len(SEEDS)] for i in range(len(SEEDS)))
    assert f"| gru | 2 | {mean:+.4f}" in text.split("mean Δ best_val_loss")[1]
    assert report.main([str(root), "--out", str(out), "--paired", "router=linear", "--paired-metric", "nope"]) == 2


def test_report_marks_routers_that_are_not_causal_in_evaluation(swept, tmp_path):
    sweep_dir, _, _ = swept
    results = [report.read_run(path, labels) for path, labels in runs.find_sweep_runs(sweep_dir / "sweep")]
    assert all(r.metrics[report.NON_CAUSAL_KEY] == 0.0 for r in results)  # linear and gru are causal
    results[0].metrics[report.NON_CAUSAL_KEY] = 1.0  # as parameter_counts says for e.g. expert_choice
    groups = report.group_runs(results, ["router"])
    table = report.markdown_table(groups, list(report.BASE_COLUMNS))
    marked = [line for line in table.splitlines() if "\\*" in line]
    assert len(marked) == 1 and marked[0].startswith(f"| {results[0].labels['router']} \\* |")


def test_a_router_not_causal_in_evaluation_is_also_tested_causally(tmp_path, capsys):
    """Expert choice: the sweep tests its checkpoint as trained (test/) and with its causal evaluation
    (test_causal/, eval_routing: topk); the report shows both; a run finished before that stage
    existed gets it on the next invocation, and nothing else of it changes."""
    doc = yaml.safe_load(write_sweep(tmp_path, "ec.yaml", {}).read_text())
    doc["grid"] = {
        "router": {"ec": "model.arch.router=expert_choice", "linear": "model.arch.router=linear"},
        "seed": {"s0": "seed_everything=0"},
    }
    path = tmp_path / "ec.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert sweep.main([str(path)]) == 0
    run = tmp_path / "sweep" / "ec-s0"
    log = (run / "stdout.log").read_text()
    assert "model.arch.router_options.eval_routing=topk" in log and f"version={runs.CAUSAL_TEST_DIR}" in log
    as_trained, causal = scalars(run / runs.TEST_DIR, "test/bpb"), scalars(run / runs.CAUSAL_TEST_DIR, "test/bpb")
    assert as_trained and causal and causal[-1] != as_trained[-1]  # another routing, another loss
    config = yaml.safe_load((run / runs.CAUSAL_TEST_DIR / "config.yaml").read_text())
    assert config["model"]["arch"]["router_options"]["eval_routing"] == "topk"

    result = report.read_run(run, {"router": "ec", "seed": "s0"})
    assert result.metrics["causal_test_bpb"] == pytest.approx(causal[-1])
    assert result.metrics[report.NON_CAUSAL_KEY] == 1.0
    assert result.metrics[report.COMPARABLE_TEST_KEY] == result.metrics["causal_test_bpb"]  # what --paired uses
    table = report.markdown_table(report.group_runs([result], ["router"]), report.base_columns([result]))
    assert "causal test bpb" in table.splitlines()[0] and "| ec \\* |" in table
    # paired on that number: added when a row is not causal, once when also asked for by name
    for asked, header in (
        ([], "mean Δ causal test bpb"),
        (["--paired-metric", "comparable_test_bpb"], "mean Δ comparable_test_bpb"),
    ):
        out = tmp_path / f"report{len(asked)}"
        assert report.main([str(tmp_path / "sweep"), "--out", str(out), "--paired", "router=linear", *asked]) == 0
        text = (out / "results.md").read_text()
        assert text.count("| router | pairs | mean Δ") == 2 - len(asked) // 2 and text.count(header) == 1
        gap = (
            result.metrics["causal_test_bpb"]
            - report.read_run(tmp_path / "sweep" / "linear-s0", {}).metrics["test_bpb"]
        )
        assert f"| ec | 1 | {gap:+.4f}" in text.split(header)[1]

    import shutil

    shutil.rmtree(run / runs.CAUSAL_TEST_DIR)  # as a run finished by an older rmoe
    before = {p: p.stat().st_mtime_ns for p in (run / runs.FIT_DIR).rglob("*") if p.is_file()}
    capsys.readouterr()
    assert sweep.main([str(path)]) == 0
    printed = capsys.readouterr().out
    assert "adding its test with causal evaluation" in printed and "causal test done" in printed
    assert scalars(run / runs.CAUSAL_TEST_DIR, "test/bpb") == pytest.approx(causal)  # same checkpoint, same data
    assert {p: p.stat().st_mtime_ns for p in (run / runs.FIT_DIR).rglob("*") if p.is_file()} == before
    assert not (run / runs.FOLLOW_UP_PLAN).exists()
    assert sweep.main([str(path)]) == 0  # now nothing is due
    assert "skipped" in capsys.readouterr().out


def test_a_run_another_sweep_process_is_running_is_left_alone(swept, capsys):
    """Two sweeps on one root (a second terminal, a follow-up): the run whose lock another process
    holds is skipped, untouched, and the summary says so; the lock goes when its holder does."""
    import fcntl

    tmp_path, path, _ = swept
    run = tmp_path / "sweep" / "linear-s0"
    (run / "done.json").rename(run / "done.json.held")  # as if still running: it would be resumed
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
            "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)",
            str(run / runs.RUN_LOCK),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert sweep.main([str(path), "--only", "router=linear", "--only", "seed=s0"]) == 0
        printed = capsys.readouterr().out
        assert "linear-s0: skipped: another sweep process is running it" in printed
        assert "0 done, 0 skipped (already finished), 0 failed, 1 left to the other sweep process" in printed
        assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before
    finally:
        holder.kill()
        holder.wait()
        (run / "done.json.held").rename(run / "done.json")
    with (run / runs.RUN_LOCK).open("a") as handle:  # released with its holder
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_causal_rows_have_no_causal_test_column(swept):
    sweep_dir, _, _ = swept
    results = [report.read_run(path, labels) for path, labels in runs.find_sweep_runs(sweep_dir / "sweep")]
    assert all(not (r.path / runs.CAUSAL_TEST_DIR).exists() for r in results)
    assert "causal_test_bpb" not in [c.key for c in report.base_columns(results)]
    assert all(r.metrics[report.COMPARABLE_TEST_KEY] == r.metrics["test_bpb"] for r in results)  # causal: as tested


def test_report_leaves_out_sweep_runs_without_their_done_marker(swept, tmp_path):
    """A run still training (or interrupted) has events but no done.json: it must not enter the table."""
    import shutil

    sweep_dir, _, _ = swept
    root = tmp_path / "root"
    shutil.copytree(sweep_dir / "sweep", root)
    (root / f"gru-{SEEDS[0]}" / "done.json").unlink()
    # and one that diverged: its row says so (it used to vanish into a line of names)
    status = root / f"linear-{SEEDS[1]}" / "version_0/status.json"
    diverged = {**json.loads(status.read_text()), "state": "failed", "global_step": 3,
                "error": "RmoeError: training diverged at optimiser step 3: train/loss=nan"}  # fmt: skip
    status.write_text(json.dumps(diverged))
    (root / f"linear-{SEEDS[1]}" / "done.json").unlink()
    assert report.main([str(root), "--out", str(tmp_path / "out")]) == 0
    rows = {row["router"]: row for row in csv.DictReader((tmp_path / "out/results.csv").open())}
    assert int(rows["gru"]["n"]) == len(SEEDS) - 1 and int(rows["linear"]["n"]) == len(SEEDS) - 1
    left_out = (tmp_path / "out/results.md").read_text().split("Runs left out of the tables")[1]
    assert f"| `gru-{SEEDS[0]}` | gru | {SEEDS[0]} | finished at step " in left_out
    assert "its sweep stages not all done" in left_out
    assert f"| `linear-{SEEDS[1]}` | linear | {SEEDS[1]} | diverged at step 3 |" in left_out
    states = {row["run"]: row["state"] for row in csv.DictReader((tmp_path / "out/runs.csv").open())}
    assert states[f"linear-{SEEDS[1]}"] == "diverged at step 3"


def test_paired_verdict_is_the_95_percent_t_interval():
    paired = report.Paired({"router": "gru"}, [0.10, 0.12, 0.08])  # mean 0.10, std 0.02, t = 8.7 > 4.303
    assert paired.verdict == "worse"
    assert paired.half_width == pytest.approx(4.303 * 0.02 / math.sqrt(3), rel=1e-6)
    assert report.Paired({}, [-0.10, -0.12, -0.08]).verdict == "better"
    assert report.Paired({}, [0.10, -0.05, 0.02]).verdict == "indistinguishable"
    assert report.Paired({}, [0.10]).verdict == "too few pairs"
    assert report.Paired({}, [0.10, 0.12, 0.08], lower_is_better=False).verdict == "higher"  # not a loss


def test_interrupted_run_resumes_and_a_failed_run_is_reported(swept, capsys):
    tmp_path, _, _ = swept
    gru_s1 = tmp_path / "sweep/gru-s1"
    (gru_s1 / "done.json").unlink()  # as if interrupted after its last checkpoint

    # a second sweep file: the same runs plus a router whose override is invalid
    path = write_sweep(tmp_path, "tiny_bad.yaml", {"bad": "model.arch.top_k=9", **TINY_ROUTERS})
    assert sweep.main([str(path), "--only", "seed=s1", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "gru-s1 (resume)" in printed and "linear-s1 (done)" in printed and "bad-s1 (new)" in printed
    assert f"--ckpt={gru_s1 / 'version_0/checkpoints/last.ckpt'}" in printed

    assert sweep.main([str(path), "--only", "seed=s1", "--jobs", "2"]) == 1
    printed = capsys.readouterr().out
    assert "1 done, 1 skipped (already finished), 1 failed" in printed
    assert "FAILED bad-s1: exit 2" in printed and "model.arch.top_k=9 must be between 1" in printed
    assert str(tmp_path / "sweep/bad-s1/stdout.log") in printed
    assert not (tmp_path / "sweep/bad-s1/done.json").exists()
    marker = json.loads((gru_s1 / "done.json").read_text())
    assert marker["resumed_from"].endswith("last.ckpt")
    assert "Restored all states from the checkpoint" in (gru_s1 / "stdout.log").read_text()
    assert scalars(gru_s1 / "test", "test/bpb")


def processes_running(fragment: str) -> list[int]:
    """The PIDs whose command line contains ``fragment`` (Linux ``/proc``)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if fragment in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
        except OSError:  # the process ended while we looked
            continue
    return pids


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs Linux /proc to find the child")
@pytest.mark.parametrize("jobs", ["1", "2"])
def test_sigterm_to_the_sweep_stops_its_running_child(jobs, tmp_path):
    """A job scheduler (or ``kill``) stops the sweep process only, not its process group: the run it
    started must stop too, as failed and resumable, whatever ``--jobs`` (with ``--jobs 1`` the child
    was once left running with no sweep, and a second sweep could start the same run beside it)."""
    path = write_sweep(tmp_path, "long.yaml", {"linear": "model.arch.router=linear"})
    doc = yaml.safe_load(path.read_text())
    doc["grid"]["seed"] = {"s0": "seed_everything=0"}
    doc["overrides"] += ["trainer.max_steps=100000"]  # far longer than the test waits
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    run = tmp_path / "sweep" / "linear-s0"
    sweeper = subprocess.Popen(
        [sys.executable, "-m", "rmoe", "sweep", str(path), "--jobs", jobs],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    printed = ""
    try:
        deadline = time.monotonic() + 300
        log = run / "stdout.log"
        while not (log.exists() and "python -m rmoe fit" in log.read_text()):  # the child is running
            assert sweeper.poll() is None and time.monotonic() < deadline, sweeper.stdout.read()
            time.sleep(0.5)
        children = processes_running(str(run / runs.PLAN_FILE))
        assert len(children) == 1, children
        sweeper.send_signal(signal.SIGTERM)
        printed, _ = sweeper.communicate(timeout=180)
    finally:
        if sweeper.poll() is None:
            sweeper.kill()
        left = processes_running(str(run / runs.PLAN_FILE))
        for pid in left:  # never leave a 100,000-step run behind a failed test
            os.kill(pid, signal.SIGKILL)
    assert not left, f"the child of the sweep was still running: {printed}"
    assert sweeper.returncode != 0 and "interrupted; run the same command again to resume" in printed, printed
    assert not (run / runs.MARKER_FILE).exists()


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        ({"configs": ["configs/base.yaml"], "grid": {"seed": {"s0": "seed_everything=0"}}}, "'name' is required"),
        ({"name": "x", "configs": ["configs/base.yaml"], "grid": {"s": {"a": "x=1"}}, "overide": []}, "'overide'"),
        ({"name": "x", "configs": ["configs/nope.yaml"], "grid": {"s": {"a": "x=1"}}}, "configs[0]"),
        ({"name": "x", "configs": ["configs/base.yaml"], "grid": {"seed": [0, 1]}}, "'grid.seed' must map"),
        ({"name": "x", "configs": ["configs/base.yaml"], "grid": {"r": {"g": "configs/router/gru2.yaml"}}}, "grid.r.g"),
        ({"name": "x", "configs": ["configs/base.yaml"], "grid": {"r": {"g": "gru"}}}, "grid.r.g='gru' is neither"),
        ({"name": "x", "configs": ["configs/base.yaml"], "grid": {"r": {"a-b": "x=1"}}}, "label 'a-b'"),
        (
            {"name": "x", "configs": ["configs/base.yaml"], "grid": {"r": {"a": "x=1"}}, "after_fit": "tset"},
            "after_fit",
        ),
    ],
)
def test_bad_sweep_file_is_one_paragraph_naming_the_key(doc, fragment, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert sweep.main([str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rmoe: error:") and fragment in err and "\n" not in err.strip()


def test_bad_options_are_reported(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    table1 = "configs/sweeps/table1_cpu.yaml"
    assert sweep.main([table1, "--dry-run", "--only", "router=nope"]) == 2
    assert "unknown label(s) nope of 'router'" in capsys.readouterr().err
    assert sweep.main([table1, "--dry-run", "--only", "size=big"]) == 2
    assert sweep.main([table1, "--dry-run", "--set", "not-an-override"]) == 2
    assert sweep.main([str(tmp_path / "missing.yaml")]) == 2
    capsys.readouterr()
    narrowed = ["--only", "router=gru,linear", "--set", "trainer.max_steps=7", "--root", str(tmp_path / "root")]
    assert sweep.main([table1, "--dry-run", *narrowed]) == 0  # a fresh root: runs under ./runs may be finished
    printed = capsys.readouterr().out
    assert printed.count("\n# [") == 6 and printed.count("trainer.max_steps=7") == 6
    with pytest.raises(SystemExit) as exit_info:  # through `rmoe`: the sweep's exit code is rmoe's
        rmoe_main(["sweep", str(tmp_path / "missing.yaml")])
    assert exit_info.value.code == 2 and "rmoe: error: sweep file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        rmoe_main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "rmoe: error: sweep root" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(PAPER_SWEEPS))
def test_paper_sweeps_expand_to_the_expected_runs(name, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # config paths are relative to the repository root
    path = SWEEPS / f"{name}.yaml"
    parsed = sweep.load_sweep(path)  # checks that every config file exists
    runs = sweep.expand(parsed)
    assert parsed.name == name and len(runs) == PAPER_SWEEPS[name]
    assert len({run.name for run in runs}) == len(runs)
    size = {"table1_deep_cpu": "deep_cpu"}.get(name, "cpu" if name.endswith("_cpu") else "medium_gpu")
    assert f"configs/size/{size}.yaml" in parsed.configs
    # same token budget in every run: no grid value touches the steps, the batch or the block
    for labels in parsed.grid.values():
        for value in labels.values():
            assert not any(
                o.startswith(("trainer.max_steps", "data.batch_size", "data.block_size")) for o in value.overrides
            )
    assert sweep.main([str(path), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("\n# [") == PAPER_SWEEPS[name]
    for i, run in enumerate(runs):
        assert f"# [{i + 1}/{len(runs)}] {run.name} (" in printed


OTHER_SWEEPS = sorted(p for p in SWEEPS.glob("*.yaml") if p.stem not in PAPER_SWEEPS)


@pytest.mark.parametrize("path", OTHER_SWEEPS, ids=lambda p: p.stem)
def test_other_sweep_files_expand(path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    runs = sweep.expand(sweep.load_sweep(path))
    assert runs and len({run.name for run in runs}) == len(runs)
    assert sweep.main([str(path), "--dry-run"]) == 0
    assert capsys.readouterr().out.count("\n# [") == len(runs)


def test_config_folders_hold_one_kind_of_file():
    """Each folder of configs/ holds what its name says: sweeps/ grids, size/ model sizes (no grid, no
    callbacks: base.yaml has the one list), arch/ model.arch keys, data/ data keys, strategy/
    trainer.strategy, router/ model keys, eval/ the downstream-evaluation callback appended to base.yaml's list
    (its tasks/ folder: lm-eval task files, not rmoe configs)."""
    configs = ROOT / "configs"
    folders = {p.name for p in configs.iterdir() if p.is_dir()}
    assert folders == {"sweeps", "size", "router", "arch", "data", "strategy", "eval"}
    assert sorted(p.name for p in configs.glob("*.yaml")) == ["base.yaml", "quick.yaml"]
    allowed = {
        "arch": {"model": {"arch"}},
        "data": {"data": None},
        "strategy": {"trainer": {"strategy"}},
        "router": {"model": None},
        "eval": {"trainer": {"callbacks+"}},
    }
    for path in configs.glob("*/*.yaml"):
        config = yaml.safe_load(path.read_text()) or {}
        folder = path.parent.name
        assert ("grid" in config) == (folder == "sweeps"), path
        if folder in allowed:
            assert set(config) <= set(allowed[folder]), path
            for key, inner in allowed[folder].items():
                assert inner is None or set(config.get(key, {})) <= inner, path
    callbacks = [
        p for p in configs.rglob("*.yaml") if "callbacks" in (yaml.safe_load(p.read_text()) or {}).get("trainer", {})
    ]
    assert callbacks == [configs / "base.yaml"]


RUN_FOLDER_NAMES = {
    runs.FIT_DIR,
    runs.TEST_DIR,
    runs.CAUSAL_TEST_DIR,
    runs.FOLLOW_UP_PLAN,
    runs.RUN_LOCK,
    runs.LOG_FILE,
    runs.PLAN_FILE,
    runs.MARKER_FILE,
    runs.SWEEP_COPY,
    runs.RESUME_CHECKPOINT,
    runs.EVENTS_GLOB,
}


def test_run_folder_file_names_are_declared_only_in_rmoe_runs():
    """rmoe/runs.py is the one module that spells the sweep run folder's file names (as string literals)."""
    assert {"done.json", "run.json", "stdout.log", "sweep.yaml", "version_0"} <= RUN_FOLDER_NAMES
    names = RUN_FOLDER_NAMES - {runs.TEST_DIR, runs.RESUME_CHECKPOINT}  # "test" and "resume" are common words
    found = []
    for path in sorted((ROOT / "rmoe").rglob("*.py")):
        if path == ROOT / "rmoe/runs.py":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}  # docstrings
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if any(name in node.value for name in names):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not found, "run-folder file names outside rmoe/runs.py (import them from rmoe.runs):\n" + "\n".join(found)


def test_rmoe_runs_is_a_leaf_module():
    """rmoe/runs.py (read by sweep, report, analysis, export, the benchmarks) imports nothing of rmoe but its
    errors and the tag schema (both leaves themselves)."""
    tree = ast.parse((ROOT / "rmoe/runs.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert {name for name in imported if name == "rmoe" or name.startswith("rmoe.")} <= {"rmoe.errors", "rmoe.tags"}


def test_a_root_belongs_to_one_sweep_spec(swept, capsys):
    """Another spec into a root is refused (a run name there would stand for other settings); the same
    sweep may add labels; ``--reuse-root`` runs it anyway and calls the other spec's runs stale."""
    tmp_path, _, _ = swept
    copy = tmp_path / "sweep/sweep.yaml"
    before = copy.read_text()
    changed = write_sweep(tmp_path, "changed.yaml", {**TINY_ROUTERS, "linear": "model.arch.router=mlp"})
    assert sweep.main([str(changed), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "belongs to sweep 'tiny'" in err and "differing: grid router=linear" in err and "--reuse-root" in err
    assert copy.read_text() == before
    renamed = tmp_path / "renamed.yaml"
    renamed.write_text((tmp_path / "tiny.yaml").read_text().replace("name: tiny", "name: other"))
    assert sweep.main([str(renamed), "--dry-run"]) == 2 and "differing: name 'tiny'" in capsys.readouterr().err
    # --reuse-root: the finished runs under these names are another spec's: stale, exit 1, nothing trained
    assert sweep.main([str(changed), "--reuse-root", "--only", "router=linear", "--only", "seed=s0"]) == 1
    printed = capsys.readouterr().out
    assert "1 stale (finished with other settings than this sweep's: not its results)" in printed
    assert "STALE linear-s0: it finished with other settings than these" in printed
    copy.write_text(before)  # the module's other tests read this root
