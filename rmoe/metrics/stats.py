"""All routing metrics at once: :func:`routing_summary` for one forward pass, :class:`RoutingStats` over many
batches in bounded memory. The metrics are declared in :mod:`rmoe.metrics.catalog`; this module only accumulates.

Shape legend: T tokens, E experts, K chosen experts per token, L MoE layers (l = index in
``MoeLMOutput.routing``, depth order), P = L - 1 consecutive pairs, N sampled tokens, V per-token values
(gate entropy, inner balance, outer balance).
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
    """Streaming, mergeable accumulator of the routing metrics over batches, in bounded memory.

    Keeps the count statistics of :data:`~rmoe.metrics.catalog.STATISTICS` and the float64 sums of the
    mean metrics (all in :meth:`state_tensors`), the counts of each distinct expert path, and a uniform
    reservoir sample (Vitter's Algorithm R, ACM TOMS 11, 1985) of at most ``max_samples`` tokens' V
    per-token values, for medians and histograms.

    Multi-process: ``all_reduce(SUM)`` each tensor of :meth:`state_tensors` in place, gather the other
    processes' objects (``all_gather_object``) and fold them in with ``merge(other, reducible=False)``.

    Exactness against :func:`routing_summary` on the concatenated batches: counts-based metrics are
    exact; means and the binned MI up to float summation order; medians while at most ``max_samples``
    tokens were seen (then sample estimates). Past ``max_paths`` distinct paths the path metrics stop
    updating (``path_num_tokens``, ``paths_truncated``).

    Args:
        top_k: K of the outer balance; None reads each layer's ``expert_ids_TK.shape[1]``.
        max_samples: Reservoir size; None keeps every token.
        max_paths: Cap on the number of distinct paths tracked; None for no cap.
        num_bins: Bins over [0, 1] of the binned-probability MI (the RMoE paper: 100).
        seed: Seed of the reservoir's random numbers.
        flops_per_pair: Training FLOPs of one computed (token, expert) pair (:func:`expert_pair_flops`); with it
            the summary has ``expert_flops_per_token`` (else NaN).
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
        flops_per_pair: float | None = None,
    ) -> None:
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples={max_samples} must be >= 1 (or None to keep every token)")
        self.num_experts = num_experts
        self.top_k = top_k
        self.max_samples = max_samples
        self.max_paths = max_paths
        self.num_bins = num_bins
        self.flops_per_pair = flops_per_pair
        self.seed = seed
        self._groups = _groups()
        self.reset()

    @classmethod
    def for_model(cls, config: Any, **kwargs: Any) -> RoutingStats:
        """The statistics of a model's routing (a ``ModelConfig``: its E, K and the expert FLOPs per pair)."""
        flops = expert_pair_flops(config.hidden_size, config.moe_intermediate_size)
        return cls(config.num_experts, top_k=config.top_k, flops_per_pair=flops, **kwargs)

    def reset(self) -> None:
        """Forget everything (the layer count is learnt again at the next :meth:`update`)."""
        self.num_layers: int | None = None
        self._state: dict[str, torch.Tensor] = {}
        self._sample_NVL: torch.Tensor | None = None
        self._num_offered = 0  # tokens offered to the reservoir
        self._paths = PathCounts(self.max_paths)
        self._generator = torch.Generator().manual_seed(self.seed)

    def _init_state(self, num_layers: int, device: torch.device) -> None:
        sizes = {"L": num_layers, "E": self.num_experts, "P": max(num_layers - 1, 0), "A": self.num_experts + 1}
        self.num_layers = num_layers
        self._state = {"num_tokens": torch.zeros((), dtype=torch.int64, device=device)}
        for stat in STATISTICS:
            self._state[stat.name] = torch.zeros([sizes[c] for c in stat.shape], dtype=stat.dtype, device=device)
        for m in self._groups.means:
            self._state[m.sum_key] = torch.zeros(num_layers, dtype=torch.float64, device=device)

    def to_host_(self) -> RoutingStats:
        """Move everything to the host in place (before pickling: device tensors unpickle onto their device)."""
        self._state = {name: t.cpu() for name, t in self._state.items()}
        if self._sample_NVL is not None:
            self._sample_NVL = self._sample_NVL.cpu()
        self._paths.to_host_()
        return self

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The live count and sum tensors (SUM-reducible across processes); empty before :meth:`update`."""
        return self._state

    @torch.no_grad()
    def update(self, routing: Sequence[RoutingOutput]) -> RoutingStats:
        """Add one forward pass's routing (one :class:`RoutingOutput` per MoE layer; [] for dense); returns self."""
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

    @torch.no_grad()
    def merge(self, other: RoutingStats, *, reducible: bool = True) -> RoutingStats:
        """Fold another accumulator (same E and bins, left unchanged) into this one; returns self.
        ``reducible=False`` (after :meth:`state_tensors` were all-reduced) merges only the paths and samples."""
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

    @torch.no_grad()
    def compute(self) -> dict[str, Any]:
        """All metrics as python numbers and small CPU tensors (ValueError before any MoE update).

        Keys: ``num_tokens``, ``num_layers``, ``num_experts``; ``tokens_per_expert`` (L, E) int64; every
        routing metric of the catalog ((L,) per layer, (L-1,) per pair, (L, L) matrix, or a scalar); the
        token samples ``gate_entropy_sample``, ``inner_balance_sample``, ``outer_balance_sample`` (N, L)
        fp32 and ``num_sampled_tokens``; ``path_num_tokens``, ``paths_truncated``.
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
        active_L = values.get("active_experts_mean")
        out["expert_flops_per_token"] = (
            float(self.flops_per_pair * active_L.double().sum())
            if self.flops_per_pair is not None and active_L is not None
            else float("nan")
        )
        out["active_counts"] = s["active_counts_LA"]
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

    Batches wait in a list until they add up to the table's size (at least ``flush_size``), so updates
    cost amortised O(log n) instead of a re-sort of every path seen. The batch that would take the table
    past ``max_paths`` is not counted and counting stops (``truncated``); ``num_tokens`` are covered.
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
        """Distinct paths in the table (without pending batches)."""
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
    """:meth:`RoutingStats.compute` of one forward pass's ``MoeLMOutput.routing`` (all tokens kept). Pass the
    model's ``top_k`` for expert-choice routing, whose ``expert_ids_TK`` lists all E experts."""
    stats = RoutingStats(num_experts, top_k=top_k, max_samples=None, max_paths=None, num_bins=num_bins)
    return stats.update(routing).compute()


def expert_pair_flops(hidden_size: int, expert_size: int) -> float:
    """Training FLOPs of one (token, expert) pair a SwiGLU expert computes: 6 x its 3 D F weights (forward and
    backward, as the MFU count)."""
    return 6.0 * 3 * hidden_size * expert_size


def summary_scalars(summary: dict[str, Any], prefix: str = "routing") -> dict[str, float]:
    """Flatten a summary into ``{name: float}`` for a logger: ``{prefix}/{key}/layer_{l}`` (or
    ``layer_{l}_{l+1}`` for pairs) plus ``/mean``; a matrix gives ``/diag_mean``, ``/offdiag_mean`` and
    ``/adjacent_mean`` (first off-diagonal); scalars stay scalars. Loads and token samples are left out.
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
