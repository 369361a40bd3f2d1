"""Small callbacks: token throughput (and MFU on GPUs) and saving the tokenizer with the run."""

from __future__ import annotations

import os
import time
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops


class TokenThroughput(L.Callback):
    """Logs ``train/tokens_per_sec`` (all processes) over a rolling window of optimiser steps, and
    ``train/mfu`` when the device's peak FLOP/s is known (CUDA): 6 x active non-embedding parameters
    + attention (12 x L x D x S) FLOPs per token, the PaLM appendix B estimate.

    Args:
        window: Number of batches the rate is averaged over.
    """

    def __init__(self, window: int = 20) -> None:
        self.window = window
        self._times: list[float] = []
        self._tokens: list[int] = []
        self._flops_per_token = 0.0
        self._peak_flops: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = pl_module.model
        cfg = model.config
        self._flops_per_token = 6.0 * model.num_parameters(active=True, exclude_embeddings=True)
        self._attn_flops_per_token_per_position = 12.0 * cfg.num_layers * cfg.hidden_size
        if pl_module.device.type == "cuda":
            dtype = torch.bfloat16 if "bf16" in str(trainer.precision) else torch.float32
            self._peak_flops = get_available_flops(pl_module.device, dtype)
        self._times, self._tokens = [], []

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: torch.Tensor, batch_idx: int
    ) -> None:
        self._times.append(time.perf_counter())
        self._tokens.append(batch[:, 1:].numel() * trainer.world_size)
        self._times, self._tokens = self._times[-self.window - 1 :], self._tokens[-self.window - 1 :]
        if len(self._times) < 2:
            return
        elapsed = self._times[-1] - self._times[0]
        tokens = sum(self._tokens[1:])
        tokens_per_sec = tokens / elapsed
        pl_module.log("train/tokens_per_sec", tokens_per_sec, on_step=True, on_epoch=False)
        if self._peak_flops:
            seq_len = batch.shape[1] - 1
            flops = self._flops_per_token + self._attn_flops_per_token_per_position * seq_len
            pl_module.log("train/mfu", tokens_per_sec * flops / (self._peak_flops * trainer.world_size))


class SaveTokenizer(L.Callback):
    """Writes the data module's tokenizer into ``<log_dir>/tokenizer`` so a run is self-contained.

    Runs on every process: ``trainer.log_dir`` is a collective (a broadcast from rank 0), so reading
    it on rank 0 alone would leave rank 0 waiting for the other processes forever (issue 10);
    only global rank 0 writes.
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = trainer.log_dir  # every process takes part in this broadcast
        datamodule = trainer.datamodule
        if trainer.is_global_zero and log_dir is not None and hasattr(datamodule, "save_tokenizer"):
            datamodule.save_tokenizer(os.path.join(log_dir, "tokenizer"))
