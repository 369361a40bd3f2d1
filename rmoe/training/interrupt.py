"""Stopping a training run on a signal without losing it: Ctrl-C, a scheduler's SIGTERM, SLURM's SIGUSR1.

:class:`Interruption` (on every ``rmoe fit``) turns SIGINT, SIGTERM (``scancel``, preemption, a time limit) and
SIGUSR1 (SLURM's ``--signal=USR1@<seconds>``, Lightning's requeue signal) into the same orderly stop:

1. the handler only records the signal (and forwards it to the processes Lightning started), so the step finishes;
2. at the next step boundary (a training step's or validation batch's end) every process stops at the same step
   (under DDP through Lightning's per-step broadcast of rank 0's ``trainer.received_sigterm``);
3. ``last.ckpt`` is written and ``status.json`` says ``interrupted``, with the signal, step and checkpoint;
4. the process exits with 128 + the signal number, so no scheduler takes the run for a success; under SLURM with
   Lightning's auto-requeue, SIGUSR1 also requeues the job.

A second Ctrl-C stops at once, without a checkpoint. Resuming from ``last.ckpt`` gives the uninterrupted run's curve.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from rmoe.training.module import logs_this_step

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)  # the others keep their default action
_received: dict[str, int] = {}  # {"signum": n} once a signal has been received in this process


def received_signal() -> int | None:
    """The signal this process received during training, if any."""
    return _received.get("signum")


class Interrupted(SystemExit):
    """Raised at the step boundary after a signal: exit code 128 + the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


def is_interruption(exception: BaseException) -> bool:
    """Whether ``exception`` is the orderly stop after a signal (ours, or Lightning's SIGTERMException)."""
    return isinstance(exception, (Interrupted, SIGTERMException))


def exit_code(exception: BaseException) -> int:
    """128 + the received signal (SIGTERM's 143 when none was recorded)."""
    signum = getattr(exception, "signum", None) or received_signal() or signal.SIGTERM
    return 128 + int(signum)


