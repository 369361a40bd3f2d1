"""The LightningModule: LM loss + balance losses, AdamW with warmup-cosine, logging."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from rmoe.model.config import ModelConfig
from rmoe.model.decoder import MoeLM
from rmoe.model.losses import average_over_layers
from rmoe.routers import Router, RoutingOutput

LN2 = math.log(2.0)


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``min_lr_ratio * lr``.

    Args:
        lr: Peak learning rate.
        min_lr_ratio: Final learning rate as a fraction of ``lr``.
        warmup_steps: Linear warmup (optimiser steps).
        weight_decay: Decoupled weight decay, applied to matrices only (not to norms, biases or
            embeddings, and so not to a tied LM head either).
        beta1: Adam beta1.
        beta2: Adam beta2.
        eps: Adam epsilon.
    """

    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8


@dataclass
class StepRecord:
    """What the last training/eval step computed, for callbacks (routing analytics).

    Attributes:
        routing: Per MoE layer, the router's decisions (still attached to the graph in training).
        lm_loss: The language-modelling loss.
        balance_loss: The balancing part of the loss (coefficient-weighted aux + z losses).
    """

    routing: list[RoutingOutput]
    lm_loss: torch.Tensor
    balance_loss: torch.Tensor


class MoeLMModule(L.LightningModule):
    """Trains :class:`~rmoe.model.decoder.MoeLM` on batches of token blocks (B, S+1).

    Args:
        arch: The model architecture (``vocab_size`` is filled in from the data module).
        optim: Optimiser and schedule.
        aux_loss_coef: Weight of the load-balancing loss (mean over MoE layers; 1.0 = balanced).
        z_loss_coef: Weight of the router z-loss (mean over MoE layers).
        compile: ``torch.compile`` each decoder layer (in place, so checkpoint names don't change).
    """

    def __init__(
        self,
        arch: ModelConfig,
        optim: OptimConfig | None = None,
        aux_loss_coef: float = 0.01,
        z_loss_coef: float = 0.001,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.arch = arch
        self.optim = optim or OptimConfig()
        self.aux_loss_coef = aux_loss_coef
        self.z_loss_coef = z_loss_coef
        self.compile_layers = compile
        self.model = MoeLM(arch)
        self.tokens_seen = 0
        self.last_step: StepRecord | None = None

    def configure_model(self) -> None:
        if self.compile_layers:
            for layer in self.model.layers:
                layer.compile()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids).logits

    def _losses(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        inputs, targets = batch[:, :-1], batch[:, 1:]
        out = self.model(inputs)
        lm_loss = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten())
        aux_loss, z_loss = average_over_layers(out.routing, self.arch.num_experts)
        aux_loss, z_loss = aux_loss.to(lm_loss.device), z_loss.to(lm_loss.device)
        balance_loss = self.aux_loss_coef * aux_loss + self.z_loss_coef * z_loss
        self.last_step = StepRecord(out.routing, lm_loss, balance_loss)
        return {"loss": lm_loss + balance_loss, "lm_loss": lm_loss, "aux_loss": aux_loss, "z_loss": z_loss}

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        losses = self._losses(batch)
        num_tokens = batch[:, 1:].numel()
        self.tokens_seen += num_tokens * self.trainer.world_size
        self.log("train/loss", losses["lm_loss"], prog_bar=True)
        self.log("train/aux_loss", losses["aux_loss"])
        self.log("train/z_loss", losses["z_loss"])
        self.log("train/total_loss", losses["loss"])
        self.log("train/tokens_seen", float(self.tokens_seen))
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return losses["loss"]

    def _eval_step(self, batch: torch.Tensor, split: str) -> None:
        losses = self._losses(batch)
        n = batch[:, 1:].numel()  # token-weighted mean over the split
        self.log(f"{split}/loss", losses["lm_loss"], batch_size=n, sync_dist=True, prog_bar=split == "val")
        self.log(f"{split}/aux_loss", losses["aux_loss"], batch_size=n, sync_dist=True)
        self.log(f"{split}/z_loss", losses["z_loss"], batch_size=n, sync_dist=True)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _log_derived(self, split: str) -> None:
        """Perplexity and bits per byte from the epoch's token-weighted mean loss."""
        loss = self.trainer.callback_metrics.get(f"{split}/loss")
        if loss is None or self.trainer.sanity_checking:
            return
        loss = float(loss)
        self.log(f"{split}/ppl", math.exp(min(loss, 50.0)))
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "bytes_per_token"):
            self.log(f"{split}/bpb", loss / LN2 / datamodule.bytes_per_token(split))

    def on_validation_epoch_end(self) -> None:
        self._log_derived("val")

    def on_test_epoch_end(self) -> None:
        self._log_derived("test")

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        for module in self.model.modules():  # e.g. auxiliary-loss-free bias balancing
            if isinstance(module, Router):
                module.after_optimizer_step()

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        seen: set[int] = set()
        for name, p in self.model.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            is_embedding = "embed_tokens" in name or "lm_head" in name
            (decay if p.dim() >= 2 and not is_embedding else no_decay).append(p)
        o = self.optim
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr,
            betas=(o.beta1, o.beta2),
            eps=o.eps,
            fused=self.device.type == "cuda",
        )
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, o.warmup_steps, total_steps, o.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokens_seen = checkpoint.get("tokens_seen", 0)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup from ~0 to 1, then cosine from 1 down to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
