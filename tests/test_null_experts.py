"""AdaMoE's null experts (arXiv 2406.13233): the choice against a naive loop over E + N experts, null slots never
computed nor counted, the all-null token through the residual, where the gradients go, the balance loss's known
answers, the capacity over real choices only, and bad options refused."""

from __future__ import annotations

import pytest
import torch
from test_router_study import swiglu_expert
from test_routers import build, routers_of, tiny_config

from rmoe import RmoeError
from rmoe.model.losses import load_balancing_loss, sequence_balancing_loss
from rmoe.routers import tokens_per_expert
from rmoe.routers.null_experts import null_balance_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

E, D = 4, 32  # tests/tiny.py's experts and width


def null_router(options: dict | None = None, top_k: int = 4, **overrides):
    model = build("null_experts", {"num_null_experts": 4, **(options or {})}, top_k=top_k, **overrides)
    return model, routers_of(model)[0]


def reference_routing(x_TD: torch.Tensor, weight_XD: torch.Tensor, K: int, normalize_over: str | None):
    """Per token: softmax over the E + N experts, its top-K, the real ones kept with their weights
    (``normalize_over`` None: not renormalised)."""
    chosen, weights = [], []
    for x_D in x_TD:
        p_X = torch.softmax(x_D @ weight_XD.detach().T, dim=0)
        top = sorted(range(len(p_X)), key=lambda i: -float(p_X[i]))[:K]  # most probable first
        real = [i for i in top if i < E]
        norm = {"real": sum(float(p_X[i]) for i in real), "slots": sum(float(p_X[i]) for i in top), None: 1.0}
        chosen.append(real)
        weights.append({i: float(p_X[i]) / (norm[normalize_over] or 1.0) for i in real})
    return chosen, weights


