"""``rmoe sweep``: one experiment over a grid of routers, seeds, sizes ...: every combination is an ``rmoe fit``.

A sweep file (YAML; examples under ``configs/sweeps/``) names the base configs, a grid and the
overrides every run gets::

    name: table1_cpu
    root: runs/sweeps/table1_cpu          # one TensorBoard root: all curves overlay
    configs: [configs/base.yaml, configs/size/cpu.yaml, configs/data/shared_text.yaml]
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
them (``--ckpt``; Lightning restores the optimiser, scheduler, RNG and step, so the resumed run
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
skipped, with a note: delete its ``done.json`` to re-run it. A run whose router is not causal in
evaluation but offers a causal evaluation is tested a second time with it (``test_causal/``); a
finished run without that test gets only it on the next invocation. While a sweep process handles
a run it holds ``<run>/running.lock`` (``flock``): another invocation on the same root skips it.

Ctrl-C (or SIGTERM to the sweep) starts nothing new and stops the running children (SIGTERM, which
ends a child's run as failed at once rather than letting Lightning return from ``fit`` early);
running the same command again resumes them. With ``--jobs N`` > 1 each child gets
``OMP_NUM_THREADS`` = cores / N unless the environment sets it: on a small, shared CPU machine
single-threaded runs side by side are much faster than one run on every core.

The package: :mod:`rmoe.sweep.spec` (the sweep file: parsing, checking, expanding the grid,
``--only`` and ``--set``), :mod:`rmoe.sweep.plan` (a run's state on disk and its command lines),
:mod:`rmoe.sweep.runner` (child processes, threads, signals, markers, the child's ``--exec-run``)
and :mod:`rmoe.sweep.sweep_cli` (the command line). The run folder's file names are
:mod:`rmoe.runs`'s.

Usage::

    rmoe sweep configs/sweeps/table1_cpu.yaml                 # run (or finish) all
    rmoe sweep configs/sweeps/table1_cpu.yaml --dry-run       # print the commands
    rmoe sweep configs/sweeps/table1_cpu.yaml --only router=gru,linear --only seed=s0
    rmoe sweep configs/sweeps/table1_cpu.yaml --jobs 2 --set trainer.max_steps=50 --root /tmp/try
"""

from rmoe.sweep.plan import (
    checkpoint_to_test,
    commands,
    fit_args,
    resume_checkpoint,
    rmoe_test_args,
    run_state,
    shell_join,
)
from rmoe.sweep.runner import Outcome, Summary, exec_run, execute
from rmoe.sweep.spec import (
    GridRun,
    Sweep,
    SweepError,
    Value,
    check_overrides,
    expand,
    load_sweep,
    parse_only,
    parse_sweep,
)
from rmoe.sweep.sweep_cli import build_parser, main

__all__ = [
    "GridRun",
    "Outcome",
    "Summary",
    "Sweep",
    "SweepError",
    "Value",
    "build_parser",
    "check_overrides",
    "checkpoint_to_test",
    "commands",
    "exec_run",
    "execute",
    "expand",
    "fit_args",
    "load_sweep",
    "main",
    "parse_only",
    "parse_sweep",
    "resume_checkpoint",
    "rmoe_test_args",
    "run_state",
    "shell_join",
]
