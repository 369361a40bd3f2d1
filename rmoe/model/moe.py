"""Sparse MoE block: a router, grouped SwiGLU experts with sort-based dispatch, a shared expert.

Shape legend: T tokens, D model width, F expert width, E experts, K top-k, S = T*K routed (token, expert) pairs,
N <= S of them kept (a capacity router may drop some).

Dispatch: the pairs are sorted by expert id so every expert's tokens are one contiguous group; each projection is
then ONE ``F.grouped_mm`` over the groups (no host sync; where its fused kernel is proven: bf16 on Hopper) or,
elsewhere, plain matmuls on contiguous slices after one host read of the group sizes per layer, with a hand-written
backward: :class:`_SlicedExperts` gathers the (S, D) expert inputs once, :class:`_TiledExperts` gathers each
expert's rows just before its matmuls (no (S, D) copy). Every expert takes part, with a zero gradient if it got no
token, so DDP needs no ``find_unused_parameters``.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from rmoe.errors import RmoeError
from rmoe.model.config import ModelConfig
from rmoe.routers import RoutingOutput, tokens_per_expert

if TYPE_CHECKING:
    from rmoe.model.expert_parallel import ExpertParallel


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``, the Qwen2/LLaMA MLP (names match transformers)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# On CPU, ``auto`` takes ``tiled`` once the (S, D) copies of ``sliced`` reach this size (half a 32 MiB L3).
TILED_MIN_BYTES = 16 * 2**20


def grouped_mm_stride_problem(dtype: torch.dtype, hidden_size: int, expert_size: int) -> str | None:
    """Why ``F.grouped_mm`` cannot take these widths (None: it can): its operands and gradients need 16-byte row
    strides, so rows of ``hidden_size`` and of ``expert_size`` must be multiples of 16 bytes in the compute dtype."""
    multiple = max(1, 16 // dtype.itemsize)
    if hidden_size % multiple == 0 and expert_size % multiple == 0:
        return None
    return (
        f"model.arch.hidden_size={hidden_size} and model.arch.moe_intermediate_size={expert_size} must both be "
        f"multiples of {multiple} in {str(dtype).removeprefix('torch.')} (grouped_mm needs 16-byte row strides)"
    )


def grouped_mm_unavailable(device: torch.device, dtype: torch.dtype, hidden_size: int, expert_size: int) -> str | None:
    """Why ``auto`` does not take ``grouped_mm`` here (None: it does).

    Only torch's CUTLASS kernel in bf16 on compute capability 9.x (Hopper), at 16-byte strides, is known right and
    fast. Elsewhere torch's fallback copies the offsets to the host at every call (six syncs per layer) and loops
    over the groups, which ``sliced`` does with one sync. Blackwell (10.x) has the kernel, but with reported wrong
    gradients for experts that get no token (pytorch issue 172439): it waits for a device check.
    """
    if not hasattr(F, "grouped_mm"):
        return f"torch {torch.__version__} has no torch.nn.functional.grouped_mm"
    if device.type != "cuda":
        return f"its fused kernel is CUDA-only (device: {device.type})"
    if not torch.cuda.is_available():
        return "CUDA is not available in this process"
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        why = "not yet proven by a device check (pytorch issue 172439)" if major == 10 else "no fused kernel"
        return f"compute capability {major}.{minor}: {why}; the fused kernel is proven on 9.x (Hopper)"
    if dtype != torch.bfloat16:
        return f"the compute dtype is {str(dtype).removeprefix('torch.')}; the fused kernel is bf16 only"
    return grouped_mm_stride_problem(dtype, hidden_size, expert_size)


_SAID: set[str] = set()


def resolve_expert_backend(
    requested: str, device: torch.device, dtype: torch.dtype, hidden_size: int, expert_size: int, num_pairs: int
) -> str:
    """The backend that runs: ``requested``, or for ``auto`` the fast one for this device and dtype.

    ``auto``: ``grouped_mm`` unless :func:`grouped_mm_unavailable` says why not; on CPU ``tiled`` when the (S, D)
    copies of ``sliced`` would reach :data:`TILED_MIN_BYTES`, else ``sliced``; ``sliced`` on other GPUs
    (deterministic, unlike ``tiled``'s ``index_add_``), warning once per reason.
    """
    if requested == "grouped_mm":
        problem = grouped_mm_stride_problem(dtype, hidden_size, expert_size)
        if problem is not None:
            raise RmoeError(
                f"model.arch.expert_backend='grouped_mm' cannot run this model: {problem}. Use expert_backend "
                "'auto' or 'sliced', or widths that are such multiples."
            )
        return requested
    if requested != "auto":
        return requested
    reason = grouped_mm_unavailable(device, dtype, hidden_size, expert_size)
    if reason is None:
        return "grouped_mm"
    if device.type == "cuda" and reason not in _SAID:
        _SAID.add(reason)
        warnings.warn(f"model.arch.expert_backend=auto runs 'sliced', not 'grouped_mm': {reason}.", stacklevel=2)
    copy_bytes = num_pairs * hidden_size * dtype.itemsize
    return "tiled" if device.type == "cpu" and copy_bytes >= TILED_MIN_BYTES else "sliced"


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
        # Set by rmoe.model.expert_parallel.shard_experts: the weights then hold E / ep experts, and run() sends
        # each pair to the process of its expert.
        self.expert_parallel: ExpertParallel | None = None

    def _resolve_backend(self, x_TD: torch.Tensor, num_pairs: int) -> str:
        D, F_ = self.gate_up_proj.shape[-1], self.down_proj.shape[-1]
        return resolve_expert_backend(self.backend, x_TD.device, self._compute_dtype(x_TD), D, F_, num_pairs)

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The autocast dtype when autocast is on (our kernels are not autocast-aware), else the weights'."""
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return self.gate_up_proj.dtype

    def forward(self, x_TD: torch.Tensor, routing: RoutingOutput) -> torch.Tensor:
        """Weighted sum over each token's chosen experts; dropped pairs (``keep_TK`` False) give 0."""
        return self.run(x_TD, routing.expert_ids_TK, routing.weights_TK, routing.keep_TK)

    def run(
        self,
        x_TD: torch.Tensor,
        expert_ids_TK: torch.Tensor,
        weights_TK: torch.Tensor,
        keep_TK: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``out[t] = sum_k weights[t, k] * expert_{ids[t, k]}(x[t])`` over the kept pairs: (T, D). Any rows can be
        routed this way (tokens, or the slots of a router that owns its dispatch)."""
        E = self.num_experts
        if keep_TK is not None:  # dropped pairs get the id E: sorted last, never computed
            expert_ids_TK = expert_ids_TK.masked_fill(~keep_TK, E)
            weights_TK = weights_TK.masked_fill(~keep_TK, 0.0)
        if self.expert_parallel is not None:
            dtype = self._compute_dtype(x_TD)
            out_TD = self.expert_parallel.run(x_TD.to(dtype), expert_ids_TK, weights_TK, E, self._run_received)
            return out_TD.to(x_TD.dtype)
        return self._run_here(x_TD, expert_ids_TK, weights_TK, has_drops=keep_TK is not None)

    def _run_received(self, x_RD: torch.Tensor, local_ids_R: torch.Tensor) -> torch.Tensor:
        """Under EP: this process's experts on the rows sent to it, one output row per row (R, D)."""
        if x_RD.shape[0] == 0:
            # Nothing to compute, but the backward still takes part in the group's all-to-alls, and the
            # experts get a zero gradient (as on one process), not a missing one.
            anchor = (self.gate_up_proj.sum() + self.down_proj.sum()) * 0.0
            return x_RD * 0.0 + anchor.to(x_RD.dtype)
        return self._run_here(x_RD, local_ids_R[:, None], x_RD.new_ones(x_RD.shape[0], 1), has_drops=False)

    def _run_here(
        self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor, has_drops: bool
    ) -> torch.Tensor:
        """:meth:`run` on the experts this process holds (ids local to them; a dropped pair has id E)."""
        E = self.gate_up_proj.shape[0]
        ids_S = expert_ids_TK.reshape(-1)  # (S,)
        order_S = torch.argsort(ids_S, stable=True)  # (S,) pair index, grouped by expert
        counts_E = tokens_per_expert(ids_S, E)  # (E,) kept pairs per expert (dropped ones have id E)
        dtype = self._compute_dtype(x_TD)
        backend = self._resolve_backend(x_TD, ids_S.numel())
        if backend == "grouped_mm":
            out_TD = self._grouped_mm_forward(x_TD.to(dtype), weights_TK, order_S, counts_E, has_drops=has_drops)
        else:
            function = _TiledExperts if backend == "tiled" else _SlicedExperts
            with torch.autocast(x_TD.device.type, enabled=False):  # cast by hand: mm(out=) is not autocast-aware
                out_TD = function.apply(
                    x_TD.to(dtype),
                    weights_TK.to(dtype),
                    self.gate_up_proj.to(dtype),
                    self.down_proj.to(dtype),
                    order_S,
                    counts_E.tolist(),  # the one host sync of this layer
                )
        return out_TD.to(x_TD.dtype)

    def _grouped_mm_forward(
        self,
        x_TD: torch.Tensor,
        weights_TK: torch.Tensor,
        order_S: torch.Tensor,
        counts_E: torch.Tensor,
        has_drops: bool,
    ) -> torch.Tensor:
        """Each projection is ONE ``F.grouped_mm`` over the expert groups; autograd does the backward."""
        T, K = weights_TK.shape
        dtype = x_TD.dtype
        offsets_E = torch.cumsum(counts_E, dim=0, dtype=torch.int32)
        x_SD = x_TD[order_S // K]
        valid_S = None
        if has_drops:
            # grouped_mm leaves the rows past the last group (dropped pairs, sorted last) uninitialised in its output
            # AND its input gradient (documented; pytorch issue 193633): mask both with where, so a NaN there
            # stays out of the forward and the backward.
            valid_S = torch.arange(order_S.numel(), device=x_TD.device) < offsets_E[-1]
            x_SD = torch.where(valid_S[:, None], x_SD, 0.0)
        # grouped_mm is not autocast-aware: the weights are cast by hand to the compute dtype.
        gate_up_S2F = F.grouped_mm(x_SD, self.gate_up_proj.to(dtype).transpose(-2, -1), offs=offsets_E)
        gate_SF, up_SF = gate_up_S2F.chunk(2, dim=-1)
        y_SD = F.grouped_mm(F.silu(gate_SF) * up_SF, self.down_proj.to(dtype).transpose(-2, -1), offs=offsets_E)
        if valid_S is not None:
            y_SD = torch.where(valid_S[:, None], y_SD, 0.0)
        y_SD = y_SD * weights_TK.reshape(-1)[order_S].to(dtype)[:, None]
        # Undo the sort with a gather (deterministic, unlike index_add_ on CUDA), then sum over K.
        inverse_S = torch.empty_like(order_S)
        inverse_S[order_S] = torch.arange(order_S.numel(), device=order_S.device)
        return y_SD[inverse_S].view(T, K, -1).sum(dim=1)


def _per_expert_weights(
    gate_up_E2FD: torch.Tensor, down_EDF: torch.Tensor
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Each expert's (F, D) gate, (F, D) up and (D, F) down matrices: views, made in three calls."""
    F_ = down_EDF.shape[-1]
    return gate_up_E2FD[:, :F_].unbind(0), gate_up_E2FD[:, F_:].unbind(0), down_EDF.unbind(0)


class _SlicedExperts(torch.autograd.Function):
    """Gather, SwiGLU experts on contiguous expert-sorted slices, weighted combine; hand-written backward.

    ``apply(x_TD, weights_TK, gate_up_E2FD, down_EDF, order_S, counts_E) -> out_TD``, with
    ``out[t] = sum_k weights[t, k] * expert_{ids[t, k]}(x[t])``. Why not plain autograd:

    * a gradient through ``weight[e]`` adds a full (E, ...) zero tensor per expert and projection
      (``select_backward``), E^2 traffic; here each expert's matmul writes its slice of one gradient buffer (an idle
      expert's slice is zeroed: a zero, not a missing, gradient);
    * every matmul writes into a slice of one preallocated buffer (no ``torch.cat``), the backward reuses its
      temporaries in place, and the weighted combine (and its transpose for dx) is one ``embedding_bag``;
    * gate and up are two (N, F) buffers, not one (N, 2F): blocks half the size stay under glibc's 32 MiB mmap
      threshold, so they are not page-faulted afresh every step.

    Saved tensors are never modified, so a second backward (``retain_graph``) is exact.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x_TD: torch.Tensor,
        weights_TK: torch.Tensor,
        gate_up_E2FD: torch.Tensor,
        down_EDF: torch.Tensor,
        order_S: torch.Tensor,
        counts_E: list[int],
    ) -> torch.Tensor:
        T, K = weights_TK.shape
        F_ = down_EDF.shape[-1]
        N = sum(counts_E)  # kept pairs; the S - N after them are dropped pairs: output 0
        busy = [e for e, n in enumerate(counts_E) if n]
        inverse_TK = torch.empty_like(order_S)
        inverse_TK[order_S] = torch.arange(order_S.numel(), device=order_S.device)
        inverse_TK = inverse_TK.view(T, K)  # sorted position of each (token, k) pair
        x_SD = x_TD.index_select(0, order_S // K)  # (S, D) rows grouped by expert
        gate_w, up_w, down_w = _per_expert_weights(gate_up_E2FD, down_EDF)
        gate_NF, up_NF = x_SD.new_empty(N, F_), x_SD.new_empty(N, F_)
        xs, gates, ups = x_SD[:N].split(counts_E), gate_NF.split(counts_E), up_NF.split(counts_E)
        for e in busy:  # per-expert views made once (split/unbind), not one slice per use
            torch.mm(xs[e], gate_w[e].t(), out=gates[e])
            torch.mm(xs[e], up_w[e].t(), out=ups[e])
        a_NF = F.silu(gate_NF).mul_(up_NF)
        y_SD = x_SD.new_empty(x_SD.shape)
        y_SD[N:].zero_()
        activations, ys = a_NF.split(counts_E), y_SD[:N].split(counts_E)
        for e in busy:
            torch.mm(activations[e], down_w[e].t(), out=ys[e])
        out_TD = F.embedding_bag(inverse_TK, y_SD, per_sample_weights=weights_TK, mode="sum")
        ctx.save_for_backward(x_SD, weights_TK, gate_up_E2FD, down_EDF, order_S, inverse_TK, gate_NF, up_NF, a_NF, y_SD)
        ctx.counts = counts_E
        return out_TD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dout_TD: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_SD, weights_TK, gate_up_E2FD, down_EDF, order_S, inverse_TK, gate_NF, up_NF, a_NF, y_SD = ctx.saved_tensors
        need_x, need_weights, need_gate_up, need_down = ctx.needs_input_grad[:4]
        counts = ctx.counts
        busy = [e for e, n in enumerate(counts) if n]
        idle = len(busy) < len(counts)
        T, K = weights_TK.shape
        N, F_ = gate_NF.shape
        gate_w, up_w, down_w = _per_expert_weights(gate_up_E2FD, down_EDF)
        dy_SD = dout_TD.index_select(0, order_S // K)  # (S, D) d out / d y of each pair, unweighted
        d_weights_TK = None
        if need_weights:
            d_weights_S = torch.linalg.vecdot(dy_SD, y_SD)  # (S,)
            d_weights_TK = d_weights_S[inverse_TK]
        dy_SD.mul_(weights_TK.reshape(-1)[order_S, None])  # now d loss / d y
        dys, activations = dy_SD[:N].split(counts), a_NF.split(counts)

        da_NF = a_NF.new_empty(N, F_)
        das = da_NF.split(counts)
        d_down_EDF = None
        if need_down:  # an idle expert's slice is zero: a zero gradient, not a missing one
            d_down_EDF = down_EDF.new_zeros(down_EDF.shape) if idle else torch.empty_like(down_EDF)
            d_downs = d_down_EDF.unbind(0)
        for e in busy:
            torch.mm(dys[e], down_w[e], out=das[e])
            if d_down_EDF is not None:
                torch.mm(dys[e].t(), activations[e], out=d_downs[e])
        # a = silu(gate) * up: d_up = da * silu(gate), d_gate = silu'(gate) * da * up (in place on temporaries)
        d_up_NF = F.silu(gate_NF).mul_(da_NF)
        d_gate_NF = torch.ops.aten.silu_backward.grad_input(da_NF.mul_(up_NF), gate_NF, grad_input=da_NF)
        d_gates, d_ups, xs = d_gate_NF.split(counts), d_up_NF.split(counts), x_SD[:N].split(counts)

        d_gate_up_E2FD = None
        if need_gate_up:
            d_gate_up_E2FD = gate_up_E2FD.new_zeros(gate_up_E2FD.shape) if idle else torch.empty_like(gate_up_E2FD)
            d_gate_w, d_up_w = d_gate_up_E2FD[:, :F_].unbind(0), d_gate_up_E2FD[:, F_:].unbind(0)
        dx_SD = dy_SD  # its buffer is free now: each expert's rows are overwritten after their last read
        dxs = dys
        for e in busy:
            if d_gate_up_E2FD is not None:
                torch.mm(d_gates[e].t(), xs[e], out=d_gate_w[e])
                torch.mm(d_ups[e].t(), xs[e], out=d_up_w[e])
            if need_x:
                torch.mm(d_gates[e], gate_w[e], out=dxs[e])
                dxs[e].addmm_(d_ups[e], up_w[e])
        dx_TD = None
        if need_x:
            dx_SD[N:].zero_()
            dx_TD = F.embedding_bag(inverse_TK, dx_SD, mode="sum")
        return dx_TD, d_weights_TK, d_gate_up_E2FD, d_down_EDF, None, None


class _TiledExperts(torch.autograd.Function):
    """Same function and arguments as :class:`_SlicedExperts`, without any (S, D) tensor.

    Each expert's rows are gathered from ``x_TD`` just before its two matmuls (still in cache when they read it),
    and its weighted output is added into ``out_TD`` at once (``index_add_``, deterministic on CPU). The backward
    gathers ``dout`` and ``x`` the same way and takes the routing weights' gradient in the expert width F,
    ``dout . y = (dout @ W_down) . a``, so no output ``y`` is saved. The faster backend when the (S, D) copies of
    ``sliced`` outgrow the cache (many experts per token); slower with small copies.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x_TD: torch.Tensor,
        weights_TK: torch.Tensor,
        gate_up_E2FD: torch.Tensor,
        down_EDF: torch.Tensor,
        order_S: torch.Tensor,
        counts_E: list[int],
    ) -> torch.Tensor:
        T, K = weights_TK.shape
        F_ = down_EDF.shape[-1]
        N = sum(counts_E)  # kept pairs, first in the sort; dropped pairs are never touched
        busy = [e for e, n in enumerate(counts_E) if n]
        token_N = order_S[:N] // K  # (N,) token of each kept pair, grouped by expert
        weight_N = weights_TK.reshape(-1)[order_S[:N]]  # (N,)
        tokens, weights = token_N.split(counts_E), weight_N.split(counts_E)
        gate_w, up_w, down_w = _per_expert_weights(gate_up_E2FD, down_EDF)
        gate_NF, up_NF = x_TD.new_empty(N, F_), x_TD.new_empty(N, F_)
        gates, ups = gate_NF.split(counts_E), up_NF.split(counts_E)
        for e in busy:
            x_nD = x_TD.index_select(0, tokens[e])
            torch.mm(x_nD, gate_w[e].t(), out=gates[e])
            torch.mm(x_nD, up_w[e].t(), out=ups[e])
        a_NF = F.silu(gate_NF).mul_(up_NF)
        activations = a_NF.split(counts_E)
        out_TD = torch.zeros_like(x_TD)
        for e in busy:
            out_TD.index_add_(0, tokens[e], torch.mm(activations[e], down_w[e].t()).mul_(weights[e][:, None]))
        ctx.save_for_backward(x_TD, gate_up_E2FD, down_EDF, order_S, token_N, weight_N, gate_NF, up_NF, a_NF)
        ctx.counts, ctx.shape_TK = counts_E, (T, K)
        return out_TD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dout_TD: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_TD, gate_up_E2FD, down_EDF, order_S, token_N, weight_N, gate_NF, up_NF, a_NF = ctx.saved_tensors
        need_x, need_weights, need_gate_up, need_down = ctx.needs_input_grad[:4]
        counts, (T, K) = ctx.counts, ctx.shape_TK
        N, F_ = gate_NF.shape
        busy = [e for e, n in enumerate(counts) if n]
        idle = len(busy) < len(counts)
        tokens = token_N.split(counts)
        gate_w, up_w, down_w = _per_expert_weights(gate_up_E2FD, down_EDF)
        da_NF = a_NF.new_empty(N, F_)  # first d out / d a of each pair, unweighted
        das = da_NF.split(counts)
        d_down_EDF = None
        if need_down:
            d_down_EDF = down_EDF.new_zeros(down_EDF.shape) if idle else torch.empty_like(down_EDF)
            d_downs, weighted_as = d_down_EDF.unbind(0), (a_NF * weight_N[:, None]).split(counts)
        for e in busy:
            dout_nD = dout_TD.index_select(0, tokens[e])
            torch.mm(dout_nD, down_w[e], out=das[e])
            if d_down_EDF is not None:
                torch.mm(dout_nD.t(), weighted_as[e], out=d_downs[e])
        d_weights_TK = None
        if need_weights:  # d out[t] / d weight[t, k] = dout[t] . y = (dout[t] @ W_down) . a
            d_weights_S = a_NF.new_zeros(order_S.numel())  # dropped pairs: 0
            d_weights_S[order_S[:N]] = torch.linalg.vecdot(da_NF, a_NF)
            d_weights_TK = d_weights_S.view(T, K)
        da_NF.mul_(weight_N[:, None])  # now d loss / d a
        d_up_NF = F.silu(gate_NF).mul_(da_NF)
        d_gate_NF = torch.ops.aten.silu_backward.grad_input(da_NF.mul_(up_NF), gate_NF, grad_input=da_NF)
        d_gates, d_ups = d_gate_NF.split(counts), d_up_NF.split(counts)

        d_gate_up_E2FD = None
        if need_gate_up:  # an idle expert's slice stays zero
            d_gate_up_E2FD = gate_up_E2FD.new_zeros(gate_up_E2FD.shape) if idle else torch.empty_like(gate_up_E2FD)
            d_gate_w, d_up_w = d_gate_up_E2FD[:, :F_].unbind(0), d_gate_up_E2FD[:, F_:].unbind(0)
        dx_TD = torch.zeros_like(x_TD) if need_x else None
        for e in busy:
            if d_gate_up_E2FD is not None:
                x_nD = x_TD.index_select(0, tokens[e])
                torch.mm(d_gates[e].t(), x_nD, out=d_gate_w[e])
                torch.mm(d_ups[e].t(), x_nD, out=d_up_w[e])
            if dx_TD is not None:
                dx_TD.index_add_(0, tokens[e], torch.mm(d_gates[e], gate_w[e]).addmm_(d_ups[e], up_w[e]))
        return dx_TD, d_weights_TK, d_gate_up_E2FD, d_down_EDF, None, None


class SparseMoeBlock(nn.Module):
    """Router + routed experts (+ optional sigmoid-gated shared expert), Qwen2-MoE style.

    The router decides and applies the experts (``Router.apply_experts``); the block never branches on the router.
    """

    def __init__(self, config: ModelConfig, layer_idx: int, shared_router: nn.Module | None) -> None:
        super().__init__()
        self.router = config.router_context().router_class(config.router_context(), layer_idx, shared_router)
        self.experts = GroupedExperts(
            config.num_experts, config.hidden_size, config.moe_intermediate_size, config.expert_backend
        )
        self.shared_expert: SwiGLU | None = None
        self.shared_expert_gate: nn.Linear | None = None
        if config.shared_expert_intermediate_size > 0:
            self.shared_expert = SwiGLU(config.hidden_size, config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(
        self, x_BSD: torch.Tensor, router_state: Any, token_ids_BS: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, RoutingOutput, Any]:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        routing, router_state = self.router(x_TD, router_state, token_ids_BS)
        out_TD = self.router.apply_experts(x_TD, routing, self.experts, B)  # default: experts(x_TD, routing)
        if self.shared_expert is not None:
            out_TD = out_TD + torch.sigmoid(self.shared_expert_gate(x_TD)) * self.shared_expert(x_TD)
        return out_TD.view(B, S, D), routing, router_state
