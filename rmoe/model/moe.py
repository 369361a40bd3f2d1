"""Sparse MoE block: a router, grouped SwiGLU experts with sort-based dispatch, a shared expert.

Shape legend: T tokens, D model width, F expert width, E experts, K top-k, S = T*K routed
(token, expert) pairs.

Dispatch: the T*K pairs are sorted by expert id so every expert's tokens are one contiguous group;
each projection is then ONE grouped matmul over the groups (``torch.nn.functional.grouped_mm``,
no host sync at all) or, on CPU where that kernel is slower, plain matmuls on contiguous slices
after a single host read of the group sizes per layer (never one sync per expert). Every expert
runs, on an empty slice if it got no token, so every expert weight is in the autograd graph and
DDP needs no ``find_unused_parameters``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rmoe.model.config import ModelConfig
from rmoe.routers import RoutingOutput, get_router_class


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``, the Qwen2/LLaMA MLP (names match transformers)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _grouped_mm_available(device: torch.device) -> bool:
    if not hasattr(F, "grouped_mm"):
        return False
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as 3-D weights (the layout of transformers' ``Qwen2MoeExperts``).

    ``gate_up_proj``: (E, 2F, D), gate rows first; ``down_proj``: (E, D, F).
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, backend: str = "auto") -> None:
        super().__init__()
        self.num_experts = num_experts
        self.backend = backend
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def _resolve_backend(self, x: torch.Tensor) -> str:
        if self.backend == "auto":
            return "grouped_mm" if _grouped_mm_available(x.device) else "loop"
        return self.backend

    def forward(self, x_TD: torch.Tensor, routing: RoutingOutput) -> torch.Tensor:
        """Weighted sum over each token's chosen experts; dropped pairs (``keep_TK`` False) give 0."""
        T, D = x_TD.shape
        E = self.num_experts
        expert_ids_TK, weights_TK = routing.expert_ids_TK, routing.weights_TK
        K = expert_ids_TK.shape[1]
        if routing.keep_TK is not None:  # dropped pairs get the id E: sorted last, never computed
            expert_ids_TK = expert_ids_TK.masked_fill(~routing.keep_TK, E)
            weights_TK = weights_TK.masked_fill(~routing.keep_TK, 0.0)

        ids_S = expert_ids_TK.reshape(-1)  # (S,)
        order_S = torch.argsort(ids_S, stable=True)  # (S,) pair index, grouped by expert
        token_S = order_S // K  # (S,) token of each sorted pair
        counts_E1 = torch.bincount(ids_S, minlength=E + 1)  # (E+1,) last slot: dropped pairs
        x_SD = x_TD[token_S]

        if self._resolve_backend(x_TD) == "grouped_mm":
            y_SD = self._grouped_mm_swiglu(x_SD, counts_E1[:E])
            if routing.keep_TK is not None:  # rows past the last group are left uninitialised
                valid_S = torch.arange(ids_S.numel(), device=x_TD.device) < counts_E1[:E].sum()
                y_SD = torch.where(valid_S[:, None], y_SD, 0.0)
        else:
            y_SD = self._loop_swiglu(x_SD, counts_E1.tolist())  # the one host sync of this layer

        w_S = weights_TK.reshape(-1)[order_S].to(y_SD.dtype)
        y_SD = y_SD * w_S[:, None]
        # Undo the sort with a gather (deterministic, unlike index_add_ on CUDA), then sum over K.
        inverse_S = torch.empty_like(order_S)
        inverse_S[order_S] = torch.arange(order_S.numel(), device=order_S.device)
        return y_SD[inverse_S].view(T, K, D).sum(dim=1).to(x_TD.dtype)

    def _loop_swiglu(self, x_SD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        num_kept = sum(counts[: self.num_experts])
        outputs = []
        for e, x_e in enumerate(x_SD[:num_kept].split(counts[: self.num_experts])):
            gate, up = F.linear(x_e, self.gate_up_proj[e]).chunk(2, dim=-1)  # empty x_e: still in graph
            outputs.append(F.linear(F.silu(gate) * up, self.down_proj[e]))
        if counts[self.num_experts]:
            outputs.append(x_SD.new_zeros(counts[self.num_experts], x_SD.shape[1]))
        return torch.cat(outputs)

    def _grouped_mm_swiglu(self, x_SD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        offsets_E = torch.cumsum(counts_E, dim=0, dtype=torch.int32)
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else self.gate_up_proj.dtype
        # grouped_mm is not autocast-aware: cast by hand to the autocast dtype.
        gate_up_S2F = F.grouped_mm(
            x_SD.to(dtype), self.gate_up_proj.to(dtype).transpose(-2, -1), offs=offsets_E
        )
        gate, up = gate_up_S2F.chunk(2, dim=-1)
        return F.grouped_mm(F.silu(gate) * up, self.down_proj.to(dtype).transpose(-2, -1), offs=offsets_E)


class SparseMoeBlock(nn.Module):
    """Router + routed experts (+ optional sigmoid-gated shared expert), Qwen2-MoE style."""

    def __init__(self, config: ModelConfig, layer_idx: int, shared_router: nn.Module | None) -> None:
        super().__init__()
        self.router = get_router_class(config.router)(config, layer_idx, shared_router)
        self.experts = GroupedExperts(
            config.num_experts, config.hidden_size, config.moe_intermediate_size, config.expert_backend
        )
        self.shared_expert: SwiGLU | None = None
        self.shared_expert_gate: nn.Linear | None = None
        if config.shared_expert_intermediate_size > 0:
            self.shared_expert = SwiGLU(config.hidden_size, config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, x_BSD: torch.Tensor, router_state: Any) -> tuple[torch.Tensor, RoutingOutput, Any]:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        routing, router_state = self.router(x_TD, router_state)
        out_TD = self.experts(x_TD, routing)
        if self.shared_expert is not None:
            out_TD = out_TD + torch.sigmoid(self.shared_expert_gate(x_TD)) * self.shared_expert(x_TD)
        return out_TD.view(B, S, D), routing, router_state
