"""``rmoe sweep --launcher slurm``: the grid as a SLURM job array, through submitit (the optional extra ``slurm``).

Each run that is not finished becomes one array task. The task does what the local launcher does for one run
(:func:`rmoe.sweep.runner.launch_one`: hold the run's lock, resume from its newest checkpoint, run ``rmoe fit``
and ``rmoe test`` in a child process, write ``done.json``), so a SLURM sweep writes the same run folders,
``run.json`` and report inputs, and the two launchers can take turns on one root. On preemption or at the time
limit SLURM signals the task ahead of time; submitit calls :meth:`SweepTask.checkpoint`, which stops the child
(its run keeps its last checkpoint, written every ``checkpoint_every_n_steps``) and requeues the same task, which
resumes the run. Running ``rmoe sweep ... --launcher slurm`` again submits only what is not finished.

``--launcher submitit-local`` is the same code path through submitit's local executor (processes on this
machine, with requeueing): how the tests run it without a cluster.

A run over several processes (``--processes-per-run N``, by default one per GPU of ``--gpus-per-run``) is one array
task of N SLURM tasks (``--ntasks-per-node N``): task 0 does what the local launcher does (lock, resume, plan,
``done.json``), tasks 1..N-1 wait for its plan and run the same stages, and each ``rmoe fit`` finds its rank in
Lightning's SLURM environment (``SLURM_PROCID`` ...), as under ``srun``. Under ``submitit-local`` the ranks get
Lightning's own variables (``LOCAL_RANK``, ``MASTER_PORT`` ...) instead, as torchrun gives them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rmoe.sweep.spec import GridRun, Sweep, SweepError, expand, load_sweep

LAUNCHERS = ("local", "slurm", "submitit-local")
SUBMITIT_FOLDER = ".submitit"
"""Under the sweep root: submitit's job scripts, pickles and logs (``%j`` is the job id)."""
MAX_REQUEUES = 1000
"""Times a task may be requeued at its time limit (submitit's default is 3); preemptions do not count."""
ACTIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "REQUEUE_HOLD")
"""SLURM states of a job that will still run: its run is not submitted again."""
RANKS_FILE = "ranks.json"
"""Under a run of several processes: ``{"attempt": <job id>.<restart>, "plan": <run.json or null>}``, written by
task 0 for the others of its attempt."""
JOBS_FILE = "slurm_jobs.txt"
"""Under the sweep root: one line per submitted run, ``<job id> <run name>``, appended at each submission."""


