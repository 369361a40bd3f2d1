"""Small callbacks: token throughput (and MFU on GPUs), saving the tokenizer with the run, a progress
bar that counts optimiser steps, and a model summary with the numbers that matter for an MoE."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelSummary, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table, get_human_readable_count

from rmoe.metrics import expert_pair_flops
from rmoe.model.decoder import ROUTED_EXPERT_PARAMETERS, MoeLM
from rmoe.runs import STATUS_FILE
from rmoe.training.module import logs_this_step

_summary_log = logging.getLogger("lightning.pytorch.callbacks.model_summary")


def training_flops_per_token(model: MoeLM, seq_len: int) -> float:
    """Training FLOPs per token: 6 x the non-embedding parameters a token uses + 12 x L x D x S for attention
    (PaLM, arXiv 2204.02311, appendix B) + 3 x the router's forward FLOPs that no parameter accounts for.
    Routed experts count ``Router.routed_pairs`` / T times (K for token choice)."""
    cfg = model.config
    routed = sum(p.numel() for n, p in model.named_parameters() if n.endswith(ROUTED_EXPERT_PARAMETERS))
    dense = model.num_parameters(exclude_embeddings=True) - routed
    flops = 6.0 * dense + 12.0 * cfg.num_layers * cfg.hidden_size * seq_len
    if cfg.moe_layers:
        context = cfg.router_context()
        pairs_per_token = context.router_class.routed_pairs(context, seq_len, 1) / seq_len
        flops += 6.0 * routed / cfg.num_experts * pairs_per_token
        flops += 3.0 * len(cfg.moe_layers) * context.router_class.extra_flops_per_token(context, seq_len)
    return flops


# Dense (no 2:4 sparsity) bf16 tensor-core peak FLOP/s per GPU, from NVIDIA's data sheets, matched in order
# against torch.cuda.get_device_name(): the first match wins, so longer names come first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2.5e15),  # the Blackwell GPU of a Grace Blackwell superchip
    ("B200", 2.25e15),
    ("H200 NVL", 835e12),
    ("H200", 989e12),  # H200 SXM (and GH200: the same Hopper GPU)
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # H100 SXM5 ("NVIDIA H100 80GB HBM3")
    ("A100", 312e12),  # SXM4 and PCIe, 40 and 80 GB
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
)


def peak_bf16_flops(device_name: str) -> float | None:
    """The dense bf16 peak FLOP/s of a GPU by its name (:data:`PEAK_BF16_FLOPS`); None when unknown."""
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    return None


class TokenThroughput(L.Callback):
    """Logs ``train/tokens_per_sec`` (all processes) over a rolling window of optimiser steps, and on a GPU
    ``train/mfu``: :func:`training_flops_per_token` over the card's dense bf16 peak (:data:`PEAK_BF16_FLOPS`,
    whatever the precision, as torchtitan reports it). Host clocks and counts only: nothing is read from the device.

    Args:
        window: Number of batches the rate is averaged over.
    """

    def __init__(self, window: int = 20) -> None:
        self.window = window
        self._times: list[float] = []
        self._tokens: list[int] = []
        self._peak_flops: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._peak_flops = None
        if pl_module.device.type == "cuda":
            name = torch.cuda.get_device_name(pl_module.device)
            self._peak_flops = peak_bf16_flops(name)
            if self._peak_flops is None:
                rank_zero_warn(f"TokenThroughput: no peak FLOP/s known for {name!r}: train/mfu is not logged.")
        self._times, self._tokens = [], []

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: torch.Tensor, batch_idx: int
    ) -> None:
        self._times.append(time.perf_counter())
        self._tokens.append(batch[:, 1:].numel() * trainer.world_size)
        self._times, self._tokens = self._times[-self.window - 1 :], self._tokens[-self.window - 1 :]
        if len(self._times) < 2 or not logs_this_step(trainer):
            return
        tokens_per_sec = sum(self._tokens[1:]) / (self._times[-1] - self._times[0])
        # host tensors: Lightning would copy a Python number to the device (a synchronisation)
        pl_module.log("train/tokens_per_sec", torch.tensor(tokens_per_sec), on_step=True, on_epoch=False)
        if self._peak_flops:
            flops = training_flops_per_token(pl_module.model, batch.shape[1] - 1)
            mfu = tokens_per_sec * flops / (self._peak_flops * trainer.world_size)
            pl_module.log("train/mfu", torch.tensor(mfu), on_step=True, on_epoch=False)


class SaveTokenizer(L.Callback):
    """Writes the data module's tokenizer into ``<log_dir>/tokenizer`` so a run is self-contained.

    Runs on every process: ``trainer.log_dir`` is a collective (a broadcast from rank 0), so reading it on rank 0
    alone would hang; only global rank 0 writes."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = trainer.log_dir  # every process takes part in this broadcast
        datamodule = trainer.datamodule
        if trainer.is_global_zero and log_dir is not None and hasattr(datamodule, "save_tokenizer"):
            datamodule.save_tokenizer(os.path.join(log_dir, "tokenizer"))


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, but a step-bounded run (``trainer.max_steps > 0``) counts optimiser steps out of
    ``max_steps`` across epochs (from the restored step on resume) and shows tokens/s; Lightning's counts the
    batches of the current epoch. Epoch-bounded runs keep Lightning's bar."""

    @staticmethod
    def _steps(trainer: L.Trainer) -> bool:
        return trainer.max_steps is not None and trainer.max_steps > 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self._steps(trainer):
            bar = self.train_progress_bar
            bar.reset(total=trainer.max_steps)
            bar.initial = bar.n = trainer.global_step
            bar.set_description("step")

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if not self._steps(trainer):
            super().on_train_epoch_start(trainer, *args)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._steps(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is not None and self._should_update(step, bar.total):
            bar.n = step
            bar.refresh()
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Close the bars, so that the error message that follows starts on a line of its own."""
        for bar in (
            self._val_progress_bar,
            self._test_progress_bar,
            self._predict_progress_bar,
            self._train_progress_bar,
        ):
            if bar is not None and not bar.disable:
                bar.close()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        tokens_per_sec = trainer.callback_metrics.get("train/tokens_per_sec")
        if tokens_per_sec is not None:
            metrics["tok/s"] = f"{float(tokens_per_sec):,.0f}"
        return metrics


class MoeModelSummary(ModelSummary):
    """Lightning's model summary with the active parameters and :func:`training_flops_per_token` at the data's
    block size instead of its ``Total Flops`` line (which needs an ``example_input_array``, not set here)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pl_module = pl_module
        self._block_size = getattr(trainer.datamodule, "block_size", None)
        super().on_fit_start(trainer, pl_module)

    def summarize(
        self,
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        table = _format_summary_table(
            total_parameters, trainable_parameters, model_size, total_training_modes, total_flops, *summary_data
        )
        lines = [line for line in table.splitlines() if not line.rstrip().endswith("Total Flops")]
        model = getattr(self._pl_module, "model", None)
        if isinstance(model, MoeLM):
            active = model.num_parameters(active=True)
            lines.append(f"{get_human_readable_count(active):<10}Active params (K of E experts per token)")
            if self._block_size:
                flops = training_flops_per_token(model, self._block_size)
                lines.append(
                    f"{get_human_readable_count(int(flops)):<10}Training FLOPs per token "
                    f"(6 x non-embedding params a token uses + attention + router at {self._block_size} tokens)"
                )
        _summary_log.info("\n" + "\n".join(lines))


class FitSummary(L.Callback):
    """Prints at the end of a finished ``fit``, on rank 0: steps, wall time, last and best validation loss and bpb,
    and where the checkpoints are."""

    def __init__(self) -> None:
        self._start = 0.0
        self._log_dir: str | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._log_dir = trainer.log_dir  # a collective: every process, here
        self._start = time.monotonic()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning.pytorch.callbacks import ModelCheckpoint

        if not trainer.is_global_zero:
            return
        elapsed = time.monotonic() - self._start
        took = f"{elapsed:.1f} s" if elapsed < 60 else "{} min {} s".format(*divmod(round(elapsed), 60))
        lines = [f"rmoe fit: {trainer.global_step} steps in {took}, run folder {self._log_dir}"]
        metrics = trainer.callback_metrics
        last = [f"{tag} {float(metrics[tag]):.4f}" for tag in ("val/loss", "val/bpb") if tag in metrics]
        if last:
            lines.append(f"  last validation: {', '.join(last)}")
        analytics = [c for c in trainer.callbacks if hasattr(c, "last_val_expert_flops")]
        realised = analytics[0].last_val_expert_flops if analytics else None
        model = getattr(pl_module, "model", None)
        if realised is not None and math.isfinite(realised) and isinstance(model, MoeLM):
            cfg = model.config
            context = cfg.router_context()
            seq_len = getattr(trainer.datamodule, "block_size", None) or 1
            bound_pairs = context.router_class.routed_pairs(context, seq_len, 1) / seq_len
            bound = len(cfg.moe_layers) * bound_pairs * expert_pair_flops(cfg.hidden_size, cfg.moe_intermediate_size)
            lines.append(
                "  routed-expert training FLOPs per token at the last validation: "
                f"{get_human_readable_count(int(realised))} (the memory estimate and MFU count "
                f"{get_human_readable_count(int(bound))}, the router's bound)"
            )
        for callback in trainer.callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.best_model_path and callback.monitor:
                score = callback.best_model_score
                value = f" {float(score):.4f}" if score is not None else ""
                lines.append(f"  best {callback.monitor}{value}: {callback.best_model_path}")
        last_paths = sorted({c.last_model_path for c in trainer.callbacks if isinstance(c, ModelCheckpoint)} - {""})
        if last_paths:
            lines.append(f"  last checkpoint: {', '.join(last_paths)}")
        print("\n".join(lines), file=sys.stderr, flush=True)


class RunStatus(L.Callback):
    """Writes ``<log_dir>/status.json``: ``{"state": "running" | "finished" | "failed" | "interrupted", ...}`` with
    the command, pid, start and end times, the global step (at every checkpoint and at least every
    ``every_seconds``), and the error, or the signal and checkpoint of an interruption. A run killed from outside
    (kill -9, the OOM killer) stays ``running``. ``trainer.log_dir`` is a collective: read in ``setup`` on every
    process; only global rank 0 writes."""

    def __init__(self, every_seconds: float = 30.0) -> None:
        self.every_seconds = every_seconds
        self._file: str | None = None
        self._status: dict[str, Any] = {}
        self._written = 0.0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        log_dir = trainer.log_dir  # every process takes part in this broadcast
        if not trainer.is_global_zero or log_dir is None or not trainer.loggers:
            return
        self._file = os.path.join(log_dir, STATUS_FILE)
        self._status = {"state": "running", "command": trainer.state.fn.value if trainer.state.fn else stage,
                        "pid": os.getpid(), "started": _now()}  # fmt: skip
        self._write(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self._file is not None and time.monotonic() - self._written >= self.every_seconds:
            self._write(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self._status.get("state") == "running":
            self._write(trainer)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._status.get("state") == "running":
            self._write(trainer, state="finished", finished=_now())

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        from rmoe.training.interrupt import Interruption, exit_code, is_interruption

        if not self._status:
            return
        if is_interruption(exception):
            import signal

            saved = next((c.checkpoint for c in trainer.callbacks if isinstance(c, Interruption)), None)
            name = signal.Signals(exit_code(exception) - 128).name
            self._write(
                trainer, state="interrupted", finished=_now(), signal=name, checkpoint=str(saved) if saved else None
            )
            return
        error = " ".join(str(exception).split())[:500]
        self._write(trainer, state="failed", finished=_now(), error=f"{type(exception).__name__}: {error}")

    def _write(self, trainer: L.Trainer, **changes: Any) -> None:
        if self._file is None:
            return
        import json

        self._written = time.monotonic()
        self._status.update(changes, global_step=trainer.global_step)
        temporary = f"{self._file}.tmp-{os.getpid()}"
        try:
            os.makedirs(os.path.dirname(self._file), exist_ok=True)
            with open(temporary, "w", encoding="utf-8") as file:
                json.dump(self._status, file, indent=1)
                file.write("\n")
            os.replace(temporary, self._file)
        except OSError:  # a full disk is reported by the write that needs the space (a checkpoint)
            pass


def _now() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
