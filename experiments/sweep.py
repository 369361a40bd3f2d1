"""Run one experiment over a grid of routers, seeds, sizes ...: every combination is a normal ``rmoe fit``.

A sweep file (YAML; examples under ``configs/paper/``) names the base configs, a grid and the
overrides every run gets::

    name: table1_cpu
    root: runs/sweeps/table1_cpu          # one TensorBoard root: all curves overlay
    configs: [configs/base.yaml, configs/paper/cpu_size.yaml, configs/data/shared_text.yaml]
    grid:                                  # cartesian product, in this order
      router: {linear: configs/router/linear.yaml, gru: configs/router/gru.yaml}
      seed: {s0: "seed_everything=0", s1: "seed_everything=1"}
    overrides: ["trainer.max_steps=600"]   # every run
    after_fit: test                        # then `rmoe test` on the best checkpoint

Keys: ``name`` (required), ``configs`` (required: config files, in order), ``grid`` (required:
``key -> {label -> value}``; a value is a config file, a ``key=value`` override or a list of
them), ``root`` (default ``runs/sweeps/<name>``), ``overrides``, ``after_fit`` (``test`` or
null), ``test_checkpoint`` (``best`` or ``last``), ``checkpoint_every_n_steps`` (default 100;
null: none), ``description``. Paths are relative to the directory the sweep runs from (the
repository root), as for ``rmoe`` itself.

Each run is named by its labels joined with ``-`` (``gru-s0``) and lives in ``<root>/<name>/``:

- ``version_0/``: the ``rmoe fit`` run (TensorBoard events, ``config.yaml``, ``checkpoints/``);
  the logger's ``save_dir``/``name``/``version`` are set so the path is deterministic;
- ``test/``: the ``rmoe test`` run of its best (or last) checkpoint when ``after_fit: test``;
- ``stdout.log``: everything the run printed (appended to on each attempt);
- ``run.json``: what the run is (its grid labels, its command lines);
- ``done.json``: the marker written once fit (and test) succeeded: such a run is skipped (and
  its ``checkpoints/resume.ckpt``, only there for resuming, is deleted).

A run without the marker but with a checkpoint (``checkpoints/last.ckpt``, written at each
validation, or ``checkpoints/resume.ckpt``, written every ``checkpoint_every_n_steps`` training
steps by a ModelCheckpoint the sweep appends to ``trainer.callbacks``) resumes from the newer of
them (``--ckpt_path``; Lightning restores the optimiser, scheduler, RNG and step, so the resumed run
continues the same curve). A run with neither starts afresh (what a failed attempt left of
``version_0/`` is removed first). Config files come first in each command line, in the order
``configs``, then the grid's files in grid order; all ``key=value`` overrides follow them (grid,
then ``overrides``, then ``--set``), so an override always wins over any file.

Each run is one child process (so a crash cannot take down the sweep): it runs
``rmoe.cli.main`` for ``fit`` and then, in the same interpreter (one import of torch and
Lightning, not two), for ``test``; ``--dry-run`` prints the equivalent ``python -m rmoe ...``
command lines. A failed run is reported (exit code, log, last error line) and the others go on;
the sweep ends with a summary and exits 1 if any run failed (2 for a bad sweep file or option).
A finished run whose command line has changed since (other settings, ``--set``) is still
skipped, with a note: delete its ``done.json`` to re-run it.

Ctrl-C (or SIGTERM to the sweep) starts nothing new and stops the running children (SIGTERM, which
ends a child's run as failed at once rather than letting Lightning return from ``fit`` early);
running the same command again resumes them. With ``--jobs N`` > 1 each child gets
``OMP_NUM_THREADS`` = cores / N unless the environment sets it: on a small, shared CPU machine
single-threaded runs side by side are much faster than one run on every core.

Usage::

    python experiments/sweep.py configs/paper/table1_cpu.yaml                 # run (or finish) all
    python experiments/sweep.py configs/paper/table1_cpu.yaml --dry-run       # print the commands
    python experiments/sweep.py configs/paper/table1_cpu.yaml --only router=gru,linear --only seed=s0
    python experiments/sweep.py configs/paper/table1_cpu.yaml --jobs 2 --set trainer.max_steps=50 --root /tmp/try
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import yaml

FIT_DIR = "version_0"
TEST_DIR = "test"
LOG_FILE = "stdout.log"
PLAN_FILE = "run.json"
MARKER_FILE = "done.json"
SWEEP_COPY = "sweep.yaml"
_ATTEMPT_HEADER = "===== "  # starts each attempt's part of stdout.log
RESUME_CHECKPOINT = "resume"  # checkpoints/resume.ckpt, written by the periodic ModelCheckpoint

_KEYS = (
    "name",
    "description",
    "root",
    "configs",
    "grid",
    "overrides",
    "after_fit",
    "test_checkpoint",
    "checkpoint_every_n_steps",
)
_AFTER_FIT = (None, "test")
_TEST_CHECKPOINTS = ("best", "last")
_NAME = re.compile(r"^[\w.]+$")  # sweep names and grid labels: no '-', which joins labels into run names
_GRID_KEY = re.compile(r"^[A-Za-z_]\w*$")
_OVERRIDE = re.compile(r"^(--)?[A-Za-z_][\w.]*\+?=")
_CONFIG_SUFFIXES = (".yaml", ".yml")


class SweepError(Exception):
    """A bad sweep file or option: one paragraph naming the key, reported without a traceback."""


_Fail = Callable[[str], SweepError]  # builds the error for a message about the sweep file


@dataclass(frozen=True)
class Value:
    """What one grid label adds to a run: config files and ``key=value`` overrides."""

    configs: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Sweep:
    """A parsed, checked sweep file.

    Attributes:
        name: The sweep's name.
        root: Directory holding one sub-directory per run (one TensorBoard root).
        configs: Config files every run starts from, in order.
        grid: ``key -> label -> Value``, in file order; runs are the cartesian product.
        overrides: ``key=value`` overrides every run gets (after the grid's).
        after_fit: ``"test"`` to run ``rmoe test`` after a successful fit, else None.
        test_checkpoint: Which checkpoint ``rmoe test`` evaluates: ``best`` (by ``val/loss``) or ``last``.
        checkpoint_every_n_steps: Interval of the appended resume checkpoint (None: not appended).
        description: Free text, shown by the report.
    """

    name: str
    root: Path
    configs: tuple[str, ...]
    grid: dict[str, dict[str, Value]]
    overrides: tuple[str, ...] = ()
    after_fit: str | None = None
    test_checkpoint: str = "best"
    checkpoint_every_n_steps: int | None = 100
    description: str = ""


@dataclass(frozen=True)
class Run:
    """One point of the grid.

    Attributes:
        name: Labels joined with ``-``, e.g. ``gru-s0``; the run's directory name under the root.
        labels: ``grid key -> label`` for this run.
        configs: Every config file of the run, in command-line order.
        overrides: Every ``key=value`` override of the run, in command-line order.
        dir: ``<root>/<name>``.
    """

    name: str
    labels: dict[str, str]
    configs: tuple[str, ...]
    overrides: tuple[str, ...]
    dir: Path

    @property
    def fit_dir(self) -> Path:
        return self.dir / FIT_DIR

    @property
    def test_dir(self) -> Path:
        return self.dir / TEST_DIR

    @property
    def log(self) -> Path:
        return self.dir / LOG_FILE

    @property
    def marker(self) -> Path:
        return self.dir / MARKER_FILE

    @property
    def plan(self) -> Path:
        return self.dir / PLAN_FILE


@dataclass
class Outcome:
    """What happened to one run in this invocation."""

    run: Run
    status: str  # "done", "skipped", "failed"
    seconds: float = 0.0
    returncode: int = 0
    message: str = ""


@dataclass
class Summary:
    """All outcomes of one invocation, in grid order."""

    outcomes: list[Outcome] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "failed"]


# ----------------------------------------------------------------------------------------------
# Parsing


def load_sweep(path: str | os.PathLike[str], base_dir: str | os.PathLike[str] | None = None) -> Sweep:
    """Read and check a sweep file.

    Args:
        path: The YAML sweep file.
        base_dir: Directory relative config paths are checked against (default: the current one,
            where the runs will be launched).

    Raises:
        SweepError: If the file is missing, not YAML, or any key is wrong (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {str(path)!r} does not exist.")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SweepError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    return parse_sweep(doc, source=str(path), base_dir=base_dir)


def parse_sweep(doc: Any, source: str = "<sweep>", base_dir: str | os.PathLike[str] | None = None) -> Sweep:
    """Check a sweep document (the YAML's mapping) and build a :class:`Sweep`; see :func:`load_sweep`."""
    base = Path(base_dir) if base_dir is not None else Path.cwd()

    def fail(message: str) -> SweepError:
        return SweepError(f"{source}: {message}")

    if not isinstance(doc, Mapping):
        raise fail(f"expected a mapping with the keys {', '.join(_KEYS)}; got {type(doc).__name__}.")
    for key in doc:
        if key not in _KEYS:
            close = difflib.get_close_matches(str(key), _KEYS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise fail(f"unknown key {key!r}.{hint} Valid keys: {', '.join(_KEYS)}.")
    for key in ("name", "configs", "grid"):
        if doc.get(key) in (None, "", [], {}):
            raise fail(f"{key!r} is required and must not be empty.")

    name = doc["name"]
    if not isinstance(name, str) or not _NAME.match(name):
        raise fail(f"'name' must be letters, digits, '_' or '.'; got {name!r}.")
    root = doc.get("root") or f"runs/sweeps/{name}"
    if not isinstance(root, str):
        raise fail(f"'root' must be a directory path; got {root!r}.")

    configs = _strings(doc["configs"], "configs", fail)
    for i, config in enumerate(configs):
        _check_config(config, f"configs[{i}]", base, fail)

    grid_doc = doc["grid"]
    if not isinstance(grid_doc, Mapping):
        raise fail(
            "'grid' must map a key to {label: value}, e.g. {router: {gru: configs/router/gru.yaml}}; "
            f"got {grid_doc!r}."
        )
    grid: dict[str, dict[str, Value]] = {}
    for key, labels in grid_doc.items():
        where = f"grid.{key}"
        if not isinstance(key, str) or not _GRID_KEY.match(key):
            raise fail(f"grid key {key!r} must be an identifier (letters, digits, '_').")
        if not isinstance(labels, Mapping) or not labels:
            raise fail(
                f"{where!r} must map each label to a config file or a key=value override (or a list of them), "
                f"e.g. {{s0: 'seed_everything=0'}}; got {labels!r}."
            )
        grid[key] = {}
        for label, value in labels.items():
            label = str(label)
            if not _NAME.match(label):
                raise fail(f"label {label!r} of {where!r} must be letters, digits, '_' or '.' ('-' joins labels).")
            grid[key][label] = _value(value, f"{where}.{label}", base, fail)

    overrides = _strings(doc.get("overrides") or [], "overrides", fail)
    for i, override in enumerate(overrides):
        if not _OVERRIDE.match(override):
            raise fail(f"overrides[{i}]={override!r} is not a key=value override.")

    after_fit = doc.get("after_fit")
    if after_fit not in _AFTER_FIT:
        raise fail(f"'after_fit' must be 'test' or null; got {after_fit!r}.")
    test_checkpoint = doc.get("test_checkpoint", "best")
    if test_checkpoint not in _TEST_CHECKPOINTS:
        raise fail(f"'test_checkpoint' must be one of {', '.join(_TEST_CHECKPOINTS)}; got {test_checkpoint!r}.")
    every = doc.get("checkpoint_every_n_steps", 100)
    if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every < 1):
        raise fail(f"'checkpoint_every_n_steps' must be a positive integer or null; got {every!r}.")
    description = doc.get("description") or ""
    if not isinstance(description, str):
        raise fail("'description' must be text.")
    return Sweep(
        name=name,
        root=Path(root),
        configs=tuple(configs),
        grid=grid,
        overrides=tuple(overrides),
        after_fit=after_fit,
        test_checkpoint=test_checkpoint,
        checkpoint_every_n_steps=every,
        description=description.strip(),
    )


def _strings(value: Any, where: str, fail: _Fail) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise fail(f"{where!r} must be a list of non-empty strings; got {value!r}.")
    return [v.strip() for v in value]


def _check_config(path: str, where: str, base: Path, fail: _Fail) -> None:
    if not path.endswith(_CONFIG_SUFFIXES):
        raise fail(f"{where}={path!r} must be a config file (*.yaml).")
    if not (base / path).is_file():
        raise fail(
            f"{where}: config file {path!r} does not exist (relative paths are resolved from {str(base)!r}, "
            "the directory the sweep runs from: run it from the repository root)."
        )


def _value(value: Any, where: str, base: Path, fail: _Fail) -> Value:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) and v.strip() for v in items):
        raise fail(f"{where} must be a config file, a key=value override or a list of them (strings); got {value!r}.")
    configs, overrides = [], []
    for item in (v.strip() for v in items):
        if _OVERRIDE.match(item):
            overrides.append(item)
        elif item.endswith(_CONFIG_SUFFIXES):
            _check_config(item, where, base, fail)
            configs.append(item)
        else:
            raise fail(f"{where}={item!r} is neither a config file (*.yaml) nor a key=value override.")
    return Value(tuple(configs), tuple(overrides))