@dataclass(frozen=True)
class ClusterOptions:
    """What a SLURM array task asks for (``rmoe sweep --partition ... --gpus-per-run ...``).

    Attributes:
        partition: ``sbatch --partition`` (required by ``--launcher slurm``).
        gpus_per_run: GPUs of each run (``--gpus-per-node``); 0 for a CPU run.
        processes_per_run: Processes of each run, one SLURM task each (``--ntasks-per-node``); None: one per GPU
            (at least 1). The run's config must ask Lightning for as many (``trainer.devices``).
        cpus_per_run: ``--cpus-per-task`` (None: the partition's default).
        time_limit_min: ``--time`` in minutes; the task is signalled ahead of it and requeued.
        array_parallelism: Tasks of the array running at once (``--array=...%N``).
        sbatch: Further ``sbatch`` options, ``{"account": "lab", "qos": "high"}``.
        signal_delay_s: How long before the time limit the task is signalled to stop and requeue (``--signal``):
            enough for the run to stop and the task to requeue itself.
    """

    partition: str | None = None
    gpus_per_run: int = 0
    processes_per_run: int | None = None
    cpus_per_run: int | None = None
    time_limit_min: int = 24 * 60
    array_parallelism: int = 256
    sbatch: Mapping[str, str] = field(default_factory=dict)
    signal_delay_s: int = 90

    def check(self, launcher: str) -> None:
        """Refuse what cannot run, naming the option, before anything is submitted."""
        if launcher not in LAUNCHERS:
            raise SweepError(f"--launcher {launcher}: expected one of {', '.join(LAUNCHERS)}.")
        if launcher == "local":
            return
        if importlib.util.find_spec("submitit") is None:
            raise SweepError(
                f"--launcher {launcher} submits through submitit, which is not installed. Install the extra with "
                "`pip install -e '.[slurm]'` (or `pip install submitit`), or run the sweep here with "
                "`--launcher local` (the default)."
            )
        if launcher == "slurm" and not self.partition:
            raise SweepError(
                "--launcher slurm needs --partition NAME (the SLURM partition the runs go to; `sinfo` lists them)."
            )
        if self.gpus_per_run < 0 or (self.cpus_per_run is not None and self.cpus_per_run < 1):
            raise SweepError(
                f"--gpus-per-run {self.gpus_per_run} and --cpus-per-run {self.cpus_per_run}: expected >= 0 GPUs "
                "and >= 1 CPU."
            )
        processes = self.processes_per_run
        if processes is not None and processes < 1:
            raise SweepError(f"--processes-per-run {processes}: expected >= 1 (one SLURM task per process).")
        if processes is not None and self.gpus_per_run > 1 and processes != self.gpus_per_run:
            raise SweepError(
                f"--processes-per-run {processes} with --gpus-per-run {self.gpus_per_run}: Lightning runs one "
                "process per GPU; leave --processes-per-run out (it follows the GPUs) or make them equal."
            )
        if self.time_limit_min < 1 or self.array_parallelism < 1:
            raise SweepError(
                f"--time-limit {self.time_limit_min} and the array parallelism {self.array_parallelism} (--jobs) "
                "must be at least 1."
            )

    @property
    def tasks_per_run(self) -> int:
        """SLURM tasks (processes) of each run."""
        return self.processes_per_run or max(1, self.gpus_per_run)

    def executor_parameters(self, launcher: str) -> dict[str, Any]:
        """submitit's ``update_parameters`` for this launcher."""
        params: dict[str, Any] = {"timeout_min": self.time_limit_min, "tasks_per_node": self.tasks_per_run, "nodes": 1}
        if launcher == "submitit-local":
            return {**params, "signal_delay_s": self.signal_delay_s}
        params.update(
            slurm_signal_delay_s=self.signal_delay_s,
            slurm_max_num_timeout=MAX_REQUEUES,
            slurm_partition=self.partition,
            slurm_array_parallelism=self.array_parallelism,
            slurm_gpus_per_node=self.gpus_per_run or None,
            slurm_additional_parameters=dict(self.sbatch),
        )
        if self.cpus_per_run is not None:
            params["slurm_cpus_per_task"] = self.cpus_per_run
        return params


def parse_sbatch(options: Sequence[str]) -> dict[str, str]:
    """``--sbatch KEY=VALUE`` options (``account=lab``, ``qos=high``) as a dict, refusing a malformed one."""
    out: dict[str, str] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not key.strip():
            raise SweepError(f"--sbatch {option!r}: expected KEY=VALUE, e.g. --sbatch account=mylab.")
        out[key.strip().replace("-", "_")] = value
    return out


