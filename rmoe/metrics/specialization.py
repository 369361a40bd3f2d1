"""OLMoE's analyses of expert specialisation (Muennighoff et al., arXiv 2409.02060, Sec. 5): vocabulary
specialisation, expert co-activation and router saturation, plus :class:`TokenExpertStats`, which accumulates
their counts over many batches.

Shape legend: T tokens, K chosen experts per token, E experts, V vocabulary (token ids), L MoE layers.
Pairs dropped by a capacity (``keep_TK`` False) count nowhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from rmoe.syncs import all_reduce_

if TYPE_CHECKING:
    from rmoe.routers.base import RoutingOutput

DEFAULT_MIN_COUNT = 10
"""Token ids seen fewer times are left out of the summaries (a token seen once is trivially 'fully specialised')."""


def _kept_ids(expert_ids_TK: torch.Tensor, keep_TK: torch.Tensor | None, num_experts: int) -> torch.Tensor:
    """``expert_ids_TK`` with dropped pairs replaced by the extra id E (a bin that is cut off)."""
    return expert_ids_TK if keep_TK is None else expert_ids_TK.masked_fill(~keep_TK, num_experts)


@torch.no_grad()
def token_expert_counts(
    token_ids_T: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    vocab_size: int,
    num_experts: int,
    keep_TK: torch.Tensor | None = None,
) -> torch.Tensor:
    """``counts_VE[v, e]`` (int64): how many occurrences of token id v were routed to expert e (kept pairs)."""
    E = num_experts
    ids_TK = _kept_ids(expert_ids_TK, keep_TK, E)
    flat = token_ids_T.reshape(-1, 1).long() * (E + 1) + ids_TK
    return torch.bincount(flat.reshape(-1), minlength=vocab_size * (E + 1)).view(vocab_size, E + 1)[:, :E]


@torch.no_grad()
def vocabulary_specialization(counts_VE: torch.Tensor, occurrences_V: torch.Tensor) -> torch.Tensor:
    """OLMoE's vocabulary specialisation (arXiv 2409.02060, Sec. 5): for token id x and expert e,
    ``N_k^(e)(x) / N(x)``, the share of x's occurrences that have e among their top-k experts.

    ``occurrences_V`` is N(x), not multiplied by K. Returns ``specialization_VE`` in [0, 1] (fp64), NaN for
    ids never seen; a row sums to K (less drops).
    """
    n_V1 = occurrences_V.double().reshape(-1, 1)
    return torch.where(n_V1 > 0, counts_VE.double() / n_V1.clamp(min=1), torch.full_like(n_V1, float("nan")))


@torch.no_grad()
def specialization_summary(
    counts_VE: torch.Tensor, occurrences_V: torch.Tensor, *, min_count: int = DEFAULT_MIN_COUNT
) -> torch.Tensor:
    """The occurrence-weighted mean, over token ids seen at least ``min_count`` times, of each token's
    largest :func:`vocabulary_specialization` share: ``sum_x max_e N_k^(e)(x) / sum_x N(x)``, 0-d fp64.

    1: every token id always goes to one expert; a router that ignores the token gives about K/E.
    """
    n_V = occurrences_V.double()
    frequent_V = n_V >= max(min_count, 1)
    if not bool(frequent_V.any()):
        return torch.tensor(float("nan"), dtype=torch.float64)
    top_V = counts_VE.double().amax(dim=1)
    return top_V[frequent_V].sum() / n_V[frequent_V].sum()


@torch.no_grad()
def top_specialized_pairs(
    counts_VE: torch.Tensor, occurrences_V: torch.Tensor, *, num_pairs: int = 20, min_count: int = DEFAULT_MIN_COUNT
) -> list[dict[str, float | int]]:
    """Up to ``num_pairs`` most specialised (expert, token id) pairs among token ids seen at least ``min_count``
    times, highest share first (ties by count): dicts ``{"expert", "token_id", "share", "count", "occurrences"}``."""
    share_VE = vocabulary_specialization(counts_VE, occurrences_V)
    frequent_V = occurrences_V >= max(min_count, 1)
    share_VE = torch.where(frequent_V[:, None], share_VE, torch.full_like(share_VE, -1.0)).nan_to_num(-1.0)
    E = share_VE.shape[1]
    # sort by (share, count): the count is < 2^40, so share * 2^40 + count orders lexicographically
    score = share_VE.reshape(-1) * 2.0**40 + counts_VE.double().reshape(-1)
    order = torch.argsort(score, descending=True)
    out: list[dict[str, float | int]] = []
    for flat in order.tolist():
        v, e = divmod(flat, E)
        if share_VE[v, e] <= 0 or len(out) >= num_pairs:
            break
        out.append(
            {
                "expert": e,
                "token_id": v,
                "share": float(share_VE[v, e]),
                "count": int(counts_VE[v, e]),
                "occurrences": int(occurrences_V[v]),
            }
        )
    return out


@torch.no_grad()
def coactivation_counts(
    expert_ids_TK: torch.Tensor, num_experts: int, keep_TK: torch.Tensor | None = None
) -> torch.Tensor:
    """``joint_EE[i, j]`` (int64): tokens for which experts i and j were both chosen and kept; the diagonal
    holds each expert's load."""
    E = num_experts
    ids_TK = _kept_ids(expert_ids_TK, keep_TK, E)
    onehot_TE = torch.zeros(ids_TK.shape[0], E + 1, dtype=torch.int64, device=ids_TK.device)
    onehot_TE.scatter_(1, ids_TK, 1)
    onehot_TE = onehot_TE[:, :E]
    return onehot_TE.T @ onehot_TE


