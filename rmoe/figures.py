"""Figures of the routing and expert analyses, as matplotlib ``Figure`` objects (no pyplot state, so safe in
callbacks and scripts).

Each takes a metrics dict (``metrics.json`` of ``rmoe analyze``, :meth:`rmoe.metrics.RoutingStats.compute`,
or their tensors) and returns a ``Figure``; ``compare_*`` put several runs side by side. It imports from rmoe
only a constant of :mod:`rmoe.metrics`, so the training callback, ``rmoe analyze`` and notebooks share it.

Routing figures (:data:`FIGURES`): the cross-layer binned-probability MI heat map and the gate-entropy
densities per layer of the RMoE paper (Qiu et al., arXiv 2408.06793, Sec. 5 and App. A.4), the layer x expert
load heat map and the expert similarity per layer (App. A.4.3). Expert figures (:data:`EXPERT_FIGURES`):
OLMoE's co-activation and router saturation (arXiv 2409.02060) and the "Closer Look" analyses
(arXiv 2406.18219).

Shape legend: E experts, L MoE layers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rmoe.metrics.closer_look import MATRICES

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FIGURES = ("binned_prob_mi", "load", "gate_entropy", "expert_similarity")


def as_array(value: Any) -> np.ndarray:
    """A tensor or nested list (JSON: None for NaN) as a float numpy array."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().double().numpy()
    return np.array([[np.nan if v is None else v for v in row] for row in value] if _is_2d(value) else value, float)


def _is_2d(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and isinstance(value[0], (list, tuple))


def _figure(num_panels: int, panel_size: tuple[float, float], fast: bool = False) -> tuple[Figure, list[Axes]]:
    """A row of panels; ``fast``: fixed margins at a lower resolution instead of the constrained layout
    (whose text measuring is most of the drawing time)."""
    from matplotlib.figure import Figure

    size = (panel_size[0] * num_panels, panel_size[1])
    if fast:
        fig = Figure(figsize=size, dpi=80)
        fig.subplots_adjust(left=0.9 / size[0], right=0.98, bottom=0.7 / size[1], top=1 - 0.45 / size[1])
    else:
        fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(1, num_panels, squeeze=False)[0]
    return fig, list(axes)


def figure_to_rgb(fig: Figure) -> np.ndarray:
    """Render a figure to an (H, W, 3) uint8 array (Agg, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def draw_matrix(
    ax: Axes,
    matrix: Any,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    vmin: float | None = None,
    vmax: float | None = None,
    vcenter: float | None = None,
    cmap: str = "viridis",
    fmt: str = "{:.2f}",
) -> None:
    """A heat map with a colour bar, values written in the cells when it is small enough to read;
    ``vcenter`` centres a diverging colour map on that value (e.g. 1 = balanced load)."""
    from matplotlib.colors import Normalize, TwoSlopeNorm

    m = as_array(matrix)
    finite = m[np.isfinite(m)]
    lo = vmin if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    if vcenter is not None:  # at least as far above the centre as below: 0 .. 2 for a balanced load
        lo = min(lo, vcenter - 1e-9)
        norm: Normalize = TwoSlopeNorm(vcenter, lo, max(hi, 2 * vcenter - lo))
    else:
        norm = Normalize(lo, hi if hi > lo else lo + 1e-9)
    image = ax.imshow(m, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    ax.figure.colorbar(image, ax=ax, shrink=0.85)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    rows, cols = m.shape
    if cols <= 32:
        ax.set_xticks(range(cols))
    if rows <= 32:
        ax.set_yticks(range(rows))
    if rows * cols <= 144:
        for (i, j), v in np.ndenumerate(m):
            if np.isfinite(v):
                r, g, b, _ = image.cmap(image.norm(v))
                color = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
                ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7, color=color)


def relative_load(tokens_per_expert: Any) -> np.ndarray:
    """Load of each expert / mean load of its layer (1 = balanced): (L, E)."""
    load_LE = as_array(tokens_per_expert)
    mean_L1 = load_LE.mean(axis=1, keepdims=True)
    return np.divide(load_LE, mean_L1, out=np.full_like(load_LE, np.nan), where=mean_L1 > 0)


def draw_mi(ax: Axes, metrics: Mapping[str, Any], title: str = "", vmax: float | None = None) -> None:
    """The RMoE paper's cross-layer binned-probability MI matrix (App. A.4.2) as a heat map."""
    draw_matrix(
        ax,
        metrics["binned_prob_mi"],
        title=title or "binned router-probability MI (nats)",
        xlabel="MoE layer",
        ylabel="MoE layer",
        vmin=None if vmax is None else 0.0,
        vmax=vmax,
        cmap="magma",
    )


def draw_load(ax: Axes, metrics: Mapping[str, Any], title: str = "", vmax: float | None = None) -> None:
    """Layer x expert load heat map, relative to the layer's mean (1 = balanced)."""
    draw_matrix(
        ax,
        relative_load(metrics["tokens_per_expert"]),
        title=title or "expert load / mean load",
        xlabel="expert",
        ylabel="MoE layer",
        vmin=0.0,
        vmax=vmax,
        vcenter=1.0,
        cmap="coolwarm",
    )


def draw_gate_entropy(ax: Axes, metrics: Mapping[str, Any], title: str = "") -> None:
    """Density of the per-token gate entropy, one line per layer, with ln E (uniform router) marked."""
    hist = metrics["histograms"]["gate_entropy"]
    edges, counts_LB = as_array(hist["edges"]), np.atleast_2d(as_array(hist["counts"]))
    widths = np.diff(edges)
    colors = _layer_colors(counts_LB.shape[0])
    for l, counts_B in enumerate(counts_LB):
        total = counts_B.sum()
        if total > 0:
            ax.stairs(counts_B / (total * widths), edges, color=colors[l], label=f"layer {l}")
    ax.axvline(edges[-1], color="grey", linestyle="--", linewidth=0.8, label="ln E (uniform)")
    ax.set(title=title or "gate entropy per token", xlabel="gate entropy (nats)", ylabel="density")
    ax.legend(fontsize=7)


def draw_curves(
    ax: Axes, series: Mapping[str, tuple[Sequence[int], Sequence[float]]], title: str, ylabel: str = ""
) -> None:
    """Lines over training steps, one per layer (``rmoe.runs.layer_series``'s output)."""
    colors = _layer_colors(len(series))
    for color, (layer, (steps, values)) in zip(colors, series.items()):
        ax.plot(steps, values, color=color, marker="." if len(steps) < 30 else None, label=f"layer {layer}")
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    if series:
        ax.legend(fontsize=7)


def _layer_colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(i / max(n - 1, 1) * 0.9) for i in range(n)]


