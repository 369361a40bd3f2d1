"""ReMoE: ReLU routing with an adaptive L1 penalty (Wang, Chen and Zhu, "ReMoE: Fully Differentiable
Mixture-of-Experts with ReLU Routing", ICLR 2025, arXiv 2412.14711).

The gates are a ReLU instead of softmax and top-k, ``R(x_t) = ReLU(x_t W^T)`` (W: (E, D), fp32, no bias, N(0,
initializer_range) as the rest of the model, like the authors' Megatron code). A token uses every expert whose gate
is positive, weighted by the gate itself (no renormalisation, no top-k)::

    y_t = sum_{e : R_e(x_t) > 0} R_e(x_t) E_e(x_t)

How many experts are active is steered by an L1 penalty on the gates whose coefficient adapts to the measured
sparsity. By default the penalty is the load-balanced form the paper proposes (the only one of the authors' code,
github.com/thu-ml/ReMoE; ``load_balanced: true``); ``load_balanced: false`` sets ``f_e = 1``, the plain L1::

    L_reg = lambda_i * (1/T) sum_t sum_e f_e R_e(x_t),   f_e = E / (k T) * #{t : R_e(x_t) > 0}  (no gradient)
    lambda_{i+1} = lambda_i * alpha ^ sign(S_target - S_i),   S_target = 1 - k / E

``S_i`` is the share of zero gates of optimiser step i over every MoE layer, micro-batch and data-parallel rank;
``k = target_experts`` (default ``top_k``: a ReMoE run is compute-matched to top-k), ``lambda_0 = 1e-8`` and
``alpha = 1.2`` (the authors' defaults); at ``S_i = S_target`` lambda stays (the paper's sign; their code divides).
The penalty is the router's ``router_loss`` (the training loop averages it over the layers, as the paper's
``1/L``); the Switch balance loss is not used (the config sets ``model.aux_loss_coef: 0``).

One lambda for all layers (the paper's; the authors keep it on the model): it lives in the module shared by the
layers (:class:`AdaptiveL1`) as a persistent integer exponent ``n``, ``lambda = lambda_0 * alpha ^ n``: each
update is ``n += sign(S_target - S_i)``, which is the recurrence above, exact over any number of steps, and a
resume (or a cast of the model to bf16) continues with exactly the same lambda.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from rmoe.errors import RmoeError
from rmoe.routers.base import CAUSAL, Router, RoutingOutput, fp32_linear
from rmoe.routers.registry import register_router

if TYPE_CHECKING:
    from rmoe.routers.base import Causality, RouterContext


@dataclass
class ReluRoutingOptions:
    """Args:
    target_experts: Mean active experts per token that the adaptive L1 steers to (the target sparsity is
        ``1 - target_experts / num_experts``); a number strictly between 0 and ``num_experts``. null: ``top_k``.
    l1_coef_init: lambda_0, the L1 coefficient at the start of training (paper: 1e-8).
    l1_coef_multiplier: alpha > 1: after every optimiser step lambda is multiplied by alpha when the gates were
        denser than the target and divided by it when sparser (paper: 1.2).
    load_balanced: Weight each expert's L1 by its load ``f_e`` (the paper's load-balanced penalty, its default);
        false: the plain L1 of the gates.
    """

    target_experts: float | None = None
    l1_coef_init: float = 1e-8
    l1_coef_multiplier: float = 1.2
    load_balanced: bool = True

    def __post_init__(self) -> None:
        if self.target_experts is not None and not self.target_experts > 0:
            raise ValueError(f"target_experts={self.target_experts} must be > 0 (null: top_k)")
        if not self.l1_coef_init > 0:
            raise ValueError(f"l1_coef_init={self.l1_coef_init} must be > 0")
        if not self.l1_coef_multiplier > 1:
            raise ValueError(f"l1_coef_multiplier={self.l1_coef_multiplier} must be > 1")


def target_experts_of(config: RouterContext) -> float:
    """k: ``target_experts``, or ``top_k`` when it is null."""
    target = config.options.target_experts
    return float(config.top_k if target is None else target)


class AdaptiveL1(nn.Module):
    """The one L1 coefficient of all layers and the gate counts of the current optimiser step.

    ``l1_exponent`` (persistent int64 buffer) is n in ``lambda = lambda_0 * alpha ^ n``. The counts (active gates,
    gates) are a plain attribute, not a buffer: DDP re-broadcasts buffers from rank 0 at each forward, which would
    overwrite the other ranks' counts.
    """

    def __init__(self, config: RouterContext) -> None:
        super().__init__()
        options = config.options
        self.l1_coef_init = float(options.l1_coef_init)
        self.l1_coef_multiplier = float(options.l1_coef_multiplier)
        self.num_experts = config.num_experts
        self.target_experts = target_experts_of(config)
        self.l1_exponent: torch.Tensor
        self.register_buffer("l1_exponent", torch.zeros((), dtype=torch.int64), persistent=True)
        self._counts_2: torch.Tensor | None = None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.l1_exponent.zero_()
        self._counts_2 = None

    def coefficient(self) -> torch.Tensor:
        """lambda, an fp32 scalar on the buffer's device (no host sync)."""
        return self.l1_coef_init * torch.pow(self.l1_coef_multiplier, self.l1_exponent.float())

    @torch.no_grad()
    def count(self, chosen_TE: torch.Tensor) -> None:
        """Add a layer's active gates and gates to the step's counts."""
        active = chosen_TE.sum()
        counts_2 = torch.stack((active, torch.full_like(active, chosen_TE.numel())))
        if self._counts_2 is None or self._counts_2.device != counts_2.device:
            self._counts_2 = counts_2
        else:
            self._counts_2 += counts_2

    @torch.no_grad()
    def update(self) -> None:
        """``n += sign(S_target - S)`` from the counts of the step (summed over the ranks), then reset them.

        ``S_target - S = active / gates - k / E`` has the sign of ``E * active - k * gates``: no division, no host
        sync, and a step without a counted forward (0 gates) leaves lambda as it is."""
        counts_2 = self._counts_2
        if counts_2 is None or counts_2.device != self.l1_exponent.device:
            counts_2 = torch.zeros(2, dtype=torch.int64, device=self.l1_exponent.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts_2, op=dist.ReduceOp.SUM)
        denser_by = self.num_experts * counts_2[0].float() - self.target_experts * counts_2[1].float()
        self.l1_exponent += torch.sign(denser_by).long()
        self._counts_2 = None


