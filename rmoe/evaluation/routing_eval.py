"""A model's loss and every routing metric over a stream of batches (:func:`evaluate_routing`, what ``rmoe
analyze`` computes), with per-layer histograms; the accumulators are shared with the training callback.

Shape legend: T tokens, E experts, L MoE layers, B histogram bins.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from rmoe.errors import RmoeError
from rmoe.evaluation.expert_analyses import DEFAULT_MAX_EXPERT_TOKENS, ExpertOutputStats, weight_analyses
from rmoe.metrics import RoutingStats, expert_similarity_per_layer
from rmoe.metrics.specialization import TokenExpertStats
from rmoe.syncs import all_reduce_, to_host

if TYPE_CHECKING:
    from rmoe.model.decoder import MoeLM
    from rmoe.routers.base import RoutingOutput


DEFAULT_MAX_BATCHES = 20
NUM_HIST_BINS = 50
_SAMPLE_KEYS = ("gate_entropy_sample", "inner_balance_sample", "outer_balance_sample")


def _empty_state(num_layers: int, num_bins: int, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    f64 = {"dtype": torch.float64, "device": device}
    return {
        "counts_LB": torch.zeros(num_layers, num_bins, dtype=torch.int64, device=device),
        "sum_L": torch.zeros(num_layers, **f64),
        "sum_squares_L": torch.zeros(num_layers, **f64),
        "min_L": torch.full((num_layers,), math.inf, **f64),
        "max_L": torch.full((num_layers,), -math.inf, **f64),
    }


def _add(state: dict[str, torch.Tensor], values_LN: torch.Tensor, lo: float, hi: float) -> None:
    """Bin each layer's values (L, N) into ``state`` (B equal bins over [lo, hi], the ends clamped)."""
    L, B = state["counts_LB"].shape
    bins_LN = ((values_LN - lo) * (B / (hi - lo))).floor().long().clamp_(0, B - 1)
    bins_LN += torch.arange(L, device=bins_LN.device)[:, None] * B
    state["counts_LB"] += torch.bincount(bins_LN.flatten(), minlength=L * B).view(L, B).to(state["counts_LB"].device)
    values_LN = values_LN.double().to(state["sum_L"].device)
    state["sum_L"] += values_LN.sum(dim=1)
    state["sum_squares_L"] += values_LN.square().sum(dim=1)
    torch.minimum(state["min_L"], values_LN.amin(dim=1), out=state["min_L"])
    torch.maximum(state["max_L"], values_LN.amax(dim=1), out=state["max_L"])


def _raw_histogram(state: dict[str, torch.Tensor], edges: torch.Tensor) -> dict[str, Any]:
    counts_LB = state["counts_LB"].cpu()
    return {
        "edges": edges.clone(),
        "counts": counts_LB,
        "num": counts_LB.sum(dim=1),
        "sum": state["sum_L"].cpu(),
        "sum_squares": state["sum_squares_L"].cpu(),
        "min": state["min_L"].cpu(),
        "max": state["max_L"].cpu(),
    }