def figure(kind: str, metrics: Mapping[str, Any], title: str = "", fast: bool = False) -> Figure:
    """One run's figure of :data:`FIGURES` from a metrics dict (:meth:`RoutingStats.compute` suffices for
    ``binned_prob_mi`` and ``load``). ``fast``: fixed margins and 80 dpi, quicker to draw (training callback)."""
    if kind == "expert_similarity":
        return compare_expert_similarity({title or "model": metrics})
    L = int(metrics.get("num_layers") or len(as_array(metrics["binned_prob_mi"])))
    E = int(metrics.get("num_experts") or as_array(metrics["tokens_per_expert"]).shape[1])
    size = {
        "binned_prob_mi": (1.0 * L + 2.5, 0.9 * L + 1.5),
        "load": (0.6 * E + 2.5, 0.45 * L + 1.6),
        "gate_entropy": (5.5, 3.8),
    }
    if kind not in size:
        raise ValueError(f"figure kind {kind!r}; expected one of {FIGURES}")
    fig, (ax,) = _figure(1, tuple(max(v, 3.0) for v in size[kind]), fast=fast)
    {"binned_prob_mi": draw_mi, "load": draw_load, "gate_entropy": draw_gate_entropy}[kind](ax, metrics, title)
    return fig


def compare(kind: str, metrics_by_run: Mapping[str, Mapping[str, Any]]) -> Figure:
    """Several runs' figures of :data:`FIGURES` side by side, one panel per run label (common colour scale
    for heat maps)."""
    if kind == "expert_similarity":
        return compare_expert_similarity(metrics_by_run)
    runs = list(metrics_by_run.items())
    if kind == "binned_prob_mi":
        vmax = max(float(np.nanmax(as_array(m["binned_prob_mi"]))) for _, m in runs)
        fig, axes = _figure(len(runs), (4.2, 3.6))
        for ax, (label, m) in zip(axes, runs):
            draw_mi(ax, m, title=f"{label}: binned-prob. MI", vmax=vmax)
    elif kind == "load":
        vmax = max(float(np.nanmax(relative_load(m["tokens_per_expert"]))) for _, m in runs)
        fig, axes = _figure(len(runs), (4.6, 3.4))
        for ax, (label, m) in zip(axes, runs):
            draw_load(ax, m, title=f"{label}: load / mean", vmax=vmax)
    elif kind == "gate_entropy":
        fig, axes = _figure(len(runs), (4.4, 3.4))
        for ax, (label, m) in zip(axes, runs):
            draw_gate_entropy(ax, m, title=f"{label}: gate entropy")
        for ax in axes[1:]:
            ax.sharey(axes[0])
    else:
        raise ValueError(f"figure kind {kind!r}; expected one of {FIGURES}")
    return fig


