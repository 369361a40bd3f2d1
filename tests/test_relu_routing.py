"""ReMoE (arXiv 2412.14711): ReLU gates and the active set against a naive loop, the gates as combine weights,
the (load-balanced) L1 penalty and its gradient, lambda's update rule over simulated steps (summed over layers
and ranks, saved and resumed exactly), and a tiny training run whose mean active experts reaches the target."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from test_routers import VOCAB, build, routers_of, tiny_config

from rmoe import MoeLM, RmoeError
from rmoe.routers import CAUSAL
from rmoe.routers.relu_routing import AdaptiveL1, ReluRouter

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "router" / "remoe.yaml"
D, E = 32, 4  # test_routers' tiny model: width 32, 4 experts, top-2, 3 MoE layers


def first_router(options: dict | None = None, **overrides) -> ReluRouter:
    return routers_of(build("remoe", options, **overrides))[0]


def set_coefficient(router: ReluRouter, exponent: int) -> None:
    router.shared.l1_exponent.fill_(exponent)


def test_gates_active_set_and_weights_against_a_naive_loop():
    router = first_router()
    x = torch.randn(10, D)
    x[3] = 0.0  # every logit 0: no active expert
    routing, _ = router(x, None)
    w = router.weight.detach()
    for t in range(10):
        gates = [max(0.0, float(x[t] @ w[e])) for e in range(E)]
        total = sum(gates)
        for e in range(E):
            assert routing.expert_ids_TK[t, e] == e  # every expert listed, gate-weighted
            assert routing.weights_TK[t, e].item() == pytest.approx(gates[e], abs=1e-6)
            assert bool(routing.chosen_TK[t, e]) == (gates[e] > 0) == bool(routing.keep_TK[t, e])
            # probs: the gates normalised per token (no renormalisation of the weights themselves), uniform if none
            expected = gates[e] / total if total > 0 else 1 / E
            assert routing.probs_TE[t, e].item() == pytest.approx(expected, abs=1e-6)
    torch.testing.assert_close(routing.logits_TE, x @ w.T)
    assert routing.weights_TK.dtype == routing.probs_TE.dtype == torch.float32
    assert not routing.chosen_TK[3].any() and 0 < routing.chosen_TK.float().mean() < 1
    # a token with no active expert: no NaN in the forward or the gradient
    (routing.probs_TE.pow(2).sum() + routing.weights_TK.sum()).backward()
    assert torch.isfinite(router.weight.grad).all()


def test_the_router_loss_is_lambda_times_the_load_balanced_l1_and_pushes_active_gates_down():
    for load_balanced in (True, False):
        router = first_router({"load_balanced": load_balanced, "target_experts": 1.5})
        set_coefficient(router, 10)
        lam = 1e-8 * 1.2**10
        x = torch.randn(12, D)
        routing, _ = router(x, None)
        gates, T = routing.weights_TK.detach(), 12
        load = [E / (1.5 * T) * int((gates[:, e] > 0).sum()) if load_balanced else 1.0 for e in range(E)]
        naive = lam / T * sum(load[e] * gates[t, e] for t in range(T) for e in range(E))
        assert routing.router_loss.item() == pytest.approx(float(naive), rel=1e-5)
        # the gradient reaches W through the active gates only, each weighted by lambda f_e / T
        routing.logits_TE.retain_grad()
        routing.router_loss.backward()
        expected = torch.where(gates > 0, lam * torch.tensor(load) / T, 0.0)
        torch.testing.assert_close(routing.logits_TE.grad, expected, rtol=1e-5, atol=1e-20)
        assert (routing.logits_TE.grad[gates > 0] > 0).all()  # descent lowers every active gate
    # steps on the penalty alone lower the gates and switch experts off
    router = first_router()
    set_coefficient(router, 101)  # lambda ~ 1
    x = torch.randn(64, D)
    before, _ = router(x, None)
    for _ in range(5):
        router.weight.grad = None
        router(x, None)[0].router_loss.backward()
        with torch.no_grad():
            router.weight -= 0.1 * router.weight.grad
    after, _ = router(x, None)
    assert after.weights_TK.sum() < 0.5 * before.weights_TK.sum()
    assert after.chosen_TK.sum() < before.chosen_TK.sum()


def test_inactive_experts_get_no_gradient_through_the_combine_weight():
    model = build("remoe").train()
    out = model(torch.randint(0, VOCAB, (2, 7)))
    for r in out.routing:
        r.logits_TE.retain_grad()
    out.logits.pow(2).mean().backward()  # the LM side only: the combine weights are the gates
    for r in out.routing:
        grad = r.logits_TE.grad
        assert torch.count_nonzero(grad[~r.chosen_TK]) == 0  # ReLU: an inactive expert's gate gets nothing
        assert torch.count_nonzero(grad[r.chosen_TK]) == int(r.chosen_TK.sum())  # active: its output times dL/dy


def test_routing_of_a_token_reads_its_own_hidden_state_only():
    assert tiny_config("remoe").causality() == CAUSAL
    router = first_router().train()
    x = torch.randn(12, D)
    changed = x.clone()
    changed[8:] = torch.randn(4, D)
    a, _ = router(x, None)
    b, _ = router(changed, None)
    for name in ("weights_TK", "probs_TE", "chosen_TK", "keep_TK"):
        assert torch.equal(getattr(a, name)[:8], getattr(b, name)[:8])


def simulate_step(model: MoeLM, weight_sign: float) -> None:
    """One training forward of every MoE layer with all gates positive (+1) or all zero (-1), then the step."""
    x = torch.rand(20, D) + 0.1  # positive inputs
    routers = routers_of(model)
    for router in routers:
        with torch.no_grad():
            router.weight.copy_(weight_sign * torch.rand(E, D))
        router.train()(x, None)
    for router in routers:
        router.after_optimizer_step()


def test_lambda_goes_up_when_too_dense_and_down_when_too_sparse_once_per_step():
    model = build("remoe")  # target: top_k = 2 of 4, sparsity 0.5
    core = model.shared_router
    assert isinstance(core, AdaptiveL1) and core.l1_exponent.item() == 0
    assert core.coefficient().item() == pytest.approx(1e-8)
    for expected in (1, 2, 3):  # every gate positive: sparsity 0 < 0.5, lambda *= 1.2 (once, not once per layer)
        simulate_step(model, +1.0)
        assert core.l1_exponent.item() == expected
    assert core.coefficient().item() == pytest.approx(1e-8 * 1.2**3, rel=1e-6)
    simulate_step(model, -1.0)  # every gate zero: sparsity 1 > 0.5, lambda /= 1.2
    assert core.l1_exponent.item() == 2
    # the layers' counts are summed: two layers all active and one all zero is 2/3 active, denser than 1/2
    x = torch.rand(20, D) + 0.1
    for router, sign in zip(routers_of(model), (1.0, 1.0, -1.0)):
        with torch.no_grad():
            router.weight.copy_(sign * torch.rand(E, D))
        router.train()(x, None)
    for router in routers_of(model):
        router.after_optimizer_step()
    assert core.l1_exponent.item() == 3
    # exactly at the target (half the gates active): sign 0, lambda unchanged
    router = routers_of(model)[0]
    with torch.no_grad():
        router.weight.copy_(torch.cat([torch.rand(2, D), -torch.rand(2, D)]))
    router.train()(x, None)
    router.after_optimizer_step()
    assert core.l1_exponent.item() == 3
    # forwards that are not part of an optimiser step count nothing: lambda stays
    router.eval()(x, None)
    with torch.no_grad():
        router.train()(x, None)
    router.after_optimizer_step()
    assert core.l1_exponent.item() == 3


def test_the_counts_are_summed_over_ranks(monkeypatch):
    """Under DDP the step's counts are all-reduced: this rank alone is too dense, the global batch too sparse."""
    import torch.distributed as dist

    model = build("remoe")
    other_rank = torch.tensor([0, 3 * 20 * E * 2])  # another rank: all of its gates zero, twice the tokens
    calls = []

    def all_reduce(tensor, op=None):
        calls.append(tensor.clone())
        tensor += other_rank

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    simulate_step(model, +1.0)  # locally sparsity 0: alone, lambda would go up
    assert len(calls) == 1 and calls[0].tolist() == [3 * 20 * E, 3 * 20 * E]
    assert model.shared_router.l1_exponent.item() == -1  # global sparsity 2/3 > 1/2: down


