"""The command line of ``rmoe sweep`` (also ``python -m rmoe.sweep``): :func:`build_parser`, :func:`main`."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from rmoe.errors import RmoeError, ToolArgumentParser
from rmoe.sweep.plan import commands, run_state, shell_join
from rmoe.sweep.runner import check_root, exec_run, execute, stop_on_sigterm
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
    parser.add_argument(
        "--reuse-root",
        action="store_true",
        help="run this sweep in a root another sweep owns (its finished runs with other settings are reported stale)",
    )
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
        if args.jobs < 1:
            raise SweepError(f"--jobs {args.jobs}: must be at least 1.")
        sweep = load_sweep(args.sweep)
        if args.root:
            sweep = dataclasses.replace(sweep, root=Path(args.root))
        runs = expand(sweep, parse_only(args.only, sweep), check_overrides(args.extra))
        check_root(sweep, reuse=args.reuse_root)
    except SweepError as err:
        print(f"rmoe: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    if not runs:
        print("rmoe sweep: nothing to run (--only matched no run).")
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
