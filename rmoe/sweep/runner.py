"""Running a sweep: one child process per run (``python -m rmoe.sweep --exec-run <run>/run.json``, which runs
:func:`exec_run`), threads for ``--jobs``, signals, resume and markers; see :mod:`rmoe.sweep`."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import yaml

from rmoe.runs import FOLLOW_UP_PLAN, RESUME_CHECKPOINT, RUN_LOCK, SWEEP_COPY
from rmoe.sweep.plan import (
    causal_evaluation,
    checkpoint_to_test,
    commands,
    fit_args,
    resume_checkpoint,
    rmoe_test_args,
    shell_join,
)
from rmoe.sweep.spec import GridRun, Sweep, SweepError

STAGES = ("fit", "test", "causal-test")  # in order; a finished run's follow-up runs only the last
_ATTEMPT_HEADER = "===== "  # starts each attempt's part of stdout.log
CHILD_MODULE = "rmoe.sweep"  # what a run's child process runs with -m


@dataclass
class Outcome:
    """What happened to one run in this invocation."""

    run: GridRun
    status: str  # "done", "skipped", "busy" (another sweep process is running it), "failed"
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


def execute(sweep: Sweep, runs: Sequence[GridRun], jobs: int = 1, out: TextIO | None = None) -> Summary:
    """Run (or skip, or resume) every run of ``runs``, ``jobs`` at a time; never raises for a failed run.

    With ``jobs`` > 1 each child gets ``OMP_NUM_THREADS`` = cores / jobs unless the environment sets it.
    """
    out = out or sys.stdout
    lock = threading.Lock()
    width = len(str(len(runs)))

    def say(i: int, run: GridRun, text: str) -> None:
        with lock:
            print(f"[{i + 1:>{width}}/{len(runs)}] {run.name}: {text}", file=out, flush=True)

    sweep.root.mkdir(parents=True, exist_ok=True)
    write_sweep_copy(sweep)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))

    def one(i: int, run: GridRun) -> Outcome:
        return launch_one(sweep, run, env, lambda text: say(i, run, text))

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
        stop_children()
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return Summary([outcomes[i] for i in range(len(runs))])


def launch_one(
    sweep: Sweep,
    run: GridRun,
    env: Mapping[str, str],
    say: Callable[[str], None],
    announce: Callable[[Path | None], None] = lambda plan: None,
) -> Outcome:
    """Handle one run, as every launcher does: skip it when another process holds its lock or it is finished (a
    finished one may still get its causal test), else run (or resume) it in a child process. ``announce`` gets
    the plan the child runs, or None when there is none (the other ranks of a multi-process run follow it)."""
    with _run_lock(run) as locked:
        if not locked:
            announce(None)
            say(f"skipped: another sweep process is running it (it holds {run.dir / RUN_LOCK})")
            return Outcome(run, "busy")
        if run.marker.is_file():
            if _causal_test_due(sweep, run):  # finished before the sweep tested both ways
                return _launch(sweep, run, env, say, stages=("causal-test",), announce=announce)
            announce(None)
            note = _changed_note(sweep, run)
            say(f"skipped (finished: {run.marker}){note}")
            return Outcome(run, "skipped", message=note.removeprefix("; NOTE: "))
        return _launch(sweep, run, env, say, announce=announce)


@contextlib.contextmanager
def _run_lock(run: GridRun) -> Iterator[bool]:
    """Hold ``<run>/running.lock`` (``flock``, non-blocking; the OS drops it when its holder dies); yields
    False when another process holds it."""
    run.dir.mkdir(parents=True, exist_ok=True)
    with (run.dir / RUN_LOCK).open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_children: set[subprocess.Popen[bytes]] = set()
_children_lock = threading.Lock()
_terminated = threading.Event()


def stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """The sweep's SIGTERM handler: stop like Ctrl-C, but without waiting for the children to stop by
    themselves (the signal did not reach them)."""
    _terminated.set()
    raise KeyboardInterrupt


def stop_children(grace: float = 10.0, timeout: float = 120.0) -> None:
    """Wait ``grace`` seconds for the children to exit (a terminal's Ctrl-C reached them too; no wait after
    a SIGTERM to the sweep), then SIGTERM them (failed; resumed next time), wait ``timeout``, kill the rest."""
    if _terminated.is_set():
        grace = 0.0
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


def has_work(sweep: Sweep, run: GridRun) -> bool:
    """Whether a launcher has something to do for the run: it is not finished, or it still needs its causal test."""
    return not run.marker.is_file() or _causal_test_due(sweep, run)


def _causal_test_due(sweep: Sweep, run: GridRun) -> bool:
    """A finished, tested run whose router offers a causal evaluation and that has no ``test_causal/`` yet."""
    return sweep.after_fit == "test" and not run.causal_test_dir.exists() and causal_evaluation(run.fit_dir) is not None


def _launch(
    sweep: Sweep,
    run: GridRun,
    env: Mapping[str, str],
    say: Callable[[str], None],
    stages: Sequence[str] = STAGES,
    announce: Callable[[Path | None], None] = lambda plan: None,
) -> Outcome:
    """Run the stages in one child; ``("causal-test",)`` only adds the causal test to a finished run."""
    follow_up = "fit" not in stages
    ckpt = None if follow_up else resume_checkpoint(run)
    if not follow_up and ckpt is None and run.fit_dir.exists():  # a failed attempt without a checkpoint
        shutil.rmtree(run.fit_dir)
    # the tests this launch writes start clean (a failed follow-up must not leave a test_causal/ that looks done)
    for directory in [run.causal_test_dir] if follow_up else [run.test_dir, run.causal_test_dir]:
        if directory.exists():
            shutil.rmtree(directory)
    run.dir.mkdir(parents=True, exist_ok=True)
    plan = {
        "sweep": sweep.name,
        "name": run.name,
        "labels": run.labels,
        "stages": list(stages),
        "fit_args": fit_args(sweep, run, ckpt),
        "set": list(run.extra),
        "fit_dir": str(run.fit_dir),
        "after_fit": sweep.after_fit,
        "test_checkpoint": sweep.test_checkpoint,
        "commands": [shell_join(c) for c in commands(sweep, run)],
    }
    # a follow-up keeps the finished run's run.json (its record) and gets its own plan file
    plan_path = run.dir / FOLLOW_UP_PLAN if follow_up else run.plan
    plan_path.write_text(json.dumps(plan, indent=1) + "\n")
    announce(plan_path)
    if follow_up:
        say(f"finished; adding its test with causal evaluation (log: {run.log})")
    else:
        say(f"{'resuming from ' + str(ckpt) if ckpt else 'starting'} (log: {run.log})")
    started = time.monotonic()
    with run.log.open("a") as log:
        attempt = "causal test" if follow_up else ("resume" if ckpt else "new")
        log.write(f"\n{_ATTEMPT_HEADER}{_now()} sweep {sweep.name}: run {run.name} ({attempt})\n")
    returncode = run_child([sys.executable, "-m", CHILD_MODULE, "--exec-run", str(plan_path)], run.log, env)
    seconds = time.monotonic() - started
    if returncode != 0:
        message = _last_error(run.log, returncode)
        say(f"FAILED (exit {returncode}) after {_duration(seconds)}: {message} (log: {run.log})")
        return Outcome(run, "failed", seconds, returncode, message)
    if follow_up:
        plan_path.unlink(missing_ok=True)
        say(f"causal test done in {_duration(seconds)}")
        return Outcome(run, "done", seconds)
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


def _fingerprint(sweep: Sweep, run: GridRun) -> list[str]:
    return [*fit_args(sweep, run), f"after_fit={sweep.after_fit}", f"test_checkpoint={sweep.test_checkpoint}"]


def _changed_note(sweep: Sweep, run: GridRun) -> str:
    try:
        recorded = json.loads(run.marker.read_text()).get("fingerprint")
    except (OSError, ValueError):
        return ""
    if recorded is not None and recorded != _fingerprint(sweep, run):
        return f"; NOTE: it finished with other settings than these: delete {run.marker} to re-run it"
    return ""


def _spec(sweep: Sweep) -> dict[str, Any]:
    """What defines a sweep's runs (not its name or description)."""
    return {
        "configs": list(sweep.configs),
        "grid": {
            key: {label: [*v.configs, *v.overrides] for label, v in labels.items()}
            for key, labels in sweep.grid.items()
        },
        "overrides": list(sweep.overrides),
        "after_fit": sweep.after_fit,
    }


