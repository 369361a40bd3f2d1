"""A test-only callback: each process writes down what it trained on, so tests can check sharding.

Used through the real CLI (``--trainer.callbacks+={class_path: rank_probe.RankProbe, ...}``, with
``tests/`` on ``PYTHONPATH`` for the processes a launcher starts).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import lightning as L
import torch


class RankProbe(L.Callback):
    """Writes ``<out>/rank<global rank>.json``: per training batch the optimiser step and a hash of
    each row, and at the end of training every router's ``balance_bias_E``.

    Args:
        out: Directory for the files.
    """

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.rows: list[tuple[int, list[str]]] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        hashes = [hashlib.sha1(row.cpu().numpy().tobytes()).hexdigest()[:16] for row in batch]
        self.rows.append((trainer.global_step, hashes))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        biases = {
            name: buffer.tolist()
            for name, buffer in pl_module.named_buffers()
            if name.endswith("balance_bias_E") and isinstance(buffer, torch.Tensor)
        }
        self.out.mkdir(parents=True, exist_ok=True)
        record = {"world_size": trainer.world_size, "rows": self.rows, "biases": biases}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
