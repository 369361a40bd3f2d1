"""A sweep run's state on disk (new, resume, done) and its ``rmoe`` command lines."""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from rmoe.runs import CAUSAL_TEST_DIR, FIT_DIR, RESUME_CHECKPOINT, TEST_DIR
from rmoe.sweep.spec import GridRun, Sweep


def resume_checkpoint(run: GridRun) -> Path | None:
    """The newer of ``checkpoints/last.ckpt`` and ``checkpoints/resume.ckpt`` of the run's fit, if any."""
    directory = run.fit_dir / "checkpoints"
    candidates = [p for p in (directory / "last.ckpt", directory / f"{RESUME_CHECKPOINT}.ckpt") if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns) if candidates else None


def run_state(run: GridRun) -> str:
    """``done`` (marker present), ``resume`` (a checkpoint, no marker) or ``new``."""
    if run.marker.is_file():
        return "done"
    return "resume" if resume_checkpoint(run) is not None else "new"


def fit_args(sweep: Sweep, run: GridRun, ckpt_path: Path | str | None = None) -> list[str]:
    """The ``rmoe`` arguments of the run's fit (``fit --config ... key=value ...``)."""
    args = ["fit"]
    for config in run.configs:
        args += ["--config", config]
    args += list(run.overrides)
    args += [
        f"trainer.logger.init_args.save_dir={sweep.root}",
        f"trainer.logger.init_args.name={run.name}",
        f"trainer.logger.init_args.version={FIT_DIR.removeprefix('version_')}",
    ]
    if sweep.checkpoint_every_n_steps:
        args.append(
            "--trainer.callbacks+={class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: "
            f"{{every_n_train_steps: {sweep.checkpoint_every_n_steps}, save_top_k: 1, "
            f"filename: {RESUME_CHECKPOINT}, enable_version_counter: false}}}}"
        )
    if ckpt_path is not None:
        args.append(f"--ckpt={ckpt_path}")
    return args


def rmoe_test_args(run: GridRun, ckpt_path: Path | str, router_options: Mapping[str, Any] | None = None) -> list[str]:
    """The ``rmoe`` arguments that test a checkpoint with the run's saved config into ``<run>/test/``, or, with
    ``router_options`` (:func:`causal_evaluation`), into ``<run>/test_causal/``."""
    version = TEST_DIR if router_options is None else CAUSAL_TEST_DIR
    args = ["test", "--config", str(run.fit_dir / "config.yaml"), f"--ckpt={ckpt_path}"]
    args.append(f"trainer.logger.init_args.version={version}")
    return args + [f"model.arch.router_options.{key}={value}" for key, value in (router_options or {}).items()]


def causal_evaluation(fit_dir: Path) -> dict[str, Any] | None:
    """The router options that make a finished fit's evaluation causal (``ModelConfig.causal_evaluation_options``);
    None when already causal, not offered, or without a saved config."""
    from rmoe.model.config import ModelConfig

    try:
        arch = yaml.safe_load((fit_dir / "config.yaml").read_text())["model"]["arch"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return None
    return ModelConfig(**arch).causal_evaluation_options() or None


def checkpoint_to_test(fit_dir: Path, which: str) -> Path:
    """The newest ``best-*.ckpt`` (``which="best"``), else ``last.ckpt``; FileNotFoundError if neither exists."""
    directory = fit_dir / "checkpoints"
    best = sorted(directory.glob("best-*.ckpt"), key=lambda p: p.stat().st_mtime_ns) if which == "best" else []
    for candidate in [*reversed(best), directory / "last.ckpt"]:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no {which} checkpoint under {directory}")


def commands(sweep: Sweep, run: GridRun) -> list[list[str]]:
    """The run's command lines as a user would type them (for ``--dry-run`` and ``run.json``)."""
    ckpt = resume_checkpoint(run) if run_state(run) == "resume" else None
    cmds = [["python", "-m", "rmoe", *fit_args(sweep, run, ckpt)]]
    if sweep.after_fit == "test":
        pattern = "best-*.ckpt" if sweep.test_checkpoint == "best" else "last.ckpt"
        cmds.append(["python", "-m", "rmoe", *rmoe_test_args(run, run.fit_dir / "checkpoints" / pattern)])
    return cmds


def shell_join(argv: Sequence[str]) -> str:
    """A command line to paste into a shell: every argument quoted, except a ``*`` in a file name."""
    parts = []
    for arg in argv:
        head, sep, name = arg.rpartition("/")
        glob = "*" in name and not any(c in name for c in " '\"$`")
        parts.append(f"{shlex.quote(head)}{sep}{name}" if glob else shlex.quote(arg))
    return " ".join(parts)