@torch.no_grad()
def coactivation_rate(joint_EE: torch.Tensor) -> torch.Tensor:
    """OLMoE's expert co-activation (arXiv 2409.02060, Sec. 5): the share of the tokens routed to expert i
    that were also routed to expert j, ``N(i, j) / N(i)``, from :func:`coactivation_counts`.

    Returns (E, E) fp64; the diagonal and the rows of idle experts are NaN. Each row sums to K - 1 (less drops).
    """
    joint = joint_EE.double()
    load_E1 = joint.diagonal().reshape(-1, 1)
    rate = torch.where(load_E1 > 0, joint / load_E1.clamp(min=1), torch.full_like(joint, float("nan")))
    return rate.fill_diagonal_(float("nan"))


@torch.no_grad()
def router_saturation(expert_ids_a_TK: torch.Tensor, expert_ids_b_TK: torch.Tensor) -> torch.Tensor:
    """OLMoE's router saturation (arXiv 2409.02060, Sec. 5): ``1/N sum_i |E_i^(t) ∩ E_i^(T)| / |E_i^(T)|``, the
    overlap of the expert sets two checkpoints (b the final one, T) compute for the same N tokens, 0-d fp64 in
    [0, 1]; ``|E_i^(T)| = k`` for top-k. A negative id marks a pair that is not computed (dropped, an unused
    slot, an expert that did not take the token): it is in neither set. Tokens b computes with no expert are left
    out."""
    computed_a_TK, computed_b_TK = expert_ids_a_TK >= 0, expert_ids_b_TK >= 0
    same_TKK = (expert_ids_a_TK[:, :, None] == expert_ids_b_TK[:, None, :]) & computed_a_TK[:, :, None]
    overlap_T = (same_TKK.any(dim=1) & computed_b_TK).sum(dim=1)
    size_T = computed_b_TK.sum(dim=1)
    counted_T = size_T > 0
    return (overlap_T[counted_T].double() / size_T[counted_T]).mean()


@torch.no_grad()
def active_experts_by_frequency(
    counts_VE: torch.Tensor, occurrences_V: torch.Tensor, num_buckets: int = 4
) -> torch.Tensor:
    """Mean experts computing a token, per token-frequency bucket (most frequent first): (num_buckets,) fp64.

    The token ids are sorted by occurrences and cut into buckets of equal token mass (quarters by default, so the
    first bucket holds the few most frequent ids; an id lies in the bucket where its mass starts, so a very
    frequent id can leave the next buckets empty); a bucket's value is its kept pairs over its occurrences (NaN
    when empty). Huang et al. (arXiv 2403.07652) report that top-p spends more experts on
    harder, rarer tokens: this is the measure of it.
    """
    occurrences_V = occurrences_V.double()
    order_V = torch.argsort(occurrences_V, descending=True, stable=True)
    mass_V = occurrences_V[order_V].cumsum(0) - occurrences_V[order_V]  # tokens before this id
    total = float(occurrences_V.sum())
    bucket_V = (mass_V / max(total, 1.0) * num_buckets).long().clamp(max=num_buckets - 1)
    pairs_V = counts_VE[order_V].sum(dim=-1).double()
    # made from the inputs (new_zeros), so they live where the counts do
    pairs_Q = occurrences_V.new_zeros(num_buckets).index_add_(0, bucket_V, pairs_V)
    tokens_Q = occurrences_V.new_zeros(num_buckets).index_add_(0, bucket_V, occurrences_V[order_V])
    return torch.where(tokens_Q > 0, pairs_Q / tokens_Q.clamp(min=1.0), tokens_Q.new_full((), float("nan")))