def gate_distribution(gates_TE: torch.Tensor) -> torch.Tensor:
    """The gates normalised per token, what the balance loss and the metrics read as the probability over experts;
    a token with no active expert reads uniform (a distribution still, no NaN in the forward or the backward)."""
    sum_T1 = gates_TE.sum(dim=-1, keepdim=True)
    active_T1 = sum_T1 > 0
    probs_TE = gates_TE / torch.where(active_T1, sum_T1, 1.0)
    return torch.where(active_T1, probs_TE, 1.0 / gates_TE.shape[-1])


def l1_penalty(
    gates_TE: torch.Tensor, chosen_TE: torch.Tensor, target_experts: float, load_balanced: bool
) -> torch.Tensor:
    """``(1/T) sum_t sum_e f_e R_e(x_t)`` with ``f_e = E / (k T) * #{t : R_e(x_t) > 0}`` (no gradient: a count; 1 per
    expert at a balanced load of k experts per token), or with ``f_e = 1`` when not ``load_balanced``."""
    mean_gate_E = gates_TE.mean(dim=0)
    if not load_balanced:
        return mean_gate_E.sum()
    T, E = gates_TE.shape
    load_E = chosen_TE.sum(dim=0).float() * (E / (target_experts * T))
    return (load_E * mean_gate_E).sum()