def test_lambda_is_saved_and_resumes_exactly_and_survives_a_cast_to_bf16():
    model = build("remoe")
    for sign in (1.0, 1.0, 1.0, -1.0, 1.0):
        simulate_step(model, sign)
    state = model.state_dict()
    assert state["shared_router.l1_exponent"].item() == 3
    assert not any(k.startswith("layers.") and "l1" in k for k in state)  # one lambda, not one per layer
    resumed = build("remoe", seed=1)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.shared_router.coefficient(), model.shared_router.coefficient())
    simulate_step(model, 1.0)
    simulate_step(resumed, 1.0)
    assert torch.equal(resumed.shared_router.l1_exponent, model.shared_router.l1_exponent)
    lam = model.shared_router.coefficient()
    model.to(torch.bfloat16)  # bf16-true: the exponent is an integer, lambda stays exactly lambda_0 alpha^n
    assert model.shared_router.l1_exponent.dtype == torch.int64
    assert torch.equal(model.shared_router.coefficient(), lam)


def test_mean_active_experts_reaches_the_target_on_a_tiny_training_run():
    """The paper's three stages on a learnable toy sequence: dense while lambda grows from 1e-8 (the gates start
    with about half of the experts active), then sparsifying, then around the target (1 of 4 experts)."""
    model = build("remoe", {"target_experts": 1.0}).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    active, exponents = [], []
    for _ in range(450):
        first = torch.randint(0, VOCAB, (4, 1), generator=gen)
        ids = torch.cat([first, (5 * first + 3 * torch.arange(1, 16)) % VOCAB], dim=1)  # learnable: uses experts
        out = model(ids[:, :-1])
        lm_loss = F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten())
        router_loss = torch.stack([r.router_loss for r in out.routing]).mean()  # as the training loop
        (lm_loss + router_loss).backward()
        optimizer.step()
        optimizer.zero_grad()
        for router in routers_of(model):
            router.after_optimizer_step()
        active.append(torch.stack([r.keep_TK.float().sum(-1).mean() for r in out.routing]).mean().item())
        exponents.append(model.shared_router.l1_exponent.item())
    assert sum(active[:50]) / 50 > 1.5 and exponents[49] == 50  # stage I: dense, lambda up every step
    assert max(exponents) > 80 and exponents[-1] < max(exponents)  # lambda grew past 1e-2, then came back
    assert sum(active[-150:]) / 150 == pytest.approx(1.0, abs=0.15)  # stage III: at the target


