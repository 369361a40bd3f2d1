"""Norms of the router parameters' gradients from each loss separately (RMoE paper, Table 11)."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from rmoe.routers.base import Router
from rmoe.syncs import to_host
from rmoe.tags import layer_label

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def router_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters of the routers, by name: those of every :class:`~rmoe.routers.Router` module and
    of the module shared across layers (``Router.shared``, e.g. RMoE's GRU cell), each once; found by type."""
    routers = [m for m in model.modules() if isinstance(m, Router)]
    shared = {id(r.shared) for r in routers if r.shared is not None}
    out: dict[str, nn.Parameter] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, Router) or id(module) in shared:
            out.update({f"{prefix}.{name}": p for name, p in module.named_parameters() if p.requires_grad})
    return out


def router_group(name: str) -> str:
    """``layer_{i}`` for a parameter of decoder layer i's router, ``shared`` otherwise."""
    match = _LAYER_RE.search(name)
    return layer_label(int(match.group(1))) if match else "shared"


def router_grad_norms_by_loss(model: nn.Module, losses: Mapping[str, torch.Tensor | None]) -> dict[str, float]:
    """L2 norm of d(loss)/d(router parameters) for each loss separately, without touching ``.grad``:
    ``"{loss}/total"``, ``"{loss}/shared"`` (0 if nothing is shared) and ``"{loss}/layer_{i}"`` (i =
    decoder layer index), read on the host in one transfer."""
    norms = router_grad_norm_tensors(model, losses)
    return dict(zip(norms, to_host([torch.stack(list(norms.values()))])[0].tolist(), strict=True)) if norms else {}


def router_grad_norm_tensors(model: nn.Module, losses: Mapping[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """:func:`router_grad_norms_by_loss` as 0-d fp32 tensors on the parameters' device (no host sync).

    ``retain_graph=True`` keeps the graph for the training step's own backward. A loss that is None or
    does not require grad gives zeros. Call it on the bare model (not a DDP wrapper): the gradients are
    the local process's, not all-reduced.
    """
    params = router_parameters(model)
    names = list(params)
    groups = sorted({router_group(n) for n in names} | {"shared"}, key=_group_order)
    device = next(iter(params.values())).device if params else torch.device("cpu")
    out: dict[str, torch.Tensor] = {}
    for loss_name, loss in losses.items():
        if loss is None or not loss.requires_grad or not names:
            grads: list[torch.Tensor | None] = [None] * len(names)
        else:
            grads = list(torch.autograd.grad(loss, list(params.values()), retain_graph=True, allow_unused=True))
        squares = {group: torch.zeros((), device=device) for group in groups}
        for name, grad in zip(names, grads):
            if grad is not None:
                squares[router_group(name)] = squares[router_group(name)] + grad.detach().float().pow(2).sum()
        out[f"{loss_name}/total"] = torch.stack(list(squares.values())).sum().sqrt()
        for group in groups:
            out[f"{loss_name}/{group}"] = squares[group].sqrt()
    return out


def router_grad_norms(model: nn.Module, lm_loss: torch.Tensor, balance_loss: torch.Tensor | None) -> dict[str, float]:
    """Router gradient norms from the LM loss and from the balance loss *as added to the total* (or None),
    keys ``lm/...`` and ``balance/...`` of :func:`router_grad_norms_by_loss`: how much of the router's
    training signal each provides (RMoE paper, arXiv 2408.06793, Table 11)."""
    return router_grad_norms_by_loss(model, {"lm": lm_loss, "balance": balance_loss})


def _group_order(group: str) -> tuple[int, int]:
    return (0, 0) if group == "shared" else (1, int(group.split("_")[1]))
