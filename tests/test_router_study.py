"""The routers of "Routers in Vision Mixture of Experts" (Liu et al., arXiv 2401.15969) and every
router's causality declaration.

Known answers: the transport plans' marginals, the sparse plan against a generic QP solver, the
simplex projection against a loop, exactly C tokens per expert, Soft MoE's softmax sums, and the
fast paths against naive per-token / per-slot loops (outputs and gradients). Causality: for every
registered router (and the options that change it), changing later tokens changes earlier outputs
exactly when the router declares it non-causal, in training and in evaluation mode.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from test_routers import CASES, VOCAB, build, tiny_config

from rmoe import MoeLM, RmoeError
from rmoe.model.moe import SparseMoeBlock
from rmoe.routers import ROUTERS
from rmoe.routers.soft_moe import SoftMoeRouter
from rmoe.routers.transport import simplex_threshold, sinkhorn_plan, sparse_plan

# the routers of the study, with the options that change what they compute
STUDY_CASES = [
    ("sinkhorn_token_choice", {}),
    ("sinkhorn_token_choice", {"combine": "plan", "eval_routing": "topk", "epsilon": 0.5}),
    ("sinkhorn_expert_choice", {}),
    ("sinkhorn_expert_choice", {"combine": "plan", "eval_routing": "topk"}),
    ("sparse_expert_choice", {}),
    ("sparse_expert_choice", {"combine": "plan", "gamma": 0.3}),
    ("soft_moe", {"slots_per_expert": 2}),
    ("soft_moe", {"normalize": False}),
]
# (router, options, ModelConfig overrides) whose declaration depends on the options
OPTION_CASES = [
    ("expert_choice", {"capacity_factor": 2.0}, {}),  # C = T: a dense, causal MoE
    ("expert_choice", {"eval_routing": "topk"}, {}),
    ("sinkhorn_expert_choice", {"capacity_factor": 2.0}, {}),
    ("sinkhorn_expert_choice", {"capacity_factor": 2.0, "combine": "plan"}, {}),  # plan gates mix the batch
    ("sparse_expert_choice", {"capacity_factor": 2.0}, {}),
    ("sinkhorn_token_choice", {}, {"top_k": 4}),  # K = E with softmax gates
    ("locmoe", {"capacity_factor": 2.0}, {}),
    ("locmoe", {"eval_routing": "topk"}, {}),  # drops in training only
]
CAUSALITY_CASES = [(r, o, {}) for r, o in CASES + STUDY_CASES] + OPTION_CASES


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_every_registered_router_has_a_causality_case():
    assert {r for r, _, _ in CAUSALITY_CASES} == set(ROUTERS)


def early_logit_changes(model: MoeLM, trials: int = 3) -> list[float]:
    """Max change of the logits at positions 0..7 when positions 8..11 change, over a few random batches
    (stops at the first change above 1e-4: one witness proves a non-causal declaration)."""
    changes: list[float] = []
    gen = torch.Generator().manual_seed(1)
    for _ in range(trials):
        ids = torch.randint(0, VOCAB, (2, 12), generator=gen)
        changed = ids.clone()
        changed[:, 8:] = (ids[:, 8:] + torch.randint(1, VOCAB, (2, 4), generator=gen)) % VOCAB
        with torch.no_grad():
            a, b = model(ids).logits[:, :8], model(changed).logits[:, :8]
        changes.append(float((a - b).abs().max()))
        if changes[-1] > 1e-4:
            break
    return changes


@pytest.mark.parametrize(
    ("router", "options", "overrides"), CAUSALITY_CASES, ids=lambda x: str(x) if not isinstance(x, dict) else None
)
def test_causality_declaration_holds_and_warns_once(router, options, overrides):
    config = tiny_config(router, options, **{"initializer_range": 0.2, **overrides})  # decisive routing
    causality = config.causality()
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = MoeLM(config)
    warned = [str(w.message) for w in record if "causal" in str(w.message)]
    assert len(warned) == (0 if causality.causal else 1), warned
    for training in (True, False):
        model.train(training)
        changes = early_logit_changes(model)
        if causality.reason(training) is None:  # declared causal: earlier outputs never change
            assert max(changes) <= 1e-5, (training, changes)
        else:  # declared non-causal: a later token changes an earlier output
            assert max(changes) > 1e-4, (training, changes)


@pytest.mark.parametrize(
    ("router", "options", "overrides"), CAUSALITY_CASES, ids=lambda x: str(x) if not isinstance(x, dict) else None
)
def test_the_causal_evaluation_each_router_offers_is_causal(router, options, overrides):
    """``ModelConfig.causal_evaluation_options``: {} when evaluation is causal already; the options that
    make it causal (checked by changing later tokens in eval mode) where the router offers them; None
    for the router that offers none (Soft MoE: every slot mixes the whole sequence)."""
    config = tiny_config(router, options, **{"initializer_range": 0.2, **overrides})
    offer = config.causal_evaluation_options()
    if config.causality().evaluation is None:
        assert offer == {}
        return
    if offer is None:
        assert router == "soft_moe", router
        return
    assert offer in ({"eval_routing": "topk"}, {"eval_capacity_factor": None}), offer
    causal = tiny_config(router, {**options, **offer}, **{"initializer_range": 0.2, **overrides})
    assert causal.causality().evaluation is None and causal.causality().training == config.causality().training
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = MoeLM(causal).eval()
    assert max(early_logit_changes(model)) <= 1e-5


def test_start_up_warning_says_which_mode():
    with pytest.warns(UserWarning, match="not causal in training.*evaluation routing is causal"):
        MoeLM(tiny_config("sinkhorn_token_choice", {"eval_routing": "topk"}))
    with pytest.warns(UserWarning, match="'soft_moe' is not causal: every slot"):
        MoeLM(tiny_config("soft_moe", {}))


# ----- transport plans -----------------------------------------------------------------------------


def sinkhorn_knopp_reference(scores: np.ndarray, num_iters: int, epsilon: float) -> np.ndarray:
    """Textbook multiplicative Sinkhorn-Knopp in float64: K = exp(s/eps); u = r / (K v); v = c / (K^T u)."""
    T, E = scores.shape
    K = np.exp(scores / epsilon)
    r, c = np.ones(T), np.full(E, T / E)
    v = np.ones(E)
    for _ in range(num_iters):
        u = r / (K @ v)
        v = c / (K.T @ u)
    return u[:, None] * K * v[None, :]


@pytest.mark.parametrize("epsilon", [1.0, 0.5])
def test_sinkhorn_plan_has_the_marginals_and_equals_sinkhorn_knopp(epsilon):
    torch.manual_seed(0)
    scores = torch.randn(96, 4) + torch.tensor([1.5, 0.0, -0.5, -1.0])  # imbalanced softmax
    plan = sinkhorn_plan(scores, 30, epsilon)
    torch.testing.assert_close(plan.sum(1), torch.ones(96), atol=1e-5, rtol=0)
    torch.testing.assert_close(plan.sum(0), torch.full((4,), 24.0), atol=1e-4, rtol=0)
    ref = sinkhorn_knopp_reference(scores.double().numpy(), 30, epsilon)
    torch.testing.assert_close(plan.double(), torch.from_numpy(ref), atol=1e-5, rtol=1e-4)


def test_sinkhorn_plan_of_an_already_balanced_softmax_is_the_softmax():
    scores = torch.cat([3.0 * torch.eye(4), 3.0 * torch.eye(4)])  # softmax columns already sum to T/E = 2
    torch.testing.assert_close(sinkhorn_plan(scores, 3), torch.softmax(scores, -1), atol=1e-6, rtol=0)


def test_default_iterations_reach_the_documented_tolerances():
    """10 Sinkhorn iterations (std 1) and 25 sparse ones (std 3) on 4096 x 8 imbalanced logits."""
    torch.manual_seed(0)
    noise, bias = torch.randn(4096, 8), torch.randn(8)
    sink = sinkhorn_plan(noise + bias, 10)
    sparse = sparse_plan(3 * (noise + bias), 25)
    for plan, row_tol in ((sink, 1e-4), (sparse, 1e-3)):
        assert (plan.sum(1) - 1).abs().max() < row_tol
        assert (plan.sum(0) / 512 - 1).abs().max() < 1e-5
    assert (sparse == 0).float().mean() > 0.5  # sparse: most entries exactly 0


def test_simplex_threshold_equals_a_loop():
    torch.manual_seed(0)
    y = torch.randn(20, 7) * 2
    for mass in (1.0, 3.5):
        theta = simplex_threshold(y, mass)
        for n in range(20):  # the textbook loop: largest k with y_(k) > (sum_{j<=k} y_(j) - mass) / k
            s = sorted(y[n].tolist(), reverse=True)
            k = max(k for k in range(1, 8) if s[k - 1] > (sum(s[:k]) - mass) / k)
            assert abs(float(theta[n]) - (sum(s[:k]) - mass) / k) < 1e-5
        torch.testing.assert_close(torch.relu(y - theta[:, None]).sum(1), torch.full((20,), mass))


@pytest.mark.parametrize("gamma", [1.0, 0.25])
def test_sparse_plan_is_the_quadratic_program_optimum_sparse_and_feasible(gamma):
    """max <P, s> - gamma/2 ||P||^2 over the transport polytope, solved by SLSQP, vs 100 iterations."""
    torch.manual_seed(0)
    T, E = 9, 3
    scores = torch.randn(T, E) + torch.tensor([0.8, 0.0, -0.8])
    plan = sparse_plan(scores, 100, gamma).double()
    s = scores.double().numpy()
    constraints = [
        {"type": "eq", "fun": lambda p: p.reshape(T, E).sum(1) - 1.0},
        {"type": "eq", "fun": lambda p: p.reshape(T, E).sum(0)[:-1] - T / E},  # the last one is implied
    ]
    result = minimize(
        lambda p: -(p * s.ravel()).sum() + 0.5 * gamma * (p**2).sum(),
        np.full(T * E, 1.0 / E),
        jac=lambda p: -s.ravel() + gamma * p,
        bounds=[(0, None)] * (T * E),
        constraints=constraints,
        method="SLSQP",
        options={"ftol": 1e-12, "maxiter": 500},
    )
    assert result.success
    torch.testing.assert_close(plan, torch.from_numpy(result.x.reshape(T, E)), atol=1e-4, rtol=0)
    torch.testing.assert_close(plan.sum(1), torch.ones(T, dtype=plan.dtype), atol=1e-5, rtol=0)
    torch.testing.assert_close(plan.sum(0), torch.full((E,), T / E, dtype=plan.dtype), atol=1e-5, rtol=0)
    assert (plan == 0).any()  # exact zeros, unlike an entropic plan


# ----- expert choice with plans, Sinkhorn token choice ------------------------------------------------


def router_and_input(router: str, options: dict, T: int = 40):
    model = build(router, options)
    torch.manual_seed(1)
    return model.layers[0].mlp.router.train(), torch.randn(T, 32)


@pytest.mark.parametrize(
    ("router", "options"),
    [
        ("sinkhorn_expert_choice", {}),
        ("sinkhorn_expert_choice", {"combine": "plan", "capacity_factor": 1.5}),
        ("sparse_expert_choice", {}),
        ("sparse_expert_choice", {"combine": "plan", "capacity_factor": 0.5, "gamma": 0.05}),
    ],
)
def test_plan_expert_choice_takes_exactly_c_tokens_of_highest_plan(router, options):
    r, x = router_and_input(router, options)
    routing, _ = r(x, None)
    o = r.options
    C = math.ceil(o.capacity_factor * 40 * 2 / 4)
    assert torch.equal(routing.keep_TK.sum(0), torch.full((4,), C))
    logits = routing.logits_TE
    if router == "sinkhorn_expert_choice":
        plan = torch.from_numpy(sinkhorn_knopp_reference(logits.detach().double().numpy(), o.num_iters, o.epsilon))
        plan = plan.float()
    else:
        plan = sparse_plan(logits, o.num_iters, o.gamma)
    for e in range(4):
        chosen = routing.keep_TK[:, e]
        assert plan[chosen, e].min() >= plan[~chosen, e].max() - 1e-6  # the top-C of the plan's column
        if router == "sparse_expert_choice" and int((plan[:, e] > 0).sum()) <= C:
            assert bool(chosen[plan[:, e] > 0].all())  # every non-zero of the column is taken
    gates = plan if o.combine == "plan" else routing.probs_TE
    torch.testing.assert_close(routing.weights_TK, gates * routing.keep_TK, atol=1e-5, rtol=1e-4)


def test_sinkhorn_token_choice_takes_the_top_k_of_the_plan_and_s_base_evaluates_with_top_k():
    r, x = router_and_input("sinkhorn_token_choice", {"num_iters": 30})
    routing, state = r(x, "opaque")
    assert state == "opaque"
    plan = torch.from_numpy(sinkhorn_knopp_reference(routing.logits_TE.detach().double().numpy(), 30, 1.0))
    assert torch.equal(routing.expert_ids_TK, torch.topk(plan, 2, dim=1).indices)
    chosen = routing.probs_TE.gather(1, routing.expert_ids_TK)
    torch.testing.assert_close(routing.weights_TK, chosen / chosen.sum(1, keepdim=True))
    r.options.eval_routing = "topk"
    r.eval()
    plain, _ = r(x, None)
    top = torch.topk(plain.probs_TE, 2, dim=1)
    assert torch.equal(plain.expert_ids_TK, top.indices)
    torch.testing.assert_close(plain.weights_TK, top.values / top.values.sum(1, keepdim=True))


def test_expert_choice_eval_routing_topk_is_token_choice_in_eval_only():
    r, x = router_and_input("sinkhorn_expert_choice", {"eval_routing": "topk"})
    assert r(x, None)[0].keep_TK is not None
    routing, _ = r.eval()(x, None)
    top = torch.topk(routing.probs_TE, 2, dim=1)
    assert routing.keep_TK is None and torch.equal(routing.expert_ids_TK, top.indices)
    torch.testing.assert_close(routing.weights_TK, top.values)  # the softmax gates, as in training


# ----- Soft MoE ----------------------------------------------------------------------------------------


def soft_block(options: dict | None = None, **overrides) -> SparseMoeBlock:
    model = build("soft_moe", {"slots_per_expert": 3, **(options or {})}, **overrides)
    with torch.no_grad():
        model.layers[0].mlp.router.scale.fill_(4.0)  # decisive softmaxes
    return model.layers[0].mlp


def test_soft_moe_dispatch_sums_to_one_over_tokens_and_combine_over_slots():
    block = soft_block()
    router: SoftMoeRouter = block.router
    x = torch.randn(3 * 10, 32)
    routing, _ = router(x, None)
    dispatch, combine = router.dispatch_and_combine(routing, 3)
    assert dispatch.shape == combine.shape == (3, 10, 12)
    torch.testing.assert_close(dispatch.sum(1), torch.ones(3, 12))  # each slot: a convex mix of its sequence
    torch.testing.assert_close(combine.sum(2), torch.ones(3, 10))  # each token: a convex mix of the slots
    torch.testing.assert_close(routing.probs_TE, combine.reshape(30, 4, 3).sum(-1))
    torch.testing.assert_close(torch.softmax(routing.logits_TE, -1), routing.probs_TE)
    assert routing.keep_TK is None and torch.equal(routing.expert_ids_TK, torch.arange(4).expand(30, 4))


def test_soft_moe_logits_are_scaled_cosines():
    router = soft_block().router
    x = torch.randn(6, 32)
    logits = router.slot_logits(x)
    expected = 4.0 * F.normalize(x, dim=-1) @ F.normalize(router.slot_embeddings, dim=-1).t()
    torch.testing.assert_close(logits, expected)
    with torch.no_grad():
        router.slot_embeddings.mul_(7.0)  # the slot vectors' norms do not matter, only the scale
    torch.testing.assert_close(router.slot_logits(3 * x), expected)


def swiglu_expert(block: SparseMoeBlock, e: int, x_D: torch.Tensor) -> torch.Tensor:
    gate_up, down = block.experts.gate_up_proj[e], block.experts.down_proj[e]
    F_ = down.shape[1]
    return down @ (F.silu(gate_up[:F_] @ x_D) * (gate_up[F_:] @ x_D))


def test_soft_moe_block_equals_a_naive_loop_in_outputs_and_gradients():
    block = soft_block(shared_expert_intermediate_size=8)
    B, S, D, E, P = 2, 5, 32, 4, 3
    x = torch.randn(B, S, D, requires_grad=True)
    out, routing, _ = block(x, None)
    params = [block.router.slot_embeddings, block.router.scale, block.experts.gate_up_proj, block.experts.down_proj]

    x_ref = x.detach().clone().requires_grad_(True)
    phi = block.router.slot_embeddings
    outs = []
    for b in range(B):
        logits = block.router.scale * F.normalize(x_ref[b], dim=-1) @ F.normalize(phi, dim=-1).t()  # (S, N)
        dispatch, combine = torch.softmax(logits, 0), torch.softmax(logits, 1)
        slot_out = []
        for n in range(E * P):
            slot_in = sum(dispatch[s, n] * x_ref[b, s] for s in range(S))
            slot_out.append(swiglu_expert(block, n // P, slot_in))  # slot n belongs to expert n // P
        rows = []
        for s in range(S):
            y = sum(combine[s, n] * slot_out[n] for n in range(E * P))
            shared = torch.sigmoid(block.shared_expert_gate(x_ref[b, s])) * block.shared_expert(x_ref[b, s])
            rows.append(y + shared)
        outs.append(torch.stack(rows))
    ref = torch.stack(outs)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    weight = torch.randn_like(out)
    grads = torch.autograd.grad((out * weight).sum(), [x, *params])
    ref_grads = torch.autograd.grad((ref * weight).sum(), [x_ref, *params])
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_soft_moe_mixes_within_each_sequence_only():
    block = soft_block()
    x = torch.randn(2, 6, 32)
    changed = x.clone()
    changed[1] = torch.randn(6, 32)
    with torch.no_grad():
        a, b = block(x, None)[0], block(changed, None)[0]
    torch.testing.assert_close(a[0], b[0], atol=1e-7, rtol=0)  # sequence 0 does not see sequence 1
    assert (a[1] - b[1]).abs().max() > 0.1 * a[1].abs().max()


# ----- the sorted path with the new routers' routings, against a per-token loop --------------------------


@pytest.mark.parametrize(
    ("router", "options"),
    [("sinkhorn_token_choice", {"combine": "plan"}), ("sinkhorn_expert_choice", {}), ("sparse_expert_choice", {})],
)
def test_block_equals_a_per_token_loop_in_outputs_and_gradients(router, options):
    model = build(router, options)
    block = model.layers[0].mlp.train()
    x = torch.randn(2, 9, 32, requires_grad=True)
    out, routing, _ = block(x, None)
    weight = torch.randn_like(out)
    params = [block.router.weight, block.experts.gate_up_proj, block.experts.down_proj]
    grads = torch.autograd.grad((out * weight).sum(), [x, *params])

    x_ref = x.detach().clone().requires_grad_(True)
    routing_ref, _ = block.router(x_ref.view(18, 32), None)  # the same decisions, differentiable in x_ref
    assert torch.equal(routing_ref.expert_ids_TK, routing.expert_ids_TK)
    keep = routing_ref.keep_TK if routing_ref.keep_TK is not None else torch.ones_like(routing_ref.weights_TK).bool()
    rows, ids, x_TD = [], routing_ref.expert_ids_TK, x_ref.view(18, 32)
    for t in range(18):
        terms = [
            routing_ref.weights_TK[t, k] * swiglu_expert(block, int(ids[t, k]), x_TD[t])
            for k in range(ids.shape[1])
            if keep[t, k]
        ]
        rows.append(sum(terms) if terms else torch.zeros(32))
    ref = torch.stack(rows).view(2, 9, 32)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    ref_grads = torch.autograd.grad((ref * weight).sum(), [x_ref, *params])
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


# ----- options -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("router", "options", "named"),
    [
        ("sinkhorn_token_choice", {"num_iters": 0}, "num_iters"),
        ("sinkhorn_token_choice", {"epsilon": 0.0}, "epsilon"),
        ("sinkhorn_token_choice", {"eval_routing": "sbase"}, "eval_routing"),
        ("sinkhorn_expert_choice", {"combine": "sinkhorn"}, "combine"),
        ("sparse_expert_choice", {"gamma": -1.0}, "gamma"),
        ("expert_choice", {"eval_routing": "prefix"}, "eval_routing"),
        ("soft_moe", {"slots_per_expert": 0}, "slots_per_expert"),
        ("soft_moe", {"capacity_factor": 1.0}, "capacity_factor"),
    ],
)
def test_bad_options_name_the_option(router, options, named):
    with pytest.raises(RmoeError, match=named):
        tiny_config(router, options)
