"""What the experts do: the analyses of :mod:`rmoe.metrics.specialization` (OLMoE, arXiv 2409.02060, Sec. 5)
and :mod:`rmoe.metrics.closer_look` ("A Closer Look into MoE", arXiv 2406.18219), run on a
:class:`~rmoe.model.decoder.MoeLM`.

Shape legend: T tokens, E experts, L MoE layers, M expert matrices.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from rmoe.metrics.closer_look import (
    MATRICES,
    all_expert_outputs,
    averaged_neuron_similarity,
    expert_output_similarity,
    gate_embedding_similarity,
    reordered_neuron_similarity,
    score_norm_rank_counts,
    squared_pearson_offdiagonal,
)
from rmoe.metrics.specialization import router_saturation

if TYPE_CHECKING:
    from rmoe.model.decoder import MoeLM

DEFAULT_MAX_EXPERT_TOKENS = 8192
"""Tokens on which every expert is run (the dynamic Closer-Look analyses), at most."""


def moe_blocks(model: MoeLM) -> list[Any]:
    """The model's :class:`~rmoe.model.moe.SparseMoeBlock` modules in depth order."""
    from rmoe.model.moe import SparseMoeBlock

    return [m for m in model.modules() if isinstance(m, SparseMoeBlock)]


def _offdiag_mean(m_EE: torch.Tensor) -> float:
    E = m_EE.shape[-1]
    if E < 2:
        return float("nan")
    return float(m_EE[~torch.eye(E, dtype=torch.bool)].double().mean())


class ExpertOutputStats:
    """The dynamic Closer-Look analyses over a stream of forward passes, through forward hooks.

    As a context manager around the forward passes: each MoE block's input ``x_TD`` and routing are read
    (never changed) after the block ran, every expert is run on the first ``max_tokens`` tokens per
    layer, and the rank counts (router probabilities vs output norms) and output similarity accumulated.
    """

    def __init__(self, model: MoeLM, max_tokens: int = DEFAULT_MAX_EXPERT_TOKENS) -> None:
        self.blocks = moe_blocks(model)
        self.max_tokens = max_tokens
        E = model.config.num_experts
        L = len(self.blocks)
        self.rank_counts_LEE = torch.zeros(L, E, E, dtype=torch.int64)
        self.output_similarity_sum_LEE = torch.zeros(L, E, E, dtype=torch.float64)
        self.num_tokens_L = torch.zeros(L, dtype=torch.int64)
        self._handles: list[Any] = []

    def __enter__(self) -> ExpertOutputStats:
        for l, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_hook(self._hook(l)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, l: int) -> Any:
        @torch.no_grad()
        def hook(block: Any, args: tuple[Any, ...], output: tuple[Any, ...]) -> None:
            room = self.max_tokens - int(self.num_tokens_L[l])
            if room <= 0:
                return
            x_TD = args[0].reshape(-1, args[0].shape[-1])[:room].detach()
            routing = output[1]
            y_ETD = all_expert_outputs(x_TD, block.experts.gate_up_proj, block.experts.down_proj)
            norms_TE = y_ETD.norm(dim=-1).T
            self.rank_counts_LEE[l] += score_norm_rank_counts(routing.probs_TE[: x_TD.shape[0]], norms_TE).cpu()
            self.output_similarity_sum_LEE[l] += expert_output_similarity(y_ETD).cpu()
            self.num_tokens_L[l] += x_TD.shape[0]

        return hook

    def compute(self) -> dict[str, Any]:
        """``score_norm_rank_counts`` (L, E, E), ``score_norm_rank_diagonal`` (L,) (share of pairs whose score
        rank equals their norm rank), ``score_norm_top1_agreement`` (L,) (1/E by chance),
        ``expert_output_similarity`` (L, E, E) (mean over tokens), its off-diagonal mean
        ``expert_output_similarity_mean`` (L,) and ``expert_output_tokens`` (L,)."""
        T_L = self.num_tokens_L.clamp(min=1)
        counts = self.rank_counts_LEE
        similarity_LEE = self.output_similarity_sum_LEE / T_L.double()[:, None, None]
        return {
            "score_norm_rank_counts": counts,
            "score_norm_rank_diagonal": counts.diagonal(dim1=1, dim2=2).sum(-1).double()
            / counts.sum((1, 2)).clamp(min=1),
            "score_norm_top1_agreement": counts[:, 0, 0].double() / T_L.double(),
            "expert_output_similarity": similarity_LEE,
            "expert_output_similarity_mean": torch.tensor([_offdiag_mean(m) for m in similarity_LEE]),
            "expert_output_tokens": self.num_tokens_L.clone(),
        }