@register_router("remoe")
class ReluRouter(Router):
    """ReMoE's ReLU router (see the module docstring): every expert with a positive gate, weighted by the gate.

    The routing lists all E experts per token (``expert_ids_TK`` = arange(E)), ``weights_TK`` are the gates and
    ``chosen_TK`` = ``keep_TK`` mark the positive ones; ``router_loss`` is ``lambda * L_reg`` of this layer.
    """

    Options = ReluRoutingOptions
    weights_sum_to_one = False

    def __init__(self, config: RouterContext, layer_idx: int, shared: nn.Module | None = None) -> None:
        super().__init__(config, layer_idx, shared)
        if not isinstance(shared, AdaptiveL1):
            raise ValueError("ReluRouter needs the shared coefficient from ReluRouter.build_shared")
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))  # (E, D)
        # one update of lambda per optimiser step: the first MoE layer's router makes it for all
        self.updates_coefficient = not config.moe_layers or layer_idx == config.moe_layers[0]

    @classmethod
    def causality(cls, config: RouterContext) -> Causality:
        """Causal: a token's gates read its own hidden state; lambda changes between steps only (the load ``f_e``
        of the penalty reads the batch, but only the loss's gradient, never a token's output)."""
        return CAUSAL

    @classmethod
    def check_context(cls, config: RouterContext) -> None:
        k, E = target_experts_of(config), config.num_experts
        if 0 < k < E:
            return
        target = (
            f"model.arch.router_options.target_experts={k:g}"
            if config.options.target_experts is not None
            else f"model.arch.top_k={config.top_k} (model.arch.router_options.target_experts is null, so top_k)"
        )
        raise RmoeError(
            f"router 'remoe': the target of active experts {target} must be strictly between 0 and "
            f"model.arch.num_experts={E}: the adaptive L1 steers the share of zero gates to 1 - target / num_experts, "
            "and at num_experts that target is 0 (every gate positive), which the penalty can only reach by "
            "switching itself off (lambda falls forever and the layer is a dense ReLU-gated MoE), while 0 asks "
            "for no expert at all (lambda grows forever). Set model.arch.router_options.target_experts (or "
            "model.arch.top_k) below model.arch.num_experts."
        )

    @classmethod
    def build_shared(cls, config: RouterContext) -> nn.Module:
        return AdaptiveL1(config)

    @classmethod
    def routed_pairs(cls, config: RouterContext, num_tokens: int, num_sequences: int) -> int:
        """T * E: a token may activate every expert (early in training, before lambda has grown, about half do)."""
        return num_tokens * config.num_experts

    @classmethod
    def saved_bytes(cls, config: RouterContext, num_tokens: int, num_sequences: int, act_bytes: int) -> int:
        """The (T, E) bool mask of the active gates, saved by the experts' masking of the weights."""
        return num_tokens * config.num_experts

    def after_optimizer_step(self) -> None:
        """Update lambda once per step (from the first MoE layer's router); call it on every rank."""
        if self.updates_coefficient:
            self.shared.update()

    def forward(
        self, x_TD: torch.Tensor, state: Any, token_ids_BS: torch.Tensor | None = None
    ) -> tuple[RoutingOutput, Any]:
        l1: AdaptiveL1 = self.shared
        logits_TE = fp32_linear(x_TD, self.weight)
        gates_TE = torch.relu(logits_TE)
        chosen_TE = gates_TE > 0
        if self.training and torch.is_grad_enabled():  # a forward of an optimiser step (as the authors' code)
            l1.count(chosen_TE)
        T, E = gates_TE.shape
        expert_ids_TE = torch.arange(E, device=gates_TE.device).expand(T, E).contiguous()
        penalty = l1_penalty(gates_TE, chosen_TE, l1.target_experts, self.options.load_balanced)
        routing = RoutingOutput(
            logits_TE,
            gate_distribution(gates_TE),
            gates_TE,
            expert_ids_TE,
            keep_TK=chosen_TE,
            chosen_TK=chosen_TE,
            router_loss=l1.coefficient() * penalty,
        )
        return routing, state
