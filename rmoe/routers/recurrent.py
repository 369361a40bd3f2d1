"""The layerwise recurrent router of RMoE (Qiu et al., "Layerwise Recurrent Router for Mixture-of-Experts",
ICLR 2025, arXiv 2408.06793, Sec. 3, Eqs. 4-6), with the paper's ablations (Tables 4-7) as options.

At MoE layer i, with x_i the MoE block's normalised input (T, D):

    x'_i = Proj_i(x_i)              D -> P (+ bias with ``bias``)        (Eq. 4)
    h_i  = Cell(x'_i, h_{i-1})      one cell for all layers              (Eq. 5; h_0 = 0)
    logits_i = G_i n(h_i)           P -> E (+ bias), per layer           (Eq. 6)

then fp32 softmax, top-k and renormalisation; ``n`` is the identity (paper) or, with ``state_norm: rms``, a
parameter-free RMS normalisation of h_i (the state passed on stays h_i).

Scale at initialisation: the cell's state is bounded (|h| < 1) and small from small inputs, so the logits' scale at
step 0 depends on how Proj_i and G_i start. ``init: torch`` is what the authors' models used (their released enwik8
checkpoints show nn.Linear / nn.GRUCell defaults with biases: ``weight_hh`` of the NP runs, which no gradient
reaches, is at std 0.0511 = 1/sqrt(3 x 128)). ``init: normal`` (N(0, initializer_range), the rest of the model's
init) starts the logits an order of magnitude below a linear router's (near-uniform probabilities).

The recurrence runs over depth only: every token is routed in parallel and nothing is carried across positions, so
causal decoding is unaffected. The experts receive x_i (never x'_i), and h never enters the residual stream; it
travels between MoE layers as the opaque router state (:class:`RecurrentState`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from rmoe.routers.base import CapacityOptions, RoutingOutput, TokenChoiceRouter, fp32_linear, init_linear
from rmoe.routers.cosine import CosineScorer, check_cosine_options
from rmoe.routers.registry import register_router

if TYPE_CHECKING:
    from rmoe.routers.base import RouterContext

_CELLS = {"gru": nn.GRUCell, "rnn": nn.RNNCell, "lstm": nn.LSTMCell}


@dataclass
class RecurrentOptions(CapacityOptions):
    """Args:
    state_dim: Width P of the projected input and of the recurrent state (paper: 128).
    cell: ``gru`` (paper), ``rnn`` (tanh) or ``lstm`` (its state carries (h, c)).
    projector: ``layerwise`` (one Proj_i per layer, paper) or ``shared`` (one for all).
    pass_state: False is the paper's "NP": every layer starts from h_0 = 0 (same parameters and FLOPs, no
        cross-layer information).
    detach_state: Pass h forward but stop its gradient between layers (forward information only).
    residual_alpha: Residual routing ("r-alpha"): add alpha times the previous MoE layer's final router logits
        to this layer's logits. 0: off.
    residual_detach: Stop the gradient through those previous logits.
    head: ``linear`` (G_i, paper) or ``cosine`` (X-MoE's cosine head on h_i, "XMoE + GRU", Table 2).
    cosine_dim: Cosine head only: down-projection width of h before the cosine (0: none).
    cosine_init_temperature: Cosine head only: initial learnable temperature.
    cosine_min_temperature: Cosine head only: lower clamp of the temperature.
    init: How the projector and head matrices start: ``torch`` (nn.Linear's default, U(+-1/sqrt(fan_in)), like
        the cell and the authors' models) or ``normal`` (N(0, initializer_range), like the rest of the model).
    bias: Biases on the projector and the linear head (as in the authors' models); they start at 0 with
        ``init: normal`` and U(+-1/sqrt(fan_in)) with ``init: torch``.
    state_norm: ``none`` (paper) or ``rms``: the head reads h_i / rms(h_i), so the logits' scale is the head's
        whatever the state's (parameter-free; the passed state is unchanged).
    head_init_std: ``init: normal`` only: std of G_i (null: initializer_range).
    """

    state_dim: int = 128
    cell: Literal["gru", "rnn", "lstm"] = "gru"
    projector: Literal["layerwise", "shared"] = "layerwise"
    pass_state: bool = True
    detach_state: bool = False
    residual_alpha: float = 0.0
    residual_detach: bool = False
    head: Literal["linear", "cosine"] = "linear"
    cosine_dim: int = 16
    cosine_init_temperature: float = 0.07
    cosine_min_temperature: float = 0.01
    init: Literal["torch", "normal"] = "torch"
    bias: bool = True
    state_norm: Literal["none", "rms"] = "none"
    head_init_std: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for key, choices in (
            ("cell", tuple(_CELLS)),
            ("projector", ("layerwise", "shared")),
            ("head", ("linear", "cosine")),
            ("init", ("torch", "normal")),
            ("state_norm", ("none", "rms")),
        ):
            if getattr(self, key) not in choices:
                raise ValueError(f"{key}={getattr(self, key)!r}; expected one of: {', '.join(choices)}")
        if self.state_dim <= 0:
            raise ValueError(f"state_dim={self.state_dim} must be a positive integer")
        if self.detach_state and not self.pass_state:
            raise ValueError("detach_state: true does nothing with pass_state: false (no state is passed)")
        if self.head_init_std is not None:
            if self.init != "normal" or self.head != "linear":
                raise ValueError("head_init_std only applies to init: normal with head: linear")
            if not self.head_init_std > 0:
                raise ValueError(f"head_init_std={self.head_init_std} must be > 0 (or null for initializer_range)")
        if self.residual_detach and self.residual_alpha == 0:
            raise ValueError("residual_detach: true does nothing with residual_alpha: 0 (residual routing is off)")
        cosine_keys = ("cosine_dim", "cosine_init_temperature", "cosine_min_temperature")
        if self.head == "linear":
            changed = [k for k in cosine_keys if getattr(self, k) != type(self).__dataclass_fields__[k].default]
            if changed:
                raise ValueError(f"{', '.join(changed)} only apply to head: cosine, not head: linear")
        else:
            check_cosine_options(self.cosine_dim, self.cosine_init_temperature, self.cosine_min_temperature)


@dataclass
class RecurrentState:
    """What one MoE layer's recurrent router hands to the next (opaque to the decoder).

    Attributes:
        h_TP: The cell output h_i (None when ``pass_state`` is false).
        c_TP: The LSTM memory cell (None for the other cells).
        logits_TE: This layer's router logits, for residual routing (None when it is off).
    """

    h_TP: torch.Tensor | None
    c_TP: torch.Tensor | None = None
    logits_TE: torch.Tensor | None = None


class RecurrentCore(nn.Module):
    """The parameters all layers share: the cell (``torch.nn.*Cell`` conventions and init) and, with
    ``projector: shared``, the projector."""

    def __init__(self, config: RouterContext, options: RecurrentOptions) -> None:
        super().__init__()
        P = options.state_dim
        self.kind = options.cell
        self.cell = _CELLS[options.cell](P, P)  # gates with input and hidden biases
        shared = options.projector == "shared"
        self.proj = nn.Parameter(torch.empty(P, config.hidden_size)) if shared else None
        self.proj_bias = nn.Parameter(torch.empty(P)) if shared and options.bias else None
        self.init = options.init
        self.initializer_range = config.initializer_range

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.cell.reset_parameters()  # PyTorch's U(-1/sqrt(P), 1/sqrt(P)) for every cell weight and bias
        if self.proj is not None:
            init_linear(self.proj, self.proj_bias, self.init, self.initializer_range)

    def step(
        self, x_TP: torch.Tensor, h_TP: torch.Tensor, c_TP: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One cell step in fp32 (even under autocast or with low-precision weights)."""
        c = self.cell
        weights = (c.weight_ih.float(), c.weight_hh.float(), c.bias_ih.float(), c.bias_hh.float())
        with torch.autocast(device_type=x_TP.device.type, enabled=False):
            if self.kind == "gru":
                return torch.gru_cell(x_TP, h_TP, *weights), None
            if self.kind == "rnn":
                return torch.rnn_tanh_cell(x_TP, h_TP, *weights), None
            h_TP, c_TP = torch.lstm_cell(x_TP, (h_TP, c_TP), *weights)
            return h_TP, c_TP


@register_router("recurrent", aliases=("gru",))
class RecurrentRouter(TokenChoiceRouter):
    """RMoE's router (see the module docstring); ``cell`` also selects the rnn and lstm variants.

    Per layer it owns the projector (``proj``, (P, D), unless shared) and the head: ``gate`` ((E, P)) or a
    :class:`~rmoe.routers.cosine.CosineScorer`. Gradients flow through h across layers unless ``detach_state``.
    """

    Options = RecurrentOptions

    def __init__(self, config: RouterContext, layer_idx: int, shared: nn.Module | None = None) -> None:
        super().__init__(config, layer_idx, shared)
        if not isinstance(shared, RecurrentCore):
            raise ValueError("RecurrentRouter needs the shared cell from RecurrentRouter.build_shared")
        o, P = self.options, self.options.state_dim
        layerwise = o.projector == "layerwise"
        self.proj = nn.Parameter(torch.empty(P, config.hidden_size)) if layerwise else None
        self.proj_bias = nn.Parameter(torch.empty(P)) if layerwise and o.bias else None
        self.gate: nn.Parameter | None = None
        self.gate_bias: nn.Parameter | None = None
        self.scorer: CosineScorer | None = None
        if o.head == "linear":
            self.gate = nn.Parameter(torch.empty(config.num_experts, P))
            self.gate_bias = nn.Parameter(torch.empty(config.num_experts)) if o.bias else None
        else:
            self.scorer = CosineScorer(
                P,
                config.num_experts,
                o.cosine_dim,
                o.cosine_init_temperature,
                o.cosine_min_temperature,
                config.initializer_range,
            )

    @classmethod
    def build_shared(cls, config: RouterContext) -> nn.Module:
        options = config.options
        cross_layer = [k for k in ("detach_state", "residual_alpha", "residual_detach") if getattr(options, k)]
        if not options.pass_state:
            cross_layer.append("pass_state")
        if len(config.moe_layers) < 2 and cross_layer:
            warnings.warn(
                f"router_options {', '.join(cross_layer)} do nothing with a single MoE layer "
                "(there is no previous layer to take a state or logits from).",
                stacklevel=2,
            )
        return RecurrentCore(config, options)

    @classmethod
    def saved_bytes(cls, config: RouterContext, num_tokens: int, num_sequences: int, act_bytes: int) -> int:
        """About 8 fp32 (T, P) tensors: the projected input, the cell's gates and workspace, the state passed on."""
        return 8 * num_tokens * config.options.state_dim * 4

    @torch.no_grad()
    def reset_parameters(self) -> None:
        super().reset_parameters()  # the bias-balancing buffer; matrices are set below
        o, std = self.options, self.config.initializer_range
        if self.proj is not None:
            init_linear(self.proj, self.proj_bias, o.init, std)
        if self.gate is not None:
            init_linear(self.gate, self.gate_bias, o.init, o.head_init_std or std)
        if self.scorer is not None:
            self.scorer.reset_parameters()

    def forward(
        self, x_TD: torch.Tensor, state: RecurrentState | None, token_ids_BS: torch.Tensor | None = None
    ) -> tuple[RoutingOutput, Any]:
        o = self.options
        core: RecurrentCore = self.shared
        if self.proj is not None:
            x_TP = fp32_linear(x_TD, self.proj, self.proj_bias)  # Eq. 4
        else:
            x_TP = fp32_linear(x_TD, core.proj, core.proj_bias)

        h_TP, c_TP = None, None
        if o.pass_state and state is not None:
            h_TP, c_TP = state.h_TP, state.c_TP
            if o.detach_state:
                h_TP = h_TP.detach()
                c_TP = c_TP.detach() if c_TP is not None else None
        if h_TP is None:  # h_0 = 0: the first MoE layer, or every layer with pass_state false
            h_TP = x_TP.new_zeros(x_TP.shape)
            c_TP = x_TP.new_zeros(x_TP.shape) if core.kind == "lstm" else None
        h_TP, c_TP = core.step(x_TP, h_TP, c_TP)  # Eq. 5

        head_TP = rms_normalize(h_TP) if o.state_norm == "rms" else h_TP
        if self.scorer is None:
            logits_TE = fp32_linear(head_TP, self.gate, self.gate_bias)  # Eq. 6
        else:
            logits_TE = self.scorer(head_TP)
        if o.residual_alpha and state is not None and state.logits_TE is not None:
            previous_TE = state.logits_TE.detach() if o.residual_detach else state.logits_TE
            logits_TE = logits_TE + o.residual_alpha * previous_TE

        next_state = RecurrentState(
            h_TP=h_TP if o.pass_state else None,
            c_TP=c_TP if o.pass_state else None,
            logits_TE=logits_TE if o.residual_alpha else None,
        )
        return self.select(logits_TE, token_ids_BS), next_state


def rms_normalize(x_TP: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps)`` over the last dimension, no gain (fp32)."""
    x_TP = x_TP.float()
    return x_TP * torch.rsqrt(x_TP.pow(2).mean(dim=-1, keepdim=True) + eps)
