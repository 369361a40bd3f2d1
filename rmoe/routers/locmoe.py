"""LocMoE-style affinity router with expert capacity (Li et al., "LocMoE: A Low-overhead MoE for Large Language
Model Training", arXiv 2401.13920; LocMoE+, arXiv 2406.00023).

Affinity ``delta_ti = cos(x_t, w_i)`` against the rows of an orthogonal grouped-average-pooling (GAP) matrix,
``w_i = (E/D) 1{j in group i}``: with D split into E contiguous groups, ``delta_ti = sqrt(|g_i|) mean(x_t over g_i)
/ ||x_t||``. Each token takes its top-k experts over ``softmax(delta / temperature)`` (token choice); each expert
then keeps at most C of the tokens that chose it, those of highest affinity (``C = ceil(capacity_factor * T * K /
E)``); dropped pairs have ``keep_TK`` False: they contribute 0 and the token passes through the residual (and the
shared expert, if any).

Choices the papers leave open, made here:
- Only the routing is implemented; LocMoE's node-locality loss and locality-aware all-to-all concern multi-node
  expert parallelism and are out of scope.
- Combine weights are the softmax probabilities at the chosen experts, renormalised per ``norm_topk_prob``
  *before* drops (a dropped pair's share is lost, not given to the kept one), as in Switch/GShard capacity.
- C is computed over the T tokens of one forward call; LocMoE's lower bound on capacity is left to
  ``capacity_factor``. Ties in affinity keep the earlier token. The balancing bias (when on) steers the token
  choice; the capacity ranking uses the unbiased affinity, and the balancing counts choices before drops.
- When D is not divisible by E the groups differ in size by one (``torch.tensor_split``); the cosine normalises
  each row, so the affinity stays ``sqrt(|g_i|) mean_g(x) / ||x||``.

Causal only when nothing can be dropped (``capacity_factor >= E / K``): which tokens an expert keeps depends on the
other tokens of the batch, later ones included. ``eval_routing: topk`` gives a causal evaluation, training
unchanged: in eval mode no capacity, every token keeps its top-K experts (as the capacity routers of
:class:`~rmoe.routers.base.CapacityOptions` evaluate by default), so its validation and test loss compare with
causal routers' and it decodes token by token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from rmoe.routers.base import (
    CAUSAL,
    EVAL_TOPK,
    Causality,
    EvalRouting,
    RoutingOutput,
    TokenChoiceOptions,
    TokenChoiceRouter,
    capacity_keep_mask,
    check_eval_routing,
    expert_capacity,
)
from rmoe.routers.registry import register_router

if TYPE_CHECKING:
    from rmoe.routers.base import RouterContext


@dataclass
class LocMoeOptions(TokenChoiceOptions):
    """Args:
    temperature: Divides the affinities (cosines in [-1, 1]) before the softmax.
    capacity_factor: C = ceil(capacity_factor * T * K / E) kept pairs per expert at most.
    learnable_keys: Train the expert keys (initialised to the GAP rows) instead of fixing them.
    eval_routing: ``same``: the capacity applies in evaluation too, as trained (not causal when it can drop);
        ``topk``: in eval mode no capacity, each token keeps its top-K experts (causal).
    """

    temperature: float = 0.1
    capacity_factor: float = 1.25
    learnable_keys: bool = False
    eval_routing: EvalRouting = "same"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature <= 0 or self.capacity_factor <= 0:
            raise ValueError(f"temperature={self.temperature} and capacity_factor={self.capacity_factor} must be > 0")
        check_eval_routing(self.eval_routing)


def gap_rows(num_experts: int, hidden_size: int) -> torch.Tensor:
    """(E, D) grouped-average-pooling matrix: row i averages the i-th contiguous group of D."""
    rows_ED = torch.zeros(num_experts, hidden_size)
    for i, group in enumerate(torch.tensor_split(torch.arange(hidden_size), num_experts)):
        rows_ED[i, group] = 1.0 / len(group)
    return rows_ED


@register_router("locmoe")
class LocMoeRouter(TokenChoiceRouter):
    """GAP-affinity token choice, then per-expert capacity by affinity (see the module docstring).

    With fixed keys the router has no trainable parameter.
    """

    Options = LocMoeOptions
    causal_evaluation = EVAL_TOPK  # no capacity in evaluation

    def __init__(self, config: RouterContext, layer_idx: int, shared: nn.Module | None = None) -> None:
        super().__init__(config, layer_idx, shared)
        rows_ED = gap_rows(config.num_experts, config.hidden_size)
        if self.options.learnable_keys:
            self.keys = nn.Parameter(rows_ED)
        else:  # deterministic from the config: not saved
            self.register_buffer("keys", rows_ED, persistent=False)

    @classmethod
    def extra_flops_per_token(cls, config: RouterContext, seq_len: int) -> float:
        """The affinities' product with the fixed keys (a buffer), 2 * D * E; learnable keys are parameters."""
        return 0.0 if config.options.learnable_keys else 2.0 * config.hidden_size * config.num_experts

    @torch.no_grad()
    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.keys.copy_(gap_rows(self.num_experts, self.config.hidden_size))

    @classmethod
    def causality(cls, config: RouterContext) -> Causality:
        """Causal only when the capacity cannot drop: ``capacity_factor * K >= E`` (C = T); in evaluation also
        with ``eval_routing: topk``."""
        options = config.options
        if options.capacity_factor * config.top_k >= config.num_experts:
            return CAUSAL
        reason = (
            f"with capacity_factor={options.capacity_factor} (below num_experts / top_k = "
            f"{config.num_experts / config.top_k:g}) it can drop tokens: an expert keeps at most C of the tokens "
            "that chose it, and which ones depends on the later tokens"
        )
        return Causality(reason, None if options.eval_routing == "topk" else reason)

    def capacity(self, seq_len: int) -> int:
        """Over the T tokens of the forward call (LocMoE's capacity is not per sequence)."""
        return expert_capacity(seq_len, self.num_experts, self.top_k, self.options.capacity_factor)

    def capacity_keep(self, *args: Any, **kwargs: Any) -> None:
        """None: :meth:`forward` applies LocMoE's own capacity, ranked by affinity over the whole call."""
        return None

    def forward(
        self, x_TD: torch.Tensor, state: Any, token_ids_BS: torch.Tensor | None = None
    ) -> tuple[RoutingOutput, Any]:
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            affinity_TE = F.linear(
                F.normalize(x_TD.float(), dim=-1, eps=1e-6), F.normalize(self.keys.float(), dim=-1, eps=1e-6)
            )
        routing = self.select(affinity_TE / self.options.temperature)
        if not self.training and self.options.eval_routing == "topk":  # causal evaluation: no capacity
            return routing, state
        affinity_TK = affinity_TE.gather(1, routing.expert_ids_TK)
        routing.keep_TK = capacity_keep_mask(
            routing.expert_ids_TK, affinity_TK.detach(), self.num_experts, self.capacity(x_TD.shape[0])
        )
        return routing, state