# ----------------------------------------------------------------------------------------------
# Expansion and commands


def parse_only(items: Iterable[str], sweep: Sweep) -> dict[str, set[str]]:
    """``["router=gru,linear", "seed=s0"]`` -> ``{"router": {"gru", "linear"}, "seed": {"s0"}}``, checked."""
    only: dict[str, set[str]] = {}
    for item in items:
        key, sep, labels = item.partition("=")
        if not sep or key not in sweep.grid:
            raise SweepError(f"--only {item!r}: expected KEY=LABEL[,LABEL...] with KEY one of {', '.join(sweep.grid)}.")
        wanted = {label.strip() for label in labels.split(",") if label.strip()}
        unknown = sorted(wanted - set(sweep.grid[key]))
        if unknown or not wanted:
            raise SweepError(
                f"--only {item!r}: unknown label(s) {', '.join(unknown) or '(none given)'} of {key!r}; "
                f"valid: {', '.join(sweep.grid[key])}."
            )
        only.setdefault(key, set()).update(wanted)
    return only


def check_overrides(items: Iterable[str], option: str = "--set") -> tuple[str, ...]:
    """Check ``key=value`` strings (as given to ``--set``)."""
    items = tuple(items)
    for item in items:
        if not _OVERRIDE.match(item):
            raise SweepError(f"{option} {item!r}: expected key=value (an rmoe dot-list override).")
    return items


