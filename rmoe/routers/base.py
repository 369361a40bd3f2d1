"""The router contract: the one seam every router goes through.

A router is called once per MoE layer with the layer's normalised input ``x_TD`` and the state the previous MoE
layer's router returned (``None`` at the first one); it returns this layer's routing and the state for the next.
The decoder never looks inside the state nor branches on router names, so a router that recurs over depth (RMoE)
fits without touching it.

Token-choice routers derive from :class:`TokenChoiceRouter`, which owns the choice (fp32 softmax, top-k,
renormalisation) and the options they share (:class:`TokenChoiceOptions`). Every router also states:

* :meth:`Router.causality`: whether a token's output can depend on later tokens of the forward call, in training
  and in evaluation (proven for every router by ``tests/test_router_study.py``; the first MoE layer's router
  warns once when either is not causal).
* :meth:`Router.apply_experts`: runs the experts as the routing says; default: the sorted grouped path of
  :class:`~rmoe.model.moe.GroupedExperts`; a router that mixes tokens into slots (Soft MoE) overrides it.

Shape legend: T tokens (batch x sequence, flattened), D model width, E experts, K top-k.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.distributed as dist
from torch import nn

from rmoe.errors import RmoeError

if TYPE_CHECKING:
    from rmoe.model.moe import GroupedExperts


@dataclass(frozen=True)
class RouterContext:
    """All a router is told about the model (besides each layer's tokens and state).

    Built once per model when its ``ModelConfig`` is validated (the one parse of the router options); routers
    never see the ``ModelConfig``, so they depend on nothing in :mod:`rmoe.model`. Names are the ``model.arch`` keys.

    Attributes:
        router_class: The registered router class (``model.arch.router``).
        options: ``model.arch.router_options`` parsed into ``router_class.Options``.
        hidden_size: D.
        num_experts: E.
        top_k: K.
        norm_topk_prob: Renormalise the K combine weights of token choice to sum to 1.
        initializer_range: Std of the default Normal init of router matrices.
        moe_layers: Indices (in the decoder) of the MoE layers, in depth order.
        vocab_size: V, the token ids' range (0 while the data module has not set it).
    """

    router_class: type[Router]
    options: Any
    hidden_size: int
    num_experts: int
    top_k: int
    norm_topk_prob: bool = True
    initializer_range: float = 0.02
    moe_layers: tuple[int, ...] = ()
    vocab_size: int = 0

    @property
    def router(self) -> str:
        """The registered router name."""
        return self.router_class.name

    def causality(self) -> Causality:
        """The causality the router declares with these options (training and evaluation)."""
        return self.router_class.causality(self)


def tokens_per_expert(
    expert_ids_TK: torch.Tensor, num_experts: int, keep_TK: torch.Tensor | None = None
) -> torch.Tensor:
    """Number of routed (token, expert) pairs per expert: ``(E,)`` int64, on the ids' device; with ``keep_TK``
    only the kept pairs. A ``scatter_add_`` into E + 1 bins (dropped pairs go to the last, cut off): fixed output
    size, so no host sync on CUDA, unlike ``bincount``."""
    ids_S = expert_ids_TK.reshape(-1)
    if keep_TK is not None:
        ids_S = ids_S.masked_fill(~keep_TK.reshape(-1), num_experts)  # out of place
    counts_E1 = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids_S.device)
    counts_E1.scatter_add_(0, ids_S, torch.ones_like(ids_S, dtype=torch.int64))
    return counts_E1[:num_experts]


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Tokens an expert may take: ``C = ceil(capacity_factor * T * K / E)``, clamped to [1, T]. Shared by every
    capacity router; factor 1 gives the compute of top-K token choice with perfect balance."""
    c = math.ceil(capacity_factor * num_tokens * top_k / num_experts)
    return max(1, min(num_tokens, c))


@dataclass
class RoutingOutput:
    """What a router decides for one MoE layer.

    Attributes:
        logits_TE: Router logits in fp32 (read by the z-loss and the metrics).
        probs_TE: The router's fp32 probability over experts (softmax of the logits for softmax routers); the
            balance loss uses it.
        weights_TK: Combine weights of the chosen experts (fp32).
        expert_ids_TK: Chosen expert ids (int64).
        keep_TK: True where the (token, expert) pair is computed, False where it was dropped by a capacity or is
            an unused slot (``chosen_TK``); a token with no computed pair passes through the residual. None: all.
        slot_logits_TN: For a router that mixes tokens into N slots and owns its dispatch (Soft MoE): the fp32
            token-slot logits. None otherwise.
        chosen_TK: Dynamic-k routers: True where the router chose the pair, False for an unused slot (the token
            took fewer than K experts). None: every pair was chosen. A router that sets it sets ``keep_TK`` within
            it (an unused slot is never computed), so a chosen pair that is not kept was dropped by a capacity.
        router_loss: The router's own training loss for this layer, already weighted by its coefficient (top-p's
            entropy loss, ReMoE's L1 penalty), added to the model's loss; None: none.
    """

    logits_TE: torch.Tensor
    probs_TE: torch.Tensor
    weights_TK: torch.Tensor
    expert_ids_TK: torch.Tensor
    keep_TK: torch.Tensor | None = None
    slot_logits_TN: torch.Tensor | None = None
    chosen_TK: torch.Tensor | None = None
    router_loss: torch.Tensor | None = None

    def detach(self) -> RoutingOutput:
        """The same decisions, detached (callbacks read the routing after the backward freed the graph)."""
        values = (getattr(self, f.name) for f in dataclasses.fields(self))
        return RoutingOutput(*(None if t is None else t.detach() for t in values))


@dataclass(frozen=True)
class Causality:
    """Whether a router's output for a token can depend on later tokens of the same forward call.

    Causal in a mode when every token's routing (chosen experts, combine weights, what its experts are fed) is a
    function of its own hidden and router state: the LM then decodes token by token exactly as trained, and its
    validation loss is comparable with any causal model's. Otherwise later tokens leak into earlier ones through
    the routing (expert choice, Sinkhorn, Soft MoE, capacity drops).

    Attributes:
        training: None when causal in training mode (``module.training``), else why not.
        evaluation: None when causal in evaluation mode, else why not.
    """

    training: str | None = None
    evaluation: str | None = None
    decoding: str | None = None
    """Why decoding token by token with a KV cache differs from the evaluation forward although no later token
    leaks into an earlier one (a capacity in evaluation by position: each cached step routes one token alone and
    drops nothing); None: it does not. ``rmoe generate`` and ``rmoe export`` refuse it with this reason."""

    @property
    def causal(self) -> bool:
        """Causal in both modes."""
        return self.training is None and self.evaluation is None

    def reason(self, training: bool) -> str | None:
        """Why the router is not causal in that mode (None: it is)."""
        return self.training if training else self.evaluation

    def warning(self, router: str) -> str | None:
        """The start-up warning for a non-causal router (None when causal in both modes)."""
        if self.causal:
            return None
        if self.training == self.evaluation:
            return (
                f"router {router!r} is not causal: {self.training}. An autoregressive LM trained with it leaks "
                "future information, its validation loss is not comparable with causal models', and it cannot "
                "decode token by token as trained. Use it for the router study only."
            )
        if self.evaluation is None:
            return (
                f"router {router!r} is not causal in training: {self.training}. Its evaluation routing is causal, "
                "so validation and test losses are comparable with causal models' and it decodes token by token."
            )
        parts = [f"in training: {self.training}" if self.training else "", f"in evaluation: {self.evaluation}"]
        return f"router {router!r} is not causal " + "; ".join(p for p in parts if p) + "."


CAUSAL = Causality()
"""The declaration of a router that is causal in training and evaluation."""

EvalRouting = Literal["same", "topk"]
"""``eval_routing`` of the routers that are not causal in training: ``same`` evaluates as trained, ``topk`` routes
each token by its own top-K in eval mode (causal)."""
EVAL_TOPK: Mapping[str, Any] = types.MappingProxyType({"eval_routing": "topk"})
"""Their ``Router.causal_evaluation`` offer."""


def check_eval_routing(value: str) -> None:
    """Raise unless ``value`` is an :data:`EvalRouting`."""
    if value not in typing.get_args(EvalRouting):
        raise ValueError(f"eval_routing={value!r}; expected one of: {', '.join(typing.get_args(EvalRouting))}")


@dataclass
class NoOptions:
    """Routers without options."""


@dataclass
class TokenChoiceOptions:
    """Options shared by every token-choice router (their own ``Options`` inherit these).

    Args:
        bias_update_rate: Auxiliary-loss-free load balancing (Wang et al., arXiv 2408.15664) when > 0: a
            per-expert bias ``b`` is added to the scores for the top-k *selection* only, and after every optimiser
            step ``b += rate * sign(mean load - load)``. 0 turns it off (no bias buffer, checkpoints unchanged).
    """

    bias_update_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.bias_update_rate < 0:
            raise ValueError(f"bias_update_rate={self.bias_update_rate} must be >= 0 (0 turns it off)")


CAPACITY_PRIORITIES = ("position", "probability")


@dataclass
class CapacityOptions(TokenChoiceOptions):
    """Token choice with an expert capacity (Switch Transformer, arXiv 2101.03961; GShard, arXiv 2006.16668).

    Args:
        capacity_factor: In training, each expert computes at most ``C = ceil(capacity_factor * S * K / E)`` of
            the pairs of each sequence of S tokens that chose it; the rest are dropped (the token passes through
            the residual, and the shared expert if any). None: no capacity.
        capacity_priority: Which pairs an expert keeps: ``position`` (earlier tokens first, a token's first
            choice before its second: causal, a token's slot depends on earlier tokens only) or ``probability``
            (the highest router probabilities first, as Batch Prioritized Routing: not causal, later tokens can
            take an earlier token's slot).
        eval_capacity_factor: The capacity in evaluation (None: none, so evaluation routes like plain top-k and
            decodes token by token as it validates).
    """

    capacity_factor: float | None = None
    capacity_priority: Literal["position", "probability"] = "position"
    eval_capacity_factor: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ValueError(f"{key}={value} must be > 0 (null: no capacity)")
        if self.capacity_priority not in CAPACITY_PRIORITIES:
            raise ValueError(
                f"capacity_priority={self.capacity_priority!r}; expected one of: {', '.join(CAPACITY_PRIORITIES)}"
            )


def capacity_keep_mask(
    group_TK: torch.Tensor, priority_TK: torch.Tensor | None, num_groups: int, capacity: int
) -> torch.Tensor:
    """True for the (at most ``capacity``) first pairs of each group; vectorised, no host sync.

    Args:
        group_TK: Each pair's group in [0, num_groups) (an expert, or a (sequence, expert) pair).
        priority_TK: Higher first; ties and None keep the flattened order (token by token, a token's k in order).

    The T*K pairs are ordered by priority, then grouped with a stable sort; a pair's rank is its position minus its
    group's start, and ranks below the capacity are kept.
    """
    group_S = group_TK.reshape(-1)
    if priority_TK is None:
        order_S = torch.argsort(group_S, stable=True)
    else:
        by_priority_S = torch.argsort(priority_TK.reshape(-1), descending=True, stable=True)
        order_S = by_priority_S[torch.argsort(group_S[by_priority_S], stable=True)]
    counts_G = tokens_per_expert(group_S, num_groups)
    starts_G = torch.cumsum(counts_G, dim=0) - counts_G
    rank_S = torch.arange(group_S.numel(), device=group_S.device) - starts_G[group_S[order_S]]
    keep_S = torch.empty_like(group_S, dtype=torch.bool)
    keep_S[order_S] = rank_S < capacity
    return keep_S.view_as(group_TK)


def num_sequences_of(token_ids_BS: torch.Tensor | None) -> int:
    """B of a forward call (1 when the router is called without its token ids)."""
    return 1 if token_ids_BS is None else token_ids_BS.shape[0]


def _option_type_problem(hint: Any, value: Any) -> str | None:
    """What an option of type ``hint`` expects when ``value`` is not that (None: it is): integers, finite
    numbers, booleans."""
    kinds = set(typing.get_args(hint)) if typing.get_origin(hint) in (typing.Union, types.UnionType) else {hint}
    if value is None and type(None) in kinds:
        return None
    if bool in kinds:
        return None if isinstance(value, bool) else "true or false"
    if int in kinds and float not in kinds:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if float in kinds:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok else "a finite number"
    return None


class Router(nn.Module):
    """Base class of every router; subclasses register with :func:`rmoe.routers.register_router`.

    Subclasses set ``Options`` (a dataclass of ``model.arch.router_options``), implement :meth:`forward` and
    declare :meth:`causality`. Parameters shared across layers are built once in :meth:`build_shared`; the decoder
    owns that module and hands it to every layer's router, which keeps it unregistered (counted once).
    """

    Options: ClassVar[type] = NoOptions
    name: ClassVar[str] = ""
    causal_evaluation: ClassVar[Mapping[str, Any] | None] = None
    """Router options that make evaluation causal without changing training (e.g. ``{"eval_routing": "topk"}``);
    None: no causal evaluation offered. ``ModelConfig.causal_evaluation_options`` applies and checks it."""
    weights_sum_to_one: ClassVar[bool] = True
    """A token's combine weights sum to 1 (times ``weight_scale``) under ``norm_topk_prob``; False for a router
    whose weights are gates of their own (ReMoE) or that lets a token choose no expert (null experts)."""
    compile_problem: ClassVar[str | None] = None
    """Why ``torch.compile(fullgraph=True)`` cannot trace this router (data-dependent shapes, control flow on
    tensor values), or None: it can (proven by ``tests/test_compile.py``). ``model.compile=true`` refuses the rest."""

    def __init__(self, config: RouterContext, layer_idx: int, shared: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.options = config.options
        # A plain attribute (not a submodule): the decoder owns and registers the shared module.
        self.__dict__["shared"] = shared
        moe_layers = config.moe_layers
        if not moe_layers or layer_idx == moe_layers[0]:  # once per model: the one start-up warning
            message = type(self).causality(config).warning(self.name)
            if message is not None:
                warnings.warn(message, stacklevel=2)

    @classmethod
    def causality(cls, config: RouterContext) -> Causality:
        """Whether this router, with these options, is causal in training and in evaluation."""
        raise NotImplementedError(f"router {cls.name!r} must declare its causality (Router.causality)")

    @classmethod
    def parse_options(cls, options: dict[str, Any]) -> Any:
        """Build ``cls.Options`` from a dict, with a clear error for unknown keys or bad values."""
        valid = {f.name: f for f in dataclasses.fields(cls.Options)}
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise RmoeError(
                f"model.arch.router_options has {', '.join(unknown)}, which router {cls.name!r} does not take; "
                f"valid options: {', '.join(valid) or '(none)'}."
            )
        hints = typing.get_type_hints(cls.Options)
        for key, value in options.items():
            expected = _option_type_problem(hints.get(key), value)
            if expected is not None:
                option = f"model.arch.router_options.{key}={value!r}"
                raise RmoeError(f"{option} is invalid for router {cls.name!r}; expected {expected}.")
        try:
            return cls.Options(**options)
        except (TypeError, ValueError) as err:
            raise RmoeError(f"model.arch.router_options for router {cls.name!r}: {err}") from None

    @classmethod
    def check_context(cls, config: RouterContext) -> None:
        """Refuse options that contradict the model's sizes (raise :class:`RmoeError` naming the keys); called once,
        when the model config is validated. Default: nothing to check."""

    # --- Costs, for the memory estimate, the FLOPs count and the summary; the defaults fit token choice.

    @classmethod
    def routed_pairs(cls, config: RouterContext, num_tokens: int, num_sequences: int) -> int:
        """(token, expert) rows the experts compute in one MoE layer for T tokens in B sequences
        (token choice: T * K; a capacity router: E * C; Soft MoE: its slots)."""
        return num_tokens * config.top_k

    @classmethod
    def extra_flops_per_token(cls, config: RouterContext, seq_len: int) -> float:
        """Forward FLOPs per token and MoE layer beyond 2 x the trainable parameters a token uses: products with
        frozen weights, transport iterations, mixing tokens into slots."""
        return 0.0

    @classmethod
    def saved_bytes(cls, config: RouterContext, num_tokens: int, num_sequences: int, act_bytes: int) -> int:
        """Bytes one MoE layer's router saves for the backward beyond its fp32 (T, E) logits, probabilities, z-loss
        input and weights; ``act_bytes`` is a matmul output's element size (2 under autocast)."""
        return 0

    @classmethod
    def build_shared(cls, config: RouterContext) -> nn.Module | None:
        """Parameters shared by the routers of all layers (None for per-layer routers)."""
        return None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Default init: Normal(0, initializer_range) for every matrix the router owns."""
        for p in self.parameters(recurse=True):
            if p.dim() >= 2:
                nn.init.normal_(p, std=self.config.initializer_range)

    def after_optimizer_step(self) -> None:
        """Called by the training loop on every router after each optimiser step (no-op here)."""

    def forward(
        self, x_TD: torch.Tensor, state: Any, token_ids_BS: torch.Tensor | None = None
    ) -> tuple[RoutingOutput, Any]:
        """This layer's routing of the T = B * S tokens of ``x_TD`` and the state for the next MoE layer.

        ``token_ids_BS`` are the tokens' ids (B, S), laid out as ``x_TD``: the decoder always passes them (hash
        routing reads them; capacities count per sequence); None when a router is called on bare hidden states,
        taken as one sequence.
        """
        raise NotImplementedError

    def apply_experts(
        self, x_TD: torch.Tensor, routing: RoutingOutput, experts: GroupedExperts, num_sequences: int
    ) -> torch.Tensor:
        """The routed experts' combined output (T, D), as ``routing`` says (default: ``experts(x_TD, routing)``).
        ``num_sequences`` is B; the T = B * S tokens of ``x_TD`` are laid out sequence by sequence."""
        return experts(x_TD, routing)


class TokenChoiceRouter(Router):
    """A router where each token picks its top-k experts from scores computed by the subclass.

    Subclasses compute fp32 ``logits_TE`` in :meth:`forward` and return ``self.select(logits_TE, token_ids_BS)``;
    one whose gate is not a softmax or whose choice is not a plain top-k overrides :meth:`gate_scores` or
    :meth:`choose`
    (DeepSeek-V3's sigmoid scores and group-limited choice). With :class:`CapacityOptions` the selection drops the
    pairs over an expert's capacity (:meth:`capacity_keep`). Causal unless its capacity ranks by probability, or
    a subclass whose selection compares tokens overrides :meth:`causality`.

    Auxiliary-loss-free balancing (``bias_update_rate > 0``; Wang et al., "Auxiliary-Loss-Free Load Balancing
    Strategy for Mixture-of-Experts", arXiv 2408.15664): with ``s`` the gate's scores, the top-k is taken over
    ``s + b`` but the combine weights are the unbiased ``s`` (renormalised per ``norm_topk_prob``). ``b`` is the
    persistent buffer ``balance_bias_E``; per-expert choices are counted while training and consumed by
    :meth:`after_optimizer_step`. The counter is a plain attribute, not a buffer: DDP re-broadcasts buffers from
    rank 0 at each forward, which would overwrite per-rank counts.
    """

    Options: ClassVar[type] = CapacityOptions
    causal_evaluation: ClassVar[Mapping[str, Any] | None] = {"eval_capacity_factor": None}
    norm_eps: ClassVar[float] = 0.0
    """Added to the sum of the chosen scores before renormalising (sigmoid scores can all be ~0)."""

    def __init__(self, config: RouterContext, layer_idx: int, shared: nn.Module | None = None) -> None:
        super().__init__(config, layer_idx, shared)
        self.bias_update_rate = float(self.options.bias_update_rate)
        # None (no state_dict entry) when off, so checkpoints of unbalanced routers are unchanged.
        bias_E = torch.zeros(config.num_experts) if self.bias_update_rate > 0 else None
        self.balance_bias_E: torch.Tensor | None
        self.register_buffer("balance_bias_E", bias_E, persistent=True)
        self._load_counts_E: torch.Tensor | None = None  # choices per expert since the last step

    @classmethod
    def causality(cls, config: RouterContext) -> Causality:
        """Causal (a token's routing reads its own state; the balancing bias changes only between steps) unless a
        capacity ranks pairs by probability and can drop."""
        options = config.options
        if not isinstance(options, CapacityOptions):
            return CAUSAL

        def reason(factor: float | None, key: str) -> str | None:
            if factor is None or options.capacity_priority == "position":
                return None
            if factor * config.top_k >= config.num_experts:  # C = S: an expert can take every token
                return None
            return (
                f"{key}={factor:g} with capacity_priority=probability: an expert keeps the most probable pairs of "
                "the sequence, so a later token can take an earlier token's slot"
            )

        factor = options.eval_capacity_factor
        decoding = None
        if factor is not None and factor * config.top_k < config.num_experts:
            decoding = (
                f"eval_capacity_factor={factor:g} drops pairs over an expert's capacity among the sequence's tokens, "
                "but a cached decoding step routes one token alone and drops nothing"
            )
        return Causality(
            reason(options.capacity_factor, "capacity_factor"),
            reason(factor, "eval_capacity_factor"),
            decoding,
        )

    @classmethod
    def routed_pairs(cls, config: RouterContext, num_tokens: int, num_sequences: int) -> int:
        """T * K, or with a training capacity below that, E * C per sequence."""
        pairs = num_tokens * config.top_k
        options = config.options
        if isinstance(options, CapacityOptions) and options.capacity_factor is not None:
            seq_len = max(1, num_tokens // max(1, num_sequences))
            capacity = expert_capacity(seq_len, config.num_experts, config.top_k, options.capacity_factor)
            pairs = min(pairs, num_sequences * config.num_experts * capacity)
        return pairs

    @torch.no_grad()
    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.balance_bias_E is not None:
            self.balance_bias_E.zero_()
        self._load_counts_E = None

    def gate_scores(self, logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores_TE, probs_TE)``: the scores the choice ranks and the combine weights take (fp32), and the
        probability over experts the balance loss and the metrics read. Default: both the softmax."""
        probs_TE = torch.softmax(logits_TE, dim=-1)
        return probs_TE, probs_TE

    def choose(self, choice_TE: torch.Tensor) -> torch.Tensor:
        """The K experts of each token ``(T, K)`` from its (biased) scores. Default: top-k."""
        return torch.topk(choice_TE, self.top_k, dim=-1).indices

    def weight_scale(self) -> float:
        """Multiplies the combine weights after renormalisation (DeepSeek-V3's ``routed_scaling_factor``)."""
        return 1.0

    def select(self, logits_TE: torch.Tensor, token_ids_BS: torch.Tensor | None = None) -> RoutingOutput:
        """Gate, choose (over ``scores + b`` when balancing), renormalise, scale, apply the capacity."""
        logits_TE = logits_TE.float()
        scores_TE, probs_TE = self.gate_scores(logits_TE)
        if self.balance_bias_E is None and type(self).choose is TokenChoiceRouter.choose:
            weights_TK, expert_ids_TK = torch.topk(scores_TE, self.top_k, dim=-1)
        else:
            choice_TE = scores_TE if self.balance_bias_E is None else scores_TE + self.balance_bias_E.float()
            expert_ids_TK = self.choose(choice_TE)
            weights_TK = scores_TE.gather(1, expert_ids_TK)  # unbiased scores: b steers the choice only
        if self.config.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + self.norm_eps)
        scale = self.weight_scale()
        if scale != 1.0:
            weights_TK = weights_TK * scale
        if self.training and self.balance_bias_E is not None:
            self._count_load(expert_ids_TK)
        keep_TK = self.capacity_keep(expert_ids_TK, scores_TE.gather(1, expert_ids_TK), token_ids_BS)
        return RoutingOutput(logits_TE, probs_TE, weights_TK, expert_ids_TK, keep_TK)

    def capacity(self, seq_len: int) -> int | None:
        """Pairs an expert may compute per sequence of ``seq_len`` tokens in the current mode (None: no cap)."""
        options = self.options
        if not isinstance(options, CapacityOptions):
            return None
        factor = options.capacity_factor if self.training else options.eval_capacity_factor
        return None if factor is None else expert_capacity(seq_len, self.num_experts, self.top_k, factor)

    def capacity_keep(
        self,
        expert_ids_TK: torch.Tensor,
        scores_TK: torch.Tensor,
        token_ids_BS: torch.Tensor | None,
        chosen_TK: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """The pairs within each expert's capacity, counted per sequence (None: no capacity in this mode).
        ``scores_TK``: the router's score of each pair before any renormalisation (its probability), the order of
        ``capacity_priority: probability``. Unused slots (``chosen_TK`` False) take no slot and are not kept."""
        T = expert_ids_TK.shape[0]
        B = num_sequences_of(token_ids_BS)
        capacity = self.capacity(T // B)
        if capacity is None:
            return chosen_TK
        E = self.num_experts
        sequence_T1 = (torch.arange(T, device=expert_ids_TK.device) // (T // B))[:, None]
        group_TK = sequence_T1 * E + expert_ids_TK  # (T, K) one group per (sequence, expert)
        if chosen_TK is not None:
            group_TK = group_TK.masked_fill(~chosen_TK, B * E)  # a group of their own, never kept
        priority_TK = scores_TK.detach() if self.options.capacity_priority == "probability" else None
        keep_TK = capacity_keep_mask(group_TK, priority_TK, B * E + 1, capacity)
        return keep_TK if chosen_TK is None else keep_TK & chosen_TK

    @torch.no_grad()
    def _count_load(self, expert_ids_TK: torch.Tensor, chosen_TK: torch.Tensor | None = None) -> None:
        counts_E = tokens_per_expert(expert_ids_TK, self.num_experts, chosen_TK).float()
        if self._load_counts_E is None or self._load_counts_E.device != counts_E.device:
            self._load_counts_E = counts_E
        else:
            self._load_counts_E += counts_E

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """``b += u * sign(mean load - load)`` from the loads counted since the last step, then reset. Call it on
        every rank: it all-reduces the counts when ``torch.distributed`` is initialised."""
        if self.balance_bias_E is None:
            return
        counts_E = self._load_counts_E
        if counts_E is None or counts_E.device != self.balance_bias_E.device:
            counts_E = torch.zeros(self.num_experts, device=self.balance_bias_E.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts_E, op=dist.ReduceOp.SUM)
        error_E = counts_E.mean() - counts_E  # > 0: underloaded, its bias goes up
        self.balance_bias_E += (self.bias_update_rate * torch.sign(error_E)).to(self.balance_bias_E.dtype)
        self._load_counts_E = None


def topk_softmax(logits_TE: torch.Tensor, top_k: int, norm_topk_prob: bool) -> RoutingOutput:
    """Softmax (fp32) over experts, top-k, optional renormalisation of the k weights."""
    logits_TE = logits_TE.float()
    probs_TE = torch.softmax(logits_TE, dim=-1)
    weights_TK, expert_ids_TK = torch.topk(probs_TE, top_k, dim=-1)
    if norm_topk_prob:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return RoutingOutput(logits_TE, probs_TE, weights_TK, expert_ids_TK)


def fp32_linear(x_TD: torch.Tensor, weight_ED: torch.Tensor, bias_E: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T (+ b)`` in fp32 even under autocast (router math stays in full precision)."""
    with torch.autocast(device_type=x_TD.device.type, enabled=False):
        bias_E = bias_E.float() if bias_E is not None else None
        return nn.functional.linear(x_TD.float(), weight_ED.float(), bias_E)


@torch.no_grad()
def init_linear(weight_OI: torch.Tensor, bias_O: torch.Tensor | None, init: str, std: float) -> None:
    """``torch``: nn.Linear's default, U(+-1/sqrt(fan_in)) for weight and bias; ``normal``: N(0, std), zero bias."""
    if init == "torch":
        bound = 1.0 / math.sqrt(weight_OI.shape[1])
        nn.init.uniform_(weight_OI, -bound, bound)
        if bias_O is not None:
            nn.init.uniform_(bias_O, -bound, bound)
    else:
        nn.init.normal_(weight_OI, std=std)
        if bias_O is not None:
            nn.init.zeros_(bias_O)