def gate_embeddings(router: torch.nn.Module, num_experts: int) -> torch.Tensor | None:
    """The router's gate embeddings: its one 2-D parameter or buffer with E rows (e.g. linear ``weight``
    (E, D), RMoE's head ``G_i`` (E, p)). None when there is no such matrix (HyperRouter) or more than one
    (RMoE with ``state_dim`` = E): the analysis is left out (NaN) rather than guessed."""
    found = [
        t
        for _, t in (*router.named_parameters(), *router.named_buffers())
        if t is not None and t.dim() == 2 and t.shape[0] == num_experts
    ]
    return found[0].detach() if len(found) == 1 else None


@torch.no_grad()
def weight_analyses(model: MoeLM, *, reorder: bool = True) -> dict[str, Any]:
    """The static Closer-Look analyses of every MoE layer: ``neuron_similarity_avg`` (L, M, E, E) and with
    ``reorder`` ``neuron_similarity_reordered``, ``neuron_kendall_tau`` (same shape), each with its
    off-diagonal means ``*_mean`` (L, M); ``gate_embedding_similarity`` (L, E, E) (NaN without gate
    embeddings) and ``gate_embedding_r2`` (L, M) against each averaged-neuron similarity (Table 3).
    """
    out: dict[str, list[Any]] = {
        "neuron_similarity_avg": [],
        "neuron_similarity_avg_mean": [],
        "gate_embedding_similarity": [],
        "gate_embedding_r2": [],
    }
    if reorder:
        for key in ("neuron_similarity_reordered", "neuron_similarity_reordered_mean", "neuron_kendall_tau"):
            out[key] = []
        out["neuron_kendall_tau_mean"] = []
    E = model.config.num_experts
    for block in moe_blocks(model):
        gate_up, down = block.experts.gate_up_proj, block.experts.down_proj
        avg_MEE = averaged_neuron_similarity(gate_up, down).cpu()
        out["neuron_similarity_avg"].append(avg_MEE)
        out["neuron_similarity_avg_mean"].append(torch.tensor([_offdiag_mean(m) for m in avg_MEE]))
        if reorder:
            sims_MEE, taus_MEE = reordered_neuron_similarity(gate_up, down)
            out["neuron_similarity_reordered"].append(sims_MEE)
            out["neuron_similarity_reordered_mean"].append(torch.tensor([_offdiag_mean(m) for m in sims_MEE]))
            out["neuron_kendall_tau"].append(taus_MEE)
            out["neuron_kendall_tau_mean"].append(torch.tensor([_offdiag_mean(m) for m in taus_MEE]))
        embeddings = gate_embeddings(block.router, E)
        if embeddings is None:
            out["gate_embedding_similarity"].append(torch.full((E, E), float("nan")))
            out["gate_embedding_r2"].append(torch.full((len(MATRICES),), float("nan")))
        else:
            gate_EE = gate_embedding_similarity(embeddings).cpu()
            out["gate_embedding_similarity"].append(gate_EE)
            out["gate_embedding_r2"].append(torch.tensor([squared_pearson_offdiagonal(m, gate_EE) for m in avg_MEE]))
    return {key: torch.stack(values) if values else torch.zeros(0) for key, values in out.items()}


@torch.no_grad()
def routed_expert_ids(model: MoeLM, batches: Iterable[torch.Tensor], device: str | torch.device = "cpu") -> list[Any]:
    """Every MoE layer's ``expert_ids_TK`` over the batches (inputs ``[:, :-1]``), concatenated: L x (T, K); a
    pair that is not computed (``keep_TK`` False) is -1."""
    model.eval().to(device)
    per_layer: list[list[torch.Tensor]] = []
    for batch in batches:
        out = model(batch[:, :-1].to(device))
        if not per_layer:
            per_layer = [[] for _ in out.routing]
        for l, r in enumerate(out.routing):
            ids_TK = r.expert_ids_TK if r.keep_TK is None else r.expert_ids_TK.masked_fill(~r.keep_TK, -1)
            per_layer[l].append(ids_TK.cpu())
    return [torch.cat(parts) for parts in per_layer]


def router_saturation_between(ids_a: list[torch.Tensor], ids_b: list[torch.Tensor]) -> torch.Tensor:
    """:func:`~rmoe.metrics.specialization.router_saturation` per layer: (L,) fp64."""
    return torch.stack([router_saturation(a, b) for a, b in zip(ids_a, ids_b)])
