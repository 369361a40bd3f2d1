"""Routing metrics as pure functions on tensors, plus a streaming accumulator.

- :mod:`rmoe.metrics.load`: expert loads, CV, MaxVio, dead experts, load entropy.
- :mod:`rmoe.metrics.gates`: per-token gate entropy, top-k scores, router z, top-1 expert.
- :mod:`rmoe.metrics.information`: entropy/MI from counts, top-1 MI between layers, the RMoE
  paper's binned-probability MI matrix, expert-path keys.
- :mod:`rmoe.metrics.expert_similarity`: the RMoE paper's expert similarity.
- :mod:`rmoe.metrics.gradients`: router gradient norms per loss.
- :mod:`rmoe.metrics.specialization`: OLMoE's vocabulary specialisation, expert co-activation and
  router saturation, and :class:`~rmoe.metrics.specialization.TokenExpertStats` (many batches).
- :mod:`rmoe.metrics.closer_look`: the analyses of "A Closer Look into Mixture-of-Experts in Large
  Language Models" (score vs output-norm ranks, expert output similarity, neuron-level weight
  similarity with Hungarian matching and Kendall's tau, gate-embedding similarity).
- :mod:`rmoe.metrics.stats`: :func:`routing_summary` (one forward) and :class:`RoutingStats`
  (many batches, mergeable across processes).

Everything runs under ``torch.no_grad()`` and never modifies its inputs.
"""

from rmoe.metrics.expert_similarity import expert_similarity, expert_similarity_per_layer
from rmoe.metrics.gates import (
    gate_entropy,
    router_logit_variance,
    router_z,
    top1_expert_ids,
)
from rmoe.metrics.gradients import router_grad_norms, router_grad_norms_by_loss, router_parameters
from rmoe.metrics.information import (
    NUM_PROB_BINS,
    binned_probability_mi_matrix,
    consecutive_joint_histograms,
    entropy_from_counts,
    mutual_information,
    normalized_mutual_information,
)
from rmoe.metrics.load import (
    load_coefficient_of_variation,
    load_entropy,
    max_violation,
    num_dead_experts,
    tokens_per_expert,
)
from rmoe.metrics.stats import RoutingStats, routing_summary, summary_scalars

__all__ = [
    "NUM_PROB_BINS",
    "RoutingStats",
    "binned_probability_mi_matrix",
    "consecutive_joint_histograms",
    "entropy_from_counts",
    "expert_similarity",
    "expert_similarity_per_layer",
    "gate_entropy",
    "load_coefficient_of_variation",
    "load_entropy",
    "max_violation",
    "mutual_information",
    "normalized_mutual_information",
    "num_dead_experts",
    "router_grad_norms",
    "router_grad_norms_by_loss",
    "router_logit_variance",
    "router_parameters",
    "router_z",
    "routing_summary",
    "summary_scalars",
    "tokens_per_expert",
    "top1_expert_ids",
]
