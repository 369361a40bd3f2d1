"""Routing analysis of a trained checkpoint (the ``rmoe analyze`` command) and its figures.

``rmoe analyze --ckpt runs/base/version_0/checkpoints/last.ckpt --split val --out analysis/base``
runs the checkpoint's model over (part of) a data split and writes ``metrics.json`` (every routing
metric of :class:`rmoe.metrics.RoutingStats`, per layer, matrices as nested lists, plus the loss
and bits per byte of the split, expert similarity and per-layer histograms) and PNG figures: the
cross-layer binned-probability MI heat map and the gate-entropy densities per layer of the RMoE
paper's analysis (Qiu et al., "Layerwise Recurrent Router for Mixture-of-Experts", arXiv
2408.06793, Sec. 5 and App. A.4), the layer x expert load heat map and the expert similarity per
layer (App. A.4.3); and what the experts do (:mod:`rmoe.expert_analysis`): OLMoE's vocabulary
specialisation, co-activation and router saturation across the run's checkpoints (arXiv
2409.02060), and the analyses of "A Closer Look into Mixture-of-Experts" (arXiv 2406.18219).

The figure functions take the ``metrics.json`` dict (or its tensors) and return matplotlib
``Figure`` objects (no pyplot state, so they are safe in callbacks and scripts); ``compare_*``
put several runs side by side, as ``notebooks/routing_analysis.ipynb`` does.

Shape legend: T tokens, E experts, L MoE layers, B histogram bins.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from rmoe.runs import read_json, run_dir_of_checkpoint, to_jsonable, write_json
from rmoe.errors import RmoeError, ToolArgumentParser
from rmoe.expert_analysis import (
    DEFAULT_MAX_EXPERT_TOKENS,
    EXPERT_FIGURES,
    ExpertOutputStats,
    expert_figure,
    routed_expert_ids,
    router_saturation_between,
    weight_analyses,
)
from rmoe.metrics import RoutingStats, expert_similarity_per_layer, gate_entropy
from rmoe.metrics.specialization import TokenExpertStats

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from rmoe.model.decoder import MoeLM
    from rmoe.routers.base import RoutingOutput

LN2 = math.log(2.0)
SPLITS = ("train", "val", "test")
DEFAULT_MAX_BATCHES = 20
NUM_HIST_BINS = 50
HISTOGRAMS = ("router_probs", "gate_entropy")
FIGURES = ("binned_prob_mi", "load", "gate_entropy", "expert_similarity")
_SAMPLE_KEYS = ("gate_entropy_sample", "inner_balance_sample", "outer_balance_sample")


# ----------------------------------------------------------------------------------------------
# Exact per-layer histograms (mergeable across processes)
# ----------------------------------------------------------------------------------------------


class RoutingHistograms:
    """Exact per-layer histograms of the router probabilities and of the gate entropy over a stream.

    Router probabilities: all T x E entries of ``probs_TE`` of a layer, B equal bins over [0, 1].
    Gate entropy: one value per token (:func:`rmoe.metrics.gate_entropy`, nats), B bins over
    [0, ln E]. Besides the counts it keeps what TensorBoard's raw histogram needs (count, sum, sum
    of squares, min, max per layer). Everything adds up across processes (:meth:`all_reduce`).

    Args:
        num_experts: E.
        num_bins: B.
    """

    def __init__(self, num_experts: int, num_bins: int = NUM_HIST_BINS) -> None:
        self.num_experts = num_experts
        self.num_bins = num_bins
        self.edges = {
            "router_probs": torch.linspace(0.0, 1.0, num_bins + 1, dtype=torch.float64),
            "gate_entropy": torch.linspace(0.0, max(math.log(max(num_experts, 1)), 1e-6), num_bins + 1).double(),
        }
        self.reset()

    def reset(self) -> None:
        """Forget everything."""
        self.num_layers: int | None = None
        self._state: dict[str, dict[str, torch.Tensor]] = {}

    def _init_state(self, num_layers: int, device: torch.device) -> None:
        L, B = num_layers, self.num_bins
        self.num_layers = L
        f64 = {"dtype": torch.float64, "device": device}
        self._state = {
            name: {
                "counts_LB": torch.zeros(L, B, dtype=torch.int64, device=device),
                "sum_L": torch.zeros(L, **f64),
                "sum_squares_L": torch.zeros(L, **f64),
                "min_L": torch.full((L,), math.inf, **f64),
                "max_L": torch.full((L,), -math.inf, **f64),
            }
            for name in HISTOGRAMS
        }

    @torch.no_grad()
    def update(self, routing: Sequence[RoutingOutput]) -> RoutingHistograms:
        """Add one forward pass's routing (one :class:`RoutingOutput` per MoE layer); returns self."""
        if not routing:
            return self
        probs_LTE = torch.stack([r.probs_TE.detach().float() for r in routing])
        if self.num_layers is None:
            self._init_state(len(routing), probs_LTE.device)
        elif self.num_layers != len(routing):
            raise ValueError(f"RoutingHistograms got {len(routing)} MoE layers after {self.num_layers}")
        self._add("router_probs", probs_LTE.flatten(1))
        self._add("gate_entropy", gate_entropy(probs_LTE))
        return self

    def _add(self, name: str, values_LN: torch.Tensor) -> None:
        s, edges = self._state[name], self.edges[name]
        L, B = values_LN.shape[0], self.num_bins
        lo, hi = float(edges[0]), float(edges[-1])
        bins_LN = ((values_LN - lo) * (B / (hi - lo))).floor().long().clamp_(0, B - 1)
        bins_LN += torch.arange(L, device=bins_LN.device)[:, None] * B
        s["counts_LB"] += torch.bincount(bins_LN.flatten(), minlength=L * B).view(L, B).to(s["counts_LB"].device)
        values_LN = values_LN.double()
        s["sum_L"] += values_LN.sum(dim=1).to(s["sum_L"].device)
        s["sum_squares_L"] += values_LN.square().sum(dim=1).to(s["sum_L"].device)
        torch.minimum(s["min_L"], values_LN.amin(dim=1).to(s["min_L"].device), out=s["min_L"])
        torch.maximum(s["max_L"], values_LN.amax(dim=1).to(s["max_L"].device), out=s["max_L"])

    def all_reduce(self) -> None:
        """Sum (counts, sums) / min / max every tensor across processes, in place (no-op when
        ``torch.distributed`` is not initialised). Every process must have seen at least one batch."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        for state in self._state.values():
            for key, tensor in state.items():
                op = {"min_L": dist.ReduceOp.MIN, "max_L": dist.ReduceOp.MAX}.get(key, dist.ReduceOp.SUM)
                dist.all_reduce(tensor, op=op)

    def compute(self) -> dict[str, dict[str, Any]]:
        """``{name: {"edges": (B+1,), "counts": (L, B), "num", "sum", "sum_squares", "min", "max": (L,)}}``
        as CPU tensors, for ``name`` in ``router_probs``, ``gate_entropy``; {} before any update."""
        out: dict[str, dict[str, Any]] = {}
        for name, s in self._state.items():
            counts_LB = s["counts_LB"].cpu()
            out[name] = {
                "edges": self.edges[name].clone(),
                "counts": counts_LB,
                "num": counts_LB.sum(dim=1),
                "sum": s["sum_L"].cpu(),
                "sum_squares": s["sum_squares_L"].cpu(),
                "min": s["min_L"].cpu(),
                "max": s["max_L"].cpu(),
            }
        return out


def all_reduce_stats(stats: RoutingStats) -> RoutingStats:
    """Combine every process's :class:`RoutingStats` (SUM all-reduce of its count tensors, gather of
    path counts and samples); returns the combined stats on every process (rank 0's is complete).
    A no-op without an initialised ``torch.distributed`` process group of more than one process.
    Every process must have updated its stats at least once."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return stats
    for tensor in stats.state_tensors().values():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    gathered: list[RoutingStats | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, stats)
    if dist.get_rank() == 0:
        for rank, other in enumerate(gathered):
            if rank != 0 and other is not None:
                stats.merge(other, reducible=False)
    return stats


# ----------------------------------------------------------------------------------------------
# Evaluating a model
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_routing(
    model: MoeLM,
    batches: Iterable[torch.Tensor],
    *,
    max_batches: int | None = DEFAULT_MAX_BATCHES,
    device: str | torch.device = "cpu",
    max_samples: int | None = 65536,
    expert_analyses: bool = True,
    max_expert_tokens: int = DEFAULT_MAX_EXPERT_TOKENS,
    reorder_neurons: bool = True,
) -> dict[str, Any]:
    """Run a model over token blocks and gather its loss and every routing metric.

    Args:
        model: The model (``MoeLMModule.model``), put in eval mode here.
        batches: Batches of token blocks (B, S+1) (inputs ``[:, :-1]``, targets ``[:, 1:]``).
        max_batches: Stop after this many batches (None: all).
        device: Where to run.
        max_samples: Reservoir size of the per-token medians (:class:`RoutingStats`).
        expert_analyses: Also OLMoE's specialisation and co-activation
            (:class:`~rmoe.metrics.specialization.TokenExpertStats`) and the "Closer Look" analyses
            (:class:`~rmoe.expert_analysis.ExpertOutputStats` on the first ``max_expert_tokens``
            tokens, :func:`~rmoe.expert_analysis.weight_analyses`).
        max_expert_tokens: Tokens on which all E experts are run.
        reorder_neurons: Include the Hungarian-reordered neuron similarity (E(E-1)/2 x 3
            assignment problems of size F per layer).

    Returns:
        ``loss`` (token-weighted mean cross entropy, nats), ``num_batches``, ``num_eval_tokens``;
        for MoE models also every key of :meth:`RoutingStats.compute` except the token samples,
        ``expert_similarity`` (L,) and ``histograms`` (see :meth:`RoutingHistograms.compute`),
        ``top_k``, and with ``expert_analyses`` the keys of :meth:`TokenExpertStats.compute`
        (without the raw counts), :meth:`ExpertOutputStats.compute` and :func:`weight_analyses`.
        Tensors stay tensors (see :func:`rmoe.runs.to_jsonable`).
    """
    model.eval().to(device)
    config = model.config
    stats = RoutingStats(config.num_experts, top_k=config.top_k, max_samples=max_samples)
    histograms = RoutingHistograms(config.num_experts)
    token_stats = TokenExpertStats(config.vocab_size, config.num_experts)
    expert_outputs = ExpertOutputStats(model, max_expert_tokens) if expert_analyses and config.moe_layers else None
    loss_sum, num_tokens, num_batches = 0.0, 0, 0
    with expert_outputs or contextlib.nullcontext():
        for batch in batches:
            if max_batches is not None and num_batches >= max_batches:
                break
            batch = batch.to(device)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            out = model(inputs)
            loss = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
            loss_sum += float(loss)
            num_tokens += targets.numel()
            num_batches += 1
            stats.update(out.routing)
            histograms.update(out.routing)
            if expert_analyses:
                token_stats.update(inputs, out.routing)
    if num_batches == 0:
        raise RmoeError("the split gave no batch to analyse (is it empty, or --max-batches 0?).")
    metrics: dict[str, Any] = {
        "loss": loss_sum / num_tokens,
        "num_batches": num_batches,
        "num_eval_tokens": num_tokens,
    }
    if stats.num_layers is not None:
        summary = stats.compute()
        metrics.update({k: v for k, v in summary.items() if k not in _SAMPLE_KEYS})
        metrics["expert_similarity"] = expert_similarity_per_layer(model)
        metrics["histograms"] = histograms.compute()
        metrics["top_k"] = config.top_k
        if expert_analyses:
            tokens = token_stats.compute()
            metrics.update({k: v for k, v in tokens.items() if k not in ("token_expert_counts", "token_occurrences")})
            metrics.update(expert_outputs.compute())
            metrics.update(weight_analyses(model, reorder=reorder_neurons))
    return metrics


def analyze_checkpoint(
    ckpt: str | os.PathLike[str],
    *,
    config: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    split: str = "val",
    max_batches: int | None = DEFAULT_MAX_BATCHES,
    device: str = "cpu",
    data_overrides: Mapping[str, Any] | None = None,
    expert_analyses: bool = True,
    saturation: bool | Sequence[str | os.PathLike[str]] = True,
) -> dict[str, Any]:
    """Load a checkpoint written by ``rmoe fit``, rebuild its data and analyse its routing on a split.

    Args:
        ckpt: A Lightning checkpoint of :class:`~rmoe.training.module.MoeLMModule`.
        config: YAML config file(s) whose ``data:`` sections (merged in order) build the
            :class:`~rmoe.data.TextDataModule`. Default: the run's ``config.yaml``
            (``<run>/config.yaml`` for ``<run>/checkpoints/x.ckpt``), else the data settings
            saved in the checkpoint.
        split: ``train`` (shuffled blocks, as in training), ``val`` or ``test``.
        max_batches: Batches of the split to use (None: all).
        device: Where to run the model (``cpu``, ``cuda``, ...).
        data_overrides: ``TextDataModule`` arguments replacing the config's (e.g. ``cache_dir``).
        expert_analyses: See :func:`evaluate_routing`; also labels the most specialised token ids.
        saturation: OLMoE's router saturation of other checkpoints against this one, on the first
            :data:`SATURATION_BATCHES` batches: True = the run's other ``*.ckpt`` (one per global
            step, this one's step excluded), or a list of checkpoint files; False: none.

    Returns:
        :func:`evaluate_routing`'s metrics plus ``ppl``, ``bpb`` (bits per UTF-8 byte of the
        split's text), ``split``, ``checkpoint``, ``global_step``, ``router`` and ``hparams``
        (the flattened, scalar hyperparameters of the model and data); with ``saturation`` and
        another checkpoint, ``router_saturation``: ``{"steps": [C], "final_step", "checkpoints",
        "saturation": (C, L)}`` in step order.

    Raises:
        RmoeError: Missing or unreadable checkpoint or config, unknown split, bad data settings.
    """
    from rmoe.training.analytics import flatten_hparams
    from rmoe.training.module import MoeLMModule

    if split not in SPLITS:
        raise RmoeError(f"--split={split!r} is not a split; expected one of: {', '.join(SPLITS)}.")
    if max_batches is not None and max_batches < 1:
        raise RmoeError(f"--max-batches={max_batches} must be a positive integer.")
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise RmoeError(f"--ckpt {ckpt}: no such checkpoint file.")
    try:
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
        module = MoeLMModule.load_from_checkpoint(ckpt, map_location="cpu")
    except Exception as err:  # corrupt file, not a Lightning checkpoint, not an MoeLMModule
        raise RmoeError(f"--ckpt {ckpt} is not a readable rmoe checkpoint: {type(err).__name__}: {err}") from None
    datamodule, data = split_datamodule(ckpt, checkpoint, split, module.arch.vocab_size, config, data_overrides)
    loader = getattr(datamodule, f"{split}_dataloader")()
    metrics = evaluate_routing(
        module.model, loader, max_batches=max_batches, device=device, expert_analyses=expert_analyses
    )
    if expert_analyses and "top_specialized" in metrics:
        from rmoe.inspection import token_pieces

        for pairs in metrics["top_specialized"]:
            for pair in pairs:
                pair["label"] = token_pieces(datamodule.tokenizer, [pair["token_id"]])[0].label
    global_step = int(checkpoint.get("global_step", -1))
    others = _saturation_checkpoints(ckpt, global_step, saturation)
    if others and module.arch.moe_layers:
        limit = SATURATION_BATCHES if max_batches is None else min(max_batches, SATURATION_BATCHES)
        batches = [b for _, b in zip(range(limit), getattr(datamodule, f"{split}_dataloader")())]
        metrics["router_saturation"] = _saturation(module, others, batches, device)
        metrics["router_saturation"]["final_step"] = global_step
    metrics["ppl"] = math.exp(min(metrics["loss"], 50.0))
    metrics["bpb"] = metrics["loss"] / LN2 / datamodule.bytes_per_token(split)
    hparams = flatten_hparams(module.hparams, prefix="model")
    hparams.update(flatten_hparams(data, prefix="data"))
    return {
        "checkpoint": str(ckpt.resolve()),
        "split": split,
        "global_step": global_step,
        "router": module.arch.router,
        "hparams": hparams,
        **metrics,
    }


SATURATION_BATCHES = 4
"""Batches of the split on which router saturation compares checkpoints (at most)."""


def _saturation_checkpoints(
    ckpt: Path, global_step: int, saturation: bool | Sequence[str | os.PathLike[str]]
) -> list[tuple[int, Path]]:
    """``[(global_step, path)]`` of the checkpoints to compare with ``ckpt``, in step order."""
    if saturation is False:
        return []
    paths = sorted(ckpt.parent.glob("*.ckpt")) if saturation is True else [Path(p) for p in saturation]
    by_step: dict[int, Path] = {}
    for path in paths:
        if not path.is_file():
            raise RmoeError(f"--saturation-ckpt {path}: no such checkpoint file.")
        if path.resolve() == ckpt.resolve():
            continue
        try:
            step = int(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step", -1))
        except Exception as err:
            raise RmoeError(f"{path} is not a readable rmoe checkpoint: {type(err).__name__}: {err}") from None
        if step != global_step:
            by_step.setdefault(step, path)
    return sorted(by_step.items())


def _saturation(
    module: Any, others: list[tuple[int, Path]], batches: list[torch.Tensor], device: str
) -> dict[str, Any]:
    """Router saturation of each other checkpoint against ``module`` on the same batches."""
    from rmoe.training.module import MoeLMModule

    final_ids = routed_expert_ids(module.model, batches, device)
    rows, steps, names = [], [], []
    for step, path in others:
        other = MoeLMModule.load_from_checkpoint(path, map_location="cpu")
        if (other.arch.num_experts, other.arch.top_k, other.arch.moe_layers) != (
            module.arch.num_experts,
            module.arch.top_k,
            module.arch.moe_layers,
        ):
            raise RmoeError(f"{path} has another MoE architecture than the analysed checkpoint: no saturation.")
        rows.append(router_saturation_between(routed_expert_ids(other.model, batches, device), final_ids))
        steps.append(step)
        names.append(path.name)
    return {"steps": steps, "checkpoints": names, "saturation": torch.stack(rows)}


def split_datamodule(
    ckpt: Path,
    checkpoint: Mapping[str, Any],
    split: str,
    vocab_size: int,
    config: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    data_overrides: Mapping[str, Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """The checkpoint's :class:`~rmoe.data.TextDataModule`, set up for ``split``, and its arguments.

    Args:
        ckpt: The checkpoint file (its run's ``config.yaml`` is the default data config).
        checkpoint: Its loaded content (for ``datamodule_hyper_parameters``).
        split: ``train``, ``val`` or ``test``.
        vocab_size: The model's vocabulary, which the data's must equal.
        config, data_overrides: As :func:`analyze_checkpoint`'s.

    Raises:
        RmoeError: Unknown split, missing config, settings that do not fit, another vocabulary.
    """
    from rmoe.data import TextDataModule

    if split not in SPLITS:
        raise RmoeError(f"--split={split!r} is not a split; expected one of: {', '.join(SPLITS)}.")
    data = _data_settings(ckpt, checkpoint, config, data_overrides or {})
    try:
        datamodule = TextDataModule(**data)
    except TypeError as err:
        raise RmoeError(f"the data settings do not fit TextDataModule: {err}") from None
    if datamodule.vocab_size != vocab_size:
        raise RmoeError(
            f"the data's vocabulary ({datamodule.vocab_size} ids) differs from the checkpoint's model "
            f"({vocab_size}); pass the run's own config with --config."
        )
    datamodule.setup({"train": "fit", "val": "validate", "test": "test"}[split])
    return datamodule, data


def _data_settings(
    ckpt: Path,
    checkpoint: Mapping[str, Any],
    config: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None,
    overrides: Mapping[str, Any],
) -> dict[str, Any]:
    """The ``TextDataModule`` arguments: config files' ``data:`` sections, else the run's
    ``config.yaml``, else the checkpoint's ``datamodule_hyper_parameters``; then ``overrides``."""
    if isinstance(config, (str, os.PathLike)):
        config = [config]
    data: dict[str, Any] = {}
    if not config:
        default = run_dir_of_checkpoint(ckpt) / "config.yaml"
        if default.is_file():
            config = [default]
        elif checkpoint.get("datamodule_hyper_parameters"):
            data = dict(checkpoint["datamodule_hyper_parameters"])
        else:
            raise RmoeError(f"no {default} and no data settings in {ckpt}; pass the run's config with --config.")
    for path in config or []:
        path = Path(path)
        if not path.is_file():
            raise RmoeError(f"--config {path}: no such file.")
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise RmoeError(f"--config {path} is not valid YAML: {err}") from None
        section = doc.get("data") if isinstance(doc, dict) else None
        if section is None:
            continue
        if not isinstance(section, dict):
            raise RmoeError(f"--config {path}: `data:` must be a mapping of TextDataModule arguments.")
        data.update(section.get("init_args", section))
    if not data:
        raise RmoeError(f"no `data:` section in {', '.join(str(c) for c in config or [])}.")
    data = {k: v for k, v in data.items() if not k.startswith("_") and k != "class_path"}
    data.update(overrides)
    return data


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------


def _array(value: Any) -> np.ndarray:
    """A tensor or nested list (JSON: None for NaN) as a float numpy array."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().double().numpy()
    return np.array([[np.nan if v is None else v for v in row] for row in value] if _is_2d(value) else value, float)


def _is_2d(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and isinstance(value[0], (list, tuple))


def _figure(num_panels: int, panel_size: tuple[float, float], fast: bool = False) -> tuple[Figure, list[Axes]]:
    """A row of panels; ``fast`` skips the constrained layout (its text measuring is most of the
    drawing time) for fixed margins, at a lower resolution."""
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
    """Render a figure to an (H, W, 3) uint8 array (Agg, no pyplot), e.g. for ``SummaryWriter.add_image``."""
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
    """A heat map with a colour bar, values written in the cells when it is small enough to read.

    ``vcenter`` centres a diverging colour map on that value (e.g. 1 = balanced load).
    """
    from matplotlib.colors import Normalize, TwoSlopeNorm

    m = _array(matrix)
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
    load_LE = _array(tokens_per_expert)
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
    edges, counts_LB = _array(hist["edges"]), np.atleast_2d(_array(hist["counts"]))
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
    """One run's figure: ``kind`` in :data:`FIGURES` (``binned_prob_mi``, ``load``, ``gate_entropy``,
    ``expert_similarity``), from a metrics dict (:func:`analyze_checkpoint`, ``metrics.json``,
    or :meth:`RoutingStats.compute` for the first two). ``fast``: fixed margins and 80 dpi, about
    twice as quick to draw (what the training callback uses)."""
    if kind == "expert_similarity":
        return compare_expert_similarity({title or "model": metrics})
    L = int(metrics.get("num_layers") or len(_array(metrics["binned_prob_mi"])))
    E = int(metrics.get("num_experts") or _array(metrics["tokens_per_expert"]).shape[1])
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
    """Several runs' figures side by side (one panel per run, common colour scale for heat maps).

    Args:
        kind: One of :data:`FIGURES`.
        metrics_by_run: Run label -> metrics dict (e.g. ``metrics.json`` of ``rmoe analyze``).
    """
    if kind == "expert_similarity":
        return compare_expert_similarity(metrics_by_run)
    runs = list(metrics_by_run.items())
    if kind == "binned_prob_mi":
        vmax = max(float(np.nanmax(_array(m["binned_prob_mi"]))) for _, m in runs)
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
    width = 0.8 / max(len(metrics_by_run), 1)
    num_layers = 0
    for i, (label, m) in enumerate(metrics_by_run.items()):
        sims = _array(m["expert_similarity"])
        num_layers = max(num_layers, len(sims))
        ax.bar(np.arange(len(sims)) + (i - (len(metrics_by_run) - 1) / 2) * width, sims, width, label=label)
    ax.set_xticks(range(num_layers))
    ax.set(title="expert similarity (mean cosine)", xlabel="MoE layer", ylabel="similarity")
    ax.legend(fontsize=7)
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


SUMMARY_COLUMNS = (
    "loss",
    "bpb",
    "gate_entropy_mean",
    "load_max_vio",
    "load_cv",
    "num_dead_experts",
    "top1_mi",
    "top1_nmi",
    "binned_prob_mi_offdiag",
    "path_entropy",
    "expert_similarity",
    "vocab_specialization",
    "coactivation_max",
    "score_norm_top1_agreement",
    "expert_output_similarity_mean",
    "neuron_similarity_reordered_mean",
    "neuron_kendall_tau_mean",
    "gate_embedding_r2",
)
"""Columns of :func:`summary_rows`: per-layer metrics are averaged over layers (pairs for MI; the
three expert matrices too for the neuron-level and gate-embedding columns)."""


def summary_rows(metrics_by_run: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per run for a comparison table: ``run``, ``router``, ``step`` and :data:`SUMMARY_COLUMNS`
    (layer means; ``binned_prob_mi_offdiag`` is the mean off-diagonal entry of the MI matrix)."""
    rows = []
    for label, m in metrics_by_run.items():
        row: dict[str, Any] = {"run": label, "router": m.get("router"), "step": m.get("global_step")}
        for key in SUMMARY_COLUMNS:
            if key == "binned_prob_mi_offdiag" and "binned_prob_mi" in m:
                mi = _array(m["binned_prob_mi"])
                off = mi[~np.eye(len(mi), dtype=bool)]
                row[key] = float(np.nanmean(off)) if off.size else float("nan")
            elif key in m:
                values = _array(m[key]) if isinstance(m[key], (list, tuple, torch.Tensor)) else np.array(m[key], float)
                row[key] = float(np.nanmean(values)) if values.size else float("nan")
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# Output and the command
# ----------------------------------------------------------------------------------------------


def write_analysis(metrics: Mapping[str, Any], out: str | os.PathLike[str], *, dpi: int = 110) -> list[Path]:
    """Write ``metrics.json`` and, for MoE models, one PNG per kind of :data:`FIGURES` and of
    :data:`~rmoe.expert_analysis.EXPERT_FIGURES` (those the metrics hold) into ``out``.

    Returns:
        The paths written (``metrics.json`` first).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [write_json(metrics, out / "metrics.json")]
    if "binned_prob_mi" not in metrics:
        return paths
    title = f"{metrics.get('router', '')} ({metrics.get('split', '')})".strip()
    for kind in FIGURES:
        fig = figure(kind, metrics, title=title if kind == "expert_similarity" else "")
        path = out / f"{kind}.png"
        fig.savefig(path, dpi=dpi)
        paths.append(path)
    for kind in EXPERT_FIGURES:  # those the metrics have (e.g. no saturation without other checkpoints)
        fig = expert_figure(kind, metrics, title=title)
        if fig is not None:
            path = out / f"{kind}.png"
            fig.savefig(path, dpi=dpi)
            paths.append(path)
    return paths


def load_metrics(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``metrics.json`` (or the folder holding it) written by ``rmoe analyze``."""
    path = Path(path)
    return read_json(path / "metrics.json" if path.is_dir() else path)


def build_parser() -> argparse.ArgumentParser:
    """The ``rmoe analyze`` argument parser (errors raise :class:`RmoeError`)."""
    parser = ToolArgumentParser(
        prog="rmoe analyze",
        description="Routing analysis of a checkpoint written by `rmoe fit`: metrics.json and PNG figures.",
    )
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint (<run>/checkpoints/*.ckpt).")
    parser.add_argument(
        "--config",
        action="append",
        help="YAML config(s) whose data: section rebuilds the data (default: <run>/config.yaml); repeatable.",
    )
    parser.add_argument("--split", default="val", help=f"one of {', '.join(SPLITS)} (default: val).")
    parser.add_argument(
        "--max-batches", type=int, default=DEFAULT_MAX_BATCHES, help=f"batches to use (default {DEFAULT_MAX_BATCHES})."
    )
    parser.add_argument("--all-batches", action="store_true", help="use the whole split (overrides --max-batches).")
    parser.add_argument("--out", help="output folder (default: <run>/analysis/<ckpt name>-<split>).")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu).")
    parser.add_argument(
        "--no-expert-analyses",
        action="store_true",
        help="skip OLMoE's specialisation/co-activation and the Closer-Look analyses (faster).",
    )
    parser.add_argument(
        "--saturation-ckpt",
        action="append",
        metavar="CKPT",
        help="checkpoint(s) whose router saturation against --ckpt to measure (default: the run's other *.ckpt).",
    )
    parser.add_argument("--no-saturation", action="store_true", help="skip router saturation.")
    parser.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a data setting, e.g. --data cache_dir=/tmp/cache (value parsed as YAML); repeatable.",
    )
    return parser


def main(argv: list[str]) -> None:
    """``rmoe analyze ...``: analyse a checkpoint's routing on a split and write the results.

    Raises:
        RmoeError: For any bad input (the ``rmoe`` entry point prints it and exits with 2).
    """
    args = build_parser().parse_args(argv)
    overrides: dict[str, Any] = {}
    for item in args.data:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RmoeError(f"--data {item!r}: expected KEY=VALUE.")
        overrides[key.strip()] = yaml.safe_load(value)
    out = Path(args.out) if args.out else None
    if out is None:
        out = run_dir_of_checkpoint(args.ckpt) / "analysis" / f"{Path(args.ckpt).stem}-{args.split}"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        metrics = analyze_checkpoint(
            args.ckpt,
            config=args.config,
            split=args.split,
            max_batches=None if args.all_batches else args.max_batches,
            device=args.device,
            data_overrides=overrides,
            expert_analyses=not args.no_expert_analyses,
            saturation=False if args.no_saturation else (args.saturation_ckpt or True),
        )
    paths = write_analysis(metrics, out)
    summary = f"loss {metrics['loss']:.4f}, bpb {metrics['bpb']:.4f} on {metrics['num_eval_tokens']} tokens"
    print(f"rmoe analyze: {args.split} {summary}; wrote {', '.join(p.name for p in paths)} to {out}")


__all__ = [
    "FIGURES",
    "RoutingHistograms",
    "all_reduce_stats",
    "analyze_checkpoint",
    "compare",
    "compare_curves",
    "compare_expert_similarity",
    "compare_scalar",
    "evaluate_routing",
    "figure",
    "figure_to_rgb",
    "load_metrics",
    "main",
    "summary_rows",
    "to_jsonable",
    "write_analysis",
]
