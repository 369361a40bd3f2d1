"""A run stopped by a signal loses nothing: real processes, real signals, through the real ``rmoe fit``.

SIGTERM (a scheduler), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's warning) stop the run at the next step
boundary, during training or validation, on one process and under DDP: ``last.ckpt`` is written,
``status.json`` says ``interrupted``, the exit code is 128 + the signal, and resuming from that
checkpoint gives the uninterrupted run's curves (``train/loss``, ``val/loss``, a routing metric) to
the last bit. A run killed from outside (a signal from another process) does the same, and a
time-based ``last.ckpt`` is written without any signal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny import BASE_CONFIGS, tiny_overrides

from rmoe.runs import read_scalars

pytestmark = pytest.mark.slow  # real processes and signals, whole runs

TESTS = Path(__file__).resolve().parent
TAGS = r"^(train/loss|val/loss|moe/val/load_cv/mean)$"


def fit_command(root: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rmoe", "fit", *BASE_CONFIGS, *tiny_overrides(root),
            f"trainer.logger.init_args.save_dir={root / 'runs'}", f"trainer.logger.init_args.name={name}",
            "trainer.max_steps=10", "trainer.val_check_interval=5", "trainer.limit_val_batches=3",
            "trainer.enable_progress_bar=false", *extra]  # fmt: skip


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=400)


def curves(run_dir: Path) -> dict[str, dict[int, float]]:
    return {tag: dict(points) for tag, points in read_scalars(run_dir, pattern=TAGS).items()}


def signal_at(spec: str) -> str:
    return f"--trainer.callbacks+={{class_path: signal_probe.SignalSelf, init_args: {{{spec}}}}}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("interrupt")
    done = run(fit_command(root, "ref"), root)
    assert done.returncode == 0, done.stderr[-3000:]
    return root, curves(root / "runs/ref/version_0")


CASES = {  # name: (the signal and where, its exit code, the step it stops at)
    "SIGTERM in training": ("signal_name: SIGTERM, step: 3", 143, 3),
    "SIGINT in validation": ("signal_name: SIGINT, val_batch: 1", 130, 5),
    "SIGUSR1 after a validation": ("signal_name: SIGUSR1, step: 5", 138, 5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_signal_saves_last_ckpt_exits_nonzero_and_the_resume_equals_the_uninterrupted_run(case, reference):
    root, expected = reference
    spec, code, step = CASES[case]
    name = case.split()[0].lower() + "_" + case.split()[-1]
    stopped = run(fit_command(root, name, signal_at(spec)), root)
    assert stopped.returncode == code, stopped.stderr[-3000:]
    run_dir = root / f"runs/{name}/version_0"
    last = run_dir / "checkpoints/last.ckpt"
    status = json.loads((run_dir / "status.json").read_text())
    signal_name = spec.split(",")[0].split(": ")[1]
    assert (status["state"], status["signal"], status["global_step"]) == ("interrupted", signal_name, step)
    assert status["checkpoint"] == str(last) and last.is_file()
    assert (
        f"rmoe: {signal_name}: stopped at step {step}: saved {last}; resume with: rmoe fit --config" in stopped.stderr
    )
    resumed = run(fit_command(root, name, f"--ckpt={last}"), root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = curves(run_dir)
    assert got.keys() == expected.keys()
    for tag, values in expected.items():
        assert got[tag] == values, tag  # the same steps, the same values to the last bit


def test_a_sigterm_from_another_process_stops_the_run_in_order(tmp_path):
    command = fit_command(tmp_path, "killed", "trainer.max_steps=3000", "trainer.val_check_interval=5000")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)  # fmt: skip
    run_dir = tmp_path / "runs/killed/version_0"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None and not list(run_dir.glob("events.out.*")):
        time.sleep(0.2)  # the events file appears as training starts
    time.sleep(3.0)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 143, err[-3000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "interrupted" and 0 < status["global_step"] < 3000
    assert (run_dir / "checkpoints/last.ckpt").is_file()


STRATEGIES = {
    "ddp": ["trainer.strategy=ddp"],
    # expert parallelism: the checkpoint of the stop gathers every expert from both processes
    "ep": ["--config", str(TESTS.parent / "configs/strategy/ep.yaml")],
}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_ddp_stops_every_process_at_the_same_step_and_resumes_exactly(strategy, reference, tmp_path):
    root, expected = reference
    ddp = [*STRATEGIES[strategy], "trainer.devices=2", "trainer.accelerator=cpu", "data.batch_size=2",
           "data.eval_batch_size=2"]  # fmt: skip
    stopped = run(fit_command(tmp_path, "ddp", *ddp, signal_at("signal_name: SIGTERM, step: 3")), tmp_path)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    run_dir = tmp_path / "runs/ddp/version_0"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "interrupted" and status["global_step"] in (3, 4)  # rank 1 learns it a step later
    resumed = run(fit_command(tmp_path, "ddp", *ddp, f"--ckpt={run_dir / 'checkpoints/last.ckpt'}"), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    uninterrupted = run(fit_command(tmp_path, "ddp_ref", *ddp), tmp_path)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    assert curves(run_dir) == curves(tmp_path / "runs/ddp_ref/version_0")


def test_last_ckpt_every_few_minutes_without_any_signal(tmp_path):
    """``checkpoint_every_minutes``: written at logged steps once the time is up, as the run's own
    ``last.ckpt`` (the ModelCheckpoint of validations then overwrites it, no ``last-v1.ckpt``)."""
    done = run(fit_command(tmp_path, "timed", "checkpoint_every_minutes=0.00001", "trainer.limit_val_batches=0",
                           "trainer.max_steps=4"), tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "runs/timed/version_0/checkpoints").iterdir())
    assert names == ["last.ckpt"]
    import torch

    assert torch.load(tmp_path / "runs/timed/version_0/checkpoints/last.ckpt", weights_only=False)["global_step"] == 4


def test_a_second_ctrl_c_stops_at_once_and_sigusr1_requeues_under_slurm(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from rmoe.training import interrupt

    callback = interrupt.Interruption()
    interrupt._received.clear()
    callback._handle(signal.SIGINT, None)
    with pytest.raises(KeyboardInterrupt):
        callback._handle(signal.SIGINT, None)
    interrupt._received.clear()

    from lightning.fabric.plugins.environments import SLURMEnvironment

    scontrol = tmp_path / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "called"}\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    trainer = SimpleNamespace(_accelerator_connector=SimpleNamespace(cluster_environment=SLURMEnvironment()))
    interrupt.requeue_slurm_job(trainer)
    assert (tmp_path / "called").read_text().split() == ["requeue", "4242"]
