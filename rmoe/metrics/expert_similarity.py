"""Expert-weight similarity (RMoE paper, App. A.4.3), per MoE layer.

Shape legend: E experts, F expert FFN width (``moe_intermediate_size``), D model width, L MoE layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rmoe.syncs import to_host


@torch.no_grad()
def expert_similarity(
    gate_up_proj_E2FD: torch.Tensor, down_proj_EDF: torch.Tensor, *, include_diagonal: bool = True
) -> torch.Tensor:
    """Mean pairwise cosine similarity of the experts of one layer (RMoE paper, Qiu et al., arXiv 2408.06793,
    App. A.4.3), as the authors' ``get_similarities`` (github.com/qiuzh20/RMoE, ``analysis_weights.ipynb``).

    Each weight matrix (gate ``w1``, up ``w3``, down ``w2``) is averaged over the expert's inner width F
    (the paper's "hidden dimension", not D) to one D-vector per expert; the three vectors are
    L2-normalised and the E x E Gram matrices of the three averaged. The authors concatenate the unit
    vectors (Gram entries a *sum* of three cosines); we divide by 3 for a mean cosine in [-1, 1].
    ``include_diagonal=True`` (default) averages the whole Gram matrix as the authors do (paper value =
    3 x ours); False averages the E(E-1) off-diagonal entries only (0 for orthogonal experts, not 1/E).
    ``gate_up_proj_E2FD`` has the gate rows first. Returns a 0-d fp32 tensor on the weights' device.
    """
    E, two_F, _ = gate_up_proj_E2FD.shape
    gate_EFD, up_EFD = gate_up_proj_E2FD.float().split(two_F // 2, dim=1)
    vectors = [gate_EFD.mean(dim=1), up_EFD.mean(dim=1), down_proj_EDF.float().mean(dim=2)]  # 3 x (E, D)
    gram_EE = sum(F.normalize(v_ED, dim=-1) @ F.normalize(v_ED, dim=-1).T for v_ED in vectors) / len(vectors)
    if include_diagonal:
        return gram_EE.mean()
    if E == 1:
        return torch.full((), float("nan"), device=gram_EE.device)
    off_diagonal = ~torch.eye(E, dtype=torch.bool, device=gram_EE.device)
    return gram_EE[off_diagonal].mean()


@torch.no_grad()
def expert_similarity_per_layer(model: nn.Module, *, include_diagonal: bool = True, host: bool = True) -> torch.Tensor:
    """:func:`expert_similarity` of every MoE layer, in depth order: (L,) fp32 on the host (one transfer),
    or with ``host=False`` on the weights' device. Experts are the modules with a 3-D ``gate_up_proj``."""
    values = [
        expert_similarity(m.gate_up_proj, m.down_proj, include_diagonal=include_diagonal)
        for m in model.modules()
        if isinstance(getattr(m, "gate_up_proj", None), torch.Tensor)
        and isinstance(getattr(m, "down_proj", None), torch.Tensor)
        and m.gate_up_proj.dim() == 3
    ]
    if not values:
        return torch.zeros(0)
    return to_host([torch.stack(values)])[0] if host else torch.stack(values)
