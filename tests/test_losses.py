"""Balance-loss properties: 1.0 when balanced, larger when skewed, no gradient at coefficient 0."""

from __future__ import annotations

import torch

from rmoe.model.losses import average_over_layers, load_balancing_loss, router_z_loss
from rmoe.routers import topk_softmax


def routing_from_logits(logits_TE: torch.Tensor, top_k: int = 2):
    return topk_softmax(logits_TE, top_k, norm_topk_prob=True)


def test_uniform_routing_gives_one():
    E, K = 8, 2
    # every token has uniform probabilities, and the top-k ids cycle over all experts evenly
    T = 64
    routing = routing_from_logits(torch.zeros(T, E), K)
    routing.expert_ids_TK = torch.arange(T * K).reshape(T, K) % E
    torch.testing.assert_close(load_balancing_loss(routing, E), torch.tensor(1.0))


def test_random_balanced_logits_close_to_one_and_skew_is_larger():
    torch.manual_seed(0)
    E, T = 8, 4096
    balanced = load_balancing_loss(routing_from_logits(torch.randn(T, E) * 0.01), E)
    assert abs(balanced.item() - 1.0) < 0.05
    skewed_logits = torch.randn(T, E) * 0.01
    skewed_logits[:, 0] += 3.0
    skewed_logits[:, 1] += 2.0
    skewed = load_balancing_loss(routing_from_logits(skewed_logits), E)
    assert skewed > 1.5
    all_on_one = routing_from_logits(torch.tensor([[20.0, 10.0] + [0.0] * (E - 2)]).repeat(T, 1))
    assert 1.5 < load_balancing_loss(all_on_one, E) <= E


def test_z_loss_is_squared_logsumexp():
    logits = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    expected = (torch.log(torch.tensor(2.0)) ** 2 + torch.logsumexp(torch.tensor([1.0, 3.0]), 0) ** 2) / 2
    torch.testing.assert_close(router_z_loss(routing_from_logits(logits, 1)), expected)


def test_zero_coefficient_contributes_no_gradient():
    torch.manual_seed(0)
    weight = torch.randn(4, 8, requires_grad=True)
    x = torch.randn(32, 8)
    routing = routing_from_logits(x @ weight.T)
    aux, z, _ = average_over_layers([routing], 4)
    (0.0 * aux + 0.0 * z).backward()
    assert torch.count_nonzero(weight.grad) == 0
    weight.grad = None
    routing = routing_from_logits(x @ weight.T)
    aux, z, _ = average_over_layers([routing], 4)
    (0.01 * aux + 0.001 * z).backward()
    assert torch.count_nonzero(weight.grad) > 0
