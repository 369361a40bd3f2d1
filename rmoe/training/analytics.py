"""Routing analytics in TensorBoard: how each MoE layer routes, during training and validation.

:class:`RoutingAnalytics` logs, for every MoE layer, the metrics of :mod:`rmoe.metrics` (load
balance, gate entropy, cross-layer mutual information, expert paths, expert similarity, router
gradient norms per loss) every ``every_n_steps`` training steps and over each whole validation
(and test) pass, with a custom-scalars layout that puts all layers of a metric in one chart,
histograms, heat-map images and an HParams session so runs with different routers can be
compared side by side. Add it to ``trainer.callbacks``::

    - class_path: rmoe.training.analytics.RoutingAnalytics
      init_args: {every_n_steps: 100}

Tags (``l`` = MoE layer index in depth order, ``{split}`` = ``train``, ``val`` or ``test``):

- scalars for every live metric declared in :data:`rmoe.metrics.catalog.METRICS` (the one list:
  see it for names and meanings): per-layer metrics as ``moe/{split}/{name}/layer_{l}`` and
  ``/mean``; consecutive-pair metrics (``top1_mi``, ``top1_nmi``) as ``.../layer_{l}_{l+1}`` and
  ``/mean``; the binned-MI matrix as ``moe/{split}/binned_prob_mi/{diag_mean,offdiag_mean,adjacent_mean}``;
  scalars as ``moe/{split}/{num_paths,path_entropy,num_tokens}``. OLMoE's ``vocab_specialization``
  and ``coactivation_max`` (arXiv 2409.02060, Sec. 5: :mod:`rmoe.metrics.specialization`; token
  ids seen fewer than ``specialization_min_count`` times are left out) come from the token
  counts, ``expert_similarity`` (training only) from the expert weights;
- training only: ``moe/train/router_grad_norm_{lm,balance}/{layer_{l},shared,total}``;
- histograms ``moe/{split}/{gate_entropy_hist,router_probs_hist}/layer_{l}``;
- images (validation and test) ``moe/{split}/load_heatmap``, ``moe/{split}/binned_prob_mi_heatmap`` and
  ``moe/{split}/coactivation_heatmap`` (OLMoE's co-activation ``N(i, j) / N(i)``, one panel per layer);
- HParams (fit): the run's scalar hyperparameters (``model.*``, ``data.*``, ``trainer.*``) with the
  metrics ``hp/val_loss``, ``hp/val_bpb``, ``hp/val_ppl`` and ``hp/<metric>`` for every metric
  declared with ``hparam=True`` in :data:`rmoe.metrics.catalog.METRICS` (layer means of the last validation);
  ``hp/train_loss`` instead of the validation losses when no validation ran.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from rmoe.errors import RmoeError
from rmoe.evaluation.routing_eval import RoutingHistograms, all_reduce_stats, routing_to_host
from rmoe.metrics import RoutingStats, expert_similarity_per_layer, router_parameters, summary_scalars
from rmoe.metrics.catalog import metrics
from rmoe.metrics.specialization import DEFAULT_MIN_COUNT, TokenExpertStats
from rmoe.routers.base import RoutingOutput
from rmoe.tags import layer_label, layer_tag, series
from rmoe.training.module import MoeLMModule
from rmoe.training.strategies import ExpertParallelStrategy
from rmoe.training.tensorboard import (
    custom_scalars_layout,
    hparam_metrics,
    run_hparams,
    write_heatmaps,
    write_histograms,
)

SPECIALIZATION_KEYS = tuple(m.name for m in metrics(source="specialization", flag="live"))
"""Per-layer scalars of :class:`~rmoe.metrics.specialization.TokenExpertStats` logged live."""


class RoutingAnalytics(L.Callback):
    """Logs every MoE layer's routing metrics to TensorBoard (see the module docstring for the tags).

    Training: on the steps where ``global_step % every_n_steps == 0`` (first micro-batch of the
    step, global rank 0 only; its own batch, not all-reduced), the metrics of the routing the
    step returns in its outputs (``training_step``'s ``"routing"``, detached), the expert
    similarity of the weights the step ran with, and the norms of the router parameters' gradients
    from the LM loss and from the balance loss separately (RMoE paper, Qiu et al., arXiv
    2408.06793, Table 11). The module measures those in ``training_step`` while the graph is
    alive, when this callback asks (``MoeLMModule.router_grad_norms_every``), with
    ``torch.autograd.grad`` on the router parameters only: no ``.grad`` is touched and the step's
    own gradients are bit-identical. Not with compiled layers (``model.compile=true``): there a
    second traversal of the compiled backward fails or corrupts the step's gradients, so the
    norms are turned off with a warning.

    Validation / test: a :class:`~rmoe.metrics.RoutingStats` over the routing every batch of the
    pass returns (``validation_step``'s outputs), whose counts are all-reduced across processes
    (path counts and samples gathered) before rank 0 logs them at the pass's end; also histograms
    of gate entropy and router probabilities per layer (:class:`RoutingHistograms`) and the layer x
    expert load and layer x layer binned-MI heat maps (:mod:`rmoe.training.tensorboard` writes
    them). The sanity check is skipped. At each validation end of ``fit``, the HParams session is
    written (first time) or its metrics updated.

    Cost: per logged training step, two partial backward passes (to the router parameters, about
    one step's time in all) and one metrics pass; per validation, one metrics update per batch
    and a few small figures. docs/speed.md measures it against the fit time.

    Only rank 0 writes. Without a :class:`~lightning.pytorch.loggers.TensorBoardLogger` (or for a
    model without MoE layers) the callback warns once and does nothing.

    Args:
        every_n_steps: Log the training-step metrics every this many optimiser steps (>= 1).
        grad_norms: Also log the router gradient norms per loss on those steps.
        histograms: Log histograms of gate entropy and router probabilities per layer.
        images: Log the load and binned-MI heat maps after each validation / test pass.
        max_samples: Tokens kept (reservoir sample) for the per-token medians over a pass.
        specialization: Log OLMoE's vocabulary specialisation and co-activation (scalars, and the
            co-activation heat map with ``images``); needs batches of token blocks (B, S+1).
        specialization_min_count: Token ids seen fewer times are left out of the specialisation.
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        grad_norms: bool = True,
        histograms: bool = True,
        images: bool = True,
        max_samples: int = 65536,
        specialization: bool = True,
        specialization_min_count: int = DEFAULT_MIN_COUNT,
    ) -> None:
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 1:
            raise RmoeError(f"RoutingAnalytics every_n_steps={every_n_steps!r} must be a positive integer.")
        if not isinstance(max_samples, int) or max_samples < 1:
            raise RmoeError(f"RoutingAnalytics max_samples={max_samples!r} must be a positive integer.")
        self.every_n_steps = every_n_steps
        self.grad_norms = grad_norms
        self.histograms = histograms
        self.images = images
        self.max_samples = max_samples
        self.specialization = specialization
        self.specialization_min_count = specialization_min_count
        self._train_step: int | None = None  # the optimiser step being logged, from its first micro-batch
        self._similarity_L: torch.Tensor | None = None  # expert similarity of the weights that step ran with
        self._sharded = False  # set at setup (FSDP); False when the hooks are called without a Trainer
        self._logger: TensorBoardLogger | None = None
        self._warned: set[str] = set()
        self._layouts_written: set[str] = set()
        self._last_train_step = -1
        self._eval: tuple[RoutingStats, Any, TokenExpertStats | None] | None = None
        self._last_val_scalars: dict[str, float] = {}
        self.last_val_expert_flops: float | None = None  # realised, at the last validation (the fit summary's)
        self._hparams_written = False
        self.seconds_spent = 0.0  # wall time spent in this callback (for overhead measurements)

    # ------------------------------------------------------------------------------------------
    # Setup

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # FSDP (ModelParallelStrategy) or expert parallelism: parameters are sharded, and reading them (expert
        # similarity) or back-propagating to them (grad norms) on rank 0 alone is a collective the others never join.
        self._sharded = isinstance(getattr(trainer, "strategy", None), (ModelParallelStrategy, ExpertParallelStrategy))
        if self._sharded:
            message = "router gradient norms and expert similarity are off with sharded parameters (FSDP, EP)"
            self._warn_once("sharded", f"RoutingAnalytics: {message}: rank 0 alone cannot gather them.")
            self.grad_norms = False
        self._logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if self._logger is None:
            self._warn_once("logger", "RoutingAnalytics does nothing: the trainer has no TensorBoardLogger.")
            return
        if not isinstance(pl_module, MoeLMModule):
            self._warn_once("model", f"RoutingAnalytics does nothing: it needs an MoeLMModule, not {type(pl_module)}.")
            self._logger = None
            return
        if not pl_module.arch.moe_layers:
            self._warn_once("model", "RoutingAnalytics does nothing: the model has no MoE layers to analyse.")
            self._logger = None
            return
        if self.grad_norms and is_compiled(pl_module):
            # Measured: autograd.grad(retain_graph=True) through AOTAutograd-compiled layers either
            # fails (donated buffers) or, with donation off, changes the step's own gradients.
            message = "router gradient norms are off with compiled layers (model.compile=true)"
            self._warn_once("compile", f"RoutingAnalytics: {message}: a compiled backward cannot safely run twice.")
            self.grad_norms = False
        if self.grad_norms and not router_parameters(pl_module.model):
            self._warn_once("params", "RoutingAnalytics: the router has no trainable parameters; no grad norms.")
            self.grad_norms = False
        pl_module.router_grad_norms_every = self.every_n_steps if self.grad_norms else 0
        if trainer.is_global_zero:
            splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage, ())
            log_dir = str(self._logger.log_dir)
            if splits and log_dir not in self._layouts_written:
                self._logger.experiment.add_custom_scalars(custom_scalars_layout(splits))
                self._layouts_written.add(log_dir)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    @property
    def enabled(self) -> bool:
        """Whether there is a TensorBoard logger and an MoE model (decided at ``setup``)."""
        return self._logger is not None

    # ------------------------------------------------------------------------------------------
    # Training steps

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """On the first micro-batch of a logged step: note the step, and measure the expert similarity
        of the weights it runs with (on the device; it reaches the host with the routing)."""
        step = trainer.global_step
        logged = self.enabled and trainer.is_global_zero and step % self.every_n_steps == 0
        self._train_step = step if logged and step != self._last_train_step else None
        if self._train_step is not None and not self._sharded:
            with torch.no_grad():
                self._similarity_L = expert_similarity_per_layer(pl_module.model, host=False)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step, self._train_step = self._train_step, None
        routing = outputs.get("routing") if isinstance(outputs, Mapping) else None
        if step is None or not routing:
            return
        start = time.perf_counter()
        self._last_train_step = step
        norms = self._grad_norm_tags(pl_module, outputs.get("router_grad_norms") or {})
        similarity_L, self._similarity_L = self._similarity_L, None
        with torch.no_grad():
            tokens_in = batch if self.specialization and isinstance(batch, torch.Tensor) else torch.zeros(0)
            extra = [
                torch.stack(list(norms.values())) if norms else torch.zeros(0),
                similarity_L if similarity_L is not None else torch.zeros(0),
                tokens_in,
            ]
            # everything this step logs reaches the host in one transfer; the metrics run there
            routing, (stacked, similarity_L, tokens_in) = routing_to_host(routing, extra)
            scalars: dict[str, float] = dict(zip(norms, stacked.tolist(), strict=True))
            stats = RoutingStats.for_model(pl_module.arch, max_samples=self.max_samples)
            summary = stats.update(routing).compute()
            scalars.update(summary_scalars(summary, prefix=series("train")))
            scalars.update(
                {layer_tag(series("train", "expert_similarity"), l): float(v) for l, v in enumerate(similarity_L)}
            )
            if similarity_L.numel():
                scalars[series("train", "expert_similarity", "mean")] = float(similarity_L.mean())
            tokens = self._token_stats(pl_module, tokens_in if tokens_in.numel() else None, routing)
            if tokens is not None:
                spec = tokens.compute(min_count=self.specialization_min_count, num_pairs=0)
                scalars.update(self._specialization_scalars(spec, "train"))
            self._logger.log_metrics(scalars, step=step)
            if self.histograms:
                histograms = RoutingHistograms(pl_module.arch.num_experts).update(routing).compute(summary)
                write_histograms(self._logger.experiment, "train", histograms, step)
        self.seconds_spent += time.perf_counter() - start

    def _grad_norm_tags(
        self, pl_module: L.LightningModule, norms: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """``moe/train/router_grad_norm_{lm,balance}/{layer_l,shared,total}`` for the step's norms
        (keyed ``{loss}/{group}`` with decoder-layer groups); warns once when the balance loss gave none."""
        if norms and not any(key.startswith("balance/") for key in norms):
            message = "the balance loss has no gradient (coefficients 0): only the LM loss's router grad norms"
            self._warn_once("balance", f"RoutingAnalytics: {message} are logged.")
        moe_index = {layer_label(d): layer_label(l) for l, d in enumerate(pl_module.arch.moe_layers)}
        out: dict[str, torch.Tensor] = {}
        for key, value in norms.items():
            loss_name, group = key.split("/", 1)
            out[series("train", f"router_grad_norm_{loss_name}", moe_index.get(group, group))] = value
        return out

    # ------------------------------------------------------------------------------------------
    # Validation and test passes

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_start(trainer, pl_module)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_start(trainer, pl_module)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_update(pl_module, outputs, batch)

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_update(pl_module, outputs, batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_log(trainer, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_log(trainer, "test")

    def _eval_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval = None
        if self.enabled and not trainer.sanity_checking:
            stats = RoutingStats.for_model(pl_module.arch, max_samples=self.max_samples)
            tokens = TokenExpertStats(pl_module.arch.vocab_size, pl_module.arch.num_experts)
            histograms = RoutingHistograms(pl_module.arch.num_experts) if self.histograms else None
            self._eval = (stats, histograms, tokens)

    def _eval_update(self, pl_module: L.LightningModule, outputs: Any, batch: Any = None) -> None:
        routing = outputs.get("routing") if isinstance(outputs, Mapping) else None
        if self._eval is None or not routing:
            return
        start = time.perf_counter()
        stats, histograms, tokens = self._eval
        with torch.no_grad():
            # one transfer per batch; the accumulators live on the host
            extra = [batch] if isinstance(batch, torch.Tensor) else []
            routing, extra = routing_to_host(routing, extra)
            batch = extra[0] if extra else batch
            stats.update(routing)
            if histograms is not None:
                histograms.update(routing)
            if tokens is not None and self._token_stats(pl_module, batch, routing, tokens) is None:
                self._eval = (stats, histograms, None)  # not token blocks: no specialisation this pass
        self.seconds_spent += time.perf_counter() - start

    def _token_stats(
        self,
        pl_module: L.LightningModule,
        batch: Any,
        routing: list[RoutingOutput],
        tokens: TokenExpertStats | None = None,
    ) -> TokenExpertStats | None:
        """Add a batch's (token id, expert) counts to ``tokens`` (a new one when None); None when the
        specialisation is off or the batch is not the (B, S+1) token blocks the routing came from."""
        if not self.specialization or not isinstance(batch, torch.Tensor) or batch.dim() != 2:
            return None
        inputs = batch[:, :-1]
        if inputs.numel() != routing[0].expert_ids_TK.shape[0]:
            self._warn_once("tokens", "RoutingAnalytics: the batch is not the routed token blocks; no specialisation.")
            return None
        tokens = tokens or TokenExpertStats(pl_module.arch.vocab_size, pl_module.arch.num_experts)
        return tokens.update(inputs, routing)

    @staticmethod
    def _specialization_scalars(spec: Mapping[str, Any], split: str) -> dict[str, float]:
        """``moe/{split}/{key}/layer_{l}`` and ``/mean`` (finite layers) for :data:`SPECIALIZATION_KEYS`."""
        out: dict[str, float] = {}
        for key in SPECIALIZATION_KEYS:
            values = spec[key].double()
            out.update({layer_tag(series(split, key), l): float(v) for l, v in enumerate(values)})
            finite = values[torch.isfinite(values)]
            if finite.numel():
                out[series(split, key, "mean")] = float(finite.mean())
        return out

    def _eval_log(self, trainer: L.Trainer, split: str) -> None:
        if self._eval is None:
            return
        start = time.perf_counter()
        stats, histograms, tokens = self._eval
        self._eval = None
        stats = all_reduce_stats(stats)  # every process takes part
        if histograms is not None:
            histograms.all_reduce()
        if tokens is not None:
            tokens.all_reduce()
        if not trainer.is_global_zero or stats.num_layers is None:
            return
        step = eval_log_step(trainer)
        summary = stats.compute()
        scalars = summary_scalars(summary, prefix=series(split))
        spec = None
        if tokens is not None and tokens.num_layers is not None:
            spec = tokens.compute(min_count=self.specialization_min_count, num_pairs=0)
            scalars.update(self._specialization_scalars(spec, split))
        self._logger.log_metrics(scalars, step=step)
        if split == "val":
            self._last_val_scalars = scalars
            self.last_val_expert_flops = float(summary["expert_flops_per_token"])
        if histograms is not None:
            write_histograms(self._logger.experiment, split, histograms.compute(summary), step)
        if self.images:
            coactivation = spec["coactivation"] if spec is not None else None
            write_heatmaps(self._logger.experiment, split, summary, coactivation, step)
        self.seconds_spent += time.perf_counter() - start

    # ------------------------------------------------------------------------------------------
    # HParams

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._write_hparams(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._hparams_written:  # no validation ran: the HParams session gets the train loss
            self._write_hparams(trainer, pl_module)

    def _write_hparams(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or not trainer.is_global_zero:
            return
        metrics = hparam_metrics(trainer.callback_metrics, self._last_val_scalars)
        if not metrics:
            return
        step = eval_log_step(trainer)
        if not self._hparams_written:
            self._logger.log_hyperparams(run_hparams(trainer, pl_module), metrics, step=step)
            self._hparams_written = True
        else:
            self._logger.log_metrics(metrics, step=step)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_train_step = -1
        self._hparams_written = False
        self._last_val_scalars = {}


def is_compiled(pl_module: L.LightningModule) -> bool:
    """Whether the module or any submodule runs through ``torch.compile`` (``nn.Module.compile`` or
    an ``OptimizedModule`` wrapper), or will (``MoeLMModule(compile=True)`` compiles at fit start)."""
    if isinstance(pl_module, MoeLMModule) and pl_module.compile_layers:
        return True
    return any(
        getattr(m, "_compiled_call_impl", None) is not None or type(m).__name__ == "OptimizedModule"
        for m in pl_module.modules()
    )


def eval_log_step(trainer: L.Trainer) -> int:
    """The step Lightning logs validation/test metrics at (``val/loss``), so routing metrics line up
    with them: ``fit_loop.epoch_loop._batches_that_stepped``, which inside ``fit`` is the step of the
    training batch just before the pass (``global_step - 1``: validation runs before the counter
    moves on)."""
    return int(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step))
