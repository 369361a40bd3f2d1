"""``rmoe sweep``: one experiment over a grid of routers, seeds, sizes ...: every combination is an ``rmoe fit``.

A sweep file (YAML; examples under ``configs/sweeps/``)::

    name: table1_cpu
    root: runs/sweeps/table1_cpu          # one TensorBoard root: all curves overlay
    configs: [configs/base.yaml, configs/size/cpu.yaml, configs/data/shared_text.yaml]
    grid:                                  # cartesian product, in this order
      router: {linear: configs/router/linear.yaml, gru: configs/router/gru.yaml}
      seed: {s0: "seed_everything=0", s1: "seed_everything=1"}
    overrides: ["trainer.max_steps=600"]   # every run
    after_fit: test                        # then `rmoe test` on the best checkpoint

Keys: ``name`` (required), ``configs`` (required, in order), ``grid`` (required: ``key -> {label -> value}``;
a value is a config file, a ``key=value`` override or a list of them), ``root`` (default ``runs/sweeps/<name>``),
``overrides``, ``after_fit`` (``test`` or null), ``test_checkpoint`` (``best`` or ``last``),
``checkpoint_every_n_steps`` (default 100; null: none), ``description``. Paths are relative to the directory the
sweep runs from (the repository root).

Each run is named by its labels joined with ``-`` (``gru-s0``) and lives in ``<root>/<name>/``:

- ``version_0/``: the ``rmoe fit`` run (TensorBoard events, ``config.yaml``, ``checkpoints/``), at a
  deterministic path (the logger's ``save_dir``/``name``/``version`` are set);
- ``test/``: the ``rmoe test`` run of its best (or last) checkpoint when ``after_fit: test``;
- ``stdout.log``: everything the run printed (appended to on each attempt);
- ``run.json``: what the run is (its grid labels, its command lines);
- ``done.json``: written once fit (and test) succeeded; such a run is skipped (and its
  ``checkpoints/resume.ckpt`` deleted).

A run without the marker resumes (``--ckpt``) from the newer of ``checkpoints/last.ckpt`` (written at each
validation) and ``checkpoints/resume.ckpt`` (every ``checkpoint_every_n_steps`` steps, by a ModelCheckpoint the
sweep appends to ``trainer.callbacks``); with neither, it starts afresh (a failed attempt's ``version_0/`` is
removed first). Command lines list the config files first (``configs``, then the grid's in grid order), then every
``key=value`` override (grid, ``overrides``, ``--set``), so an override always wins over any file.

Each run is one child process (a crash cannot take down the sweep) running ``rmoe.cli.main`` for ``fit`` and
then, in the same interpreter, ``test``; ``--dry-run`` prints the equivalent ``python -m rmoe ...`` lines. A
failed run is reported and the others go on; the sweep exits 1 if any run failed (2 for a bad sweep file or
option). A finished run whose command line has changed is still skipped, with a note (delete its ``done.json``
to re-run it). A run whose router is not causal in evaluation but offers a causal evaluation is tested again
with it (``test_causal/``). A sweep process holds ``<run>/running.lock`` (``flock``) while it handles a run, so
another invocation on the same root skips it.

Ctrl-C (or SIGTERM) starts nothing new and SIGTERMs the running children (their run ends as failed rather than
Lightning returning from ``fit`` early); the same command resumes them. With ``--jobs N`` > 1 each child gets
``OMP_NUM_THREADS`` = cores / N unless set: on a small CPU machine single-threaded runs side by side are faster.

Modules: :mod:`rmoe.sweep.spec` (the sweep file, the grid, ``--only``, ``--set``), :mod:`rmoe.sweep.plan` (a
run's state on disk and command lines), :mod:`rmoe.sweep.runner` (child processes, signals, markers,
``--exec-run``), :mod:`rmoe.sweep.sweep_cli` (the command line); run folder file names are :mod:`rmoe.runs`'s.

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