def expand(sweep: Sweep, only: Mapping[str, set[str]] | None = None, extra: Sequence[str] = ()) -> list[Run]:
    """The sweep's runs, in grid order (the last grid key varies fastest).

    Args:
        sweep: The sweep.
        only: Keep runs whose label for each given key is in the set.
        extra: ``key=value`` overrides appended to every run (``--set``).
    """
    only = only or {}
    keys = list(sweep.grid)
    runs = []
    for labels in itertools.product(*(sweep.grid[k] for k in keys)):
        chosen = dict(zip(keys, labels))
        if any(chosen[k] not in allowed for k, allowed in only.items()):
            continue
        values = [sweep.grid[k][chosen[k]] for k in keys]
        name = "-".join(labels)
        runs.append(
            Run(
                name=name,
                labels=chosen,
                configs=(*sweep.configs, *(c for v in values for c in v.configs)),
                overrides=(*(o for v in values for o in v.overrides), *sweep.overrides, *extra),
                dir=sweep.root / name,
            )
        )
    return runs


def resume_checkpoint(run: Run) -> Path | None:
    """The newer of ``checkpoints/last.ckpt`` and ``checkpoints/resume.ckpt`` of the run's fit, if any."""
    directory = run.fit_dir / "checkpoints"
    candidates = [p for p in (directory / "last.ckpt", directory / f"{RESUME_CHECKPOINT}.ckpt") if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns) if candidates else None


