"""A test-only callback: the training process sends itself a real signal at a chosen point.

Used through the real CLI (``--trainer.callbacks+={class_path: signal_probe.SignalSelf, ...}``, with
``tests/`` on ``PYTHONPATH``), so that an interruption lands exactly where a test wants it.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning as L


class SignalSelf(L.Callback):
    """Sends ``signal_name`` to this process once, at the start of optimiser step ``step`` or of
    validation batch ``val_batch`` (not during the sanity check), on global rank ``rank`` only.

    Args:
        signal_name: ``SIGINT``, ``SIGTERM`` or ``SIGUSR1``.
        step: The optimiser step (-1: none).
        val_batch: The validation batch index (-1: none).
        rank: The process that sends it.
    """

    def __init__(self, signal_name: str, step: int = -1, val_batch: int = -1, rank: int = 0) -> None:
        self.signum = getattr(signal, signal_name)
        self.step, self.val_batch, self.rank = step, val_batch, rank
        self.sent = False

    def _send(self) -> None:
        self.sent = True
        os.kill(os.getpid(), self.signum)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if not self.sent and trainer.global_step == self.step and trainer.global_rank == self.rank:
            self._send()

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:  # fmt: skip
        if not self.sent and not trainer.sanity_checking and batch_idx == self.val_batch:
            if trainer.global_rank == self.rank:
                self._send()