def compare_expert_similarity(metrics_by_run: Mapping[str, Mapping[str, Any]]) -> Figure:
    """Expert similarity per layer (RMoE paper, App. A.4.3), grouped bars: one bar per run per layer."""
    fig, (ax,) = _figure(1, (max(4.5, 1.2 * len(metrics_by_run) + 3.0), 3.4))
    sims = {label: m["expert_similarity"] for label, m in metrics_by_run.items()}
    _bars(ax, sims, "expert similarity (mean cosine)", "similarity")
    return fig


def compare_curves(
    series_by_run: Mapping[str, Mapping[str, tuple[Sequence[int], Sequence[float]]]], title: str, ylabel: str = ""
) -> Figure:
    """Per-layer curves over training steps, one panel per run, shared y axis."""
    fig, axes = _figure(max(len(series_by_run), 1), (4.4, 3.2))
    for ax, (label, series) in zip(axes, series_by_run.items()):
        draw_curves(ax, series, f"{label}: {title}", ylabel)
    for ax in axes[1:]:
        ax.sharey(axes[0])
    return fig


def compare_scalar(
    scalars_by_run: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]], tag: str, ylabel: str = ""
) -> Figure:
    """One scalar (e.g. ``val/loss``) over training steps, one line per run (``read_scalars`` output)."""
    fig, (ax,) = _figure(1, (5.5, 3.4))
    for label, scalars in scalars_by_run.items():
        points = scalars.get(tag, [])
        if points:
            ax.plot(
                [p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None, label=label
            )
    ax.set(title=tag, xlabel="step", ylabel=ylabel)
    ax.legend(fontsize=7)
    return fig


EXPERT_FIGURES = (
    "vocab_specialization",
    "coactivation",
    "score_norm_rank",
    "expert_output_similarity",
    "neuron_similarity",
    "router_saturation",
)


def _panels(matrices: list[Any], titles: list[str], *, suptitle: str, fast: bool = False, **draw: Any) -> Figure:
    fig, axes = _figure(len(matrices), (3.6, 3.1), fast=fast)
    for ax, m, title in zip(axes, matrices, titles):
        draw_matrix(ax, m, title=title, **draw)
    fig.suptitle(suptitle, fontsize=10)
    return fig


def coactivation_figure(coactivation_LEE: Any, title: str = "co-activation N(i,j)/N(i)", fast: bool = False) -> Figure:
    """OLMoE's co-activation heat maps, one panel per layer (row i: given expert i, the share of its
    tokens also routed to expert j). ``fast``: as :func:`figure`."""
    m = [as_array(x) for x in coactivation_LEE]
    titles = [f"layer {l}" for l in range(len(m))]
    return _panels(m, titles, suptitle=title, fast=fast, xlabel="expert j", ylabel="expert i", vmin=0.0)


def _bars(ax: Any, values_by_run: Mapping[str, Any], title: str, ylabel: str) -> None:
    width = 0.8 / max(len(values_by_run), 1)
    num_layers = 0
    for i, (label, values) in enumerate(values_by_run.items()):
        v = as_array(values).reshape(-1)
        num_layers = max(num_layers, len(v))
        ax.bar(np.arange(len(v)) + (i - (len(values_by_run) - 1) / 2) * width, v, width, label=label)
    ax.set_xticks(range(num_layers))
    ax.set(title=title, xlabel="MoE layer", ylabel=ylabel)
    ax.legend(fontsize=7)


def expert_figure(kind: str, metrics: Mapping[str, Any], title: str = "") -> Figure | None:
    """One run's figure of :data:`EXPERT_FIGURES` from a metrics dict (``rmoe analyze``); None when
    the metrics lack what it needs (e.g. saturation without intermediate checkpoints)."""
    prefix = f"{title}: " if title else ""
    if kind == "vocab_specialization" and "vocab_specialization" in metrics:
        fig, (ax,) = _figure(1, (5.0, 3.4))
        _bars(ax, {title or "model": metrics["vocab_specialization"]}, "vocabulary specialisation", "share")
        top_k, E = metrics.get("top_k"), metrics.get("num_experts")
        if top_k and E:
            ax.axhline(top_k / E, color="grey", linestyle="--", linewidth=0.8, label="K/E (token-blind)")
            ax.legend(fontsize=7)
        return fig
    if kind == "coactivation" and "coactivation" in metrics:
        return coactivation_figure(metrics["coactivation"], title=f"{prefix}co-activation N(i,j)/N(i)")
    if kind == "score_norm_rank" and "score_norm_rank_counts" in metrics:
        m = [as_array(x) for x in metrics["score_norm_rank_counts"]]
        m = [x / max(x.sum(axis=1, keepdims=True).max(), 1) for x in m]
        titles = [f"layer {l}" for l in range(len(m))]
        return _panels(
            m,
            titles,
            suptitle=f"{prefix}share of tokens: gate-score rank vs output-norm rank (0 = largest)",
            xlabel="output-norm rank",
            ylabel="score rank",
            vmin=0.0,
            cmap="magma",
        )
    if kind == "expert_output_similarity" and "expert_output_similarity" in metrics:
        m = [as_array(x) for x in metrics["expert_output_similarity"]]
        titles = [f"layer {l}" for l in range(len(m))]
        return _panels(
            m, titles, suptitle=f"{prefix}expert output angular similarity", xlabel="expert", ylabel="expert"
        )
    if kind == "neuron_similarity" and "neuron_similarity_avg" in metrics:
        fig, (ax,) = _figure(1, (6.5, 3.6))
        series = {
            "avg " + name: as_array(metrics["neuron_similarity_avg_mean"])[:, m] for m, name in enumerate(MATRICES)
        }
        if "neuron_similarity_reordered_mean" in metrics:
            reordered = as_array(metrics["neuron_similarity_reordered_mean"])
            series.update({"reordered " + name: reordered[:, m] for m, name in enumerate(MATRICES)})
        _bars(ax, series, f"{prefix}expert weight similarity", "mean off-diagonal cosine")
        return fig
    if kind == "router_saturation" and metrics.get("router_saturation"):
        sat = metrics["router_saturation"]
        fig, (ax,) = _figure(1, (5.0, 3.4))
        steps = [*sat["steps"], sat["final_step"]]
        values = as_array(sat["saturation"])
        for l in range(values.shape[1]):
            ax.plot(steps, [*values[:, l], 1.0], marker=".", label=f"layer {l}")
        ax.set(
            title=f"{prefix}router saturation vs final checkpoint",
            xlabel="step",
            ylabel="top-k overlap",
            ylim=(0, 1.05),
        )
        ax.legend(fontsize=7)
        return fig
    return None


def compare_expert_figure(kind: str, metrics_by_run: Mapping[str, Mapping[str, Any]]) -> Figure:
    """Several runs on one of :data:`EXPERT_FIGURES`: per-layer summaries as grouped bars (one bar
    per run), matrices as one row of layer panels per run."""
    from matplotlib.figure import Figure

    summary = {
        "vocab_specialization": ("vocab_specialization", "vocabulary specialisation", "share"),
        "score_norm_rank": ("score_norm_top1_agreement", "top-scored expert has the largest norm", "share"),
        "expert_output_similarity": ("expert_output_similarity_mean", "expert output similarity", "angular sim."),
        "neuron_similarity": ("neuron_similarity_reordered_mean", "reordered neuron similarity (mean of M)", "cosine"),
        "coactivation": ("coactivation_max", "largest co-activation rate", "N(i,j)/N(i)"),
        "router_saturation": (None, "router saturation", ""),
    }
    if kind not in summary:
        raise ValueError(f"figure kind {kind!r}; expected one of {EXPERT_FIGURES}")
    key, title, ylabel = summary[kind]
    if kind == "coactivation":
        runs = [(label, m) for label, m in metrics_by_run.items() if "coactivation" in m]
        num_layers = max((len(m["coactivation"]) for _, m in runs), default=1)
        fig = Figure(figsize=(3.2 * num_layers, 2.9 * max(len(runs), 1)), layout="constrained")
        axes = fig.subplots(max(len(runs), 1), num_layers, squeeze=False)
        for row, (label, m) in zip(axes, runs):
            for l, ax in enumerate(row):
                if l < len(m["coactivation"]):
                    draw_matrix(ax, m["coactivation"][l], title=f"{label}: layer {l}", xlabel="j", ylabel="i", vmin=0.0)
        return fig
    fig, (ax,) = _figure(1, (max(4.5, 1.2 * len(metrics_by_run) + 3.0), 3.4))
    if kind == "router_saturation":
        for label, m in metrics_by_run.items():
            sat = m.get("router_saturation")
            if sat:
                values = as_array(sat["saturation"]).mean(axis=1)
                ax.plot([*sat["steps"], sat["final_step"]], [*values, 1.0], marker=".", label=label)
        ax.set(title="router saturation (layer mean)", xlabel="step", ylabel="top-k overlap with final")
        ax.legend(fontsize=7)
        return fig
    values = {}
    for label, m in metrics_by_run.items():
        if key in m:
            v = as_array(m[key])
            values[label] = v.mean(axis=1) if v.ndim == 2 else v
    _bars(ax, values, title, ylabel)
    return fig