class RoutingHistograms:
    """Per-layer histograms, with what TensorBoard's raw histogram needs (count, sum, sum of squares, min, max).

    Router probabilities: all T x E entries per layer (too many to sample), counted exactly over the
    stream in B bins over [0, 1]. Gate entropy (nats): B bins over [0, ln E], binned at :meth:`compute`
    from the token sample that :class:`~rmoe.metrics.RoutingStats` keeps for the medians.
    """

    def __init__(self, num_experts: int, num_bins: int = NUM_HIST_BINS) -> None:
        self.num_experts = num_experts
        self.num_bins = num_bins
        self._range = {"router_probs": (0.0, 1.0), "gate_entropy": (0.0, max(math.log(max(num_experts, 1)), 1e-6))}
        self.edges = {
            name: torch.linspace(lo, hi, num_bins + 1, dtype=torch.float64) for name, (lo, hi) in self._range.items()
        }
        self.num_layers: int | None = None
        self._probs: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def update(self, routing: Sequence[RoutingOutput]) -> RoutingHistograms:
        """Add one forward pass's router probabilities (one :class:`RoutingOutput` per MoE layer); returns self."""
        if not routing:
            return self
        probs_LTE = torch.stack([r.probs_TE.detach().float() for r in routing])
        if self.num_layers is None:
            self.num_layers = len(routing)
            self._probs = _empty_state(len(routing), self.num_bins, probs_LTE.device)
        elif self.num_layers != len(routing):
            raise ValueError(f"RoutingHistograms got {len(routing)} MoE layers after {self.num_layers}")
        _add(self._probs, probs_LTE.flatten(1), *self._range["router_probs"])
        return self

    def all_reduce(self) -> None:
        """Sum / min / max the tensors across processes in place (no-op without ``torch.distributed``).
        Every process must have seen at least one batch."""
        for key, tensor in self._probs.items():
            all_reduce_([tensor], {"min_L": dist.ReduceOp.MIN, "max_L": dist.ReduceOp.MAX}.get(key))

    def compute(self, summary: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """``{name: {"edges": (B+1,), "counts": (L, B), "num", "sum", "sum_squares", "min", "max": (L,)}}``
        as CPU tensors: ``router_probs`` and ``gate_entropy`` from the same stream's ``summary``."""
        out: dict[str, dict[str, Any]] = {}
        if self._probs:
            out["router_probs"] = _raw_histogram(self._probs, self.edges["router_probs"])
        sample_NL = summary.get("gate_entropy_sample")
        if sample_NL is not None and sample_NL.numel():
            state = _empty_state(sample_NL.shape[1], self.num_bins)
            _add(state, sample_NL.T.float().cpu(), *self._range["gate_entropy"])
            out["gate_entropy"] = _raw_histogram(state, self.edges["gate_entropy"])
        active_LA = summary.get("active_counts")
        if active_LA is not None:
            out["active_experts"] = active_experts_histogram(active_LA)
        return out


def active_experts_histogram(counts_LA: torch.Tensor) -> dict[str, Any]:
    """The raw histogram of the experts computing each token (bins 0, 1, ..., E) from its counts (L, E + 1),
    built from one read of the host counts (python numbers, so nothing here can wait for a device)."""
    rows = counts_LA.cpu().tolist()
    A = len(rows[0]) if rows else 0

    def per_layer(value: Any) -> torch.Tensor:
        return torch.tensor([value(row) for row in rows], dtype=torch.float64)

    seen = [[k for k in range(A) if row[k]] for row in rows]
    return {
        "edges": torch.tensor([k - 0.5 for k in range(A + 1)], dtype=torch.float64),
        "counts": torch.tensor(rows, dtype=torch.float64),
        "num": per_layer(sum),
        "sum": per_layer(lambda row: sum(k * n for k, n in enumerate(row))),
        "sum_squares": per_layer(lambda row: sum(k * k * n for k, n in enumerate(row))),
        "min": torch.tensor([min(ks, default=math.inf) for ks in seen], dtype=torch.float64),
        "max": torch.tensor([max(ks, default=-math.inf) for ks in seen], dtype=torch.float64),
    }


ROUTING_TENSORS = ("logits_TE", "probs_TE", "weights_TK", "expert_ids_TK", "keep_TK", "chosen_TK")
"""The fields of :class:`~rmoe.routers.RoutingOutput` the routing metrics read (not Soft MoE's slot logits)."""


def routing_to_host(
    routing: Sequence[RoutingOutput], extra: Sequence[torch.Tensor] = ()
) -> tuple[list[RoutingOutput], list[torch.Tensor]]:
    """Every MoE layer's routing (:data:`ROUTING_TENSORS` only) and any other tensors, on the host in ONE
    transfer, so the metrics never make the host wait for the device again."""
    from rmoe.routers.base import RoutingOutput

    fields = [[getattr(r, name) for name in ROUTING_TENSORS] for r in routing]
    flat = [t for row in fields for t in row if t is not None]
    host = to_host([*flat, *extra])
    moved, out = iter(host[: len(flat)]), []
    for r, row in zip(routing, fields, strict=True):
        values = {name: (next(moved) if t is not None else None) for name, t in zip(ROUTING_TENSORS, row, strict=True)}
        # slot logits are not moved (T x slots); an empty tensor still says that the router mixes tokens into slots
        slots = None if r.slot_logits_TN is None else torch.empty(0, 0)
        out.append(RoutingOutput(**values, slot_logits_TN=slots))
    return out, host[len(flat) :]


def all_reduce_stats(stats: RoutingStats) -> RoutingStats:
    """Combine every process's :class:`RoutingStats` (all-reduce of its counts, gather of paths and samples)
    and return them (only rank 0's are complete); a no-op for one process. Every process must have updated
    its stats at least once."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return stats
    all_reduce_(list(stats.state_tensors().values()))
    # pickled to the other processes: device tensors would be unpickled onto their devices (torch warns)
    stats.to_host_()
    gathered: list[RoutingStats | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, stats)
    if dist.get_rank() == 0:
        for rank, other in enumerate(gathered):
            if rank != 0 and other is not None:
                stats.merge(other, reducible=False)
    return stats


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
    """Run a model (put in eval mode) over token blocks (B, S+1) and gather its loss and every routing metric.

    Args:
        max_samples: Reservoir size of the per-token medians (:class:`RoutingStats`).
        expert_analyses: Also OLMoE's specialisation and co-activation and the "Closer Look" analyses
            (all E experts run on the first ``max_expert_tokens`` tokens).
        reorder_neurons: Include the Hungarian-reordered neuron similarity (E(E-1)/2 x 3 assignment
            problems of size F per layer).

    Returns:
        ``loss`` (token-weighted mean cross entropy, nats), ``num_batches``, ``num_eval_tokens``; for MoE
        models also the keys of :meth:`RoutingStats.compute` except the token samples, ``expert_similarity``
        (L,), ``histograms``, ``top_k``, and with ``expert_analyses`` those of
        :meth:`TokenExpertStats.compute` (without the raw counts), :meth:`ExpertOutputStats.compute` and
        :func:`weight_analyses`, as tensors.
    """
    model.eval().to(device)
    config = model.config
    stats = RoutingStats.for_model(config, max_samples=max_samples)
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
    metrics: dict[str, Any] = {"loss": loss_sum / num_tokens, "num_batches": num_batches, "num_eval_tokens": num_tokens}
    if stats.num_layers is not None:
        summary = stats.compute()
        metrics.update({k: v for k, v in summary.items() if k not in _SAMPLE_KEYS})
        metrics["expert_similarity"] = expert_similarity_per_layer(model)
        metrics["histograms"] = histograms.compute(summary)
        metrics["top_k"] = config.top_k
        if expert_analyses:
            tokens = token_stats.compute()
            metrics.update({k: v for k, v in tokens.items() if k not in ("token_expert_counts", "token_occurrences")})
            metrics.update(expert_outputs.compute())
            metrics.update(weight_analyses(model, reorder=reorder_neurons))
    return metrics
