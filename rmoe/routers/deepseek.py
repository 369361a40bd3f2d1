"""DeepSeek-V3 routing (DeepSeek-AI, "DeepSeek-V3 Technical Report", arXiv 2412.19437, Sec. 2.1.2).

Scores are sigmoids, not a softmax: ``s_te = sigmoid(x_t . w_e)`` in fp32. The choice adds the per-expert
selection bias ``b`` of auxiliary-loss-free balancing (Wang et al., arXiv 2408.15664; ``bias_update_rate``, the
paper's gamma) and is group-limited: the E experts form ``n_group`` equal groups, a group is scored from its
experts' biased scores, each token keeps its ``topk_group`` best groups and takes its top-K experts among them.
The combine weights are the unbiased scores of the chosen experts, renormalised (``norm_topk_prob``, with 1e-20
added to the sum) and multiplied by ``routed_scaling_factor``::

    g_te = routed_scaling_factor * s_te / sum_{e' in TopK} s_te'   for e in TopK(s_t + b, within the best groups)

The balance loss and the metrics read ``s_te / sum_e' s_te'`` as the probability over experts (DeepSeek's
normalised ``s'`` of the sequence-wise loss, Eq. 19); ``model.aux_loss_scope: sequence`` gives that loss.

Group scores (``group_score``): ``top2_sum``, the sum of a group's two best biased scores (DeepSeek-V3 and
transformers' ``DeepseekV3TopkRouter``); ``topk_sum``, the sum of its ``top_k / topk_group`` best (Megatron-Core's
``group_limited_topk``; the same as ``top2_sum`` at DeepSeek-V3's 8 of 4 groups); ``max``, its best score
(DeepSeek-V2's device-limited routing). Equal to transformers' router given the same weight, bias and input
(``tests/test_deepseek_router.py``), up to the order of the K chosen experts (transformers does not sort them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from rmoe.errors import RmoeError
from rmoe.routers.base import CapacityOptions, RoutingOutput, TokenChoiceRouter, fp32_linear
from rmoe.routers.registry import register_router

if TYPE_CHECKING:
    from rmoe.routers.base import RouterContext

GROUP_SCORES = ("top2_sum", "topk_sum", "max")


@dataclass
class DeepSeekOptions(CapacityOptions):
    """Args:
    n_group: Groups the E experts are split into (equal, contiguous); 1: no group limit.
    topk_group: Groups a token may choose its experts from, the best by ``group_score``.
    group_score: How a group is scored from its experts' biased scores: ``top2_sum`` (DeepSeek-V3, transformers),
        ``topk_sum`` (the best top_k / topk_group, Megatron-Core) or ``max`` (DeepSeek-V2).
    routed_scaling_factor: Multiplies the combine weights after renormalisation (DeepSeek-V3: 2.5 for 8 of 256).
    """

    n_group: int = 1
    topk_group: int = 1
    group_score: Literal["top2_sum", "topk_sum", "max"] = "top2_sum"
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_group < 1 or self.topk_group < 1:
            raise ValueError(f"n_group={self.n_group} and topk_group={self.topk_group} must be >= 1")
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group={self.topk_group} is more than n_group={self.n_group}")
        if self.group_score not in GROUP_SCORES:
            raise ValueError(f"group_score={self.group_score!r}; expected one of: {', '.join(GROUP_SCORES)}")
        if not self.routed_scaling_factor > 0:
            raise ValueError(f"routed_scaling_factor={self.routed_scaling_factor} must be > 0")


@register_router("deepseek_v3")
class DeepSeekV3Router(TokenChoiceRouter):
    """DeepSeek-V3: sigmoid scores, bias for the choice only, group-limited top-k, scaled weights (module doc)."""

    Options = DeepSeekOptions
    norm_eps: ClassVar[float] = 1e-20

    def __init__(self, config: RouterContext, layer_idx: int, shared: nn.Module | None = None) -> None:
        super().__init__(config, layer_idx, shared)
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))  # (E, D)

    @classmethod
    def check_context(cls, config: RouterContext) -> None:
        o, E, K = config.options, config.num_experts, config.top_k
        key = "model.arch.router_options"
        problem = None
        if E % o.n_group:
            problem = f"{key}.n_group={o.n_group} does not divide model.arch.num_experts={E} into equal groups"
        elif o.topk_group * (E // o.n_group) < K:
            problem = (
                f"{key}.topk_group={o.topk_group} groups of {E // o.n_group} experts (num_experts={E} / n_group="
                f"{o.n_group}) hold fewer than model.arch.top_k={K} experts"
            )
        elif o.n_group > 1 and o.group_score == "top2_sum" and E // o.n_group < 2:
            problem = f"{key}.group_score=top2_sum needs 2 experts per group; n_group={o.n_group} leaves 1"
        elif o.n_group > 1 and o.group_score == "topk_sum" and (K % o.topk_group or K // o.topk_group > E // o.n_group):
            problem = (
                f"{key}.group_score=topk_sum sums the best top_k / topk_group = {K}/{o.topk_group} experts of each "
                f"group: model.arch.top_k={K} must be a multiple of topk_group and at most topk_group * "
                f"{E // o.n_group}"
            )
        if problem:
            raise RmoeError(f"router 'deepseek_v3': {problem}.")

    def gate_scores(self, logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores_TE = torch.sigmoid(logits_TE)
        return scores_TE, scores_TE / scores_TE.sum(dim=-1, keepdim=True)

    def choose(self, choice_TE: torch.Tensor) -> torch.Tensor:
        """Top-K of the experts of each token's ``topk_group`` best groups."""
        o = self.options
        if o.n_group == 1:
            return torch.topk(choice_TE, self.top_k, dim=-1).indices
        T, E = choice_TE.shape
        choice_TGe = choice_TE.view(T, o.n_group, E // o.n_group)
        if o.group_score == "max":
            group_TG = choice_TGe.amax(dim=-1)
        else:
            per_group = 2 if o.group_score == "top2_sum" else self.top_k // o.topk_group
            group_TG = choice_TGe.topk(per_group, dim=-1).values.sum(dim=-1)
        groups_Tg = torch.topk(group_TG, o.topk_group, dim=-1).indices
        allowed_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(1, groups_Tg, True)
        allowed_TE = allowed_TG[:, :, None].expand(T, o.n_group, E // o.n_group).reshape(T, E)
        return torch.topk(choice_TE.masked_fill(~allowed_TE, float("-inf")), self.top_k, dim=-1).indices

    def weight_scale(self) -> float:
        return float(self.options.routed_scaling_factor)

    def forward(
        self, x_TD: torch.Tensor, state: Any, token_ids_BS: torch.Tensor | None = None
    ) -> tuple[RoutingOutput, Any]:
        return self.select(fp32_linear(x_TD, self.weight), token_ids_BS), state
