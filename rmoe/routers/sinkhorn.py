"""Sinkhorn token choice (Liu, Blondel, Riquelme, Puigcerver, "Routers in Vision Mixture of Experts: An Empirical
Study", arXiv 2401.15969, Sec. 3.1; BASE layers, Lewis et al., arXiv 2103.16716; S-BASE, Clark et al., "Unified
Scaling Laws for Routed Language Models", arXiv 2202.01169).

1. ``logits = x W^T`` (D -> E, no bias), fp32.
2. The entropic balanced plan ``P = Sinkhorn(exp(logits / epsilon))`` over the T tokens of the forward call: rows
   sum to 1, columns to T/E (:func:`~rmoe.routers.transport.sinkhorn_potentials`, no gradient).
3. Each token takes the top-K experts of its row of P. With P = exp(logits/eps + f 1^T + 1 g^T) the row order is
   that of ``logits / epsilon + g`` (``f_t`` is a per-row constant): balance enters through the experts' ``g``.
4. Gates: ``combine: softmax`` (default; Liu et al.'s code) the softmax of the logits at the chosen experts,
   ``combine: plan`` P's entries (differentiable in the logits with the potentials held fixed); renormalised over
   the K per ``model.arch.norm_topk_prob``.

``probs_TE`` is the softmax of the logits, so the balance loss and the metrics read the router's own distribution.

NOT CAUSAL in training (unless K = E with softmax gates): the potentials g depend on every token of the batch,
later ones included. ``eval_routing: topk`` is BASE / S-BASE's switch: Sinkhorn in training only, plain softmax
top-K in eval mode (exactly the ``linear`` router), which is causal. ``eval_routing: same`` (default) evaluates
with Sinkhorn over the evaluation batch, as Liu et al. do for images, which is not causal.

Shape legend: T tokens, D model width, E experts, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rmoe.routers.base import (
    CAUSAL,
    EVAL_TOPK,
    Causality,
    EvalRouting,
    Router,
    RoutingOutput,
    check_eval_routing,
    fp32_linear,
    topk_softmax,
)
from rmoe.routers.expert_choice import PlanCosts, PlanOptions
from rmoe.routers.registry import register_router
from rmoe.routers.transport import sinkhorn_potentials

if TYPE_CHECKING:
    from rmoe.routers.base import RouterContext


@dataclass
class SinkhornTokenChoiceOptions(PlanOptions):
    """Args:
    epsilon: Entropic regularisation, > 0: the plan is Sinkhorn(exp(logits / epsilon)).
    eval_routing: ``same``: Sinkhorn in evaluation too (not causal); ``topk``: plain softmax top-K in eval mode
        (BASE / S-BASE; causal evaluation).
    """

    epsilon: float = 1.0
    eval_routing: EvalRouting = "same"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.epsilon <= 0:
            raise ValueError(f"epsilon={self.epsilon} must be > 0")
        check_eval_routing(self.eval_routing)


@register_router("sinkhorn_token_choice")
class SinkhornTokenChoiceRouter(PlanCosts, Router):
    """Top-K of the Sinkhorn plan per token (see the module docstring). The state passes through."""

    Options = SinkhornTokenChoiceOptions
    causal_evaluation = EVAL_TOPK  # S-BASE: Sinkhorn in training only

    def __init__(self, config: RouterContext, layer_idx: int, shared: nn.Module | None = None) -> None:
        super().__init__(config, layer_idx, shared)
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))  # (E, D)

    @classmethod
    def causality(cls, config: RouterContext) -> Causality:
        """Training: not causal (the expert potentials read the whole batch) unless every token takes every expert
        with softmax gates. Evaluation: causal with ``eval_routing: topk``."""
        options = config.options
        if config.top_k == config.num_experts and options.combine == "softmax":
            return CAUSAL
        training = (
            "the Sinkhorn plan balances the experts over the whole batch, so a token's experts depend on later tokens"
        )
        if options.combine == "plan":
            training += " and its gates are the plan's entries"
        return Causality(training, None if options.eval_routing == "topk" else training)

    def forward(
        self, x_TD: torch.Tensor, state: Any, token_ids_BS: torch.Tensor | None = None
    ) -> tuple[RoutingOutput, Any]:
        o = self.options
        logits_TE = fp32_linear(x_TD, self.weight)
        if not self.training and o.eval_routing == "topk":  # S-BASE: plain top-k at evaluation
            return topk_softmax(logits_TE, self.top_k, self.config.norm_topk_prob), state
        probs_TE = torch.softmax(logits_TE, dim=-1)
        f_T, g_E = sinkhorn_potentials(logits_TE, o.num_iters, o.epsilon)
        expert_ids_TK = torch.topk(logits_TE.detach() / o.epsilon + g_E, self.top_k, dim=-1).indices
        if o.combine == "plan":
            gates_TE = torch.exp(logits_TE / o.epsilon + f_T[:, None] + g_E)
        else:
            gates_TE = probs_TE
        weights_TK = gates_TE.gather(1, expert_ids_TK)
        if self.config.norm_topk_prob:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return RoutingOutput(logits_TE, probs_TE, weights_TK, expert_ids_TK), state