def spec_sha256(spec: dict[str, Any]) -> str:
    """The hash a sweep root records of the sweep that owns it (:func:`check_root`)."""
    keys = ("configs", "grid", "overrides", "after_fit")
    return hashlib.sha256(json.dumps({k: spec.get(k) for k in keys}, sort_keys=True).encode()).hexdigest()


def check_root(sweep: Sweep, reuse: bool = False) -> None:
    """A sweep root belongs to the sweep that first ran there (its ``sweep.yaml`` records the spec and hash).
    The same sweep may come back with more grid labels (the record becomes the union). Anything else (another
    name, configs, overrides or grid keys, or a label with other settings) is refused unless ``reuse``
    (``--reuse-root``): a run name would stand for other settings and the report would mislabel old runs."""
    copy = sweep.root / SWEEP_COPY
    if reuse or not copy.is_file():
        return
    recorded = yaml.safe_load(copy.read_text()) or {}
    mine = _spec(sweep)
    same_name = recorded.get("name") == sweep.name
    if same_name and (recorded.get("spec_sha256") or spec_sha256(recorded)) == spec_sha256(mine):
        return
    differing = [] if same_name else [f"name {recorded.get('name')!r}"]
    differing += [k for k in ("configs", "overrides", "after_fit") if recorded.get(k) != mine[k]]
    old_grid = recorded.get("grid") or {}
    if list(old_grid) != list(mine["grid"]):
        differing.append(f"grid keys {list(old_grid)} vs {list(mine['grid'])}")
    else:
        for key, labels in mine["grid"].items():
            differing += [f"grid {key}={label}" for label, settings in labels.items()
                          if label in old_grid[key] and old_grid[key][label] != settings]  # fmt: skip
    if differing:
        raise SweepError(
            f"--root {sweep.root} belongs to sweep {recorded.get('name')!r} ({copy}), whose runs are defined "
            f"otherwise than sweep {sweep.name!r}'s (differing: {'; '.join(differing)}). Use another --root, or "
            "--reuse-root to run this sweep there anyway (a run that finished with other settings is then reported "
            "as stale, not as this sweep's, and the sweep exits 1)."
        )