@dataclass
class SweepTask:
    """One run of a sweep as a submitit task: picklable, and requeued with its state on preemption or timeout.

    The task re-reads the sweep file where it runs (the same checkout on the cluster's shared file system) and
    handles its run as the local launcher does.
    """

    sweep_file: str
    run_name: str
    root: str | None = None
    extra: tuple[str, ...] = ()
    workdir: str = dataclasses.field(default_factory=os.getcwd)
    stop_timeout_s: float = 30.0  # the child's time to stop on the signal, well inside --signal's delay
    launcher: str = "slurm"

    def _run(self) -> tuple[Sweep, GridRun]:
        sweep = load_sweep(self.sweep_file)
        if self.root:
            sweep = dataclasses.replace(sweep, root=Path(self.root))
        matches = [r for r in expand(sweep, {}, self.extra) if r.name == self.run_name]
        if not matches:
            raise SweepError(f"sweep {self.sweep_file}: no run named {self.run_name!r} (the file changed?).")
        return sweep, matches[0]

    def __call__(self) -> str:
        import threading

        import submitit

        from rmoe.sweep.runner import launch_one

        os.chdir(self.workdir)  # the paths of the sweep file are relative to where the sweep was submitted
        sweep, run = self._run()
        job = submitit.JobEnvironment()
        env = dict(os.environ, PYTHONUNBUFFERED="1", **rank_environment(self.launcher, job))
        attempt = f"{job.job_id}.{os.environ.get('SLURM_RESTART_COUNT', '0')}"  # requeued: the same job, counted
        if job.global_rank == 0:

            def announce(plan: Path | None) -> None:
                if job.num_tasks > 1:  # the other ranks run what this one plans (None: nothing this time)
                    record = {"attempt": attempt, "plan": None if plan is None else str(plan)}
                    (run.dir / RANKS_FILE).write_text(json.dumps(record) + "\n")

            target = lambda: done.append(launch_one(sweep, run, env, print, announce))  # noqa: E731
        else:
            target = lambda: done.append(follow(run, attempt, job.global_rank, env))  # noqa: E731
        done: list[Any] = []
        # The run waits in a thread of its own: submitit's signal handler (checkpoint) runs in the main thread
        # and stops the run's child, which a handler interrupting that very wait could not do (Popen's lock).
        worker = threading.Thread(target=target, daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(timeout=1.0)
        if not done:
            raise RuntimeError(f"run {run.name}: the launcher thread ended without an outcome (see {run.log})")
        outcome = done[0]
        if outcome.status == "failed":
            raise RuntimeError(f"run {run.name} failed (exit {outcome.returncode}): {outcome.message}")
        return outcome.status

    def checkpoint(self) -> Any:
        """Called by submitit on the preemption / time-limit signal: stop the run's child (it keeps its last
        checkpoint) and requeue this task, which resumes the run."""
        import submitit

        from rmoe.sweep.runner import stop_children

        stop_children(grace=0.0, timeout=self.stop_timeout_s)
        return submitit.helpers.DelayedSubmission(dataclasses.replace(self))


def rank_environment(launcher: str, job: Any) -> dict[str, str]:
    """What a rank of a run of several processes needs beyond its environment. Under SLURM nothing: ``srun``
    set ``SLURM_PROCID`` and the rest, which Lightning's SLURM environment reads. Under submitit's local executor,
    Lightning's own variables, as torchrun would set them (a port from the job id, shared by the ranks)."""
    if launcher != "submitit-local" or job.num_tasks == 1:
        return {}
    port = 20000 + zlib.crc32(str(job.job_id).encode()) % 20000
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(job.num_tasks),
            "NODE_RANK": "0", "LOCAL_RANK": str(job.local_rank)}  # fmt: skip


def follow(run: GridRun, attempt: str, rank: int, env: Mapping[str, str], timeout_s: float = 600.0) -> Any:
    """Rank ``rank`` (> 0) of a run of several processes: wait for task 0's plan of this attempt, then run the
    same stages in a child (its output in ``<run>/stdout.rank<r>.log``); task 0 keeps the run's record."""
    from rmoe.sweep.runner import CHILD_MODULE, Outcome, run_child

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            record = json.loads((run.dir / RANKS_FILE).read_text())
        except (OSError, ValueError):
            record = {}
        if record.get("attempt") == attempt:
            break
        if time.monotonic() > deadline:
            return Outcome(run, "failed", message=f"rank {rank}: task 0 wrote no plan in {timeout_s:.0f} s")
        time.sleep(0.5)
    if record["plan"] is None:
        return Outcome(run, "skipped")
    log = run.dir / f"stdout.rank{rank}.log"
    returncode = run_child([sys.executable, "-m", CHILD_MODULE, "--exec-run", record["plan"]], log, env)
    if returncode:
        message = f"rank {rank} exited {returncode} (log: {log})"
        return Outcome(run, "failed", returncode=returncode, message=message)
    return Outcome(run, "done")