def run_state(run: Run) -> str:
    """``done`` (marker present), ``resume`` (a checkpoint, no marker) or ``new``."""
    if run.marker.is_file():
        return "done"
    return "resume" if resume_checkpoint(run) is not None else "new"


def fit_args(sweep: Sweep, run: Run, ckpt_path: Path | str | None = None) -> list[str]:
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
        args.append(f"--ckpt_path={ckpt_path}")
    return args


def rmoe_test_args(run: Run, ckpt_path: Path | str) -> list[str]:
    """The ``rmoe`` arguments that test a checkpoint of the run with its saved config, into ``<run>/test/``."""
    return [
        "test",
        "--config",
        str(run.fit_dir / "config.yaml"),
        f"--ckpt_path={ckpt_path}",
        f"trainer.logger.init_args.version={TEST_DIR}",
    ]


def checkpoint_to_test(fit_dir: Path, which: str) -> Path:
    """The checkpoint to test: the newest ``best-*.ckpt`` (``which="best"``), else ``last.ckpt``.

    Raises:
        FileNotFoundError: If the run has no such checkpoint.
    """
    directory = fit_dir / "checkpoints"
    best = sorted(directory.glob("best-*.ckpt"), key=lambda p: p.stat().st_mtime_ns) if which == "best" else []
    for candidate in [*reversed(best), directory / "last.ckpt"]:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no {which} checkpoint under {directory}")


