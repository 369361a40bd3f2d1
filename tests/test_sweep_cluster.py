"""``rmoe sweep --launcher slurm`` without a cluster: the sbatch script against a fixture, bad options refused
before anything is submitted, and the same code path through submitit's local executor end to end (submission,
a task interrupted as SLURM does at preemption and requeued, resuming its run from its checkpoint, the report)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml
from tiny import ROOT, tiny_overrides

from rmoe import report
from rmoe.sweep import load_sweep
from rmoe.sweep.cluster import JOBS_FILE, ClusterOptions, sbatch_script, submit
from rmoe.sweep.sweep_cli import main as sweep_main

FIXTURE = Path(__file__).parent / "fixtures" / "table1_gpu.sbatch"


def test_the_sbatch_script_is_the_fixture():
    options = ClusterOptions(
        partition="gpu",
        gpus_per_run=1,
        cpus_per_run=8,
        time_limit_min=120,
        array_parallelism=4,
        sbatch={"account": "lab"},
    )
    folder = Path("/cluster/runs/sweeps/table1_gpu/.submitit/%j")
    assert sbatch_script(options, folder, "table1_gpu", 24) == FIXTURE.read_text()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--launcher", "slurm"], "--launcher slurm needs --partition NAME"),
        (["--launcher", "slurm", "--partition", "gpu", "--gpus-per-run", "2"], "--gpus-per-run 2: a run over"),
        (["--launcher", "slurm", "--partition", "gpu", "--time-limit", "0"], "--time-limit 0"),
        (["--launcher", "slurm", "--partition", "gpu", "--sbatch", "account"], "--sbatch 'account': expected"),
        (["--launcher", "submitit-local", "--cpus-per-run", "0"], "--cpus-per-run 0"),
    ],
)
def test_bad_cluster_options_are_refused_before_submitting(args, fragment, tmp_path, capsys):
    spec = ROOT / "configs/sweeps/tiny.yaml"
    assert sweep_main([str(spec), "--root", str(tmp_path / "r"), *args]) == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "r" / ".submitit").exists()


def test_without_submitit_the_message_says_what_to_install(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "submitit" else real(name, *a))
    spec = ROOT / "configs/sweeps/tiny.yaml"
    assert sweep_main([str(spec), "--launcher", "slurm", "--partition", "gpu", "--root", str(tmp_path / "r")]) == 2
    assert "pip install -e '.[slurm]'" in capsys.readouterr().err


def test_a_slurm_dry_run_prints_the_array_script(tmp_path, capsys):
    spec = ROOT / "configs/sweeps/tiny.yaml"
    args = [str(spec), "--root", str(tmp_path / "r"), "--launcher", "slurm", "--partition", "cpu", "--dry-run"]
    assert sweep_main([*args, "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --array=0-3%2" in out and "#SBATCH --partition=cpu" in out and "--signal=USR2@90" in out
    assert sweep_main(args) == 0  # without --jobs: the array's default parallelism
    assert "#SBATCH --array=0-3%4" in capsys.readouterr().out


def write_spec(tmp_path: Path, steps: int) -> Path:
    doc = {
        "name": "cluster",
        "root": str(tmp_path / "sweep"),
        "configs": [str(ROOT / "configs/base.yaml"), str(ROOT / "configs/quick.yaml")],
        "grid": {"seed": {"s0": "seed_everything=0", "s1": "seed_everything=1"}},
        "overrides": [
            *tiny_overrides(tmp_path),
            f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={steps}",
            "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1",
            "trainer.num_sanity_val_steps=0",
        ],
        "after_fit": "test",
        "checkpoint_every_n_steps": 5,
    }
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.mark.slow
def test_submitit_local_runs_the_grid_then_a_rerun_submits_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = write_spec(tmp_path, steps=4)
    assert sweep_main([str(spec), "--launcher", "submitit-local", "--wait"]) == 0
    out = capsys.readouterr().out
    assert "submitted 2 task(s)" in out and "sweep cluster: 2 done." in out
    root = tmp_path / "sweep"
    for name in ("s0", "s1"):
        assert json.loads((root / name / "done.json").read_text())["name"] == name
        assert (root / name / "test").is_dir() and (root / name / "run.json").is_file()
    assert len((root / JOBS_FILE).read_text().splitlines()) == 2
    assert sweep_main([str(spec), "--launcher", "submitit-local", "--wait"]) == 0
    assert "2 finished run(s) skipped, 0 in the queue; 0 to submit" in capsys.readouterr().out
    assert (root / "sweep.yaml").is_file()  # the root's owner and grid, as the local launcher writes them
    assert report.main([str(root), "--out", str(tmp_path / "report")]) == 0


def task_pids(folder: Path) -> list[int]:
    """The processes running a submitit task of this job folder (Linux /proc)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if proc.name.isdigit() and "submitit.core._submit" in cmdline and str(folder) in cmdline:
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_an_interrupted_task_is_requeued_and_resumes_its_run(tmp_path, monkeypatch, capsys):
    import signal

    monkeypatch.chdir(tmp_path)
    spec = write_spec(tmp_path, steps=40)
    sweep = load_sweep(str(spec))
    from rmoe.sweep import expand

    runs = [r for r in expand(sweep, {}, ()) if r.name == "s0"]
    (job,) = submit(sweep, runs, "submitit-local", ClusterOptions(time_limit_min=20), str(spec), None, ())
    checkpoint = runs[0].fit_dir / "checkpoints" / "resume.ckpt"
    deadline = time.monotonic() + 600
    while not checkpoint.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert checkpoint.exists() and not runs[0].marker.exists(), "the run never wrote its first checkpoint"
    # a second invocation while the task runs does not submit the run again
    assert sweep_main([str(spec), "--launcher", "submitit-local", "--only", "seed=s0"]) == 0
    assert f"s0: still queued or running as job {job.job_id}" in capsys.readouterr().out
    pids = task_pids(sweep.root / ".submitit")
    assert pids, "no submitit task process found"
    for pid in pids:  # what SLURM sends ahead of a preemption or the time limit (--signal=USR2@90)
        os.kill(pid, signal.SIGUSR2)
    assert job.result() == "done"
    log = runs[0].log.read_text()
    assert "(new)" in log and "(resume)" in log  # the requeued task resumed the run from its checkpoint
    assert json.loads(runs[0].marker.read_text())["resumed_from"]
