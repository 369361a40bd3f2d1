"""What the routing analytics write to TensorBoard beyond scalars: the custom-scalars layout, raw
histograms, heat-map images and the HParams session.

:class:`~rmoe.training.analytics.RoutingAnalytics` decides when and what to measure; these
functions turn its results into TensorBoard summaries (``writer`` is a
``torch.utils.tensorboard.SummaryWriter``, the ``TensorBoardLogger``'s ``experiment``). Tags come
from :mod:`rmoe.tags`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L

from rmoe.figures import coactivation_figure, figure, figure_to_rgb
from rmoe.metrics.catalog import metrics
from rmoe.runs import flatten_hparams
from rmoe.tags import PREFIX, layer_tag, series

Scalar = bool | int | float | str

_TITLES = {"load": "expert load / mean load", "binned_prob_mi": "binned router-prob. MI (nats)"}


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


def write_histograms(writer: Any, split: str, histograms: Mapping[str, Mapping[str, Any]], step: int) -> None:
    """``moe/{split}/{name}_hist/layer_{l}`` for each histogram of
    :meth:`rmoe.evaluation.routing_eval.RoutingHistograms.compute` (a layer without values is skipped)."""
    for name, hist in histograms.items():
        limits = hist["edges"][1:].tolist()
        for l, counts_B in enumerate(hist["counts"]):
            if int(hist["num"][l]) == 0:
                continue
            writer.add_histogram_raw(
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


def write_heatmaps(writer: Any, split: str, summary: Mapping[str, Any], coactivation: Any | None, step: int) -> None:
    """``moe/{split}/load_heatmap`` and ``binned_prob_mi_heatmap`` from a :meth:`RoutingStats.compute`
    summary, and ``coactivation_heatmap`` (OLMoE's ``N(i, j) / N(i)``, one panel per layer) when given."""
    images = [
        (tag, figure(kind, summary, title=f"{split} step {step}: " + _TITLES[kind], fast=True))
        for kind, tag in (("load", "load_heatmap"), ("binned_prob_mi", "binned_prob_mi_heatmap"))
    ]
    if coactivation is not None:
        title = f"{split} step {step}: co-activation"
        images.append(("coactivation_heatmap", coactivation_figure(coactivation, title=title, fast=True)))
    for tag, fig in images:
        writer.add_image(series(split, tag), figure_to_rgb(fig), step, dataformats="HWC")


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
