"""The command line of ``rmoe sweep`` (also ``python -m rmoe.sweep``): :func:`build_parser`, :func:`main`."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rmoe.errors import RmoeError, ToolArgumentParser
from rmoe.sweep.cluster import (
    JOBS_FILE,
    LAUNCHERS,
    SUBMITIT_FOLDER,
    ClusterOptions,
    active_jobs,
    parse_sbatch,
    sbatch_script,
    submit,
)
from rmoe.sweep.plan import commands, run_state, shell_join
from rmoe.sweep.runner import check_root, exec_run, execute, has_work, stop_on_sigterm
from rmoe.sweep.spec import SweepError, check_overrides, expand, load_sweep, parse_only


def build_parser() -> argparse.ArgumentParser:
    parser = ToolArgumentParser(
        prog="rmoe sweep",
        description="Run every combination of a sweep file's grid as an `rmoe fit` (+ `rmoe test`) run; "
        "finished runs are skipped, interrupted ones resumed.",
    )
    parser.add_argument("sweep", nargs="?", help="the sweep file (YAML), e.g. configs/sweeps/table1_cpu.yaml")
    parser.add_argument("--dry-run", action="store_true", help="print each run's state and commands; run nothing")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="KEY=LABEL[,LABEL]",
        help="keep the runs with one of these labels for KEY (repeatable; keys combine with AND)",
    )
    parser.add_argument(
        "--jobs", type=int, metavar="N", help="runs at a time (default 1; with --launcher slurm: the array's, 256)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        dest="extra",
        metavar="KEY=VALUE",
        help="an override for every run, after the sweep's own (repeatable)",
    )
    parser.add_argument("--root", metavar="DIR", help="put the runs here instead of the sweep file's root")
    parser.add_argument(
        "--reuse-root",
        action="store_true",
        help="run this sweep in a root another sweep owns (its finished runs with other settings are reported stale)",
    )
    cluster = parser.add_argument_group("cluster (--launcher slurm: a SLURM job array through submitit)")
    cluster.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        default="local",
        help="local: child processes here (default); slurm: one array task per run; submitit-local: the slurm "
        "code path on this machine (submitit's local executor)",
    )
    cluster.add_argument("--partition", help="SLURM partition (required by --launcher slurm)")
    cluster.add_argument("--gpus-per-run", type=int, default=0, metavar="N", help="GPUs per run (default 0)")
    cluster.add_argument(
        "--processes-per-run",
        type=int,
        metavar="N",
        help="processes (SLURM tasks) per run, each finding its rank in Lightning's SLURM environment "
        "(default: one per GPU); the run's trainer.devices must match",
    )
    cluster.add_argument("--cpus-per-run", type=int, metavar="N", help="CPUs per run (default: the partition's)")
    cluster.add_argument("--time-limit", type=int, default=24 * 60, metavar="MIN", help="minutes per task (1 day)")
    cluster.add_argument(
        "--sbatch", action="append", default=[], metavar="KEY=VALUE", help="a further sbatch option (repeatable)"
    )
    cluster.add_argument("--wait", action="store_true", help="wait for the submitted runs and print the summary")
    parser.add_argument("--exec-run", metavar="RUN_JSON", help=argparse.SUPPRESS)  # the child process
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 a run failed, 2 bad sweep file or option)."""
    try:
        args = build_parser().parse_args(argv)
    except RmoeError as err:
        print(f"rmoe: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    if args.exec_run:
        return exec_run(args.exec_run)
    try:
        if not args.sweep:
            raise SweepError("no sweep file given (e.g. rmoe sweep configs/sweeps/table1_cpu.yaml).")
        if args.jobs is None:
            args.jobs = 1 if args.launcher == "local" else 256
        if args.jobs < 1:
            raise SweepError(f"--jobs {args.jobs}: must be at least 1.")
        sweep = load_sweep(args.sweep)
        if args.root:
            sweep = dataclasses.replace(sweep, root=Path(args.root))
        runs = expand(sweep, parse_only(args.only, sweep), check_overrides(args.extra))
        check_root(sweep, reuse=args.reuse_root)
        cluster = ClusterOptions(
            partition=args.partition,
            gpus_per_run=args.gpus_per_run,
            processes_per_run=args.processes_per_run,
            cpus_per_run=args.cpus_per_run,
            time_limit_min=args.time_limit,
            array_parallelism=args.jobs,
            sbatch=parse_sbatch(args.sbatch),
        )
        cluster.check(args.launcher)
    except SweepError as err:
        print(f"rmoe: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    if not runs:
        print("rmoe sweep: nothing to run (--only matched no run).")
        return 0

    print(f"sweep {sweep.name}: {len(runs)} run(s) under {sweep.root}  (tensorboard --logdir {sweep.root})")
    if args.launcher != "local":
        return _submit(sweep, runs, args, cluster)
    if args.dry_run:
        for i, run in enumerate(runs):
            state = run_state(run)
            print(f"\n# [{i + 1}/{len(runs)}] {run.name} ({state})")
            if state != "done":
                for command in commands(sweep, run):
                    print(shell_join(command))
        return 0

    signal.signal(signal.SIGTERM, stop_on_sigterm)  # stop like Ctrl-C: children too
    try:
        summary = execute(sweep, runs, jobs=args.jobs)
    except KeyboardInterrupt:
        print("\nrmoe sweep: interrupted; run the same command again to resume.", file=sys.stderr)
        return 130
    busy = f", {summary.count('busy')} left to the other sweep process running them" if summary.count("busy") else ""
    # in a root another sweep owned (--reuse-root), a run finished with other settings is another spec's: stale
    stale = [o for o in summary.outcomes if o.status == "skipped" and o.message] if args.reuse_root else []
    print(
        f"\nsweep {sweep.name}: {summary.count('done')} done, {summary.count('skipped')} skipped "
        f"(already finished), {len(summary.failed)} failed{busy}"
        + (f", {len(stale)} stale (finished with other settings than this sweep's: not its results)" if stale else "")
        + "."
    )
    for outcome in summary.failed:
        print(f"  FAILED {outcome.run.name}: exit {outcome.returncode}: {outcome.message}\n    log: {outcome.run.log}")
    for outcome in stale:
        print(f"  STALE {outcome.run.name}: {outcome.message}")
    # written next to the runs, never over a committed results folder
    only = "".join(f" --only {shlex.quote(o)}" for o in args.only)
    print(f"rmoe sweep: report with: rmoe report {shlex.quote(str(sweep.root))} --out {sweep.root / 'report'}{only}")
    return 1 if summary.failed or stale else 0


def _submit(sweep: Any, runs: Sequence[Any], args: argparse.Namespace, cluster: ClusterOptions) -> int:
    """``--launcher slurm`` / ``submitit-local``: submit the runs with work left as one job array."""
    todo = [run for run in runs if has_work(sweep, run)]
    active = active_jobs(sweep.root, args.launcher) if todo else {}
    for run in todo:
        if run.name in active:
            print(f"  {run.name}: still queued or running as job {active[run.name]}: not submitted again")
    todo = [run for run in todo if run.name not in active]
    print(
        f"rmoe sweep: {len(runs) - len(todo) - len(active)} finished run(s) skipped, {len(active)} in the queue; "
        f"{len(todo)} to submit ({args.launcher})."
    )
    if not todo:
        return 0
    if args.dry_run:
        if args.launcher == "slurm":
            folder = (sweep.root / SUBMITIT_FOLDER / "%j").resolve()
            print(sbatch_script(cluster, folder, sweep.name, len(todo), sys.executable))
        return 0
    try:
        jobs = submit(sweep, todo, args.launcher, cluster, args.sweep, args.root, args.extra)
    except Exception as err:  # sbatch refused (account, partition, limits) or no srun/sbatch here
        print(f"rmoe: error: --launcher {args.launcher}: submitting failed: {err}", file=sys.stderr)
        return 2
    print(f"submitted {len(jobs)} task(s): job {jobs[0].job_id.split('_')[0]} (recorded in {sweep.root / JOBS_FILE})")
    if not args.wait:
        print(f"rmoe sweep: run the same command again to submit what did not finish; report with: rmoe report "
              f"{shlex.quote(str(sweep.root))} --out {sweep.root / 'report'}")  # fmt: skip
        return 0
    statuses: dict[str, int] = {}
    for job, run in zip(jobs, todo, strict=True):
        try:
            status = str(job.results()[0])  # task 0's: it holds the run's record (the others follow it)
        except Exception as err:  # a failed task: the RuntimeError it raised says why, its run's log the rest
            status = "failed"
            lines = [line for line in str(err).splitlines() if line.startswith("RuntimeError:")]
            print(f"  FAILED {run.name}: {lines[-1].removeprefix('RuntimeError: ') if lines else err}")
            print(f"    log: {run.log}")
        else:
            print(f"  {run.name}: {status}")
        statuses[status] = statuses.get(status, 0) + 1
    counts = ", ".join(f"{n} {status}" for status, n in sorted(statuses.items()))
    print(f"\nsweep {sweep.name}: {counts}.")
    return 1 if statuses.get("failed") else 0
