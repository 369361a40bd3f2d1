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
    """Mean pairwise cosine similarity of the experts of one layer, as in the RMoE paper.

    Qiu et al., "Layerwise Recurrent Router for Mixture-of-Experts", arXiv 2408.06793, App. A.4.3
    ("expert similarity"), following the authors' analysis code (github.com/qiuzh20/RMoE,
    ``analysis/analysis_megatron/analysis_weights.ipynb``, ``get_similarities`` for the SwiGLU
    experts): each of an expert's weight matrices is averaged over the FFN hidden dimension F
    (the "hidden dimension" the paper averages over is the expert's inner width, not the model
    width D), giving one D-vector per matrix: gate ``w1`` and up ``w3`` (our ``gate_up_proj``
    halves, (E, F, D) each, averaged over F) and down ``w2`` (our ``down_proj`` (E, D, F),
    averaged over F). Each vector is L2-normalised, the E x E Gram matrices of the three are
    formed, and their entries averaged.

    Scale: the authors concatenate the three unit vectors, so their Gram entries are the *sum* of
    three cosines (diagonal 3); we divide by 3 so the result is a mean cosine in [-1, 1] (identical
    experts give 1). Reduction: the authors take the mean of the whole E x E matrix, diagonal
    included (``include_diagonal=True``, the default, for comparability: paper value = 3 x ours);
    ``include_diagonal=False`` averages the E(E-1) off-diagonal entries only (0 for orthogonal
    experts, whereas the full mean is then 1/E).

    Args:
        gate_up_proj_E2FD: (E, 2F, D), gate rows first (``GroupedExperts.gate_up_proj``).
        down_proj_EDF: (E, D, F) (``GroupedExperts.down_proj``).
        include_diagonal: Average the whole Gram matrix (paper) or only its off-diagonal entries.

    Returns:
        A 0-d fp32 tensor on the weights' device.
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
    """:func:`expert_similarity` of every MoE layer of a model, in depth order: (L,) fp32, on the host
    (one transfer), or with ``host=False`` on the weights' device.

    Finds the routed experts as the modules with 3-D ``gate_up_proj`` (E, 2F, D) and ``down_proj``
    (E, D, F) parameters (``rmoe.model.moe.GroupedExperts``), in registration (= depth) order.
    """
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
