"""Soft MoE (Puigcerver, Riquelme, Mustafa, Houlsby, "From Sparse to Soft Mixtures of Experts", ICLR 2024, arXiv
2308.00951; the "Soft MoE" router of Liu et al., arXiv 2401.15969).

Every expert has P slots (``slots_per_expert``), N = E * P in all, each with a learnable vector ``phi_n`` (the
columns of the paper's Phi, stored as the rows of ``slot_embeddings``, (N, D)). Per sequence of S tokens (paper,
Sec. 2.1 and Algorithm 1):

1. ``logits[s, n] = x_s . phi_n`` in fp32, or with ``normalize: true`` (Sec. 2.3) ``scale * (x_s / ||x_s||) .
   (phi_n / ||phi_n||)``, ``scale`` a learnable scalar initialised to 1.
2. Dispatch ``D = softmax over the S tokens`` (each column sums to 1); slot inputs ``x~_n = sum_s D[s, n] x_s``.
3. Each expert e runs on its P slots (through the same sorted grouped path as token choice, one contiguous group
   of B * P rows per expert).
4. Combine ``C = softmax over the N slots`` (each row sums to 1); ``y_s = sum_n C[s, n] f(x~_n)``. Nothing is
   dropped.

The dispatch runs over **each sequence separately** (in the paper a group is one image's tokens): a sequence's
output does not depend on the batch it is in, and the compute per sequence is fixed, so
``slots_per_expert = S * K / E`` matches the expert compute of top-K token choice at sequence length S.

NOT CAUSAL, in training and evaluation: every slot averages the whole sequence. No causal evaluation is offered
(it would need every position's own prefix-restricted slots: S times the expert compute).

``RoutingOutput`` carries ``slot_logits_TN`` (for :meth:`apply_experts`) and, for metrics and losses,
``probs_TE[t, e] = sum_{n in e} C[t, n]`` (token t's output share from expert e's slots) and
``logits_TE[t, e] = logsumexp_{n in e} logits[t, n]`` (so ``softmax(logits_TE) = probs_TE``); ``expert_ids_TK``
lists all E experts, ``weights_TK = probs_TE``. The Switch loss is then the constant 1 (zero gradient): the paper
uses neither it nor the z-loss, so set ``model.aux_loss_coef=0 model.z_loss_coef=0`` (as the router study does).

Shape legend: B sequences, S tokens per sequence, T = B * S, D model width, E experts, P slots per expert,
N = E * P slots, R = B * N slot rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from rmoe.routers.base import Causality, Router, RoutingOutput, fp32_linear
from rmoe.routers.registry import register_router

if TYPE_CHECKING:
    from rmoe.model.moe import GroupedExperts
    from rmoe.routers.base import RouterContext


@dataclass
class SoftMoeOptions:
    """Args:
    slots_per_expert: P, slots per expert per sequence (>= 1); ``S * K / E`` matches top-K's compute.
    normalize: The paper's L2 normalisation of tokens and slot vectors with a learnable scale
        (Sec. 2.3); false: raw dot products ``x . phi``.
    """

    slots_per_expert: int = 1
    normalize: bool = True

    def __post_init__(self) -> None:
        p = self.slots_per_expert
        if isinstance(p, bool) or not isinstance(p, int) or p < 1:
            raise ValueError(f"slots_per_expert={p!r} must be an integer >= 1")


@register_router("soft_moe")
class SoftMoeRouter(Router):
    """Soft MoE: slots per expert, dispatch softmax over each sequence's tokens, combine softmax over slots (see the
    module docstring). Owns its dispatch (:meth:`apply_experts`)."""

    Options = SoftMoeOptions

    def __init__(self, config: RouterContext, layer_idx: int, shared: nn.Module | None = None) -> None:
        super().__init__(config, layer_idx, shared)
        self.slots_per_expert = self.options.slots_per_expert
        self.num_slots = config.num_experts * self.slots_per_expert
        self.slot_embeddings = nn.Parameter(torch.empty(self.num_slots, config.hidden_size))  # (N, D), expert-major
        self.scale = nn.Parameter(torch.ones(())) if self.options.normalize else None

    @classmethod
    def causality(cls, config: RouterContext) -> Causality:
        reason = "every slot is a softmax-weighted average of all tokens of the sequence, later ones included"
        return Causality(reason, reason)

    @classmethod
    def routed_pairs(cls, config: RouterContext, num_tokens: int, num_sequences: int) -> int:
        """Every slot of every sequence: B * E * P rows, whatever the sequence length."""
        return num_sequences * config.num_experts * config.options.slots_per_expert

    @classmethod
    def extra_flops_per_token(cls, config: RouterContext, seq_len: int) -> float:
        """The dispatch and combine products with the tokens, (N, S) x (S, D) and (S, N) x (N, D)."""
        return 4.0 * config.num_experts * config.options.slots_per_expert * config.hidden_size

    @classmethod
    def saved_bytes(cls, config: RouterContext, num_tokens: int, num_sequences: int, act_bytes: int) -> int:
        """The fp32 slot logits and both softmaxes (T, N), and the combined output (T, D)."""
        slots = config.num_experts * config.options.slots_per_expert
        return 3 * num_tokens * slots * 4 + num_tokens * config.hidden_size * act_bytes

    @torch.no_grad()
    def reset_parameters(self) -> None:
        super().reset_parameters()  # slot vectors ~ N(0, initializer_range)
        if self.scale is not None:
            self.scale.fill_(1.0)

    def slot_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """``logits_TN`` in fp32 (step 1 of the module docstring)."""
        if self.scale is None:
            return fp32_linear(x_TD, self.slot_embeddings)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            x_TD = F.normalize(x_TD.float(), dim=-1, eps=1e-6)
            slots_ND = F.normalize(self.slot_embeddings.float(), dim=-1, eps=1e-6)
            return self.scale.float() * F.linear(x_TD, slots_ND)

    def forward(
        self, x_TD: torch.Tensor, state: Any, token_ids_BS: torch.Tensor | None = None
    ) -> tuple[RoutingOutput, Any]:
        T, E = x_TD.shape[0], self.num_experts
        slot_logits_TN = self.slot_logits(x_TD)
        logits_TE = torch.logsumexp(slot_logits_TN.view(T, E, self.slots_per_expert), dim=-1)
        probs_TE = torch.softmax(logits_TE, dim=-1)  # = combine weights summed over each expert's slots
        expert_ids_TE = torch.arange(E, device=x_TD.device).expand(T, E)
        routing = RoutingOutput(logits_TE, probs_TE, probs_TE, expert_ids_TE, slot_logits_TN=slot_logits_TN)
        return routing, state

    def dispatch_and_combine(self, routing: RoutingOutput, num_sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dispatch_BSN, combine_BSN)`` in fp32: softmax over each sequence's tokens, over the slots."""
        T, N = routing.slot_logits_TN.shape
        logits_BSN = routing.slot_logits_TN.view(num_sequences, T // num_sequences, N)
        return torch.softmax(logits_BSN, dim=1), torch.softmax(logits_BSN, dim=2)

    def apply_experts(
        self, x_TD: torch.Tensor, routing: RoutingOutput, experts: GroupedExperts, num_sequences: int
    ) -> torch.Tensor:
        """Steps 2-4 of the module docstring: mix tokens into slots, run the experts, mix back. (T, D)."""
        T, D = x_TD.shape
        B, E, P = num_sequences, self.num_experts, self.slots_per_expert
        dispatch_BSN, combine_BSN = self.dispatch_and_combine(routing, B)
        x_BSD = x_TD.view(B, T // B, D)
        slots_BND = torch.bmm(dispatch_BSN.transpose(1, 2).to(x_TD.dtype), x_BSD)
        slots_RD = slots_BND.view(B, E, P, D).transpose(0, 1).reshape(E * B * P, D)  # expert-major rows
        expert_ids_R1 = torch.arange(E, device=x_TD.device).repeat_interleave(B * P)[:, None]
        y_RD = experts.run(slots_RD, expert_ids_R1, slots_RD.new_ones(E * B * P, 1))
        y_BND = y_RD.view(E, B, P, D).transpose(0, 1).reshape(B, E * P, D)
        return torch.bmm(combine_BSN.to(y_BND.dtype), y_BND).reshape(T, D)
