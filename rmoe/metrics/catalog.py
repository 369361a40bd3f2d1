"""Every metric, declared once in :data:`METRICS`: its name, shape, how it is accumulated and where it is shown.

:class:`rmoe.metrics.RoutingStats` computes the ``source="routing"`` metrics; :func:`rmoe.metrics.summary_scalars`
and the training callback log them as ``moe/{split}/{name}/layer_{l}`` (``kind="layer"``), ``.../layer_{l}_{l+1}``
(``"pair"``), diagonal / off-diagonal / adjacent means (``"matrix"``) or ``moe/{split}/{name}`` (``"scalar"``).

Adding a routing metric: its function (in :mod:`rmoe.metrics.gates`, ``load`` or ``information``), one
:class:`Metric` here with one of ``per_token`` (a mean over tokens), ``sample`` (a median) or ``from_state``
(read from :data:`STATISTICS`), and its known-answer test.

Shape legend: T tokens, E experts, K chosen experts, L MoE layers, P = L - 1 consecutive pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Literal

import torch

from rmoe.metrics.gates import gate_entropy, router_logit_variance, router_z, sorted_top_scores, top1_expert_ids
from rmoe.metrics.information import (
    binned_log_count_sums,
    binned_mi_from_log_count_sums,
    consecutive_joint_histograms,
    entropy_from_counts,
    mutual_information,
    normalized_mutual_information,
)
from rmoe.metrics.load import (
    load_coefficient_of_variation,
    load_entropy,
    max_violation,
    num_dead_experts,
    tokens_per_expert,
)

if TYPE_CHECKING:
    from rmoe.routers.base import RoutingOutput

Kind = Literal["layer", "pair", "matrix", "scalar"]
Source = Literal["routing", "specialization", "weights", "experts"]


class RoutingBatch:
    """One forward pass's routing (one :class:`RoutingOutput` per MoE layer), with the values several
    metrics share computed once, on first use (fp32, on the routing's device)."""

    def __init__(self, routing: Sequence[RoutingOutput], num_experts: int, top_k: int | None, num_bins: int) -> None:
        self.routing = routing
        self.num_experts = num_experts
        self.top_k = top_k
        self.num_bins = num_bins
        self.num_layers = len(routing)

    @cached_property
    def probs_LTE(self) -> torch.Tensor:
        return torch.stack([r.probs_TE.float() for r in self.routing])

    @cached_property
    def logits_LTE(self) -> torch.Tensor:
        return torch.stack([r.logits_TE.float() for r in self.routing])

    @property
    def num_tokens(self) -> int:
        return self.probs_LTE.shape[1]

    @cached_property
    def load_LE(self) -> torch.Tensor:
        """Kept (token, expert) pairs per expert."""
        return torch.stack([tokens_per_expert(r.expert_ids_TK, self.num_experts, r.keep_TK) for r in self.routing])

    @cached_property
    def active_LT(self) -> torch.Tensor:
        """Experts each token is computed by (its kept pairs), fp32; NaN for a router that mixes tokens into slots
        (Soft MoE: a token is in every slot, no expert computes it alone)."""
        device = self.probs_LTE.device
        rows = []
        for r in self.routing:
            T, K = r.expert_ids_TK.shape
            if r.slot_logits_TN is not None:
                rows.append(torch.full((T,), float("nan"), device=device))
            elif r.keep_TK is None:
                rows.append(torch.full((T,), float(K), device=device))
            else:
                rows.append(r.keep_TK.sum(dim=-1).to(device).float())
        return torch.stack(rows)

    @cached_property
    def top1_LT(self) -> torch.Tensor:
        """Each token's highest-weight kept expert (-1 when all its pairs were dropped)."""
        return torch.stack(
            [top1_expert_ids(r.expert_ids_TK, r.weights_TK, r.probs_TE, r.keep_TK) for r in self.routing]
        )

    @cached_property
    def gate_entropy_LT(self) -> torch.Tensor:
        return gate_entropy(self.probs_LTE)

    @cached_property
    def balances_LT(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inner, outer) balance per token: top-1 / top-2 probability, and the sum of the top-K
        probabilities (K = ``top_k``, or each layer's ``expert_ids_TK.shape[1]``)."""
        probs_LTE = self.probs_LTE
        L, T, E = probs_LTE.shape
        ks = [self.top_k or r.expert_ids_TK.shape[1] for r in self.routing]
        top_LTk = sorted_top_scores(probs_LTE, min(E, max(2, *ks)))
        if E < 2:
            inner_LT = torch.full((L, T), float("nan"), device=probs_LTE.device)
        else:
            inner_LT = top_LTk[..., 0] / top_LTk[..., 1]
        if len(set(ks)) == 1:
            outer_LT = top_LTk[..., : ks[0]].sum(dim=-1)
        else:
            outer_LT = torch.stack([top_LTk[l, :, :k].sum(dim=-1) for l, k in enumerate(ks)])
        return inner_LT, outer_LT


@dataclass(frozen=True)
class Statistic:
    """A count or sum over tokens that :class:`~rmoe.metrics.RoutingStats` keeps (adds up across batches
    and processes). ``shape`` is a string of the letters L, E, P (e.g. ``"LE"``)."""

    name: str
    shape: str
    dtype: torch.dtype
    update: Callable[[RoutingBatch], torch.Tensor]


@dataclass(frozen=True)
class Accumulated:
    """What a metric's ``from_state`` reads: the statistics (CPU), the tokens seen, E."""

    state: Mapping[str, torch.Tensor]
    num_tokens: int
    num_experts: int


@dataclass(frozen=True)
class Metric:
    """One metric (see the module docstring).

    Attributes:
        name: Its key in the summaries and its TensorBoard tag (``moe/{split}/{name}/...``).
        kind: ``layer`` (L,), ``pair`` (L-1,) between layers l and l+1, ``matrix`` (L, L), ``scalar``.
        source: What computes it: ``routing`` (:class:`~rmoe.metrics.RoutingStats`), ``specialization``
            (:class:`~rmoe.metrics.specialization.TokenExpertStats`), ``weights`` (the expert weights,
            training only) or ``experts`` (``rmoe analyze`` only).
        per_token: For a mean over tokens: the (L, T) values; ``finish`` maps the mean (L,) float64.
        sample: For medians: the (L, T) per-token values kept in the reservoir sample.
        hparam: In the HParams tab (``hp/{name}``, layer mean of the last validation).
        report: A column of ``rmoe report``; summary: of :func:`rmoe.analyze.summary_rows`.
        live: Logged by the training callback (False: ``rmoe analyze`` only), for ``splits``.
    """

    name: str
    kind: Kind
    description: str
    source: Source = "routing"
    per_token: Callable[[RoutingBatch], torch.Tensor] | None = None
    finish: Callable[[torch.Tensor], torch.Tensor] | None = None
    sample: Callable[[RoutingBatch], torch.Tensor] | None = None
    from_state: Callable[[Accumulated], torch.Tensor] | None = None
    hparam: bool = False
    report: bool = False
    summary: bool = False
    live: bool = True
    splits: tuple[str, ...] = ("train", "val", "test")

    def __post_init__(self) -> None:
        ways = [self.per_token, self.sample, self.from_state]
        if self.source == "routing" and self.kind != "scalar" and sum(w is not None for w in ways) != 1:
            raise ValueError(f"routing metric {self.name!r}: give exactly one of per_token, sample, from_state")

    @property
    def sum_key(self) -> str:
        """The RoutingStats statistic of a ``per_token`` metric: the float64 sum over tokens per layer."""
        return f"{self.name}_sum_L"


def _bincount_rows(ids_LT: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Per-row histograms of ids in [0, num_bins): (L, num_bins) int64."""
    L = ids_LT.shape[0]
    offset_L1 = torch.arange(L, device=ids_LT.device)[:, None] * num_bins
    return torch.bincount((ids_LT + offset_L1).reshape(-1), minlength=L * num_bins).view(L, num_bins)


def _num_fully_dropped(batch: RoutingBatch) -> torch.Tensor:
    """Per layer, the tokens that chose an expert and have no kept pair (L,) int64."""
    device = batch.probs_LTE.device
    counts = []
    for r in batch.routing:
        if r.keep_TK is None:
            counts.append(torch.zeros((), dtype=torch.int64, device=device))
            continue
        chose_T = torch.ones_like(r.keep_TK[:, 0]) if r.chosen_TK is None else r.chosen_TK.any(dim=-1)
        counts.append((chose_T & ~r.keep_TK.any(dim=-1)).sum().to(device))
    return torch.stack(counts)


def _num_chosen_pairs(batch: RoutingBatch) -> torch.Tensor:
    """Per layer, the (token, expert) pairs the router chose (L,) int64 (dynamic-k routers leave slots unused)."""
    device = batch.probs_LTE.device
    return torch.stack(
        [
            torch.tensor(r.expert_ids_TK.numel(), device=device)
            if r.chosen_TK is None
            else r.chosen_TK.sum().to(device)
            for r in batch.routing
        ]
    )


def _active_histogram(batch: RoutingBatch) -> torch.Tensor:
    """Per layer, tokens computed by 0, 1, ..., E experts: (L, E + 1) int64 (a Soft MoE layer: zeros)."""
    active_LT = batch.active_LT
    counted_L1 = torch.isfinite(active_LT).all(dim=-1, keepdim=True)
    ids_LT = active_LT.nan_to_num(0.0).long().clamp(0, batch.num_experts)
    return _bincount_rows(ids_LT, batch.num_experts + 1) * counted_L1


STATISTICS: tuple[Statistic, ...] = (
    Statistic("tokens_per_expert_LE", "LE", torch.int64, lambda b: b.load_LE),
    Statistic("num_pairs_L", "L", torch.int64, _num_chosen_pairs),
    Statistic("active_counts_LA", "LA", torch.int64, _active_histogram),
    Statistic("num_dropped_tokens_L", "L", torch.int64, _num_fully_dropped),
    Statistic("top1_counts_LE", "LE", torch.int64, lambda b: _bincount_rows(b.top1_LT, b.num_experts)),
    Statistic("top1_joint_PEE", "PEE", torch.int64, lambda b: consecutive_joint_histograms(b.top1_LT, b.num_experts)),
    Statistic("binned_log_count_sum_LL", "LL", torch.float64, lambda b: binned_log_count_sums(b.probs_LTE, b.num_bins)),
)
"""The shared count statistics of :class:`~rmoe.metrics.RoutingStats` (besides ``num_tokens`` and sums)."""


def _active_std(counts_LA: torch.Tensor) -> torch.Tensor:
    """Std of the active-expert counts from their histogram (L, A) -> (L,)."""
    k_A = torch.arange(counts_LA.shape[1], dtype=torch.float64)
    n_L = counts_LA.sum(dim=-1).double().clamp(min=1)
    mean_L = (counts_LA.double() * k_A).sum(dim=-1) / n_L
    var_L = (counts_LA.double() * k_A.pow(2)).sum(dim=-1) / n_L - mean_L.pow(2)
    return var_L.clamp(min=0).sqrt().float()


def _load(a: Accumulated) -> torch.Tensor:
    return a.state["tokens_per_expert_LE"]


METRICS: tuple[Metric, ...] = (
    # load balance (kept pairs per expert)
    Metric(
        "load_cv",
        "layer",
        "coefficient of variation of the expert loads",
        from_state=lambda a: load_coefficient_of_variation(_load(a)),
        hparam=True,
        summary=True,
    ),
    Metric(
        "load_max_vio",
        "layer",
        "MaxVio: (max load - mean load) / mean load",
        from_state=lambda a: max_violation(_load(a)),
        hparam=True,
        report=True,
        summary=True,
    ),
    Metric(
        "num_dead_experts",
        "layer",
        "experts that got no token",
        from_state=lambda a: num_dead_experts(_load(a)),
        hparam=True,
        summary=True,
    ),
    Metric("load_entropy", "layer", "entropy of the load / ln E", from_state=lambda a: load_entropy(_load(a))),
    Metric(
        "drop_ratio",
        "layer",
        "share of the chosen (token, expert) pairs dropped by a capacity",
        from_state=lambda a: (1.0 - _load(a).sum(dim=-1).double() / a.state["num_pairs_L"].double()).float(),
        report=True,
    ),
    Metric(
        "token_drop_ratio",
        "layer",
        "share of tokens with every chosen pair dropped",
        from_state=lambda a: (a.state["num_dropped_tokens_L"].double() / a.num_tokens).float(),
    ),
    # the compute each token gets
    Metric(
        "active_experts_mean",
        "layer",
        "experts that compute each token, mean over tokens (K for top-K without drops)",
        per_token=lambda b: b.active_LT,
        hparam=True,
        report=True,
        summary=True,
    ),
    Metric(
        "active_experts_std",
        "layer",
        "standard deviation over tokens of the experts that compute each token",
        from_state=lambda a: _active_std(a.state["active_counts_LA"]),
    ),
    Metric(
        "expert_flops_per_token",
        "scalar",
        "realised training FLOPs of the routed experts per token of the routing measured, all MoE layers (6 x 3 D F "
        "per computed pair)",
        report=True,
        summary=True,
    ),
    # the gate's probabilities and logits, per token
    Metric(
        "gate_entropy_mean",
        "layer",
        "mean entropy of the router probabilities (nats)",
        per_token=lambda b: b.gate_entropy_LT,
        hparam=True,
        report=True,
        summary=True,
    ),
    Metric(
        "gate_entropy_median",
        "layer",
        "median entropy of the router probabilities (nats)",
        sample=lambda b: b.gate_entropy_LT,
    ),
    Metric("inner_balance_median", "layer", "median top-1 / top-2 probability", sample=lambda b: b.balances_LT[0]),
    Metric("outer_balance_median", "layer", "median sum of the top-K probabilities", sample=lambda b: b.balances_LT[1]),
    Metric(
        "router_z_mean",
        "layer",
        "mean logsumexp of the logits (the ST-MoE z-loss squares it)",
        per_token=lambda b: router_z(b.logits_LTE),
    ),
    Metric(
        "router_logit_std",
        "layer",
        "RMS over tokens of each token's logit std over experts (the scale the softmax sees)",
        per_token=lambda b: router_logit_variance(b.logits_LTE.flatten(0, 1)).view(b.num_layers, b.num_tokens),
        finish=lambda mean_L: mean_L.sqrt(),
        hparam=True,
        report=True,
    ),
    # across layers
    Metric(
        "top1_entropy",
        "layer",
        "entropy of the top-1 expert histogram (nats)",
        from_state=lambda a: entropy_from_counts(a.state["top1_counts_LE"]).float(),
    ),
    Metric(
        "top1_mi",
        "pair",
        "mutual information of the top-1 experts of layers l and l+1 (nats)",
        from_state=lambda a: mutual_information(a.state["top1_joint_PEE"]).float(),
        hparam=True,
        report=True,
        summary=True,
    ),
    Metric(
        "top1_nmi",
        "pair",
        "normalised mutual information of the top-1 experts of layers l and l+1",
        from_state=lambda a: normalized_mutual_information(a.state["top1_joint_PEE"]).float(),
        hparam=True,
        summary=True,
    ),
    Metric(
        "binned_prob_mi",
        "matrix",
        "MI of the binned router probabilities of every pair of layers (RMoE App. A.4.2, nats)",
        from_state=lambda a: binned_mi_from_log_count_sums(
            a.state["binned_log_count_sum_LL"], a.num_tokens, a.num_experts
        ).float(),
        summary=True,
    ),
    Metric("num_paths", "scalar", "distinct top-1 expert paths through the layers"),
    Metric("path_entropy", "scalar", "entropy of the expert paths (nats)", summary=True),
    Metric("num_tokens", "scalar", "tokens the metrics cover"),
    # computed elsewhere, declared here so that tags, layouts and tables derive from one list
    Metric(
        "vocab_specialization",
        "layer",
        "OLMoE's vocabulary specialisation (arXiv 2409.02060)",
        source="specialization",
        summary=True,
    ),
    Metric(
        "active_experts_frequent",
        "layer",
        "experts computing a token, mean over the most frequent ids' quarter of the tokens",
        source="specialization",
        summary=True,
    ),
    Metric(
        "active_experts_rare",
        "layer",
        "experts computing a token, mean over the rarest ids' quarter of the tokens",
        source="specialization",
        summary=True,
    ),
    Metric(
        "coactivation_max",
        "layer",
        "OLMoE's largest off-diagonal co-activation N(i,j)/N(i)",
        source="specialization",
        summary=True,
    ),
    Metric(
        "expert_similarity",
        "layer",
        "mean pairwise cosine similarity of the experts' weights (RMoE App. A.4.3)",
        source="weights",
        summary=True,
        splits=("train",),
    ),
    Metric(
        "score_norm_top1_agreement",
        "layer",
        "Closer Look: how often the top-scored expert has the largest output norm",
        source="experts",
        summary=True,
        live=False,
    ),
    Metric(
        "expert_output_similarity_mean",
        "layer",
        "Closer Look: mean off-diagonal similarity of the experts' outputs",
        source="experts",
        summary=True,
        live=False,
    ),
    Metric(
        "neuron_similarity_reordered_mean",
        "layer",
        "Closer Look: neuron-level expert similarity after Hungarian reordering",
        source="experts",
        summary=True,
        live=False,
    ),
    Metric(
        "neuron_kendall_tau_mean",
        "layer",
        "Closer Look: Kendall's tau of the neuron similarities",
        source="experts",
        summary=True,
        live=False,
    ),
    Metric(
        "gate_embedding_r2",
        "layer",
        "Closer Look: R^2 of the gate-embedding similarity against the neuron similarity",
        source="experts",
        summary=True,
        live=False,
    ),
)
"""Every metric, in the order of the summaries, logs and tables."""


def metrics(*, source: Source | None = None, kind: Kind | None = None, flag: str | None = None) -> tuple[Metric, ...]:
    """The declared metrics with that ``source``, ``kind`` and boolean attribute ``flag`` set."""
    return tuple(
        m
        for m in METRICS
        if (source is None or m.source == source)
        and (kind is None or m.kind == kind)
        and (flag is None or getattr(m, flag))
    )


def metric(name: str) -> Metric:
    """The declaration of ``name`` (KeyError naming the known metrics otherwise)."""
    for m in METRICS:
        if m.name == name:
            return m
    raise KeyError(f"no routing metric {name!r}; declared: {', '.join(m.name for m in METRICS)}")


def markdown_table() -> str:
    """The catalog as a markdown table (the README's copy is checked against it by the tests)."""
    flags = (("hparam", "HParams"), ("report", "`rmoe report`"), ("summary", "analyze table"))
    rows = ["| metric | kind | computed by | shown in | what it is |", "|---|---|---|---|---|"]
    for m in METRICS:
        shown = ["TensorBoard" if m.live else "`rmoe analyze`", *(label for f, label in flags if getattr(m, f))]
        rows.append(f"| `{m.name}` | {m.kind} | {m.source} | {', '.join(shown)} | {m.description} |")
    return "\n".join(rows) + "\n"


def _check_unique() -> None:
    names = [m.name for m in METRICS]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"metrics declared twice: {duplicates}")


_check_unique()