def commands(sweep: Sweep, run: Run) -> list[list[str]]:
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


# ----------------------------------------------------------------------------------------------
# Execution


def execute(sweep: Sweep, runs: Sequence[Run], jobs: int = 1, out: TextIO | None = None) -> Summary:
    """Run (or skip, or resume) every run; never raises for a failed run.

    Args:
        sweep: The sweep.
        runs: The runs to consider (from :func:`expand`).
        jobs: Runs at a time. With more than one, each child gets ``OMP_NUM_THREADS`` = cores / jobs
            unless the environment sets it.
        out: Where progress lines go (default ``sys.stdout``).
    """
    out = out or sys.stdout
    lock = threading.Lock()
    width = len(str(len(runs)))

    def say(i: int, run: Run, text: str) -> None:
        with lock:
            print(f"[{i + 1:>{width}}/{len(runs)}] {run.name}: {text}", file=out, flush=True)

    sweep.root.mkdir(parents=True, exist_ok=True)
    _write_sweep_copy(sweep)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))

    def one(i: int, run: Run) -> Outcome:
        if run.marker.is_file():
            note = _changed_note(sweep, run)
            say(i, run, f"skipped (finished: {run.marker}){note}")
            return Outcome(run, "skipped")
        return _launch(sweep, run, env, lambda text: say(i, run, text))

    outcomes: dict[int, Outcome] = {}
    pool = ThreadPoolExecutor(max_workers=jobs) if jobs > 1 else None
    try:
        if pool is None:
            for i, run in enumerate(runs):
                outcomes[i] = one(i, run)
        else:
            futures = {pool.submit(one, i, run): i for i, run in enumerate(runs)}
            for future in as_completed(futures):
                outcomes[futures[future]] = future.result()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: start nothing new, stop the running children
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        _stop_children()
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return Summary([outcomes[i] for i in range(len(runs))])


_children: set[subprocess.Popen[bytes]] = set()
_children_lock = threading.Lock()


def _stop_children(grace: float = 10.0, timeout: float = 120.0) -> None:
    """Stop the running children: wait ``grace`` seconds for them to exit by themselves (a terminal's
    Ctrl-C reached them too), then SIGTERM them (they stop at once, as failed: the run resumes from
    its last checkpoint next time) and wait ``timeout`` seconds, then kill what is left."""
    with _children_lock:
        running = [p for p in _children if p.poll() is None]
    for sig, wait in ((None, grace), (signal.SIGTERM, timeout), (signal.SIGKILL, None)):
        for process in running:
            if sig is not None and process.poll() is None:
                process.send_signal(sig)
        deadline = time.monotonic() + (wait or 0.0)
        for process in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=None if wait is None else max(0.0, deadline - time.monotonic()))
        running = [p for p in running if p.poll() is None]
        if not running:
            return


