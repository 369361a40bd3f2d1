"""OLMoE's specialisation, co-activation and saturation, and the "Closer Look" analyses, on known answers.

Pure functions on hand-made tensors (a router sending token id t to expert t mod E is fully
specialised; identical experts are similar with 1; a router whose scores are the output norms
gives a diagonal rank matrix), then the model-level passes on a tiny model (the hooks see what
the MoE block computes, and they change nothing).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from tiny import tiny_config

from rmoe.evaluation.expert_analyses import (
    ExpertOutputStats,
    gate_embeddings,
    moe_blocks,
    router_saturation_between,
    weight_analyses,
)
from rmoe.evaluation.routing_eval import evaluate_routing
from rmoe.figures import compare_expert_figure, expert_figure
from rmoe.metrics.closer_look import (
    all_expert_outputs,
    averaged_neuron_similarity,
    expert_output_similarity,
    gate_embedding_similarity,
    kendall_tau,
    linear_sum_assignment_max,
    reordered_neuron_similarity,
    score_norm_rank_counts,
    squared_pearson_offdiagonal,
)
from rmoe.metrics.specialization import (
    TokenExpertStats,
    coactivation_counts,
    coactivation_rate,
    router_saturation,
    specialization_summary,
    token_expert_counts,
    top_specialized_pairs,
    vocabulary_specialization,
)
from rmoe.model.decoder import MoeLM
from rmoe.routers.base import RoutingOutput

V, E = 40, 4


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def fixed_routing(expert_ids_TK: torch.Tensor, keep_TK: torch.Tensor | None = None) -> RoutingOutput:
    T, K = expert_ids_TK.shape
    probs = torch.full((T, E), 1.0 / E)
    return RoutingOutput(probs.log(), probs, torch.full((T, K), 1.0 / K), expert_ids_TK, keep_TK)


# ----------------------------------------------------------------------------------------------
# OLMoE: specialisation, co-activation, saturation


@pytest.mark.parametrize("top_k", [1, 2])
def test_token_mod_e_router_is_fully_specialised(top_k):
    tokens_T = torch.randint(0, V, (2000,), generator=torch.Generator().manual_seed(0))
    ids_TK = torch.stack([(tokens_T + k) % E for k in range(top_k)], dim=1)  # t mod E (and the next expert)
    stats = TokenExpertStats(V, E).update(tokens_T.view(4, -1), [fixed_routing(ids_TK)] * 3)
    out = stats.compute(min_count=1)
    assert out["vocab_specialization"].tolist() == [1.0, 1.0, 1.0]
    share_VE = vocabulary_specialization(out["token_expert_counts"][0], out["token_occurrences"])
    seen = out["token_occurrences"] > 0
    expected_VE = torch.zeros(V, E, dtype=torch.float64)
    for k in range(top_k):
        expected_VE[torch.arange(V), (torch.arange(V) + k) % E] = 1.0
    torch.testing.assert_close(share_VE[seen], expected_VE[seen])
    assert torch.isnan(share_VE[~seen]).all()
    top = out["top_specialized"][0]
    assert all(p["share"] == 1.0 and p["count"] == p["occurrences"] for p in top)
    assert all(p["expert"] in {(p["token_id"] + k) % E for k in range(top_k)} for p in top)


def test_token_blind_random_router_scores_about_k_over_e():
    gen = torch.Generator().manual_seed(1)
    tokens_T = torch.randint(0, 5, (40000,), generator=gen)  # 5 ids, ~8000 occurrences each
    ids_TK = torch.rand(tokens_T.numel(), E, generator=gen).argsort(dim=1)[:, :2]  # 2 distinct experts, uniform
    counts = token_expert_counts(tokens_T, ids_TK, 5, E)
    assert counts.sum() == 2 * tokens_T.numel()
    value = float(specialization_summary(counts, torch.bincount(tokens_T, minlength=5)))
    assert value == pytest.approx(2 / E, abs=0.02)
    # a token seen fewer than min_count times is left out; none left: NaN
    assert math.isnan(float(specialization_summary(counts, torch.bincount(tokens_T, minlength=5), min_count=10**6)))


def test_dropped_pairs_count_nowhere():
    tokens_T = torch.tensor([3, 3, 5])
    ids_TK = torch.tensor([[0, 1], [0, 2], [1, 2]])
    keep_TK = torch.tensor([[True, True], [True, False], [False, False]])
    counts = token_expert_counts(tokens_T, ids_TK, 8, E, keep_TK)
    assert counts[3].tolist() == [2, 1, 0, 0] and counts[5].tolist() == [0, 0, 0, 0]
    joint = coactivation_counts(ids_TK, E, keep_TK)
    assert joint.diagonal().tolist() == [2, 1, 0, 0] and joint[0, 1] == 1 and joint[0, 2] == 0


def test_coactivation_rate_known_answer():
    ids_TK = torch.tensor([[0, 1], [1, 0], [0, 2]])
    rate = coactivation_rate(coactivation_counts(ids_TK, E))
    assert rate[0, 1] == pytest.approx(2 / 3) and rate[0, 2] == pytest.approx(1 / 3)
    assert rate[1, 0] == 1.0 and rate[2, 0] == 1.0 and rate[1, 2] == 0.0
    assert torch.isnan(rate.diagonal()).all() and torch.isnan(rate[3]).all()  # itself; idle expert 3
    torch.testing.assert_close(rate[:3].nan_to_num(0).sum(dim=1), torch.ones(3, dtype=torch.float64))  # K - 1
    top1 = coactivation_rate(coactivation_counts(torch.tensor([[0], [1], [1]]), E))
    assert top1[:2].nan_to_num(0).abs().sum() == 0  # top-1: never together


def test_router_saturation_known_answers():
    a = torch.tensor([[0, 1], [2, 3], [1, 2], [0, 3]])
    assert float(router_saturation(a, a)) == 1.0
    assert float(router_saturation(a, a.flip(1))) == 1.0  # order inside the top-k does not matter
    assert float(router_saturation(a, (a + 2) % 4)) == 0.0  # disjoint sets in every row
    b = torch.tensor([[0, 2], [3, 2], [3, 0], [0, 3]])  # overlaps 1/2, 1, 0, 1
    assert float(router_saturation(a, b)) == pytest.approx(0.625)
    assert float(router_saturation(torch.tensor([[0, 1]]), torch.tensor([[2, 3]]))) == 0.0
    assert float(router_saturation(torch.tensor([[0, 1]]), torch.tensor([[1, 3]]))) == 0.5
    sat = router_saturation_between([a, a], [a, a.flip(1)])
    assert sat.tolist() == [1.0, 1.0]


def test_top_specialized_pairs_orders_by_share_then_count():
    counts = torch.tensor([[10, 0], [3, 3], [0, 50]])
    pairs = top_specialized_pairs(counts, torch.tensor([10, 6, 50]), num_pairs=3, min_count=1)
    assert [(p["token_id"], p["expert"], p["share"]) for p in pairs] == [(2, 1, 1.0), (0, 0, 1.0), (1, 0, 0.5)]
    assert top_specialized_pairs(counts, torch.tensor([10, 6, 50]), min_count=20)[0]["token_id"] == 2


# ----------------------------------------------------------------------------------------------
# "A Closer Look": pure functions


def test_scores_equal_to_output_norms_give_a_diagonal_rank_matrix():
    norms_TE = torch.rand(500, E, generator=torch.Generator().manual_seed(2))
    counts = score_norm_rank_counts(norms_TE, norms_TE)
    assert torch.equal(counts, torch.diag(torch.full((E,), 500)))
    anti = score_norm_rank_counts(-norms_TE, norms_TE)  # the router prefers small outputs
    assert torch.equal(anti, torch.diag(torch.full((E,), 500)).flip(1))
    assert (score_norm_rank_counts(torch.rand(500, E), norms_TE).sum(dim=0) == 500).all()


def test_identical_experts_have_similarity_one():
    gen = torch.Generator().manual_seed(3)
    F_, D = 12, 8
    gate_up = torch.randn(1, 2 * F_, D, generator=gen).expand(E, -1, -1).clone()
    down = torch.randn(1, D, F_, generator=gen).expand(E, -1, -1).clone()
    torch.testing.assert_close(averaged_neuron_similarity(gate_up, down), torch.ones(3, E, E))
    sims, taus = reordered_neuron_similarity(gate_up, down)
    torch.testing.assert_close(sims, torch.ones(3, E, E))
    torch.testing.assert_close(taus, torch.ones(3, E, E))  # matched in their own order
    y_ETD = all_expert_outputs(torch.randn(30, D, generator=gen), gate_up, down)
    torch.testing.assert_close(
        expert_output_similarity(y_ETD) / 30, torch.ones(E, E, dtype=torch.float64), atol=2e-3, rtol=0
    )
    rows = torch.randn(1, D, generator=gen).expand(E, -1)
    torch.testing.assert_close(gate_embedding_similarity(rows), torch.ones(E, E))


def test_permuted_neurons_are_found_by_the_matching():
    gen = torch.Generator().manual_seed(4)
    F_, D = 10, 6
    gate_up = torch.randn(2, 2 * F_, D, generator=gen)
    down = torch.randn(2, D, F_, generator=gen)
    reverse = torch.arange(F_ - 1, -1, -1)
    gate, up = gate_up[0, :F_], gate_up[0, F_:]
    gate_up[1] = torch.cat([gate[reverse], up[reverse]])  # expert 1 = expert 0 with its neurons reversed
    down[1] = down[0][:, reverse]
    sims, taus = reordered_neuron_similarity(gate_up, down)
    torch.testing.assert_close(sims[:, 0, 1], torch.ones(3))
    torch.testing.assert_close(taus[:, 0, 1], -torch.ones(3))  # the permutation found is the reversal
    # averaging does not see the order either; opposite experts give -1
    assert averaged_neuron_similarity(gate_up, down)[:, 0, 1].tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert float(averaged_neuron_similarity(torch.cat([gate_up[:1], -gate_up[:1]]), -down)[0, 0, 1]) == pytest.approx(
        -1
    )


def test_angular_similarity_of_orthogonal_and_opposite_outputs():
    y_ETD = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[-1.0, 0.0]]])
    sim = expert_output_similarity(y_ETD)
    assert sim[0, 1] == pytest.approx(0.5) and sim[0, 2] == pytest.approx(0.0) and sim[1, 1] == 1.0


def test_hungarian_is_exact():
    rng = np.random.default_rng(5)
    for n in (1, 2, 3, 5, 6):
        for _ in range(10):
            score = rng.normal(size=(n, n))
            best = max(sum(score[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
            perm = linear_sum_assignment_max(score)
            assert sorted(perm.tolist()) == list(range(n))
            assert score[np.arange(n), perm].sum() == pytest.approx(best)


def test_kendall_tau():
    assert kendall_tau(np.arange(7)) == 1.0 and kendall_tau(np.arange(7)[::-1]) == -1.0
    assert kendall_tau(np.array([1, 0, 2])) == pytest.approx(1 / 3)
    stats = pytest.importorskip("scipy.stats")
    p = np.random.default_rng(7).permutation(25)
    assert kendall_tau(p) == pytest.approx(stats.kendalltau(p, np.arange(25)).statistic)


def test_squared_pearson():
    a = torch.rand(5, 5, generator=torch.Generator().manual_seed(8))
    assert squared_pearson_offdiagonal(a, 2 * a + 1) == pytest.approx(1.0)
    assert squared_pearson_offdiagonal(a, -a) == pytest.approx(1.0)
    assert math.isnan(squared_pearson_offdiagonal(a, torch.ones(5, 5)))


# ----------------------------------------------------------------------------------------------
# On a model


def tiny_model(**overrides) -> MoeLM:
    torch.manual_seed(0)
    return MoeLM(tiny_config(**overrides)).eval()


def test_hooks_see_the_moe_block_computation_and_change_nothing():
    model = tiny_model()
    x_BS = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(9))
    inputs, outputs = [], []

    def record(module, args, output):  # returns None: the output is left as it is
        inputs.append(args[0].detach())
        outputs.append(output)

    handles = [b.register_forward_hook(record) for b in moe_blocks(model)]
    reference = model(x_BS).logits
    for h in handles:
        h.remove()
    rng = torch.get_rng_state()
    with ExpertOutputStats(model, max_tokens=20) as stats:
        logits = model(x_BS).logits
    assert torch.equal(logits, reference) and torch.equal(rng, torch.get_rng_state())
    assert not any(b._forward_hooks for b in moe_blocks(model))  # removed on exit
    for l, block in enumerate(moe_blocks(model)):
        x_TD = inputs[l].reshape(-1, 32)
        out_TD, routing = outputs[l][0].reshape(-1, 32), outputs[l][1]
        y_ETD = all_expert_outputs(x_TD, block.experts.gate_up_proj, block.experts.down_proj)
        mixed_TD = (routing.weights_TK[..., None] * y_ETD[routing.expert_ids_TK, torch.arange(32)[:, None]]).sum(1)
        torch.testing.assert_close(mixed_TD, out_TD, atol=1e-5, rtol=1e-4)  # the block's own output
        expected = score_norm_rank_counts(routing.probs_TE[:20], y_ETD[:, :20].norm(dim=-1).T)
        assert torch.equal(stats.rank_counts_LEE[l], expected)
    out = stats.compute()
    assert out["expert_output_tokens"].tolist() == [20, 20, 20]  # capped at max_tokens
    assert ((0 <= out["score_norm_top1_agreement"]) & (out["score_norm_top1_agreement"] <= 1)).all()


def test_model_with_identical_experts():
    model = tiny_model(shared_expert_intermediate_size=0)
    with torch.no_grad():
        for block in moe_blocks(model):
            block.experts.gate_up_proj.copy_(block.experts.gate_up_proj[:1].expand_as(block.experts.gate_up_proj))
            block.experts.down_proj.copy_(block.experts.down_proj[:1].expand_as(block.experts.down_proj))
    weights = weight_analyses(model)
    torch.testing.assert_close(weights["neuron_similarity_avg"], torch.ones(3, 3, E, E))
    torch.testing.assert_close(weights["neuron_similarity_reordered"], torch.ones(3, 3, E, E))
    torch.testing.assert_close(weights["neuron_kendall_tau_mean"], torch.ones(3, 3))
    with ExpertOutputStats(model) as stats:
        model(torch.randint(0, 97, (2, 16)))
    torch.testing.assert_close(
        stats.compute()["expert_output_similarity"], torch.ones(3, E, E, dtype=torch.float64), atol=2e-3, rtol=0
    )


@pytest.mark.parametrize(
    ("router", "options", "shape"),
    [
        ("linear", {}, (E, 32)),
        ("gru", {"state_dim": 8}, (E, 8)),
        ("mlp", {"hidden_dim": 6}, (E, 6)),
        ("hyper", {}, None),
    ],
)
def test_gate_embeddings_of_each_router(router, options, shape):
    model = tiny_model(router=router, router_options=options)
    embeddings = gate_embeddings(moe_blocks(model)[0].router, E)
    assert (embeddings is None) if shape is None else (embeddings.shape == shape)
    r2 = weight_analyses(model, reorder=False)["gate_embedding_r2"]
    assert r2.shape == (3, 3) and (torch.isnan(r2).all() if shape is None else torch.isfinite(r2).all())


@pytest.mark.parametrize("router", ["linear", "locmoe", "expert_choice", "gru"])
def test_evaluate_routing_gives_every_analysis_and_changes_nothing(router):
    options = {"gru": {"state_dim": 8}, "locmoe": {"capacity_factor": 0.5}}.get(router, {})
    model = tiny_model(router=router, router_options=options)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    rng = torch.get_rng_state()
    metrics = evaluate_routing(model, batches, max_samples=None)
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    L = 3
    assert metrics["vocab_specialization"].shape == (L,) and metrics["coactivation"].shape == (L, E, E)
    assert metrics["score_norm_rank_counts"].sum(dim=(1, 2)).tolist() == [64 * E] * L  # every (token, expert)
    assert metrics["expert_output_similarity"].shape == (L, E, E)
    assert metrics["neuron_similarity_reordered"].shape == (L, 3, E, E)
    assert len(metrics["top_specialized"]) == L
    without = evaluate_routing(model, batches, max_samples=None, expert_analyses=False)
    assert without["loss"] == metrics["loss"] and "coactivation" not in without
    if router == "linear":  # the figures, once
        metrics["num_experts"] = E
        for kind in ("vocab_specialization", "coactivation", "score_norm_rank", "expert_output_similarity"):
            assert len(expert_figure(kind, metrics).axes) >= 1
        for kind in ("neuron_similarity", "coactivation"):
            assert len(compare_expert_figure(kind, {"a": metrics, "b": metrics}).axes) >= 1
        assert expert_figure("router_saturation", metrics) is None  # no other checkpoint