def executor(launcher: str, root: Path, options: ClusterOptions, name: str) -> Any:
    """The submitit executor of ``launcher`` with ``options``."""
    import submitit

    folder = root / SUBMITIT_FOLDER / "%j"
    params = options.executor_parameters(launcher)
    if launcher == "submitit-local":
        local = submitit.LocalExecutor(folder=folder)
        params.pop("nodes")
        local.update_parameters(**params)
        return local
    out = submitit.AutoExecutor(folder=folder, cluster="slurm")
    out.update_parameters(name=f"rmoe-{name}", **params)
    return out


def submit(
    sweep: Sweep,
    runs: Sequence[GridRun],
    launcher: str,
    options: ClusterOptions,
    sweep_file: str,
    root: str | None,
    extra: Sequence[str],
) -> list[Any]:
    """Submit ``runs`` as one job array; returns submitit's jobs. Records ``<job id> <run>`` in the root."""
    from rmoe.sweep.runner import write_sweep_copy

    sweep.root.mkdir(parents=True, exist_ok=True)
    write_sweep_copy(sweep)  # the root's owner and grid, as the local launcher records them
    stop = max(5.0, options.signal_delay_s / 3)
    tasks = [
        SweepTask(sweep_file, run.name, root, tuple(extra), stop_timeout_s=stop, launcher=launcher) for run in runs
    ]
    jobs = executor(launcher, sweep.root, options, sweep.name).submit_array(tasks)
    with (sweep.root / JOBS_FILE).open("a") as record:
        for job, run in zip(jobs, runs, strict=True):
            record.write(f"{job.job_id} {run.name}\n")
    return jobs


def sbatch_script(options: ClusterOptions, folder: Path, name: str, num_tasks: int, python: str = "python") -> str:
    """The ``sbatch`` script submitit writes for an array of ``num_tasks`` runs with these options (what
    ``--dry-run`` prints for a SLURM sweep)."""
    import shlex

    from submitit.slurm.slurm import _make_sbatch_string

    command = f"{python} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    params = {k.removeprefix("slurm_"): v for k, v in options.executor_parameters("slurm").items()}
    params["map_count"] = num_tasks
    params.pop("max_num_timeout")  # submitit's requeue count, not an sbatch option
    params["time"] = params.pop("timeout_min")
    params["ntasks_per_node"] = params.pop("tasks_per_node")
    params["additional_parameters"] = params.pop("additional_parameters") or None
    params = {k: v for k, v in params.items() if v is not None}
    return _make_sbatch_string(command=command, folder=folder, job_name=f"rmoe-{name}", **params)


def active_jobs(root: Path, launcher: str) -> dict[str, str]:
    """``{run name: job id}`` of the runs whose last submitted job (``<root>/slurm_jobs.txt``) is still queued or
    running, so a second invocation does not submit them again."""
    record = root / JOBS_FILE
    if not record.is_file():
        return {}
    last: dict[str, str] = {}
    for line in record.read_text().splitlines():
        job_id, _, name = line.partition(" ")
        if name:
            last[name] = job_id
    import submitit

    active = {}
    for name, job_id in last.items():
        if launcher == "submitit-local":  # a local job's id is its controller's pid
            try:
                os.kill(int(job_id), 0)
            except (OSError, ValueError):
                continue
            active[name] = job_id
        elif submitit.SlurmJob(root / SUBMITIT_FOLDER / "%j", job_id).state in ACTIVE_STATES:
            active[name] = job_id
    return active