def _launch(sweep: Sweep, run: Run, env: Mapping[str, str], say: Callable[[str], None]) -> Outcome:
    ckpt = resume_checkpoint(run)
    if ckpt is None and run.fit_dir.exists():  # a failed attempt without a checkpoint: start clean
        shutil.rmtree(run.fit_dir)
    if run.test_dir.exists():
        shutil.rmtree(run.test_dir)
    run.dir.mkdir(parents=True, exist_ok=True)
    plan = {
        "sweep": sweep.name,
        "name": run.name,
        "labels": run.labels,
        "fit_args": fit_args(sweep, run, ckpt),
        "fit_dir": str(run.fit_dir),
        "after_fit": sweep.after_fit,
        "test_checkpoint": sweep.test_checkpoint,
        "commands": [shell_join(c) for c in commands(sweep, run)],
    }
    run.plan.write_text(json.dumps(plan, indent=1) + "\n")
    say(f"{'resuming from ' + str(ckpt) if ckpt else 'starting'} (log: {run.log})")
    started = time.monotonic()
    with run.log.open("a") as log:
        log.write(f"\n{_ATTEMPT_HEADER}{_now()} sweep {sweep.name}: run {run.name} ({'resume' if ckpt else 'new'})\n")
        log.flush()
        child = [sys.executable, str(Path(__file__).resolve()), "--exec-run", str(run.plan)]
        with subprocess.Popen(child, stdout=log, stderr=subprocess.STDOUT, env=dict(env)) as process:
            with _children_lock:
                _children.add(process)
            try:
                returncode = process.wait()
            finally:
                with _children_lock:
                    _children.discard(process)
    seconds = time.monotonic() - started
    if returncode != 0:
        message = _last_error(run.log, returncode)
        say(f"FAILED (exit {returncode}) after {_duration(seconds)}: {message} (log: {run.log})")
        return Outcome(run, "failed", seconds, returncode, message)
    marker = {
        "name": run.name,
        "labels": run.labels,
        "fingerprint": _fingerprint(sweep, run),
        "finished": _now(),
        "seconds": round(seconds, 1),
        "resumed_from": str(ckpt) if ckpt else None,
    }
    run.marker.write_text(json.dumps(marker, indent=1) + "\n")
    # only there to resume an interrupted fit; last.ckpt and best-*.ckpt stay
    (run.fit_dir / "checkpoints" / f"{RESUME_CHECKPOINT}.ckpt").unlink(missing_ok=True)
    say(f"done in {_duration(seconds)}")
    return Outcome(run, "done", seconds)


def _fingerprint(sweep: Sweep, run: Run) -> list[str]:
    return [*fit_args(sweep, run), f"after_fit={sweep.after_fit}", f"test_checkpoint={sweep.test_checkpoint}"]


def _changed_note(sweep: Sweep, run: Run) -> str:
    try:
        recorded = json.loads(run.marker.read_text()).get("fingerprint")
    except (OSError, ValueError):
        return ""
    if recorded is not None and recorded != _fingerprint(sweep, run):
        return f"; NOTE: it finished with other settings than these: delete {run.marker} to re-run it"
    return ""


def _write_sweep_copy(sweep: Sweep) -> None:
    """``<root>/sweep.yaml``: the grid (keys and labels in order) for the report and for the record."""
    doc = {
        "name": sweep.name,
        "description": sweep.description,
        "configs": list(sweep.configs),
        "grid": {
            key: {label: [*v.configs, *v.overrides] for label, v in labels.items()}
            for key, labels in sweep.grid.items()
        },
        "overrides": list(sweep.overrides),
        "after_fit": sweep.after_fit,
    }
    (sweep.root / SWEEP_COPY).write_text(yaml.safe_dump(doc, sort_keys=False))


def _last_error(log: Path, returncode: int) -> str:
    """The most telling line of this attempt's log: ``rmoe: error: ...``, else its last line."""
    if returncode < 0:
        return f"killed by signal {-returncode}"
    try:
        with log.open("rb") as f:
            f.seek(max(0, log.stat().st_size - 65536))
            text = f.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    attempt = text.rpartition(_ATTEMPT_HEADER)[2]  # earlier attempts' errors do not count
    lines = [line.strip() for line in attempt.splitlines()[1:] if line.strip()]
    errors = [line for line in lines if line.startswith(("rmoe: error:", "sweep: error:"))]
    if errors:
        return errors[-1][:400]
    if returncode > 128:
        return f"stopped by signal {returncode - 128}"
    return (lines or ["(empty log)"])[-1][:400]


def _now() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


# ----------------------------------------------------------------------------------------------
# The child process: fit, then test, in one interpreter


