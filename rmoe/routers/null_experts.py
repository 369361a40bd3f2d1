"""Null experts (AdaMoE: Zeng et al., "AdaMoE: Token-Adaptive Routing with Null Experts for Mixture-of-Experts
Language Models", Findings of EMNLP 2024, arXiv 2406.13233).

The router scores E real and N null experts, ``p_t = softmax(x_t W^T)`` over E + N (W is (E + N, D)), and each
token takes its top-K of the E + N. A null expert computes nothing (its output is 0), so a token that spends some of
its K choices on null experts uses fewer real experts: ``top_k`` is the number of slots, and the real experts per
token vary from 0 to K (AdaMoE raises top-k above the dense baseline's and lets the balance loss set the mean, e.g.
K = 4 with N = E for 2 real experts per token on average). The combine weights (authors' code, both experiments):

    g_te = p_te / sum_{e' in TopK(p_t), e' < E} p_te'     for a real e in TopK(p_t); null slots weigh 0

(``norm_topk_prob``; ``normalize_over: slots`` divides by the sum over all K chosen slots instead, null ones
included, so a null choice takes its share of the token's output away; without ``norm_topk_prob`` the weights are
the probabilities ``p_te``). A token that chose only null experts passes through the residual.

Balance loss (AdaMoE's; the authors' MoLA code): Switch's loss over the E + N experts with the null experts' loads
averaged (they are interchangeable, so only their total matters), ``f_i`` the share of the T*K choices that went to
i and ``P_i`` the mean of ``p_ti``::

    L = (E + N) * sum_{i < E + N} f~_i P_i,   f~_i = f_i (real i),   f~_i = (1/N) sum_{j >= E} f_j (null i)

1 at perfect balance, where the null experts take ``N / (E + N)`` of the choices. It is this router's own
``router_loss`` (times ``balance_loss_coef``): the model's balance loss reads ``probs_TE``, a distribution over the
E real experts only, and cannot see the null experts' mass. Set ``model.aux_loss_coef: 0`` for AdaMoE's objective
alone (configs/router/null_experts.yaml); with both, the real experts are also balanced among themselves.

Representation: K slots; ``chosen_TK`` is True where the slot chose a real expert; a null slot has id 0 (any real
id would do), weight 0 and ``keep_TK`` False, so it is never computed nor counted as load. ``probs_TE`` is the real
experts' probabilities renormalised (what the metrics and the model's balance loss read); ``logits_TE`` are the real
experts' logits shifted per token so that their logsumexp is that of all E + N logits: ``softmax(logits_TE) =
probs_TE``, and the z-loss (ST-MoE, arXiv 2202.08906) covers the whole router, null logits included.

Causal: a token's choice reads its own logits only (a capacity is per the base class).

Shape legend: T tokens, D model width, E real experts, N null experts, X = E + N, K slots (top_k).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from rmoe.errors import RmoeError
from rmoe.routers.base import CapacityOptions, RoutingOutput, TokenChoiceRouter, fp32_linear
from rmoe.routers.registry import register_router

if TYPE_CHECKING:
    from rmoe.routers.base import RouterContext

NORMALIZE_OVER = ("real", "slots")


@dataclass
class NullExpertsOptions(CapacityOptions):
    """Args:
    num_null_experts: N, the null experts added to the E real ones (null: N = E). 0 is plain top-k routing.
    balance_loss_coef: Coefficient of AdaMoE's balance loss over the E + N experts (the router's own loss,
        ``train/router_loss``); 0 turns it off.
    normalize_over: With ``norm_topk_prob``, what the chosen real experts' weights are divided by: ``real``, their
        own sum (AdaMoE; the null logits get no gradient from the LM loss) or ``slots``, the sum over the K chosen
        slots, null ones included (a null choice scales the token's output down; the LM loss reaches the null
        logits).
    """

    num_null_experts: int | None = None
    balance_loss_coef: float = 0.01
    normalize_over: Literal["real", "slots"] = "real"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_null_experts is not None and self.num_null_experts < 0:
            raise ValueError(f"num_null_experts={self.num_null_experts} must be >= 0 (null: as many as num_experts)")
        if not self.balance_loss_coef >= 0:
            raise ValueError(f"balance_loss_coef={self.balance_loss_coef} must be >= 0 (0 turns it off)")
        if self.normalize_over not in NORMALIZE_OVER:
            raise ValueError(f"normalize_over={self.normalize_over!r}; expected one of: {', '.join(NORMALIZE_OVER)}")


def null_balance_loss(probs_TX: torch.Tensor, choice_ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """AdaMoE's balance loss (module docstring): Switch's ``X * sum_i f_i P_i`` over the X = E + N experts with
    the null experts' ``f`` replaced by their mean. ``choice_ids_TK`` are ids in [0, X); only ``P`` has a gradient."""
    X = probs_TX.shape[1]
    counts_X = torch.zeros(X, dtype=probs_TX.dtype, device=probs_TX.device)
    counts_X.scatter_add_(0, choice_ids_TK.reshape(-1), torch.ones_like(choice_ids_TK, dtype=probs_TX.dtype).view(-1))
    fraction_X = counts_X / choice_ids_TK.numel()
    if X > num_experts:  # the nulls are interchangeable: only their total load is balanced
        null_mean = fraction_X[num_experts:].mean()
        fraction_X = torch.cat([fraction_X[:num_experts], null_mean.expand(X - num_experts)])
    return X * torch.sum(fraction_X * probs_TX.mean(dim=0))


