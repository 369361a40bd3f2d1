"""Expert parallelism (EP): each process holds E / ep experts of every MoE layer, and the tokens travel to the
process of their expert and back with an all-to-all (Lepikhin et al., "GShard", arXiv 2006.16668; the token
dispatcher of torchtitan and Megatron-Core).

Layout: the W processes form a ``(W / ep, ep)`` device mesh, dims ``("expert_data_parallel", "expert_parallel")``.
Process ``r`` holds experts ``[i * E/ep, (i+1) * E/ep)`` with ``i = r % ep``; the ``ep`` consecutive processes of a
mesh row hold every expert between them and exchange tokens; the processes of a mesh column hold the same experts
and average their gradients. Everything else (attention, norms, embeddings, the routers and their state) is
replicated and data parallel over all W processes, so a router never sees another process's tokens and the
recurrent router's state never leaves its process.

Shape legend: T tokens of this process, K top-k, S = T*K pairs, N <= S pairs kept (sent), P = ep processes of
the EP group, E experts in all, El = E / P experts here, R rows received (pairs this process's experts compute).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from rmoe.routers import tokens_per_expert
from rmoe.syncs import to_host

if TYPE_CHECKING:
    from rmoe.model.moe import GroupedExperts

EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")
"""The parameters of :class:`~rmoe.model.moe.GroupedExperts` that EP splits on dim 0 (experts)."""


@dataclass
class DispatchStats:
    """One process's all-to-all traffic since the last :meth:`take` (one optimiser step), counted on the host
    from the split sizes each layer reads anyway: rows (token, expert pairs) of width D each way."""

    sent: int = 0  # rows sent to the other processes of the EP group (its own are not sent)
    received: int = 0  # rows received from the other processes
    computed: int = 0  # rows this process's experts computed (its load)
    seconds: float = 0.0  # time inside the all-to-alls, forward and backward (CPU: gloo blocks; CUDA: events)
    _events: list[tuple[Any, Any]] = field(default_factory=list)

    @contextmanager
    def timed(self, device: torch.device) -> Iterator[None]:
        if device.type == "cuda":  # NCCL returns at once: time on the stream, read at take()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
            return
        began = time.perf_counter()
        yield
        self.seconds += time.perf_counter() - began

    def take(self) -> dict[str, float]:
        """The counts so far (seconds of CUDA events waited for), reset to zero."""
        seconds = self.seconds
        for start, end in self._events:
            end.synchronize()
            seconds += start.elapsed_time(end) / 1000
        out = {"sent": float(self.sent), "received": float(self.received), "computed": float(self.computed),
               "seconds": seconds}  # fmt: skip
        self.sent = self.received = self.computed = 0
        self.seconds, self._events = 0.0, []
        return out


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with variable splits whose backward is the reverse exchange (as
    ``torch.distributed.nn.functional.all_to_all_single``), timed both ways into :class:`DispatchStats`."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any, stats: DispatchStats
    ) -> torch.Tensor:
        ctx.splits, ctx.group, ctx.stats = (out_splits, in_splits), group, stats
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        with stats.timed(x.device):
            dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        out_splits, in_splits = ctx.splits
        out = grad.new_empty(sum(in_splits), *grad.shape[1:])
        with ctx.stats.timed(grad.device):
            dist.all_to_all_single(out, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return out, None, None, None, None


class ExpertParallel:
    """What one MoE layer's experts need under EP: the EP process group, their place in it, the shared counters.

    Args:
        group: The process group of the ``ep`` processes that hold every expert between them.
        size: ``ep``.
        index: This process's place in ``group`` (it holds experts ``index * E/ep`` onwards).
        stats: Counters shared by every layer of the model.
    """

    def __init__(self, group: Any, size: int, index: int, stats: DispatchStats) -> None:
        self.group, self.size, self.index, self.stats = group, size, index, stats

    def run(
        self,
        x_TD: torch.Tensor,
        expert_ids_TK: torch.Tensor,
        weights_TK: torch.Tensor,
        num_experts: int,
        compute: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """``out[t] = sum_k weights[t, k] * expert_{ids[t, k]}(x[t])`` (T, D), the experts spread over the group.

        Args:
            x_TD: This process's rows, in the compute dtype.
            expert_ids_TK: Global expert ids; ``num_experts`` marks a dropped pair (sorted last, never sent).
            weights_TK: Combine weights (0 for dropped pairs).
            num_experts: E.
            compute: ``compute(x_RD, local_ids_R) -> y_RD``: this process's experts on the rows it received.

        Exchanges, per layer: the (E,) counts (one small all-to-all, read on the host: the split sizes, the one
        host sync of the layer), then the rows there and the outputs back (torchtitan's token dispatcher order).
        """
        T, K = expert_ids_TK.shape
        D = x_TD.shape[-1]
        P, El = self.size, num_experts // self.size
        ids_S = expert_ids_TK.reshape(-1)  # (S,)
        order_S = torch.argsort(ids_S, stable=True)  # (S,) grouped by expert, so by destination process
        counts_E = tokens_per_expert(ids_S, num_experts)  # (E,) kept pairs per global expert
        received_PEl = torch.empty_like(counts_E)  # (P * El,) block p: process p's pairs for each of our experts
        dist.all_to_all_single(received_PEl, counts_E, group=self.group)
        sent_host, received_host = to_host([counts_E.view(P, El).sum(1), received_PEl.view(P, El).sum(1)])
        send_splits, recv_splits = sent_host.tolist(), received_host.tolist()
        N, R = sum(send_splits), sum(recv_splits)
        stats = self.stats
        if torch.is_grad_enabled():  # training traffic only, not evaluation's
            stats.sent += N - send_splits[self.index]
            stats.received += R - recv_splits[self.index]
            stats.computed += R

        x_ND = x_TD[order_S[:N] // K]  # (N, D) kept pairs' rows, grouped by destination
        x_RD = _AllToAll.apply(x_ND, recv_splits, send_splits, self.group, stats)  # by source, then local expert
        local_ids_R = torch.arange(El, device=x_TD.device).repeat(P).repeat_interleave(received_PEl, output_size=R)
        y_RD = compute(x_RD, local_ids_R)
        y_ND = _AllToAll.apply(y_RD, send_splits, recv_splits, self.group, stats)  # (N, D) back, in send order

        y_SD = torch.cat([y_ND, y_ND.new_zeros(T * K - N, D)])  # dropped pairs: 0
        y_SD = y_SD * weights_TK.reshape(-1)[order_S].to(y_SD.dtype)[:, None]
        inverse_S = torch.empty_like(order_S)
        inverse_S[order_S] = torch.arange(order_S.numel(), device=order_S.device)
        return y_SD[inverse_S].view(T, K, D).sum(dim=1)


def local_experts(num_experts: int, size: int, index: int) -> slice:
    """The experts process ``index`` of an EP group of ``size`` holds."""
    per = num_experts // size
    return slice(index * per, (index + 1) * per)


def expert_modules(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, GroupedExperts)`` of every MoE layer under ``module``."""
    from rmoe.model.moe import GroupedExperts

    for name, child in module.named_modules():
        if isinstance(child, GroupedExperts):
            yield name, child


def shard_experts(module: nn.Module, group: Any, size: int, index: int) -> list[str]:
    """Keep this process's E / ``size`` experts of every MoE layer of ``module`` (in place, new parameters) and
    route its MoE layers through the group. Returns the names of the expert parameters (relative to
    ``module``), which data parallelism must leave alone. Idempotent."""
    stats = DispatchStats()
    names = []
    for name, experts in expert_modules(module):
        names += [f"{name}.{p}" if name else p for p in EXPERT_WEIGHTS]
        if experts.expert_parallel is not None:
            continue
        rows = local_experts(experts.num_experts, size, index)
        for p in EXPERT_WEIGHTS:
            full = getattr(experts, p)
            setattr(experts, p, nn.Parameter(full.detach()[rows].clone(), requires_grad=full.requires_grad))
        experts.expert_parallel = ExpertParallel(group, size, index, stats)
    return names


def sharded_experts(module: nn.Module) -> list[tuple[str, GroupedExperts]]:
    """``(name, GroupedExperts)`` of every MoE layer under ``module`` whose experts are sharded (empty without EP)."""
    return [(name, e) for name, e in expert_modules(module) if e.expert_parallel is not None]


def expert_parallel_of(module: nn.Module) -> ExpertParallel | None:
    """The EP group, size and counters of a model whose experts are sharded (every layer shares them); None."""
    sharded = sharded_experts(module)
    return sharded[0][1].expert_parallel if sharded else None


def expert_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The sharded expert parameters under ``module`` (empty without EP)."""
    return [getattr(e, p) for _, e in sharded_experts(module) for p in EXPERT_WEIGHTS]


def _state_keys(module: nn.Module, prefix: str) -> Iterator[tuple[str, GroupedExperts]]:
    """``(state-dict key, its GroupedExperts)`` of every sharded expert weight under ``module``."""
    for name, experts in sharded_experts(module):
        for p in EXPERT_WEIGHTS:
            yield (f"{prefix}{name}.{p}" if name else f"{prefix}{p}"), experts


def _gather_rows(tensor: torch.Tensor, group: Any, size: int) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


def gather_expert_state(module: nn.Module, state: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``state`` (``module.state_dict()`` with ``prefix``) with every sharded expert weight gathered to all E
    experts: a checkpoint that loads on one process and at any EP size. Every process of the group must call it."""
    state = dict(state)
    for key, experts in _state_keys(module, prefix):
        state[key] = _gather_rows(state[key], experts.expert_parallel.group, experts.expert_parallel.size)
    return state


def slice_expert_state(module: nn.Module, state: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The inverse of :func:`gather_expert_state`: full (E, ...) expert weights cut to this process's rows."""
    state = dict(state)
    for key, experts in _state_keys(module, prefix):
        ep = experts.expert_parallel
        if key in state and state[key].shape[0] == experts.num_experts:
            state[key] = state[key][local_experts(experts.num_experts, ep.size, ep.index)]
    return state


def _expert_param_indices(module: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> dict:
    """{index in the optimiser's state dict: ExpertParallel} of the sharded expert parameters."""
    owner = {id(getattr(e, p)): e for _, e in sharded_experts(module) for p in EXPERT_WEIGHTS}
    out = {}
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"], strict=True):
        for param, index in zip(group["params"], saved_group["params"], strict=True):
            if id(param) in owner:
                out[index] = owner[id(param)]
    return out


def gather_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with the sharded experts' moments gathered to all E experts (collective)."""
    saved = optimizer.state_dict()
    state = dict(saved["state"])
    for index, experts in _expert_param_indices(module, optimizer, saved).items():
        ep = experts.expert_parallel
        if index in state:
            state[index] = {k: _gather_rows(v, ep.group, ep.size) if torch.is_tensor(v) and v.dim() > 0 else v
                            for k, v in state[index].items()}  # fmt: skip
    return {**saved, "state": state}


def slice_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> dict:
    """A saved optimiser state (full experts) cut to this process's experts, for ``optimizer.load_state_dict``."""
    state = dict(saved["state"])
    for index, experts in _expert_param_indices(module, optimizer, saved).items():
        ep = experts.expert_parallel
        rows = local_experts(experts.num_experts, ep.size, ep.index)
        if index in state:
            state[index] = {
                k: v[rows] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == experts.num_experts else v
                for k, v in state[index].items()
            }
    return {**saved, "state": state}
