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

import dataclasses
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
from rmoe.figures import coactivation_figure, figure, figure_to_rgb
from rmoe.metrics import (
    RoutingStats,
    expert_similarity_per_layer,
    router_parameters,
    summary_scalars,
)
from rmoe.metrics.catalog import metrics
from rmoe.metrics.gradients import router_grad_norm_tensors
from rmoe.metrics.specialization import DEFAULT_MIN_COUNT, TokenExpertStats
from rmoe.routers.base import RoutingOutput
from rmoe.runs import flatten_hparams
from rmoe.tags import PREFIX, layer_label, layer_tag, series
from rmoe.training.module import MoeLMModule

SPECIALIZATION_KEYS = tuple(m.name for m in metrics(source="specialization", flag="live"))
"""Per-layer scalars of :class:`~rmoe.metrics.specialization.TokenExpertStats` logged live."""

Scalar = bool | int | float | str


class RoutingAnalytics(L.Callback):
    """Logs every MoE layer's routing metrics to TensorBoard (see the module docstring for the tags).

    Training: on the steps where ``global_step % every_n_steps == 0`` (first micro-batch of the
    step, global rank 0 only; its own batch, not all-reduced), the metrics of that step's routing
    (:class:`~rmoe.metrics.RoutingStats` of ``pl_module.last_step.routing``, detached, under
    ``torch.no_grad()``), the expert similarity of the weights, and the norms of the router
    parameters' gradients from the LM loss and from the balance loss separately (RMoE paper,
    Qiu et al., arXiv 2408.06793, Table 11; ``torch.autograd.grad`` on the router parameters only,
    with ``retain_graph``, in ``on_before_backward``: no ``.grad`` is touched and the step's own
    gradients are bit-identical). Not with compiled layers (``model.compile=true``): there a
    second traversal of the compiled backward fails or corrupts the step's gradients, so the
    norms are turned off with a warning.

    Validation / test: a :class:`~rmoe.metrics.RoutingStats` over every batch of the pass, whose
    counts are all-reduced across processes (path counts and samples gathered) before rank 0
    logs them at the pass's end; also histograms of gate entropy and router probabilities per
    layer and the layer x expert load and layer x layer binned-MI heat maps. The sanity check is
    skipped. At each validation end of ``fit``, the HParams session is written (first time) or
    its metrics updated.

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
        self._train_batch: torch.Tensor | None = None
        self._sharded = False  # set at setup (FSDP); False when the hooks are called without a Trainer
        self._logger: TensorBoardLogger | None = None
        self._warned: set[str] = set()
        self._layouts_written: set[str] = set()
        self._last_train_step = -1
        self._eval: tuple[RoutingStats, Any, TokenExpertStats | None] | None = None
        self._last_val_scalars: dict[str, float] = {}
        self._hparams_written = False
        self.seconds_spent = 0.0  # wall time spent in this callback (for overhead measurements)

    # ------------------------------------------------------------------------------------------
    # Setup

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # FSDP (ModelParallelStrategy): parameters are sharded, and reading them (expert similarity) or
        # back-propagating to them (grad norms) on rank 0 alone is a collective the others never join.
        self._sharded = isinstance(getattr(trainer, "strategy", None), ModelParallelStrategy)
        if self._sharded:
            message = "router gradient norms and expert similarity are off with sharded parameters (FSDP)"
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
        """Keep a reference to the batch of a logged step: its token ids, for the specialisation."""
        step = trainer.global_step
        logged = self.enabled and self.specialization and trainer.is_global_zero and step % self.every_n_steps == 0
        self._train_batch = batch if logged and step != self._last_train_step else None

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        step = trainer.global_step
        if not self.enabled or not trainer.is_global_zero or step % self.every_n_steps or step == self._last_train_step:
            return
        record = pl_module.last_step
        if record is None or not record.routing:
            return
        start = time.perf_counter()
        self._last_train_step = step
        norms: dict[str, torch.Tensor] = self._grad_norms(pl_module, record) if self.grad_norms else {}
        with torch.no_grad():
            similarity_L = torch.zeros(0) if self._sharded else expert_similarity_per_layer(pl_module.model, host=False)
            batch = self._train_batch if isinstance(self._train_batch, torch.Tensor) else torch.zeros(0)
            stacked = torch.stack(list(norms.values())) if norms else torch.zeros(0)
            # everything this step logs reaches the host in one transfer; the metrics run there
            routing, (stacked, similarity_L, batch) = routing_to_host(record.routing, [stacked, similarity_L, batch])
            metrics: dict[str, float] = dict(zip(norms, stacked.tolist(), strict=True))
            stats = RoutingStats(pl_module.arch.num_experts, top_k=pl_module.arch.top_k, max_samples=self.max_samples)
            metrics.update(summary_scalars(stats.update(routing).compute(), prefix=series("train")))
            metrics.update(
                {layer_tag(series("train", "expert_similarity"), l): float(v) for l, v in enumerate(similarity_L)}
            )
            if similarity_L.numel():
                metrics[series("train", "expert_similarity", "mean")] = float(similarity_L.mean())
            tokens = self._token_stats(pl_module, batch if batch.numel() else None, routing)
            if tokens is not None:
                spec = tokens.compute(min_count=self.specialization_min_count, num_pairs=0)
                metrics.update(self._specialization_scalars(spec, "train"))
            self._train_batch = None
            self._logger.log_metrics(metrics, step=step)
            if self.histograms:
                self._write_histograms("train", _histograms(pl_module).update(routing), step)
        self.seconds_spent += time.perf_counter() - start

    def _grad_norms(self, pl_module: L.LightningModule, record: Any) -> dict[str, torch.Tensor]:
        """``moe/train/router_grad_norm_{lm,balance}/...`` as device scalars; the balance part is left
        out (warned once) when its coefficients are 0 or it has no gradient path to the routers."""
        if not isinstance(record.lm_loss, torch.Tensor) or not record.lm_loss.requires_grad:
            return {}
        if not router_parameters(pl_module.model):
            self._warn_once("params", "RoutingAnalytics: the router has no trainable parameters; no grad norms.")
            self.grad_norms = False
            return {}
        coefs = (pl_module.aux_loss_coef, pl_module.z_loss_coef)
        balance = record.balance_loss
        if not any(coefs) or not isinstance(balance, torch.Tensor) or not balance.requires_grad:
            message = "the balance loss has no gradient (coefficients 0): only the LM loss's router grad norms"
            self._warn_once("balance", f"RoutingAnalytics: {message} are logged.")
            balance = None
        try:
            norms = router_grad_norm_tensors(pl_module.model, {"lm": record.lm_loss, "balance": balance})
        except RuntimeError as err:  # e.g. a compiled graph that cannot be traversed twice
            self._warn_once("grad", f"RoutingAnalytics: router gradient norms are off for this run ({err}).")
            self.grad_norms = False
            return {}
        moe_index = {layer_label(d): layer_label(l) for l, d in enumerate(pl_module.arch.moe_layers)}
        out: dict[str, torch.Tensor] = {}
        for key, value in norms.items():
            loss_name, group = key.split("/", 1)
            if loss_name == "balance" and balance is None:
                continue
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
        self._eval_update(pl_module, batch)

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_update(pl_module, batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_log(trainer, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_log(trainer, "test")

    def _eval_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval = None
        if self.enabled and not trainer.sanity_checking:
            stats = RoutingStats(pl_module.arch.num_experts, top_k=pl_module.arch.top_k, max_samples=self.max_samples)
            tokens = TokenExpertStats(pl_module.arch.vocab_size, pl_module.arch.num_experts)
            self._eval = (stats, _histograms(pl_module) if self.histograms else None, tokens)

    def _eval_update(self, pl_module: L.LightningModule, batch: Any = None) -> None:
        record = pl_module.last_step
        if self._eval is None or record is None or not record.routing:
            return
        start = time.perf_counter()
        stats, histograms, tokens = self._eval
        with torch.no_grad():
            # one transfer per batch; the accumulators live on the host
            extra = [batch] if isinstance(batch, torch.Tensor) else []
            routing, extra = routing_to_host(record.routing, extra)
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
        if histograms is not None:
            self._write_histograms(split, histograms, step)
        if self.images:
            for kind, tag in (("load", "load_heatmap"), ("binned_prob_mi", "binned_prob_mi_heatmap")):
                fig = figure(kind, summary, title=f"{split} step {step}: " + _TITLES[kind], fast=True)
                image = figure_to_rgb(fig)
                self._logger.experiment.add_image(series(split, tag), image, step, dataformats="HWC")
            if spec is not None:
                fig = coactivation_figure(spec["coactivation"], title=f"{split} step {step}: co-activation", fast=True)
                image = figure_to_rgb(fig)
                self._logger.experiment.add_image(series(split, "coactivation_heatmap"), image, step, dataformats="HWC")
        self.seconds_spent += time.perf_counter() - start

    def _write_histograms(self, split: str, histograms: Any, step: int) -> None:
        experiment = self._logger.experiment
        for name, hist in histograms.compute().items():
            limits = hist["edges"][1:].tolist()
            for l, counts_B in enumerate(hist["counts"]):
                if int(hist["num"][l]) == 0:
                    continue
                experiment.add_histogram_raw(
                    layer_tag(series(split, f"{name}_hist"), l),
                    min=float(hist["min"][l]),
                    max=float(hist["max"][l]),
                    num=int(hist["num"][l]),
                    sum=float(hist["sum"][l]),
                    sum_squares=float(hist["sum_squares"][l]),
                    bucket_limits=limits,
                    bucket_counts=counts_B.tolist(),
                    global_step=step,
                )

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


_TITLES = {"load": "expert load / mean load", "binned_prob_mi": "binned router-prob. MI (nats)"}


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


def detached(routing: RoutingOutput) -> RoutingOutput:
    """The same routing with every tensor detached from the autograd graph."""
    return RoutingOutput(
        **{
            f.name: (v.detach() if isinstance(v := getattr(routing, f.name), torch.Tensor) else v)
            for f in dataclasses.fields(routing)
        }
    )


def _histograms(pl_module: L.LightningModule) -> Any:
    return RoutingHistograms(pl_module.arch.num_experts)


def custom_scalars_layout(splits: tuple[str, ...] = ("train", "val")) -> dict[str, dict[str, list[Any]]]:
    """TensorBoard custom-scalars layout: category ``moe ({split})``, one multiline chart per live
    metric of :data:`rmoe.metrics.catalog.METRICS` logged for that split, holding every layer (tags
    are regular expressions), and the router gradient norms for training."""
    layout: dict[str, dict[str, list[Any]]] = {}
    for split in splits:
        root = series(split)
        charts = {
            m.name: ["Multiline", [rf"^{root}/{m.name}$" if m.kind == "scalar" else rf"^{root}/{m.name}/"]]
            for m in metrics(flag="live")
            if split in m.splits and m.name != "num_tokens"
        }
        if split == "train":
            for loss in ("lm", "balance"):
                charts[f"router_grad_norm_{loss}"] = ["Multiline", [rf"^{root}/router_grad_norm_{loss}/"]]
            charts["router_grad_norm (total)"] = ["Multiline", [rf"^{root}/router_grad_norm_(lm|balance)/total$"]]
        layout[f"{PREFIX} ({split})"] = charts
    return layout


def hparam_metrics(callback_metrics: Mapping[str, Any], val_scalars: Mapping[str, float]) -> dict[str, float]:
    """The HParams tab's metrics: ``hp/val_loss``, ``hp/val_bpb``, ``hp/val_ppl`` (``hp/train_loss``
    when there was no validation) and ``hp/<metric>`` = layer mean over the last validation of every
    metric declared with ``hparam=True`` in the catalog."""
    out: dict[str, float] = {}
    for tag in ("val/loss", "val/bpb", "val/ppl") if "val/loss" in callback_metrics else ("train/loss",):
        if tag in callback_metrics:
            out[f"hp/{tag.replace('/', '_')}"] = float(callback_metrics[tag])
    for key in (m.name for m in metrics(flag="hparam")):  # read at each call: the catalog is the one list
        value = val_scalars.get(series("val", key, "mean"))
        if value is not None:
            out[f"hp/{key}"] = value
    return out


def run_hparams(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Scalar]:
    """The run's scalar hyperparameters for the HParams tab: the module's (``model.arch.*``,
    ``model.optim.*``, ``model.aux_loss_coef``, ...), the data module's (``data.*``) and a few of
    the trainer's (``trainer.*``)."""
    hparams = dict(pl_module.hparams)
    for name in ("arch", "optim"):  # arguments left at None have live defaults on the module
        if hparams.get(name) is None and getattr(pl_module, name, None) is not None:
            hparams[name] = getattr(pl_module, name)
    params = flatten_hparams(hparams, "model")
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None:
        params.update(flatten_hparams(dict(getattr(datamodule, "hparams", {})), "data"))
    params.update(
        flatten_hparams(
            {
                "max_steps": trainer.max_steps,
                "accumulate_grad_batches": trainer.accumulate_grad_batches,
                "precision": str(trainer.precision),
                "gradient_clip_val": trainer.gradient_clip_val,
                "world_size": trainer.world_size,
            },
            "trainer",
        )
    )
    return params
