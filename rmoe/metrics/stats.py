"""All routing metrics of a model at once: :func:`routing_summary` for one forward pass and
:class:`RoutingStats`, which accumulates the same metrics over many batches in bounded memory.

Shape legend: T tokens, E experts, K chosen experts per token, L MoE layers (index l = position
in ``MoeLMOutput.routing``, i.e. the l-th MoE layer in depth order), P = L - 1 consecutive pairs,
N sampled tokens, V per-token values (gate entropy, inner balance, outer balance).

Every metric is declared once in :mod:`rmoe.metrics.catalog` (its definition lives in
:mod:`rmoe.metrics.load`, :mod:`rmoe.metrics.gates` or :mod:`rmoe.metrics.information`); this
module only batches and accumulates what the declarations ask for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from rmoe.metrics.catalog import STATISTICS, Accumulated, Metric, RoutingBatch, metrics
from rmoe.metrics.information import NUM_PROB_BINS, entropy_from_counts, path_keys, unique_with_counts
from rmoe.tags import layer_tag

if TYPE_CHECKING:
    from rmoe.routers.base import RoutingOutput

DEFAULT_MAX_SAMPLES = 65536
DEFAULT_MAX_PATHS = 1 << 21


class _Groups(NamedTuple):
    """The routing metrics of :data:`rmoe.metrics.catalog.METRICS`, by how they are accumulated."""

    routing: tuple[Metric, ...]
    means: tuple[Metric, ...]  # kept as float64 sums over tokens
    sampled: tuple[Metric, ...]  # the V per-token values of the reservoir sample
    from_state: tuple[Metric, ...]
    sample_names: tuple[str, ...]  # gate_entropy, inner_balance, outer_balance

    def keys(self, kind: str) -> tuple[str, ...]:
        return tuple(m.name for m in self.routing if m.kind == kind)


def _groups() -> _Groups:
    """Read from the declarations at each use, so a metric added to the catalog needs nothing else."""
    routing = metrics(source="routing")
    sampled = tuple(m for m in routing if m.sample is not None)
    return _Groups(
        routing,
        tuple(m for m in routing if m.per_token is not None),
        sampled,
        tuple(m for m in routing if m.from_state is not None),
        tuple(m.name.removesuffix("_median") for m in sampled),
    )


# Keys of the summary dict, for callers that log it (see summary_scalars), from the declarations.
PER_LAYER_KEYS = _groups().keys("layer")
PER_PAIR_KEYS = _groups().keys("pair")


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
        self._groups = _groups()
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
        sizes = {"L": num_layers, "E": self.num_experts, "P": max(num_layers - 1, 0)}
        self.num_layers = num_layers
        self._state = {"num_tokens": torch.zeros((), dtype=torch.int64, device=device)}
        for stat in STATISTICS:
            self._state[stat.name] = torch.zeros([sizes[c] for c in stat.shape], dtype=stat.dtype, device=device)
        for m in self._groups.means:
            self._state[m.sum_key] = torch.zeros(num_layers, dtype=torch.float64, device=device)

    def to_host_(self) -> RoutingStats:
        """Move everything to the host, in place (before pickling: device tensors would be unpickled
        onto the device they came from); returns self."""
        self._state = {name: t.cpu() for name, t in self._state.items()}
        if self._sample_NVL is not None:
            self._sample_NVL = self._sample_NVL.cpu()
        self._paths.to_host_()
        return self

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
        batch = RoutingBatch(routing, self.num_experts, self.top_k, self.num_bins)
        L, T = batch.num_layers, batch.num_tokens
        if self.num_layers is None:
            self._init_state(L, batch.probs_LTE.device)
        elif self.num_layers != L:
            raise ValueError(f"RoutingStats got {L} MoE layers after {self.num_layers}")
        s = self._state
        s["num_tokens"] += T
        for stat in STATISTICS:
            s[stat.name] += stat.update(batch).to(device=s[stat.name].device, dtype=stat.dtype)
        g = self._groups
        for m in g.means:
            s[m.sum_key] += m.per_token(batch).sum(dim=1, dtype=torch.float64).to(s[m.sum_key].device)
        if g.sampled:
            self._offer_samples(torch.stack([m.sample(batch) for m in g.sampled], dim=0).permute(2, 0, 1))
        keys, counts_N = unique_with_counts(path_keys(batch.top1_LT, self.num_experts))
        self._paths.add(keys, counts_N, T)
        return self

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
        g = self._groups
        V = len(g.sampled)
        sample_NVL = self._sample_NVL.cpu() if self._sample_NVL is not None else torch.zeros(0, V, self.num_layers)
        samples = {name: sample_NVL[:, v, :].contiguous() for v, name in enumerate(g.sample_names)}
        accumulated = Accumulated(s, num_tokens, self.num_experts)
        values: dict[str, Any] = {m.name: m.from_state(accumulated) for m in g.from_state}
        for m in g.means:
            mean_L = s[m.sum_key] / num_tokens
            values[m.name] = (m.finish(mean_L) if m.finish is not None else mean_L).float()
        for m, name in zip(g.sampled, g.sample_names):
            values[m.name] = _lower_median(samples[name])
        out: dict[str, Any] = {
            "num_tokens": num_tokens,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "tokens_per_expert": s["tokens_per_expert_LE"],
            **{m.name: values[m.name] for m in g.routing if m.name in values},
            **{f"{name}_sample": samples[name] for name in g.sample_names},
            "num_sampled_tokens": int(sample_NVL.shape[0]),
        }
        counts_N = self._paths.counts().cpu()
        out["num_paths"] = int(counts_N.numel())
        out["path_entropy"] = float(entropy_from_counts(counts_N))
        out["path_num_tokens"] = self._paths.num_tokens
        out["paths_truncated"] = self._paths.truncated
        return out

    def __getstate__(self) -> dict[str, Any]:  # torch.Generator does not pickle (nor do the declarations)
        state = self.__dict__.copy()
        state["_generator"] = self._generator.get_state()
        del state["_groups"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        generator = torch.Generator()
        generator.set_state(state["_generator"])
        self.__dict__.update(state, _generator=generator, _groups=_groups())


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

    def to_host_(self) -> None:
        """Move the table and the pending batches to the host, in place."""
        if self._keys is not None:
            self._keys, self._counts_N = self._keys.cpu(), self._counts_N.cpu()
        self._pending = [(k.cpu(), c.cpu()) for k, c in self._pending]

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
    g = _groups()
    out: dict[str, float] = {}
    for key in g.keys("layer"):
        values = summary[key].double()
        out.update({layer_tag(f"{prefix}/{key}", l): float(v) for l, v in enumerate(values)})
        out[f"{prefix}/{key}/mean"] = float(values.mean())
    for key in g.keys("pair"):
        values = summary[key].double()
        out.update({layer_tag(f"{prefix}/{key}", (l, l + 1)): float(v) for l, v in enumerate(values)})
        if values.numel():
            out[f"{prefix}/{key}/mean"] = float(values.mean())
    for key in g.keys("matrix"):
        m_LL = summary[key].double()
        L = m_LL.shape[0]
        out[f"{prefix}/{key}/diag_mean"] = float(m_LL.diagonal().mean())
        if L > 1:
            out[f"{prefix}/{key}/offdiag_mean"] = float(m_LL[~torch.eye(L, dtype=torch.bool)].mean())
            out[f"{prefix}/{key}/adjacent_mean"] = float(m_LL.diagonal(1).mean())
    for key in g.keys("scalar"):
        out[f"{prefix}/{key}"] = float(summary[key])
    return out


def _lower_median(values_NL: torch.Tensor) -> torch.Tensor:
    """Per-column lower median (``torch.median``'s convention); NaN for an empty sample."""
    if values_NL.shape[0] == 0:
        return torch.full(values_NL.shape[1:], float("nan"))
    return values_NL.median(dim=0).values