class TokenExpertStats:
    """Accumulates, per MoE layer, the (token id, expert) and co-activation counts over a stream of batches,
    in O(L V E + L E^2) memory; mergeable across processes."""

    def __init__(self, vocab_size: int, num_experts: int) -> None:
        self.vocab_size = vocab_size
        self.num_experts = num_experts
        self.num_layers: int | None = None
        self.counts_LVE: torch.Tensor | None = None
        self.joint_LEE: torch.Tensor | None = None
        self.occurrences_V: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, token_ids: torch.Tensor, routing: Sequence[RoutingOutput]) -> TokenExpertStats:
        """Add one forward pass: ``token_ids`` (B, S) (the model's input) and its routing; returns self."""
        if not routing:
            return self
        token_ids_T = token_ids.reshape(-1).to(routing[0].expert_ids_TK.device)
        V, E = self.vocab_size, self.num_experts
        if self.counts_LVE is None:
            device = token_ids_T.device
            self.num_layers = len(routing)
            self.counts_LVE = torch.zeros(len(routing), V, E, dtype=torch.int64, device=device)
            self.joint_LEE = torch.zeros(len(routing), E, E, dtype=torch.int64, device=device)
            self.occurrences_V = torch.zeros(V, dtype=torch.int64, device=device)
        for l, r in enumerate(routing):
            self.counts_LVE[l] += token_expert_counts(token_ids_T, r.expert_ids_TK, V, E, r.keep_TK)
            self.joint_LEE[l] += coactivation_counts(r.expert_ids_TK, E, r.keep_TK)
        self.occurrences_V += torch.bincount(token_ids_T.long(), minlength=V)[:V]
        return self

    def all_reduce(self) -> None:
        """Sum the counts across processes, in place (no-op without ``torch.distributed``)."""
        if self.counts_LVE is not None:
            all_reduce_([self.counts_LVE, self.joint_LEE, self.occurrences_V])

    def compute(self, *, min_count: int = DEFAULT_MIN_COUNT, num_pairs: int = 20) -> dict[str, Any]:
        """``vocab_specialization`` (L,), ``coactivation`` (L, E, E), ``coactivation_max`` (L,) (the largest
        off-diagonal rate), ``top_specialized`` (per layer), ``active_experts_frequent`` and ``active_experts_rare``
        (L,) (:func:`active_experts_by_frequency`: the most frequent and the rarest quarter of the tokens),
        ``token_expert_counts`` (L, V, E) and ``token_occurrences`` (V,), as CPU tensors; {} before any update."""
        if self.counts_LVE is None:
            return {}
        counts_LVE, occurrences_V = self.counts_LVE.cpu(), self.occurrences_V.cpu()
        rates_LEE = torch.stack([coactivation_rate(j) for j in self.joint_LEE.cpu()])
        finite = rates_LEE.nan_to_num(float("-inf")).flatten(1).amax(dim=1)
        by_frequency_LQ = torch.stack([active_experts_by_frequency(c, occurrences_V) for c in counts_LVE])
        return {
            "active_experts_frequent": by_frequency_LQ[:, 0],
            "active_experts_rare": by_frequency_LQ[:, -1],
            "vocab_specialization": torch.stack(
                [specialization_summary(c, occurrences_V, min_count=min_count) for c in counts_LVE]
            ),
            "coactivation": rates_LEE,
            "coactivation_max": torch.where(torch.isfinite(finite), finite, torch.full_like(finite, float("nan"))),
            "top_specialized": [
                top_specialized_pairs(c, occurrences_V, num_pairs=num_pairs, min_count=min_count) for c in counts_LVE
            ],
            "token_expert_counts": counts_LVE,
            "token_occurrences": occurrences_V,
        }


__all__ = [
    "DEFAULT_MIN_COUNT",
    "TokenExpertStats",
    "active_experts_by_frequency",
    "coactivation_counts",
    "coactivation_rate",
    "router_saturation",
    "specialization_summary",
    "token_expert_counts",
    "top_specialized_pairs",
    "vocabulary_specialization",
]
