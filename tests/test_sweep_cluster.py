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


@pytest.mark.slow
def test_a_run_of_two_processes_is_one_array_task_of_two_ranks(tmp_path, monkeypatch, capsys):
    """``--processes-per-run 2``: one array task of 2 submitit tasks; task 0 plans and records the run, task 1
    follows its plan; the two ``rmoe fit`` processes are the ranks of one DDP run (gloo), then of its test."""
    monkeypatch.chdir(tmp_path)
    spec = write_spec(tmp_path, steps=4)
    doc = yaml.safe_load(spec.read_text())
    doc["grid"] = {"seed": {"s0": "seed_everything=0"}}
    doc["overrides"] += ["trainer.accelerator=cpu", "trainer.strategy=ddp", "trainer.devices=2"]
    spec.write_text(yaml.safe_dump(doc, sort_keys=False))
    args = [str(spec), "--launcher", "submitit-local", "--processes-per-run", "2", "--wait"]
    assert sweep_main(args) == 0, capsys.readouterr()
    assert "sweep cluster: 1 done." in capsys.readouterr().out
    run = tmp_path / "sweep" / "s0"
    assert json.loads((run / "done.json").read_text())["name"] == "s0" and (run / "test").is_dir()
    rank0, rank1 = (run / "stdout.log").read_text(), (run / "stdout.rank1.log").read_text()
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in rank0 and "GLOBAL_RANK: 1, MEMBER: 2/2" in rank1
    assert rank1.count("$ python -m rmoe test") == rank0.count("$ python -m rmoe test") == 1  # the same stages
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["test", "version_0"]  # one run, not one per rank
    assert sweep_main(args) == 0  # the finished run: nothing submitted, no rank waits
    assert "1 finished run(s) skipped" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--processes-per-run", "0"], "--processes-per-run 0: expected >= 1"),
        (["--gpus-per-run", "4", "--processes-per-run", "2"], "Lightning runs one process per GPU"),
    ],
)
def test_bad_process_counts_are_refused_before_submitting(args, fragment, tmp_path, capsys):
    spec = ROOT / "configs/sweeps/tiny.yaml"
    assert sweep_main([str(spec), "--root", str(tmp_path / "r"), "--launcher", "submitit-local", *args]) == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_the_sbatch_script_of_a_four_gpu_run_asks_for_a_task_per_gpu(tmp_path):
    options = ClusterOptions(partition="gpu", gpus_per_run=4)
    script = sbatch_script(options, tmp_path, "grid", num_tasks=3)
    assert "#SBATCH --ntasks-per-node=4" in script and "#SBATCH --gpus-per-node=4" in script