@pytest.mark.parametrize(
    ("options", "overrides", "normalize_over"),
    [({}, {}, "real"), ({"normalize_over": "slots"}, {}, "slots"), ({}, {"norm_topk_prob": False}, None)],
)
def test_choice_and_weights_equal_a_naive_loop_over_real_and_null_experts(options, overrides, normalize_over):
    _, router = null_router(options, **overrides)
    x_TD = torch.randn(64, D, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        routing, _ = router(x_TD, None)
    chosen, weights = reference_routing(x_TD, router.weight, 4, normalize_over)
    for t in range(64):
        got = routing.expert_ids_TK[t][routing.chosen_TK[t]].tolist()
        assert got == chosen[t]  # the real experts among the top-K, most probable first
        got_weights = routing.weights_TK[t][routing.chosen_TK[t]].tolist()
        assert got_weights == pytest.approx([weights[t][i] for i in chosen[t]], abs=1e-6)
    assert torch.equal(routing.keep_TK, routing.chosen_TK)  # no capacity: exactly the real choices are computed
    assert (routing.weights_TK[~routing.chosen_TK] == 0).all() and (
        routing.expert_ids_TK[~routing.chosen_TK] == 0
    ).all()
    assert routing.logits_TE.shape == routing.probs_TE.shape == (64, E)
    logits_TX = x_TD @ router.weight.T
    shift_T = (routing.logits_TE - logits_TX[:, :E]).mean(-1)  # the real logits, shifted per token
    torch.testing.assert_close(routing.logits_TE, logits_TX[:, :E] + shift_T[:, None])
    torch.testing.assert_close(routing.logits_TE.logsumexp(-1), logits_TX.logsumexp(-1))  # the z-loss sees all E + N
    torch.testing.assert_close(routing.probs_TE, torch.softmax(routing.logits_TE, dim=-1))
    if normalize_over == "real":  # a token with a real expert: its real weights sum to 1
        has_real_T = routing.chosen_TK.any(-1)
        torch.testing.assert_close(routing.weights_TK.sum(-1)[has_real_T], torch.ones(int(has_real_T.sum())))


def test_real_experts_per_token_vary_and_average_below_top_k():
    _, router = null_router()
    with torch.no_grad():
        routing, _ = router(torch.randn(256, D, generator=torch.Generator().manual_seed(1)), None)
    real_per_token_T = routing.chosen_TK.sum(-1)
    assert 0 < real_per_token_T.float().mean() < 4  # null experts win some slots
    assert len(real_per_token_T.unique()) >= 3  # token-adaptive: different tokens take different numbers


def test_null_slots_are_never_computed_nor_counted_as_load(monkeypatch):
    model, router = null_router(shared_expert_intermediate_size=0)
    block = model.layers[0].mlp.train()
    x = torch.randn(2, 9, D, requires_grad=True, generator=torch.Generator().manual_seed(2))
    out, routing, _ = block(x, None)
    assert not routing.chosen_TK.all()
    loads_E = tokens_per_expert(routing.expert_ids_TK, E, routing.keep_TK)
    assert int(loads_E.sum()) == int(routing.chosen_TK.sum())  # the metrics' loads: real choices only
    # the MoE output is the naive sum over each token's real experts only, in value and gradient
    weight = torch.randn_like(out)
    params = [router.weight, block.experts.gate_up_proj, block.experts.down_proj]
    grads = torch.autograd.grad((out * weight).sum(), [x, *params])
    x_ref = x.detach().clone().requires_grad_(True)
    routing_ref, _ = router(x_ref.view(18, D), None)
    rows = []
    for t in range(18):
        terms = [
            routing_ref.weights_TK[t, k]
            * swiglu_expert(block, int(routing_ref.expert_ids_TK[t, k]), x_ref.view(18, D)[t])
            for k in range(4)
            if routing_ref.chosen_TK[t, k]
        ]
        rows.append(sum(terms) if terms else torch.zeros(D))
    ref = torch.stack(rows).view(2, 9, D)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    for g, r in zip(grads, torch.autograd.grad((ref * weight).sum(), [x_ref, *params]), strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def null_routing(seed: int):
    _, router = null_router()
    with torch.no_grad():
        routing, _ = router(torch.randn(24, D, generator=torch.Generator().manual_seed(seed)), None)
    assert not routing.chosen_TK.all()
    counts_E = tokens_per_expert(routing.expert_ids_TK, E, routing.chosen_TK).float()
    return routing, counts_E / counts_E.sum()


def test_the_sequence_balance_loss_counts_only_real_choices():
    routing, fraction_E = null_routing(12)
    expected = E * (fraction_E * routing.probs_TE.mean(0)).sum()
    torch.testing.assert_close(sequence_balancing_loss(routing, E, 1), expected)


def test_the_balance_loss_counts_only_real_choices():
    routing, fraction_E = null_routing(12)
    expected = E * (fraction_E * routing.probs_TE.mean(0)).sum()
    torch.testing.assert_close(load_balancing_loss(routing, E), expected)


def test_bias_balancing_counts_only_real_choices():
    _, router = null_router({"bias_update_rate": 0.1})
    router.train()
    with torch.no_grad():
        routing, _ = router(torch.randn(64, D, generator=torch.Generator().manual_seed(3)), None)
    expected_E = tokens_per_expert(routing.expert_ids_TK, E, routing.chosen_TK).float()
    assert torch.equal(router._load_counts_E, expected_E)
    assert expected_E.sum() < 64 * 4  # the null slots are not counted (as expert 0 or any other)
    router.after_optimizer_step()
    torch.testing.assert_close(router.balance_bias_E, 0.1 * torch.sign(expected_E.mean() - expected_E))


def test_a_token_choosing_only_null_experts_passes_through_the_residual():
    model, router = null_router(top_k=2, shared_expert_intermediate_size=0)
    u_D = torch.nn.functional.normalize(torch.randn(D, generator=torch.Generator().manual_seed(4)), dim=0)
    with torch.no_grad():  # real logits 0; null logits 5 x.u: tokens with x.u > 0 take two null experts
        router.weight.zero_()
        router.weight[E:] = 5 * u_D
    x_TD = torch.randn(40, D, generator=torch.Generator().manual_seed(5))
    null_only_T = x_TD @ u_D > 0
    block = model.layers[0].mlp
    out, routing, _ = block(x_TD.view(2, 20, D), None)
    assert torch.equal(~routing.chosen_TK.any(-1), null_only_T) and 0 < int(null_only_T.sum()) < 40
    out_TD = out.reshape(40, D)
    assert torch.equal(out_TD[null_only_T], torch.zeros(int(null_only_T.sum()), D))  # the MoE adds nothing
    assert (out_TD[~null_only_T].abs().sum(-1) > 0).all()
    assert (routing.weights_TK[null_only_T] == 0).all() and not routing.weights_TK.isnan().any()


@pytest.mark.parametrize(("options", "overrides", "lm_reaches_nulls"), [
    ({}, {}, False),  # AdaMoE: renormalised over the real experts, the null logits cancel out
    ({"normalize_over": "slots"}, {}, True),
    ({}, {"norm_topk_prob": False}, True),
])  # fmt: skip
def test_gradients_reach_the_null_experts_router_rows(options, overrides, lm_reaches_nulls):
    model, router = null_router(options, shared_expert_intermediate_size=0, **overrides)
    block = model.layers[0].mlp.train()
    x = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(6))
    out, routing, _ = block(x, None)
    assert not routing.chosen_TK.all() and routing.chosen_TK.any(-1).all()
    (lm_grad,) = torch.autograd.grad(out.pow(2).sum(), [router.weight], retain_graph=True)
    assert lm_grad[:E].abs().sum() > 0
    # through the normalisation, or not at all (AdaMoE: zero up to rounding, the null logits cancel)
    assert (lm_grad[E:].abs().max() > 1e-6 * lm_grad[:E].abs().max()) == lm_reaches_nulls
    (own_grad,) = torch.autograd.grad(routing.router_loss, [router.weight])
    assert own_grad[E:].abs().sum() > 0  # AdaMoE's balance loss always reaches them


def test_balance_loss_known_answers():
    # uniform probabilities and loads over E + N: 1, whatever the split between real and null choices
    probs_TX = torch.full((8, 8), 1 / 8)
    ids_TK = torch.arange(8).view(4, 2).repeat(2, 1)
    assert float(null_balance_loss(probs_TX, ids_TK, 4)) == pytest.approx(1.0)
    # the null loads are averaged: moving choices between null experts changes nothing, between real ones does
    probs_TX = torch.softmax(torch.randn(8, 8, generator=torch.Generator().manual_seed(7)), dim=-1)
    to_one_null = ids_TK.masked_fill(ids_TK >= 4, 7)
    assert float(null_balance_loss(probs_TX, to_one_null, 4)) == pytest.approx(
        float(null_balance_loss(probs_TX, ids_TK, 4))
    )
    to_one_real = ids_TK.masked_fill(ids_TK < 4, 0)
    assert float(null_balance_loss(probs_TX, to_one_real, 4)) != pytest.approx(
        float(null_balance_loss(probs_TX, ids_TK, 4))
    )
    # the formula, by hand: (E + N) * (sum_e f_e P_e + f_null / N * P_null)
    f_X = torch.bincount(ids_TK.flatten(), minlength=8).float() / ids_TK.numel()
    P_X = probs_TX.mean(0)
    expected = 8 * ((f_X[:4] * P_X[:4]).sum() + f_X[4:].sum() / 4 * P_X[4:].sum())
    assert float(null_balance_loss(probs_TX, ids_TK, 4)) == pytest.approx(float(expected))
    # no null experts: Switch's E * sum_e f_e P_e
    f4 = torch.bincount(to_one_real.clamp(max=3).flatten(), minlength=4).float() / 16
    P4 = torch.softmax(torch.randn(8, 4, generator=torch.Generator().manual_seed(8)), dim=-1)
    assert float(null_balance_loss(P4, to_one_real.clamp(max=3), 4)) == pytest.approx(
        float(4 * (f4 * P4.mean(0)).sum())
    )


def test_router_loss_is_the_balance_loss_times_its_coefficient_and_off_at_zero():
    _, router = null_router({"balance_loss_coef": 0.5})
    x_TD = torch.randn(32, D, generator=torch.Generator().manual_seed(9))
    routing, _ = router(x_TD, None)
    probs_TX = torch.softmax(x_TD @ router.weight.T, dim=-1)
    ids_TK = torch.topk(probs_TX, 4, dim=-1).indices
    torch.testing.assert_close(routing.router_loss, 0.5 * null_balance_loss(probs_TX, ids_TK, E))
    _, router = null_router({"balance_loss_coef": 0.0})
    assert router(x_TD, None)[0].router_loss is None


def test_num_null_experts_defaults_to_num_experts_and_zero_is_plain_top_k():
    assert null_router({"num_null_experts": None})[1].weight.shape == (2 * E, D)
    model, router = null_router({"num_null_experts": 0}, top_k=2)
    x_TD = torch.randn(16, D, generator=torch.Generator().manual_seed(10))
    routing, _ = router(x_TD, None)
    weights_TK, ids_TK = torch.topk(torch.softmax(x_TD @ router.weight.T, -1), 2, dim=-1)
    assert torch.equal(routing.expert_ids_TK, ids_TK) and routing.chosen_TK.all()
    torch.testing.assert_close(routing.weights_TK, weights_TK / weights_TK.sum(-1, keepdim=True))


def test_capacity_treats_null_choices_as_unused_slots():
    _, router = null_router({"capacity_factor": 0.5})
    router.train()
    x_TD = torch.randn(2 * 16, D, generator=torch.Generator().manual_seed(11))
    routing, _ = router(x_TD, None, torch.zeros(2, 16, dtype=torch.long))
    C = router.capacity(16)
    assert not (routing.keep_TK & ~routing.chosen_TK).any()
    # naive: per sequence, each expert keeps its first C real choices in token order, a token's slots in order
    expected = torch.zeros_like(routing.keep_TK)
    for b in range(2):
        taken = [0] * E
        for t in range(b * 16, (b + 1) * 16):
            for k in range(4):
                e = int(routing.expert_ids_TK[t, k])
                if routing.chosen_TK[t, k] and taken[e] < C:
                    expected[t, k], taken[e] = True, taken[e] + 1
    assert torch.equal(routing.keep_TK, expected)
    assert not torch.equal(routing.keep_TK, routing.chosen_TK)  # the capacity drops some real choices


@pytest.mark.parametrize(
    ("options", "overrides", "named"),
    [
        ({"num_null_experts": -1}, {}, "num_null_experts"),
        ({"num_null_experts": 1.5}, {}, "num_null_experts"),
        ({"balance_loss_coef": -0.1}, {}, "balance_loss_coef"),
        ({"normalize_over": "all"}, {}, "normalize_over"),
        ({"normalize_over": "slots"}, {"norm_topk_prob": False}, "normalize_over.*norm_topk_prob"),
        ({"bias_update_rate": -1.0}, {}, "bias_update_rate"),
        ({"capacity_factor": 0.0}, {}, "capacity_factor"),
        ({"null_experts": 4}, {}, "null_experts"),
    ],
)
def test_bad_options_are_refused_naming_the_key(options, overrides, named):
    with pytest.raises(RmoeError, match=named):
        tiny_config("null_experts", options, **overrides)
