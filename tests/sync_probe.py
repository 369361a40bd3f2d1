"""A test-only callback: counts the host synchronisations of chosen training steps and validation
batches (:class:`rmoe.syncs.HostSyncCounter`) and writes them to a JSON file.

One counter follows the whole run (so it knows which tensors live on the host) and records only in
the windows: a training step from its ``on_train_batch_start`` to the next one (forward, backward,
optimiser step, every callback and logger in between, and the data loader's next batch); a
validation batch from its ``on_validation_batch_start`` to its ``on_validation_batch_end`` (this
callback is last in the list, so the other callbacks' batch-end hooks are inside).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L

from rmoe.syncs import HostSyncCounter


class SyncProbe(L.Callback):
    """Args:
    out: The JSON file: ``{"train": {step: [[kind, where], ...]}, "val": [[[kind, where], ...], ...]}``.
    steps: The optimiser steps to count.
    val_batches: How many validation batches to count (the first ones of each validation).
    """

    def __init__(self, out: str, steps: list[int], val_batches: int = 1) -> None:
        self.out = Path(out)
        self.steps = set(steps)
        self.val_batches = val_batches
        self.counter: HostSyncCounter | None = None
        self.window: tuple[str, int | None, int] | None = None  # (split, step, first event)
        self.results: dict[str, Any] = {"train": {}, "val": []}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.counter = HostSyncCounter().__enter__()
        self.counter.recording = False

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stop()
        if self.counter is not None:
            self.counter.__exit__(None, None, None)
            self.counter = None

    def _start(self, split: str, step: int | None) -> None:
        self.window = (split, step, len(self.counter.events))
        self.counter.recording = True

    def _stop(self) -> None:
        if self.window is None or self.counter is None:
            return
        split, step, first = self.window
        events = [[e.kind, e.where] for e in self.counter.events[first:]]
        if split == "train":
            self.results["train"][str(step)] = events
        else:
            self.results["val"].append(events)
        self.window = None
        self.counter.recording = False
        self.out.write_text(json.dumps(self.results, indent=1))

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._stop()
        if trainer.global_step in self.steps:
            self._start("train", trainer.global_step)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._stop()  # a step counted just before a validation ends here: its batch-end hooks have run
        if batch_idx < self.val_batches and not trainer.sanity_checking:
            self._start("val", None)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.window is not None and self.window[0] == "val":
            self._stop()
