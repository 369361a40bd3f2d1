"""Routing metrics as pure functions on tensors (:mod:`~rmoe.metrics.load`, :mod:`~rmoe.metrics.gates`,
:mod:`~rmoe.metrics.information`, :mod:`~rmoe.metrics.expert_similarity`, :mod:`~rmoe.metrics.gradients`,
OLMoE's :mod:`~rmoe.metrics.specialization`, :mod:`~rmoe.metrics.closer_look`), declared in
:mod:`~rmoe.metrics.catalog` and accumulated over batches by :mod:`~rmoe.metrics.stats`.

Everything runs under ``torch.no_grad()`` and never modifies its inputs.
"""

from rmoe.metrics.expert_similarity import expert_similarity, expert_similarity_per_layer
from rmoe.metrics.gates import gate_entropy, router_logit_variance, router_z, top1_expert_ids
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
from rmoe.metrics.stats import RoutingStats, expert_pair_flops, routing_summary, summary_scalars

__all__ = [
    "NUM_PROB_BINS",
    "RoutingStats",
    "binned_probability_mi_matrix",
    "consecutive_joint_histograms",
    "entropy_from_counts",
    "expert_pair_flops",
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
