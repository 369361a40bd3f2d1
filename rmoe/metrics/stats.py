"""All routing metrics of a model at once: :func:`routing_summary` for one forward pass and
:class:`RoutingStats`, which accumulates the same metrics over many batches in bounded memory.

Shape legend: T tokens, E experts, K chosen experts per token, L MoE layers (index l = position
in ``MoeLMOutput.routing``, i.e. the l-th MoE layer in depth order), P = L - 1 consecutive pairs,
N sampled tokens, V per-token values (gate entropy, inner balance, outer balance).

Every definition lives in :mod:`rmoe.metrics.load`, :mod:`rmoe.metrics.gates` and
:mod:`rmoe.metrics.information`; this module only batches and accumulates them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from rmoe.metrics.gates import gate_entropy, router_logit_variance, router_z, sorted_top_scores, top1_expert_ids
from rmoe.metrics.information import (
    NUM_PROB_BINS,
    binned_log_count_sums,
    binned_mi_from_log_count_sums,
    consecutive_joint_histograms,
    entropy_from_counts,
    mutual_information,
    normalized_mutual_information,
    path_keys,
    unique_with_counts,
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

DEFAULT_MAX_SAMPLES = 65536
DEFAULT_MAX_PATHS = 1 << 21
_SAMPLED = ("gate_entropy", "inner_balance", "outer_balance")  # the V per-token values kept in the sample

# Keys of the summary dict, for callers that log it (see summary_scalars).
PER_LAYER_KEYS = (
    "load_cv",
    "load_max_vio",
    "num_dead_experts",
    "load_entropy",
    "drop_ratio",
    "token_drop_ratio",
    "gate_entropy_mean",
    "gate_entropy_median",
    "inner_balance_median",
    "outer_balance_median",
    "router_z_mean",
    "router_logit_std",
    "top1_entropy",
)
PER_PAIR_KEYS = ("top1_mi", "top1_nmi")


class RoutingStats:
    """Streaming accumulator of the routing metrics over batches (bounded memory, mergeable).

    Holds, per MoE layer: expert loads (E ints, kept pairs), the number of routed pairs and of
    fully dropped tokens, the top-1 histogram, sums of gate entropy and router z; per pair of
    consecutive layers the E x E joint histogram of top-1 ids (exact MI from counts); the L x L
    sufficient statistic of the binned-probability MI (a running mean over tokens); the counts
    of each distinct expert path; and a uniform reservoir sample (Vitter's Algorithm R, "Random
    sampling with a reservoir", ACM TOMS 11, 1985) of at most ``max_samples`` tokens' per-layer
    gate entropy, inner balance and outer balance, for medians and histograms.

    Every count and sum is in :meth:`state_tensors` and adds up across processes. Multi-process
    use: ``all_reduce(SUM)`` each tensor of :meth:`state_tensors` in place, then gather the other
    processes' objects (``torch.distributed.all_gather_object``) and fold them in with
    ``merge(other, reducible=False)``, which merges only the path counts and the samples. The
    single-process :meth:`merge` (default) adds everything.

    Exactness: counts-based metrics (loads, CV, MaxVio, dead experts, entropies, drop ratios, top-1
    MI/NMI, paths) equal those of :func:`routing_summary` on the concatenated batches exactly;
    means and the binned MI equal them up to float summation order; medians are exact while the
    number of tokens seen is at most ``max_samples`` (then estimates from the sample). Path
    counts take O(distinct paths) memory, at most ``min(E^L, tokens seen)``; past ``max_paths``
    distinct paths the path metrics stop updating and report the tokens they cover
    (``path_num_tokens``, ``paths_truncated``).

    Args:
        num_experts: E.
        top_k: K of the outer balance; None reads each layer's ``expert_ids_TK.shape[1]``.
        max_samples: Reservoir size; None keeps every token (what :func:`routing_summary` uses).
        max_paths: Cap on the number of distinct paths tracked; None for no cap.
        num_bins: Bins over [0, 1] of the binned-probability MI (the RMoE paper: 100).
        seed: Seed of the reservoir's random numbers (reproducible samples).
    """

    def __init__(
        self,
        num_experts: int,
        *,
        top_k: int | None = None,
        max_samples: int | None = DEFAULT_MAX_SAMPLES,
        max_paths: int | None = DEFAULT_MAX_PATHS,
        num_bins: int = NUM_PROB_BINS,
        seed: int = 0,
    ) -> None:
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples={max_samples} must be >= 1 (or None to keep every token)")
        self.num_experts = num_experts
        self.top_k = top_k
        self.max_samples = max_samples
        self.max_paths = max_paths
        self.num_bins = num_bins
        self.seed = seed
        self.reset()

    def reset(self) -> None:
        """Forget everything (the layer count is learnt again at the next :meth:`update`)."""
        self.num_layers: int | None = None
        self._state: dict[str, torch.Tensor] = {}
        self._sample_NVL: torch.Tensor | None = None
        self._num_offered = 0  # tokens offered to the reservoir
        self._paths = PathCounts(self.max_paths)
        self._generator = torch.Generator().manual_seed(self.seed)

    # ------------------------------------------------------------------------------------------
    # State

    def _init_state(self, num_layers: int, device: torch.device) -> None:
        L, E = num_layers, self.num_experts
        i64 = {"dtype": torch.int64, "device": device}
        f64 = {"dtype": torch.float64, "device": device}
        self.num_layers = L
        self._state = {
            "num_tokens": torch.zeros((), **i64),
            "tokens_per_expert_LE": torch.zeros(L, E, **i64),
            "num_pairs_L": torch.zeros(L, **i64),
            "num_dropped_tokens_L": torch.zeros(L, **i64),
            "top1_counts_LE": torch.zeros(L, E, **i64),
            "top1_joint_PEE": torch.zeros(max(L - 1, 0), E, E, **i64),
            "gate_entropy_sum_L": torch.zeros(L, **f64),
            "router_z_sum_L": torch.zeros(L, **f64),
            "logit_var_sum_L": torch.zeros(L, **f64),
            "binned_log_count_sum_LL": torch.zeros(L, L, **f64),
        }

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The live count and sum tensors (all add up across processes: ``all_reduce`` with SUM in
        place). Empty before the first :meth:`update`."""
        return self._state

    # ------------------------------------------------------------------------------------------
    # Update

    @torch.no_grad()
    def update(self, routing: Sequence[RoutingOutput]) -> RoutingStats:
        """Add one forward pass's routing (one :class:`RoutingOutput` per MoE layer, depth order).

        Nothing for a dense model (empty list). Returns self.
        """
        if not routing:
            return self
        L, E = len(routing), self.num_experts
        probs_LTE = torch.stack([r.probs_TE.float() for r in routing])
        device = probs_LTE.device
        T = probs_LTE.shape[1]
        if self.num_layers is None:
            self._init_state(L, device)
        elif self.num_layers != L:
            raise ValueError(f"RoutingStats got {L} MoE layers after {self.num_layers}")
        s = self._state

        load_LE = torch.stack([tokens_per_expert(r.expert_ids_TK, E, r.keep_TK) for r in routing])
        s["tokens_per_expert_LE"] += load_LE.to(s["tokens_per_expert_LE"].device)
        s["num_pairs_L"] += torch.tensor([r.expert_ids_TK.numel() for r in routing], device=s["num_pairs_L"].device)
        dropped_L = torch.stack([_num_fully_dropped(r) for r in routing])
        s["num_dropped_tokens_L"] += dropped_L.to(s["num_dropped_tokens_L"].device)
        s["num_tokens"] += T

        top1_LT = torch.stack([top1_expert_ids(r.expert_ids_TK, r.weights_TK, r.probs_TE, r.keep_TK) for r in routing])
        s["top1_counts_LE"] += _bincount_rows(top1_LT, E).to(s["top1_counts_LE"].device)
        s["top1_joint_PEE"] += consecutive_joint_histograms(top1_LT, E).to(s["top1_joint_PEE"].device)

        entropy_LT = gate_entropy(probs_LTE)
        logits_LTE = torch.stack([r.logits_TE.float() for r in routing])
        z_LT = router_z(logits_LTE)
        var_LT = router_logit_variance(logits_LTE.flatten(0, 1)).view(L, T)
        s["gate_entropy_sum_L"] += entropy_LT.sum(dim=1, dtype=torch.float64).to(s["gate_entropy_sum_L"].device)
        s["router_z_sum_L"] += z_LT.sum(dim=1, dtype=torch.float64).to(s["router_z_sum_L"].device)
        s["logit_var_sum_L"] += var_LT.sum(dim=1, dtype=torch.float64).to(s["logit_var_sum_L"].device)
        sums_LL = binned_log_count_sums(probs_LTE, self.num_bins)
        s["binned_log_count_sum_LL"] += sums_LL.to(s["binned_log_count_sum_LL"].device)

        values_TVL = torch.stack([entropy_LT, *self._balances(probs_LTE, routing)], dim=0).permute(2, 0, 1)
        self._offer_samples(values_TVL)
        keys, counts_N = unique_with_counts(path_keys(top1_LT, E))
        self._paths.add(keys, counts_N, T)
        return self

    def _balances(self, probs_LTE: torch.Tensor, routing: Sequence[RoutingOutput]) -> tuple[torch.Tensor, torch.Tensor]:
        """(inner balance (L, T), outer balance (L, T)) from one top-k over all layers."""
        L, T, E = probs_LTE.shape
        ks = [self.top_k or r.expert_ids_TK.shape[1] for r in routing]
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

    def _offer_samples(self, values_NVL: torch.Tensor) -> None:
        """Vectorised Algorithm R: fill the reservoir, then item g (0-based, over all tokens seen)
        replaces slot ``j ~ U{0..g}`` when ``j < max_samples`` (later items win ties in a batch)."""
        values_NVL = values_NVL.float()
        n = values_NVL.shape[0]
        seen, cap = self._num_offered, self.max_samples
        self._num_offered += n
        filled = 0 if self._sample_NVL is None else self._sample_NVL.shape[0]
        num_direct = n if cap is None else max(0, min(cap - filled, n))
        if num_direct:
            head = values_NVL[:num_direct].clone()
            self._sample_NVL = head if self._sample_NVL is None else torch.cat([self._sample_NVL, head])
        if num_direct == n:
            return
        index_R = torch.arange(seen + num_direct, seen + n, dtype=torch.float64)
        slot_R = (torch.rand(n - num_direct, generator=self._generator, dtype=torch.float64) * (index_R + 1)).long()
        accepted = (slot_R < cap).nonzero().squeeze(1)
        slot_A, row_A = slot_R[accepted], accepted + num_direct
        order = torch.argsort(slot_A, stable=True)  # rows stay in order within a slot: keep the last
        slot_A, row_A = slot_A[order], row_A[order]
        last = torch.ones_like(slot_A, dtype=torch.bool)
        last[:-1] = slot_A[1:] != slot_A[:-1]
        device = self._sample_NVL.device
        self._sample_NVL[slot_A[last].to(device)] = values_NVL[row_A[last].to(values_NVL.device)].to(device)

    # ------------------------------------------------------------------------------------------
    # Merge

    @torch.no_grad()
    def merge(self, other: RoutingStats, *, reducible: bool = True) -> RoutingStats:
        """Fold another accumulator (same E and bins) into this one; returns self.

        Args:
            other: The other accumulator (unchanged).
            reducible: Also add :meth:`state_tensors`. False after those were already all-reduced:
                then only the path counts and the samples are merged.
        """
        if other.num_layers is None:
            return self
        if other.num_experts != self.num_experts or other.num_bins != self.num_bins:
            raise ValueError("RoutingStats.merge: different num_experts or num_bins")
        if self.num_layers is None:
            self._init_state(other.num_layers, next(iter(other._state.values())).device)
        elif self.num_layers != other.num_layers:
            raise ValueError(f"RoutingStats.merge: {other.num_layers} MoE layers vs {self.num_layers}")
        if reducible:
            for name, tensor in self._state.items():
                tensor += other._state[name].to(tensor.device)
        self._merge_samples(other)
        self._paths.merge(other._paths)
        return self

    def _merge_samples(self, other: RoutingStats) -> None:
        """Union when it fits; else each side contributes in proportion to the tokens it saw
        (a uniform sample of the union, up to rounding)."""
        if other._sample_NVL is None:
            return
        theirs = other._sample_NVL
        if self._sample_NVL is None:
            self._sample_NVL, self._num_offered = theirs.clone(), other._num_offered
            return
        mine = self._sample_NVL
        theirs = theirs.to(mine.device)
        cap = self.max_samples
        total_seen = self._num_offered + other._num_offered
        self._num_offered = total_seen
        if cap is None or mine.shape[0] + theirs.shape[0] <= cap:
            self._sample_NVL = torch.cat([mine, theirs])
            return
        num_mine = min(mine.shape[0], round(cap * (total_seen - other._num_offered) / total_seen))
        num_theirs = min(theirs.shape[0], cap - num_mine)
        pick_mine = torch.randperm(mine.shape[0], generator=self._generator)[:num_mine].to(mine.device)
        pick_theirs = torch.randperm(theirs.shape[0], generator=self._generator)[:num_theirs].to(mine.device)
        self._sample_NVL = torch.cat([mine[pick_mine], theirs[pick_theirs]])

    # ------------------------------------------------------------------------------------------
    # Results

    @torch.no_grad()
    def compute(self) -> dict[str, Any]:
        """All metrics from what was accumulated, as python numbers and small CPU tensors.

        Keys (l = MoE layer index in depth order; "(L,)" = one value per MoE layer):

        - ``num_tokens``, ``num_layers``, ``num_experts`` (int)
        - load: ``tokens_per_expert`` (L, E) int64, ``load_cv``, ``load_max_vio``,
          ``num_dead_experts`` (int64), ``load_entropy`` (normalised), ``drop_ratio``,
          ``token_drop_ratio`` - each (L,)
        - per token: ``gate_entropy_mean``, ``router_z_mean`` (exact means), ``router_logit_std``
          (RMS over tokens of each token's logit std over experts, exact), ``gate_entropy_median``,
          ``inner_balance_median``, ``outer_balance_median`` (from the sample) - each (L,);
          ``gate_entropy_sample``, ``inner_balance_sample``, ``outer_balance_sample`` (N, L) fp32
          for histograms; ``num_sampled_tokens`` (int)
        - across layers: ``top1_entropy`` (L,) (entropy of the top-1 histogram), ``top1_mi`` and
          ``top1_nmi`` (L-1,) between layers l and l+1, ``binned_prob_mi`` (L, L) (RMoE App. A.4.2)
        - paths: ``num_paths`` (int), ``path_entropy`` (float, nats), ``path_num_tokens`` (int),
          ``paths_truncated`` (bool)

        Raises:
            ValueError: Before any :meth:`update` with a non-empty routing.
        """
        if self.num_layers is None:
            raise ValueError("RoutingStats.compute before any update with MoE layers")
        s = {name: t.cpu() for name, t in self._state.items()}
        num_tokens = int(s["num_tokens"])
        load_LE = s["tokens_per_expert_LE"]
        joint_PEE = s["top1_joint_PEE"]
        sample_NVL = self._sample_NVL.cpu() if self._sample_NVL is not None else torch.zeros(0, 3, self.num_layers)
        samples = {name: sample_NVL[:, v, :].contiguous() for v, name in enumerate(_SAMPLED)}
        out: dict[str, Any] = {
            "num_tokens": num_tokens,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "tokens_per_expert": load_LE,
            "load_cv": load_coefficient_of_variation(load_LE),
            "load_max_vio": max_violation(load_LE),
            "num_dead_experts": num_dead_experts(load_LE),
            "load_entropy": load_entropy(load_LE),
            "drop_ratio": (1.0 - load_LE.sum(dim=-1).double() / s["num_pairs_L"].double()).float(),
            "token_drop_ratio": (s["num_dropped_tokens_L"].double() / num_tokens).float(),
            "gate_entropy_mean": (s["gate_entropy_sum_L"] / num_tokens).float(),
            "router_z_mean": (s["router_z_sum_L"] / num_tokens).float(),
            "router_logit_std": (s["logit_var_sum_L"] / num_tokens).sqrt().float(),
            **{f"{name}_median": _lower_median(samples[name]) for name in _SAMPLED},
            **{f"{name}_sample": samples[name] for name in _SAMPLED},
            "num_sampled_tokens": int(sample_NVL.shape[0]),
            "top1_entropy": entropy_from_counts(s["top1_counts_LE"]).float(),
            "top1_mi": mutual_information(joint_PEE).float(),
            "top1_nmi": normalized_mutual_information(joint_PEE).float(),
            "binned_prob_mi": binned_mi_from_log_count_sums(
                s["binned_log_count_sum_LL"], num_tokens, self.num_experts
            ).float(),
        }
        counts_N = self._paths.counts().cpu()
        out["num_paths"] = int(counts_N.numel())
        out["path_entropy"] = float(entropy_from_counts(counts_N))
        out["path_num_tokens"] = self._paths.num_tokens
        out["paths_truncated"] = self._paths.truncated
        return out

    def __getstate__(self) -> dict[str, Any]:  # torch.Generator does not pickle: keep its state
        state = self.__dict__.copy()
        state["_generator"] = self._generator.get_state()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        generator = torch.Generator()
        generator.set_state(state["_generator"])
        self.__dict__.update(state, _generator=generator)


class PathCounts:
    """Exact counts of distinct expert paths (keys of :func:`rmoe.metrics.information.path_keys`).

    New batches' (keys, counts) wait in a list and are folded into the sorted unique table only
    when they add up to the table's size (at least ``flush_size``), so the cost per update stays
    amortised O(log n) instead of a full re-sort of every path seen. With ``max_paths``, the batch
    that would take the table past it is not counted and counting stops (``truncated``);
    ``num_tokens`` says how many tokens the counts cover.
    """

    def __init__(self, max_paths: int | None, flush_size: int = 1 << 16) -> None:
        self.max_paths = max_paths
        self.flush_size = flush_size
        self.num_tokens = 0
        self.truncated = False
        self._keys: torch.Tensor | None = None  # sorted unique keys: (N,) codes or (N, L) rows
        self._counts_N: torch.Tensor | None = None
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._pending_size = 0
        self._pending_tokens = 0

    @property
    def size(self) -> int:
        """Distinct paths in the table (pending batches not yet folded in)."""
        return 0 if self._keys is None else int(self._keys.shape[0])

    def add(self, keys: torch.Tensor, counts_N: torch.Tensor, num_tokens: int) -> None:
        """Count ``num_tokens`` tokens whose distinct paths are ``keys`` with multiplicities ``counts_N``."""
        if self.truncated:
            return
        if self.max_paths is not None and self.size + self._pending_size + keys.shape[0] > self.max_paths:
            self.flush()  # everything before this batch fits; does this batch?
            merged = self._merged([(keys, counts_N)])
            if merged[0].shape[0] > self.max_paths:
                self.truncated = True
                return
            (self._keys, self._counts_N), self.num_tokens = merged, self.num_tokens + num_tokens
            return
        self._pending.append((keys, counts_N))
        self._pending_size += keys.shape[0]
        self._pending_tokens += num_tokens
        if self._pending_size >= max(self.flush_size, self.size):
            self.flush()

    def flush(self) -> None:
        """Fold the pending batches into the table."""
        if not self._pending:
            return
        self._keys, self._counts_N = self._merged(self._pending)
        self.num_tokens += self._pending_tokens
        self._pending, self._pending_size, self._pending_tokens = [], 0, 0

    def counts(self) -> torch.Tensor:
        """Count of each distinct path, (N,) int64 (flushes first)."""
        self.flush()
        return self._counts_N if self._counts_N is not None else torch.zeros(0, dtype=torch.int64)

    def merge(self, other: PathCounts) -> None:
        """Add the paths another counter saw (folding its pending batches in first)."""
        other.flush()
        if other._keys is not None:
            self.add(other._keys, other._counts_N, other.num_tokens)
        self.truncated = self.truncated or other.truncated

    def _merged(self, chunks: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        if self._keys is not None:
            chunks = [(self._keys, self._counts_N), *chunks]
        device = chunks[0][0].device
        keys = torch.cat([k.to(device) for k, _ in chunks])
        counts = torch.cat([c.to(device) for _, c in chunks])
        return unique_with_counts(keys, counts)


@torch.no_grad()
def routing_summary(
    routing: Sequence[RoutingOutput], num_experts: int, *, top_k: int | None = None, num_bins: int = NUM_PROB_BINS
) -> dict[str, Any]:
    """Every per-layer and cross-layer routing metric of one forward pass (all tokens kept).

    Args:
        routing: ``MoeLMOutput.routing`` (one :class:`RoutingOutput` per MoE layer, depth order);
            tensors on any device, left untouched.
        num_experts: E.
        top_k: K of the outer balance; None reads ``expert_ids_TK.shape[1]`` (pass the model's
            ``top_k`` for expert-choice routing, whose ``expert_ids_TK`` lists all E experts).
        num_bins: Bins of the binned-probability MI (the RMoE paper: 100).

    Returns:
        The dict of :meth:`RoutingStats.compute` (same keys), python numbers and CPU tensors.
    """
    stats = RoutingStats(num_experts, top_k=top_k, max_samples=None, max_paths=None, num_bins=num_bins)
    return stats.update(routing).compute()


def summary_scalars(summary: dict[str, Any], prefix: str = "routing") -> dict[str, float]:
    """Flatten a summary into ``{name: float}`` for a logger.

    Per-layer values become ``{prefix}/{key}/layer_{l}`` plus ``{prefix}/{key}/mean``; consecutive-
    pair values ``{prefix}/{key}/layer_{l}_{l+1}`` plus the mean; the binned MI matrix gives the
    mean of its off-diagonal (``binned_prob_mi/offdiag_mean``), of its first off-diagonal
    (``binned_prob_mi/adjacent_mean``) and of its diagonal (``binned_prob_mi/diag_mean``); path
    metrics stay scalars. Loads per expert and the token samples are left out (log them as
    histograms).
    """
    out: dict[str, float] = {}
    for key in PER_LAYER_KEYS:
        values = summary[key].double()
        out.update({f"{prefix}/{key}/layer_{l}": float(v) for l, v in enumerate(values)})
        out[f"{prefix}/{key}/mean"] = float(values.mean())
    for key in PER_PAIR_KEYS:
        values = summary[key].double()
        out.update({f"{prefix}/{key}/layer_{l}_{l + 1}": float(v) for l, v in enumerate(values)})
        if values.numel():
            out[f"{prefix}/{key}/mean"] = float(values.mean())
    mi_LL = summary["binned_prob_mi"].double()
    L = mi_LL.shape[0]
    out[f"{prefix}/binned_prob_mi/diag_mean"] = float(mi_LL.diagonal().mean())
    if L > 1:
        out[f"{prefix}/binned_prob_mi/offdiag_mean"] = float(mi_LL[~torch.eye(L, dtype=torch.bool)].mean())
        out[f"{prefix}/binned_prob_mi/adjacent_mean"] = float(mi_LL.diagonal(1).mean())
    for key in ("num_paths", "path_entropy", "num_tokens"):
        out[f"{prefix}/{key}"] = float(summary[key])
    return out


def _num_fully_dropped(routing: RoutingOutput) -> torch.Tensor:
    """Number of tokens with no kept pair (0-d int64)."""
    if routing.keep_TK is None:
        return torch.zeros((), dtype=torch.int64, device=routing.expert_ids_TK.device)
    return (~routing.keep_TK.any(dim=-1)).sum()


def _bincount_rows(ids_LT: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Per-row histograms of ids in [0, num_bins): (L, num_bins) int64."""
    L = ids_LT.shape[0]
    offset_L1 = torch.arange(L, device=ids_LT.device)[:, None] * num_bins
    return torch.bincount((ids_LT + offset_L1).reshape(-1), minlength=L * num_bins).view(L, num_bins)


def _lower_median(values_NL: torch.Tensor) -> torch.Tensor:
    """Per-column lower median (``torch.median``'s convention); NaN for an empty sample."""
    if values_NL.shape[0] == 0:
        return torch.full(values_NL.shape[1:], float("nan"))
    return values_NL.median(dim=0).values