def exec_run(plan_path: str | os.PathLike[str]) -> int:
    """Run one run's stages (what the child process does); returns the exit code.

    ``rmoe.cli.main`` for ``fit`` with the plan's arguments, then, if ``after_fit`` is ``test``,
    for ``test`` on the chosen checkpoint with the fit's saved config. Each stage's command line
    is printed first. User errors exit 2 (``rmoe``'s own code); a crash raises (exit 1).
    """
    plan = json.loads(Path(plan_path).read_text())
    # SIGTERM (the sweep stopping, a job scheduler) must end the run as failed, not let Lightning
    # finish fit() early as if done: Lightning calls this handler after its own.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    from rmoe.cli import main as rmoe_main

    returncode = _stage(rmoe_main, plan["fit_args"])
    if returncode or plan.get("after_fit") != "test":
        return returncode
    fit_dir = Path(plan["fit_dir"])
    run = Run(plan["name"], plan["labels"], (), (), fit_dir.parent)
    try:
        ckpt = checkpoint_to_test(fit_dir, plan.get("test_checkpoint", "best"))
    except FileNotFoundError as err:
        print(f"sweep: error: cannot test run {plan['name']}: {err}", flush=True)
        return 1
    return _stage(rmoe_main, rmoe_test_args(run, ckpt))


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _stage(rmoe_main: Callable[[list[str]], None], args: list[str]) -> int:
    print(f"$ {shlex.join(['python', '-m', 'rmoe', *args])}", flush=True)
    try:
        rmoe_main(args)
    except SystemExit as exit_:
        code = exit_.code
        if code not in (None, 0):
            return code if isinstance(code, int) else 1
    sys.stdout.flush()
    return 0


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python experiments/sweep.py",
        description="Run every combination of a sweep file's grid as an `rmoe fit` (+ `rmoe test`) run; "
        "finished runs are skipped, interrupted ones resumed.",
    )
    parser.add_argument("sweep", nargs="?", help="the sweep file (YAML), e.g. configs/paper/table1_cpu.yaml")
    parser.add_argument("--dry-run", action="store_true", help="print each run's state and commands; run nothing")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="KEY=LABEL[,LABEL]",
        help="keep the runs with one of these labels for KEY (repeatable; keys combine with AND)",
    )
    parser.add_argument("--jobs", type=int, default=1, metavar="N", help="runs at a time (default 1)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        dest="extra",
        metavar="KEY=VALUE",
        help="an override for every run, after the sweep's own (repeatable)",
    )
    parser.add_argument("--root", metavar="DIR", help="put the runs here instead of the sweep file's root")
    parser.add_argument("--exec-run", metavar="RUN_JSON", help=argparse.SUPPRESS)  # the child process
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 a run failed, 2 bad sweep file or option)."""
    args = build_parser().parse_args(argv)
    if args.exec_run:
        return exec_run(args.exec_run)
    try:
        if not args.sweep:
            raise SweepError("no sweep file given (e.g. python experiments/sweep.py configs/paper/table1_cpu.yaml).")
        if args.jobs < 1:
            raise SweepError(f"--jobs {args.jobs}: must be at least 1.")
        sweep = load_sweep(args.sweep)
        if args.root:
            sweep = dataclasses.replace(sweep, root=Path(args.root))
        runs = expand(sweep, parse_only(args.only, sweep), check_overrides(args.extra))
    except SweepError as err:
        print(f"sweep: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    if not runs:
        print("sweep: nothing to run (--only matched no run).")
        return 0

    print(f"sweep {sweep.name}: {len(runs)} run(s) under {sweep.root}  (tensorboard --logdir {sweep.root})")
    if args.dry_run:
        for i, run in enumerate(runs):
            state = run_state(run)
            print(f"\n# [{i + 1}/{len(runs)}] {run.name} ({state})")
            if state != "done":
                for command in commands(sweep, run):
                    print(shell_join(command))
        return 0

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop like Ctrl-C: children too
    try:
        summary = execute(sweep, runs, jobs=args.jobs)
    except KeyboardInterrupt:
        print("\nsweep: interrupted; run the same command again to resume.", file=sys.stderr)
        return 130
    print(
        f"\nsweep {sweep.name}: {summary.count('done')} done, {summary.count('skipped')} skipped "
        f"(already finished), {len(summary.failed)} failed."
    )
    for outcome in summary.failed:
        print(f"  FAILED {outcome.run.name}: exit {outcome.returncode}: {outcome.message}\n    log: {outcome.run.log}")
    print(f"report: python experiments/report.py {sweep.root} --out docs/results/{sweep.name}")
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