class Interruption(L.Callback):
    """See the module docstring. In a script, add it to the callbacks.

    Args:
        every_minutes: Also write ``last.ckpt`` at the first logged step after every this many minutes of
            training, so a run killed without a signal (SIGKILL, a node failure) loses at most that much; 0: off.
            Rank 0's clock decides, broadcast to the others on logged steps only.
    """

    def __init__(self, every_minutes: float = 0.0) -> None:
        if every_minutes < 0:
            raise ValueError(f"every_minutes={every_minutes} must be >= 0")
        self.every_minutes = every_minutes
        self._last_save = 0.0
        self._previous: dict[int, Any] = {}
        self._trainer: L.Trainer | None = None
        self._log_dir: str | None = None
        self._validating = False
        self._rewind: str | None = None  # while the interrupted run is saved: "step" or "validation"
        self.checkpoint: Path | None = None  # where the interrupted run was saved

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._log_dir = trainer.log_dir  # a collective: read here, on every process, not in a handler
        if stage == "fit":
            _received.clear()
            self._install(trainer)

    # -- handlers

    def _install(self, trainer: L.Trainer) -> None:
        self._trainer = trainer
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in SIGNALS:
            self._previous.setdefault(signum, signal.getsignal(signum))  # the handlers from before the run
            signal.signal(signum, self._handle)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # again: Lightning registers its own SIGTERM handler (chaining ours) just before training; ours decides
        self._install(trainer)
        self._last_save = time.monotonic()

    def _restore(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if "signum" in _received:
            if signum == signal.SIGINT:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            return
        _received["signum"] = signum
        name = signal.Signals(signum).name
        print(f"\nrmoe: {name} received: stopping at the end of this step, after saving last.ckpt "
              "(Ctrl-C again to stop at once, without it)", file=sys.stderr, flush=True)  # fmt: skip
        trainer = self._trainer
        if trainer is None:
            return
        trainer._signal_connector.received_sigterm = True  # Lightning's loops stop on it (DDP: broadcast)
        launcher = getattr(trainer.strategy, "launcher", None)
        if launcher is not None and hasattr(launcher, "kill") and getattr(launcher, "procs", None):
            launcher.kill(signum)  # the processes Lightning started get it too

    # -- the stop

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # after a whole optimiser step: the batch just fetched is not trained on, and a resume fetches it again
        first_micro_batch = batch_idx % trainer.accumulate_grad_batches == 0
        if "signum" in _received and trainer.world_size == 1 and first_micro_batch:  # DDP: Lightning's broadcast
            raise Interrupted(_received["signum"])

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if not self.every_minutes or not logs_this_step(trainer):
            return
        due = time.monotonic() - self._last_save >= 60.0 * self.every_minutes
        if trainer.world_size > 1:
            due = bool(trainer.strategy.broadcast(due))
        path = last_checkpoint_path(trainer)
        if due and path is not None:
            save_last(trainer, path)
            self._last_save = time.monotonic()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validating = True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validating = False

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()
        if not is_interruption(exception) or trainer.sanity_checking:
            return
        path = last_checkpoint_path(trainer)
        if path is not None:
            self._rewind = "validation" if self._validating else "step"
            try:
                save_last(trainer, path)
            finally:
                self._rewind = None
            self.checkpoint = path
        if trainer.is_global_zero:
            name = signal.Signals(exit_code(exception) - 128).name
            config = Path(self._log_dir or ".") / "config.yaml"
            saved = f"saved {path}; resume with: rmoe fit --config {config} --ckpt {path}" if path else (
                "no checkpoint written (checkpointing is off)")  # fmt: skip
            print(f"rmoe: {name}: stopped at step {trainer.global_step}: {saved}", file=sys.stderr, flush=True)
        signum = getattr(exception, "signum", None) or received_signal()
        if signum == signal.SIGUSR1 and trainer.is_global_zero:
            requeue_slurm_job(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """Make the interrupted run's checkpoint resume as the uninterrupted run goes on.

        Lightning's loops resume exactly from a training batch's end; the stop comes later, so the loop counters
        are set back: after a training step, as if saved at its end; during a validation, to its first batch, so
        that the resumed run runs all of it again (Lightning would only finish the rest)."""
        if self._rewind is None:
            return
        fit = checkpoint.get("loops", {}).get("fit_loop", {})
        steps, batches = fit.get("epoch_loop.state_dict", {}), fit.get("epoch_loop.batch_progress")
        if self._rewind == "step" and "_batches_that_stepped" in steps and batches and batches["total"]["processed"]:
            # as a ModelCheckpoint at the batch's end: processed, not completed, the logging step not moved on
            for part in ("total", "current"):
                batches[part].update(ready=batches[part]["processed"], completed=batches[part]["processed"] - 1)
            steps["_batches_that_stepped"] -= 1
        progress = fit.get("epoch_loop.val_loop.batch_progress")
        if self._rewind == "validation" and progress and {"total", "current"} <= set(progress):
            done_before = progress["total"]["completed"] - progress["current"]["completed"]
            progress["current"].update(ready=1, started=1, processed=0, completed=0)
            progress["total"].update(ready=done_before + 1, started=done_before + 1, processed=done_before,
                                     completed=done_before)  # fmt: skip
            progress["is_last_batch"] = False

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()
        self._trainer = None


def last_checkpoint_path(trainer: L.Trainer) -> Path | None:
    """Where ``last.ckpt`` of this run goes: the folder of its first ``ModelCheckpoint`` (None without one)."""
    callbacks = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
    if not callbacks or callbacks[0].dirpath is None:
        return None
    callback = callbacks[0]
    return Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"


def save_last(trainer: L.Trainer, path: Path) -> None:
    """Write ``last.ckpt`` as the run's ModelCheckpoint's own (so it later overwrites it, not ``last-v1.ckpt``)."""
    trainer.save_checkpoint(path)
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath == str(path.parent):
            callback.last_model_path = str(path)


def requeue_slurm_job(trainer: L.Trainer) -> None:
    """``scontrol requeue <job>`` under SLURM with Lightning's auto-requeue (its SIGUSR1 convention)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    environment = trainer._accelerator_connector.cluster_environment
    if not isinstance(environment, SLURMEnvironment) or not environment.auto_requeue:
        return
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ.get("SLURM_JOB_ID")
    if not job:
        return
    try:
        code = subprocess.run(["scontrol", "requeue", job], check=False).returncode
    except OSError as err:  # no scontrol on this machine
        code = err.errno or 1
    state = "requeued" if code == 0 else f"not requeued (scontrol failed: {code})"
    print(f"rmoe: SLURM job {job} {state}", file=sys.stderr, flush=True)