@pytest.mark.parametrize(
    ("options", "overrides", "fragment"),
    [
        ({"target_experts": 4}, {}, "target_experts=4 must be strictly between 0 and model.arch.num_experts=4"),
        ({"target_experts": 6.5}, {}, "target_experts=6.5 must be strictly between 0"),
        ({}, {"top_k": 4}, "model.arch.top_k=4 (model.arch.router_options.target_experts is null, so top_k)"),
        ({"target_experts": 0}, {}, "target_experts=0 must be > 0"),
        ({"l1_coef_multiplier": 1.0}, {}, "l1_coef_multiplier=1.0 must be > 1"),
        ({"l1_coef_init": 0.0}, {}, "l1_coef_init=0.0 must be > 0"),
        ({"load_balanced": "yes"}, {}, "load_balanced='yes' is invalid for router 'remoe'; expected true or false"),
        ({"top_k": 1}, {}, "valid options: target_experts, l1_coef_init"),
    ],
)
def test_bad_options_are_refused_naming_the_key(options, overrides, fragment):
    with pytest.raises(RmoeError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        tiny_config("remoe", options, **overrides)


def test_the_config_uses_no_switch_or_z_loss_and_targets_top_k():
    data = yaml.safe_load(CONFIG.read_text())
    assert data["model"]["aux_loss_coef"] == 0 and data["model"]["z_loss_coef"] == 0
    options = data["model"]["arch"]["router_options"]
    assert options["target_experts"] is None and options["load_balanced"] is True
    assert (options["l1_coef_init"], options["l1_coef_multiplier"]) == (1e-8, 1.2)
    context = tiny_config("remoe", options).router_context()
    assert ReluRouter.routed_pairs(context, 24, 2) == 24 * E  # an upper bound: every gate may be positive