def write_sweep_copy(sweep: Sweep) -> None:
    """Write ``<root>/sweep.yaml``: the grid for the report, with the hash of the owning spec (:func:`check_root`)."""
    spec = _spec(sweep)
    copy = sweep.root / SWEEP_COPY
    recorded = (yaml.safe_load(copy.read_text()) or {}) if copy.is_file() else {}
    old_grid = recorded.get("grid") or {}
    if list(old_grid) == list(spec["grid"]):  # the same sweep with more labels: the record keeps every label
        spec["grid"] = {key: {**old_grid[key], **labels} for key, labels in spec["grid"].items()}
    doc = {"name": sweep.name, "description": sweep.description, **spec, "spec_sha256": spec_sha256(spec)}
    copy.write_text(yaml.safe_dump(doc, sort_keys=False))


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


def run_child(command: Sequence[str], log_path: Path, env: Mapping[str, str]) -> int:
    """Run a run's child with its output appended to ``log_path``; :func:`stop_children` can stop it."""
    with (
        log_path.open("a") as log,
        subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=dict(env)) as process,
    ):
        with _children_lock:
            _children.add(process)
        try:
            return process.wait()
        except KeyboardInterrupt:  # --jobs 1 waits in the main thread: stop the child while the run is locked
            stop_children()
            raise
        finally:
            with _children_lock:
                _children.discard(process)


def exec_run(plan_path: str | os.PathLike[str]) -> int:
    """Run one run's stages in the child process; returns the exit code.

    ``rmoe.cli.main`` for ``fit``, then (``after_fit: test``) ``test`` of the chosen checkpoint, and, when the
    router is not causal in evaluation but offers a causal evaluation (``eval_routing: topk``), ``test`` again
    with it into ``test_causal/`` (comparable with causal models). The plan's ``stages`` picks among ``fit``,
    ``test``, ``causal-test`` (default all). User errors exit 2 (``rmoe``'s code); a crash raises (exit 1).
    """
    plan = json.loads(Path(plan_path).read_text())
    # SIGTERM must end the run as failed, not let Lightning finish fit() early (it calls this after its own).
    signal.signal(signal.SIGTERM, _exit_on_signal)
    from rmoe.cli import main as rmoe_main

    stages = plan.get("stages", STAGES)
    if "fit" in stages:
        returncode = _stage(rmoe_main, plan["fit_args"])
        if returncode:
            return returncode
    if plan.get("after_fit") != "test":
        return 0
    fit_dir = Path(plan["fit_dir"])
    run = GridRun(plan["name"], plan["labels"], (), (), fit_dir.parent)
    try:
        ckpt = checkpoint_to_test(fit_dir, plan.get("test_checkpoint", "best"))
    except FileNotFoundError as err:
        print(f"rmoe: error: cannot test run {plan['name']}: {err}", flush=True)
        return 1
    if "test" in stages:
        returncode = _stage(rmoe_main, rmoe_test_args(run, ckpt))
        if returncode:
            return returncode
    options = causal_evaluation(fit_dir) if "causal-test" in stages else None
    return _stage(rmoe_main, rmoe_test_args(run, ckpt, options)) if options else 0


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
