"""Expert-choice routers: each expert takes its top-C tokens of the batch, by one of three plans.

* ``expert_choice`` (Zhou et al., "Mixture-of-Experts with Expert Choice Routing", NeurIPS 2022, arXiv 2202.09368;
  the "softmax expert choice" of Liu et al., arXiv 2401.15969): ``S = softmax(X W^T)`` over experts (T, E);
  expert e takes the C tokens of highest ``S[:, e]``.
* ``sinkhorn_expert_choice`` (Liu et al., arXiv 2401.15969, "Sinkhorn expert choice"): ranked instead by the
  entropic balanced plan ``P = Sinkhorn(exp(logits / epsilon))`` (rows sum to 1, columns to T/E;
  :func:`~rmoe.routers.transport.sinkhorn_potentials`).
* ``sparse_expert_choice`` (Liu et al., "sparsity-constrained expert choice"; here with the squared-L2-regularised
  plan of Blondel et al., "Smooth and Sparse Optimal Transport", arXiv 1710.06276): ranked by the sparse plan
  ``P = [logits / gamma + f 1^T + 1 g^T]_+`` (:func:`~rmoe.routers.transport.sparse_potentials`). Liu et al.'s
  own sparse router bounds the non-zeros per column (Liu, Puigcerver, Blondel, arXiv 2209.15466); the squared-L2
  plan is sparse through its threshold instead, with the sparsity set by ``gamma``.

``C = ceil(capacity_factor * T * K / E)``, so on average a token gets K experts; some get none and pass through
the residual. For the plans, expert e ranks tokens by ``f_t + logits_te / epsilon`` (Sinkhorn; monotone in P's
column) or ``f_t + logits_te / gamma`` (sparse: P's order where P > 0, and below the threshold by distance to it,
so a column with fewer than C non-zeros still takes C tokens). Gates: ``combine: softmax`` (default; Liu et al.'s code)
the softmax probabilities ``S`` of the chosen pairs, ``combine: plan`` the plan's entries (differentiable in the
logits with the potentials held fixed). Gates are not renormalised (as in the paper): ``norm_topk_prob`` does
not apply.

NOT CAUSAL whenever the capacity can drop (``capacity_factor * K < E``): whether token t is processed depends on
later tokens of the batch. With ``capacity_factor * K >= E`` every expert takes every token: a causal dense MoE,
unless ``combine: plan`` gates mix the batch. ``eval_routing: topk`` gives a causal evaluation: in eval mode every
token takes its top-K experts of ``S`` with gates ``S`` (not renormalised); training is unchanged.

Representation: ``expert_ids_TK`` lists all E experts for every token (K = E columns), ``keep_TK`` marks the chosen
pairs and ``weights_TK`` holds the gates (0 elsewhere), so the dispatch gathers T*E rows before dropping the unkept
ones, the Switch auxiliary loss is the constant 1 (no gradient), and per-expert token counts must read ``keep_TK``.
With ``eval_routing: topk`` the eval-mode routing is a plain top-K one (K columns, no ``keep_TK``).

Shape legend: T tokens, D model width, E experts, K top-k, C capacity (tokens per expert).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

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
    expert_capacity,
    fp32_linear,
)
from rmoe.routers.registry import register_router
from rmoe.routers.transport import sinkhorn_potentials, sparse_potentials

if TYPE_CHECKING:
    from rmoe.routers.base import RouterContext


@dataclass
class ExpertChoiceOptions:
    """Args:
    capacity_factor: C = ceil(capacity_factor * T * K / E) tokens per expert; 1 matches the compute of top-K
        token choice. The paper's capacity factor c is ``K * capacity_factor``: its "EC-CF2" is ``top_k: 2,
        capacity_factor: 1``.
    eval_routing: ``same``: evaluate with expert choice, as trained (not causal); ``topk``: in eval mode each
        token takes its top-K experts of the softmax (causal).
    """

    capacity_factor: float = 1.0
    eval_routing: EvalRouting = "same"

    def __post_init__(self) -> None:
        if self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor={self.capacity_factor} must be > 0")
        check_eval_routing(self.eval_routing)


@dataclass
class PlanOptions:
    """Options of a transport plan (shared by the Sinkhorn and sparse routers).

    Args:
        num_iters: Iterations of the plan's solver (one row and one column update each), >= 1. Columns are exact;
            the row error falls with the iterations and grows with the logits' spread: Sinkhorn's default 10 keeps
            row sums within 1e-4 of 1 on 4096 x 8 logits of std ~1.4, about 5e-3 at std 3 (then raise it).
        combine: Gate values of the chosen pairs: ``softmax`` of the logits (Liu et al.'s code) or the ``plan``'s
            entries.
    """

    num_iters: int = 10
    combine: Literal["softmax", "plan"] = "softmax"

    def __post_init__(self) -> None:
        if isinstance(self.num_iters, bool) or not isinstance(self.num_iters, int) or self.num_iters < 1:
            raise ValueError(f"num_iters={self.num_iters!r} must be an integer >= 1")
        if self.combine not in ("softmax", "plan"):
            raise ValueError(f"combine={self.combine!r}; expected one of: softmax, plan")


class PlanCosts:
    """Cost methods of the routers that solve a transport plan (a mixin)."""

    @classmethod
    def saved_bytes(cls, config: RouterContext, num_tokens: int, num_sequences: int, act_bytes: int) -> int:
        """Two fp32 (T, E) iterates per solver iteration, saved by autograd's trace of the loop."""
        return 2 * config.options.num_iters * num_tokens * config.num_experts * 4

    @classmethod
    def extra_flops_per_token(cls, config: RouterContext, seq_len: int) -> float:
        """A row and a column update per iteration, each reading every entry about twice."""
        return 4.0 * config.options.num_iters * config.num_experts


@dataclass
class SinkhornExpertChoiceOptions(PlanOptions, ExpertChoiceOptions):
    """Args:
    epsilon: Entropic regularisation, > 0: the plan is Sinkhorn(exp(logits / epsilon)).
    """

    epsilon: float = 1.0

    def __post_init__(self) -> None:
        ExpertChoiceOptions.__post_init__(self)
        PlanOptions.__post_init__(self)
        if self.epsilon <= 0:
            raise ValueError(f"epsilon={self.epsilon} must be > 0")


@dataclass
class SparseExpertChoiceOptions(PlanOptions, ExpertChoiceOptions):
    """Args:
    gamma: Squared-L2 regularisation, > 0: the plan is ``[logits / gamma + f + g]_+``; smaller is sparser.
    num_iters: Block-coordinate ascent iterations (default 25: row sums within 1e-3 of 1 for logits up to std 3
        on 4096 x 8, columns exact).
    """

    gamma: float = 1.0
    num_iters: int = 25

    def __post_init__(self) -> None:
        ExpertChoiceOptions.__post_init__(self)
        PlanOptions.__post_init__(self)
        if self.gamma <= 0:
            raise ValueError(f"gamma={self.gamma} must be > 0")


EXPERT_CHOICE_REASON = (
    "each expert picks its top-C tokens among the whole batch, so a token's experts depend on later tokens"
)


@register_router("expert_choice")
class ExpertChoiceRouter(Router):
    """Each expert takes its top-C tokens of the batch by the softmax (see the module docstring).

    Subclasses change the ranking and the gates through :meth:`rank_and_gate`.
    """

    Options = ExpertChoiceOptions
    causal_evaluation = EVAL_TOPK  # each token's softmax top-K in evaluation

    def __init__(self, config: RouterContext, layer_idx: int, shared: nn.Module | None = None) -> None:
        super().__init__(config, layer_idx, shared)
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))  # (E, D)

    @classmethod
    def gates_are_per_token(cls, options: Any) -> bool:
        """Whether a chosen pair's gate reads only its token (the softmax does; a plan does not)."""
        return getattr(options, "combine", "softmax") == "softmax"

    @classmethod
    def causality(cls, config: RouterContext) -> Causality:
        """Not causal when the capacity can drop or the gates come from a plan (causal eval: ``eval_routing: topk``)."""
        options = config.options
        if options.capacity_factor * config.top_k < config.num_experts:
            training = EXPERT_CHOICE_REASON
        elif not cls.gates_are_per_token(options):
            training = "the gates are the transport plan's entries, which are normalised over the whole batch"
        else:
            return CAUSAL  # every expert takes every token, gated by the token's own softmax: a dense MoE
        return Causality(training, None if options.eval_routing == "topk" else training)

    @classmethod
    def routed_pairs(cls, config: RouterContext, num_tokens: int, num_sequences: int) -> int:
        """E experts of C tokens each."""
        return config.num_experts * expert_capacity(
            num_tokens, config.num_experts, config.top_k, config.options.capacity_factor
        )

    def capacity(self, num_tokens: int) -> int:
        return expert_capacity(num_tokens, self.num_experts, self.top_k, self.options.capacity_factor)

    def rank_and_gate(self, logits_TE: torch.Tensor, probs_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rank_TE, gates_TE)``: each expert takes the C tokens of highest ``rank_TE[:, e]``, gated by
        ``gates_TE``. Softmax expert choice: both are the softmax probabilities."""
        return probs_TE, probs_TE

    def forward(
        self, x_TD: torch.Tensor, state: Any, token_ids_BS: torch.Tensor | None = None
    ) -> tuple[RoutingOutput, Any]:
        T, E = x_TD.shape[0], self.num_experts
        logits_TE = fp32_linear(x_TD, self.weight)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        if not self.training and self.options.eval_routing == "topk":  # causal evaluation: token choice
            weights_TK, expert_ids_TK = torch.topk(probs_TE, self.top_k, dim=-1)
            return RoutingOutput(logits_TE, probs_TE, weights_TK, expert_ids_TK), state
        rank_TE, gates_TE = self.rank_and_gate(logits_TE, probs_TE)
        token_CE = torch.topk(rank_TE.detach(), self.capacity(T), dim=0).indices  # each expert's chosen tokens
        keep_TE = torch.zeros(T, E, dtype=torch.bool, device=x_TD.device).scatter_(0, token_CE, True)
        weights_TE = gates_TE.masked_fill(~keep_TE, 0.0)
        expert_ids_TE = torch.arange(E, device=x_TD.device).expand(T, E)
        return RoutingOutput(logits_TE, probs_TE, weights_TE, expert_ids_TE, keep_TE), state


@register_router("sinkhorn_expert_choice")
class SinkhornExpertChoiceRouter(PlanCosts, ExpertChoiceRouter):
    """Expert choice ranked by the entropic balanced plan (Liu et al., arXiv 2401.15969; module docstring)."""

    Options = SinkhornExpertChoiceOptions

    def rank_and_gate(self, logits_TE: torch.Tensor, probs_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        o = self.options
        f_T, g_E = sinkhorn_potentials(logits_TE, o.num_iters, o.epsilon)
        log_plan_TE = logits_TE / o.epsilon + f_T[:, None] + g_E
        return log_plan_TE, (torch.exp(log_plan_TE) if o.combine == "plan" else probs_TE)


@register_router("sparse_expert_choice")
class SparseExpertChoiceRouter(PlanCosts, ExpertChoiceRouter):
    """Expert choice ranked by the squared-L2 (sparse) balanced plan (Blondel et al., arXiv 1710.06276)."""

    Options = SparseExpertChoiceOptions

    def rank_and_gate(self, logits_TE: torch.Tensor, probs_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        o = self.options
        f_T, g_E = sparse_potentials(logits_TE, o.num_iters, o.gamma)
        shifted_TE = logits_TE / o.gamma + f_T[:, None] + g_E  # the plan before its threshold at 0
        return shifted_TE, (torch.relu(shifted_TE) if o.combine == "plan" else probs_TE)