@register_router("null_experts")
class NullExpertsRouter(TokenChoiceRouter):
    """AdaMoE: top-K over E real and N null experts; null choices compute nothing (module docstring)."""

    Options = NullExpertsOptions
    weights_sum_to_one = False

    def __init__(self, config: RouterContext, layer_idx: int, shared: nn.Module | None = None) -> None:
        super().__init__(config, layer_idx, shared)
        n = self.options.num_null_experts
        self.num_null_experts = config.num_experts if n is None else n
        # one (E + N, D) matrix: the null rows are in the graph even when no loss reaches them
        self.weight = nn.Parameter(torch.empty(config.num_experts + self.num_null_experts, config.hidden_size))

    @classmethod
    def check_context(cls, config: RouterContext) -> None:
        if config.options.normalize_over != "real" and not config.norm_topk_prob:
            raise RmoeError(
                "router 'null_experts': model.arch.router_options.normalize_over="
                f"{config.options.normalize_over} does nothing with model.arch.norm_topk_prob=false (the weights are "
                "then the probabilities); drop it or set norm_topk_prob: true."
            )

    def forward(
        self, x_TD: torch.Tensor, state: Any, token_ids_BS: torch.Tensor | None = None
    ) -> tuple[RoutingOutput, Any]:
        logits_TX = fp32_linear(x_TD, self.weight)
        return self.select(logits_TX, token_ids_BS), state

    def select(self, logits_TX: torch.Tensor, token_ids_BS: torch.Tensor | None = None) -> RoutingOutput:
        """1. softmax over E + N; 2. top-K (over ``p + b`` with bias balancing, b = 0 on the null experts);
        3. null slots: unchosen, weight 0, id 0; 4. renormalise; 5. capacity over the real choices."""
        E = self.num_experts
        logits_TX = logits_TX.float()
        probs_TX = torch.softmax(logits_TX, dim=-1)
        choice_TX = probs_TX
        if self.balance_bias_E is not None:  # the bias steers the real experts only
            choice_TX = probs_TX + F.pad(self.balance_bias_E.float(), (0, self.num_null_experts))
        choice_ids_TK = torch.topk(choice_TX, self.top_k, dim=-1).indices
        chosen_TK = choice_ids_TK < E
        top_TK = probs_TX.gather(1, choice_ids_TK)
        weights_TK = top_TK.masked_fill(~chosen_TK, 0.0)
        if self.config.norm_topk_prob:
            norm_T1 = (weights_TK if self.options.normalize_over == "real" else top_TK).sum(dim=-1, keepdim=True)
            # a token with only null choices has all weights 0: keep them 0 rather than 0 / 0
            weights_TK = weights_TK / torch.where(norm_T1 > 0, norm_T1, torch.ones_like(norm_T1))
        expert_ids_TK = choice_ids_TK.masked_fill(~chosen_TK, 0)  # a placeholder, never computed
        if self.training and self.balance_bias_E is not None:
            self._count_load(expert_ids_TK, chosen_TK)
        keep_TK = self.capacity_keep(expert_ids_TK, top_TK, token_ids_BS, chosen_TK)
        # a per-token shift: the softmax over the real experts is unchanged, the logsumexp is the whole router's
        logits_TE = torch.log_softmax(logits_TX[:, :E], dim=-1) + torch.logsumexp(logits_TX, dim=-1, keepdim=True)
        router_loss = None
        if self.options.balance_loss_coef > 0:
            router_loss = self.options.balance_loss_coef * null_balance_loss(probs_TX, choice_ids_TK, E)
        return RoutingOutput(
            logits_TE,
            torch.softmax(logits_TE, dim=-1),
            weights_TK,
            expert_ids_TK,
            keep_TK,
            chosen_TK=chosen_TK,
            router_loss=router_loss,
        )
