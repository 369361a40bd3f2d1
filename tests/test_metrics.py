"""Routing metrics: known answers, naive references (per-token loops, the RMoE authors' formula),
streaming == one-shot, no graphs built and no inputs modified."""

from __future__ import annotations

import itertools
import math
import pickle
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from reference_metrics import (
    binned_probability_mi,
    drop_ratio,
    expert_path_diversity,
    inner_balance,
    joint_histogram,
    outer_balance,
    token_drop_ratio,
)
from tiny import tiny_config

from rmoe import MoeLM
from rmoe.metrics import (
    RoutingStats,
    binned_probability_mi_matrix,
    entropy_from_counts,
    expert_similarity,
    expert_similarity_per_layer,
    gate_entropy,
    load_coefficient_of_variation,
    load_entropy,
    max_violation,
    mutual_information,
    normalized_mutual_information,
    num_dead_experts,
    router_grad_norms,
    router_logit_variance,
    router_z,
    routing_summary,
    summary_scalars,
    tokens_per_expert,
    top1_expert_ids,
)
from rmoe.metrics.information import binned_log_count_sums, path_keys, unique_with_counts
from rmoe.metrics.stats import PathCounts
from rmoe.model.losses import average_over_layers
from rmoe.routers import RoutingOutput, topk_softmax
from rmoe.routers.recurrent import RecurrentRouter

# ----------------------------------------------------------------------------------------------
# helpers


def random_routing(T: int, E: int, K: int, *, scale: float = 2.0, seed: int = 0, keep_rate: float | None = None):
    g = torch.Generator().manual_seed(seed)
    routing = topk_softmax(torch.randn(T, E, generator=g) * scale, K, norm_topk_prob=True)
    if keep_rate is not None:
        routing.keep_TK = torch.rand(T, K, generator=g) < keep_rate
    return routing


def concat_routing(batches: list[list[RoutingOutput]]) -> list[RoutingOutput]:
    """Concatenate several forwards' routing along tokens, layer by layer."""
    out = []
    for layer in zip(*batches):
        keeps = [r.keep_TK for r in layer]
        out.append(
            RoutingOutput(
                torch.cat([r.logits_TE for r in layer]),
                torch.cat([r.probs_TE for r in layer]),
                torch.cat([r.weights_TK for r in layer]),
                torch.cat([r.expert_ids_TK for r in layer]),
                None if keeps[0] is None else torch.cat(keeps),
            )
        )
    return out


def naive_plugin_mi(x: list[int], y: list[int]) -> float:
    """sum p(x,y) ln p(x,y) / (p(x) p(y)) with a python Counter (scikit-learn's mutual_info_score)."""
    n = len(x)
    pxy, px, py = Counter(zip(x, y)), Counter(x), Counter(y)
    return sum(c / n * math.log(c * n / (px[a] * py[b])) for (a, b), c in pxy.items())


# ----------------------------------------------------------------------------------------------
# load


def test_uniform_load():
    load_E = torch.full((8,), 100)
    assert load_coefficient_of_variation(load_E) == 0
    assert max_violation(load_E) == 0
    assert num_dead_experts(load_E) == 0
    torch.testing.assert_close(load_entropy(load_E), torch.tensor(1.0))


def test_all_tokens_on_one_expert():
    E = 8
    load_E = tokens_per_expert(torch.full((64, 1), 3), E)
    assert load_E.tolist() == [0, 0, 0, 64, 0, 0, 0, 0]
    assert num_dead_experts(load_E) == E - 1
    torch.testing.assert_close(load_entropy(load_E), torch.tensor(0.0))
    torch.testing.assert_close(max_violation(load_E), torch.tensor(float(E - 1)))
    torch.testing.assert_close(load_coefficient_of_variation(load_E), torch.tensor(math.sqrt(E - 1)))


def test_load_counts_kept_pairs_and_batches_over_layers():
    ids_TK = torch.tensor([[0, 1], [1, 2], [2, 3]])
    keep_TK = torch.tensor([[True, False], [True, True], [False, False]])
    assert tokens_per_expert(ids_TK, 4).tolist() == [1, 2, 2, 1]
    assert tokens_per_expert(ids_TK, 4, keep_TK).tolist() == [1, 1, 1, 0]
    load_LE = torch.tensor([[2, 2, 2, 2], [8, 0, 0, 0]])
    torch.testing.assert_close(load_entropy(load_LE), torch.tensor([1.0, 0.0]))
    assert num_dead_experts(load_LE).tolist() == [0, 3]


def test_drop_ratios():
    keep_TK = torch.tensor([[True, False], [True, True], [False, False], [True, True]])
    torch.testing.assert_close(drop_ratio(keep_TK), torch.tensor(3 / 8))
    torch.testing.assert_close(token_drop_ratio(keep_TK), torch.tensor(1 / 4))
    ids_TK = torch.zeros(4, 2, dtype=torch.int64)
    assert drop_ratio(None, ids_TK) == 0 and token_drop_ratio(None, ids_TK) == 0
    routing = random_routing(4, 4, 2)
    routing.keep_TK = keep_TK
    summary = routing_summary([routing], 4)
    torch.testing.assert_close(summary["drop_ratio"], torch.tensor([3 / 8]))
    torch.testing.assert_close(summary["token_drop_ratio"], torch.tensor([1 / 4]))
    assert summary["tokens_per_expert"].sum() == 5


# ----------------------------------------------------------------------------------------------
# per-token routing


def test_gate_entropy_known_values():
    E = 8
    torch.testing.assert_close(gate_entropy(torch.full((3, E), 1 / E)), torch.full((3,), math.log(E)))
    torch.testing.assert_close(gate_entropy(F.one_hot(torch.tensor([0, 5]), E).float()), torch.zeros(2))


def test_inner_and_outer_balance():
    probs_TE = torch.tensor([[0.25, 0.5, 0.15, 0.1], [0.3, 0.2, 0.5, 0.0]])
    torch.testing.assert_close(inner_balance(probs_TE), torch.tensor([2.0, 0.5 / 0.3]))
    torch.testing.assert_close(outer_balance(torch.tensor([[0.5, 0.3, 0.2]]), 2), torch.tensor([0.8]))
    # outer balance reads the full softmax, not the renormalised weights (which sum to 1)
    routing = topk_softmax(torch.log(torch.tensor([[0.5, 0.3, 0.2]])), 2, norm_topk_prob=True)
    summary = routing_summary([routing], 3)
    torch.testing.assert_close(summary["outer_balance_median"], torch.tensor([0.8]))
    torch.testing.assert_close(summary["inner_balance_median"], torch.tensor([0.5 / 0.3]))


def test_router_logit_std_is_the_rms_of_per_token_stds_and_shift_invariant():
    # token 0: logits (a, -a, a, -a) -> std a; token 1: all equal -> 0; token 2: (0, 0, 0, 4) -> sqrt(3)
    logits_TE = torch.tensor([[1.0, -1.0, 1.0, -1.0], [3.0, 3.0, 3.0, 3.0], [0.0, 0.0, 0.0, 4.0]])
    torch.testing.assert_close(router_logit_variance(logits_TE), torch.tensor([1.0, 0.0, 3.0]))
    summary = routing_summary([topk_softmax(logits_TE, 2, True), topk_softmax(2 * logits_TE + 7, 2, True)], 4)
    torch.testing.assert_close(summary["router_logit_std"], torch.tensor([math.sqrt(4 / 3), 2 * math.sqrt(4 / 3)]))
    assert "routing/router_logit_std/layer_1" in summary_scalars(summary)


def test_router_z_is_logsumexp():
    torch.testing.assert_close(router_z(torch.zeros(2, 8)), torch.full((2,), math.log(8)))
    logits = torch.tensor([[1.0, 3.0]])
    torch.testing.assert_close(router_z(logits), torch.logsumexp(logits, -1))


def test_top1_expert_ids_skip_dropped_pairs_and_fall_back_to_argmax():
    probs_TE = torch.tensor([[0.1, 0.6, 0.3], [0.2, 0.3, 0.5], [0.7, 0.2, 0.1]])
    ids_TK = torch.tensor([[1, 2], [2, 1], [0, 1]])
    weights_TK = torch.tensor([[0.6, 0.3], [0.5, 0.3], [0.7, 0.2]])
    assert top1_expert_ids(ids_TK, weights_TK, probs_TE).tolist() == [1, 2, 0]
    keep_TK = torch.tensor([[False, True], [True, True], [False, False]])
    assert top1_expert_ids(ids_TK, weights_TK, probs_TE, keep_TK).tolist() == [2, 2, 0]


# ----------------------------------------------------------------------------------------------
# mutual information between layers


def test_identical_routing_mi_is_entropy_and_nmi_one():
    ids_T = torch.randint(0, 8, (5000,), generator=torch.Generator().manual_seed(0))
    joint = joint_histogram(ids_T, ids_T, 8, 8)
    h = entropy_from_counts(torch.bincount(ids_T, minlength=8))
    torch.testing.assert_close(mutual_information(joint), h)
    torch.testing.assert_close(normalized_mutual_information(joint), torch.tensor(1.0, dtype=torch.float64))
    # relabelling the experts of one layer changes nothing
    joint_perm = joint_histogram(ids_T, (ids_T + 3) % 8, 8, 8)
    torch.testing.assert_close(normalized_mutual_information(joint_perm), torch.tensor(1.0, dtype=torch.float64))


def test_independent_routing_mi_is_the_known_small_bias():
    E, N = 8, 200_000
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, E, (N,), generator=g), torch.randint(0, E, (N,), generator=g)
    mi = float(mutual_information(joint_histogram(x, y, E, E)))
    bias = (E - 1) ** 2 / (2 * N)  # Miller: 2 N MI ~ chi2((E-1)^2)
    std = math.sqrt(2 * (E - 1) ** 2) / (2 * N)
    assert abs(mi - bias) < 5 * std
    assert float(normalized_mutual_information(joint_histogram(x, y, E, E))) < 1e-3


def test_mi_matches_naive_plugin_and_constant_cases():
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 4, (300,), generator=g)
    y = (x + torch.randint(0, 2, (300,), generator=g)) % 4
    mi = float(mutual_information(joint_histogram(x, y, 4, 4)))
    assert mi == pytest.approx(naive_plugin_mi(x.tolist(), y.tolist()), abs=1e-12)
    const = torch.zeros(50, dtype=torch.int64)
    assert float(normalized_mutual_information(joint_histogram(const, const, 4, 4))) == 1.0
    assert float(normalized_mutual_information(joint_histogram(const, x[:50], 4, 4))) == 0.0


def test_summary_top1_mi_of_identical_layers():
    r = random_routing(4096, 8, 2)
    summary = routing_summary([r, r, random_routing(4096, 8, 2, seed=9)], 8)
    torch.testing.assert_close(summary["top1_mi"][0], summary["top1_entropy"][0])
    torch.testing.assert_close(summary["top1_nmi"][0], torch.tensor(1.0))
    assert summary["top1_nmi"][1] < 0.02


# ----------------------------------------------------------------------------------------------
# the RMoE paper's binned-probability MI


@pytest.mark.parametrize("E", [8, 5, 12, 20])
def test_binned_mi_matches_naive_per_token_loop(E):
    T, L = 40, 3
    g = torch.Generator().manual_seed(E)
    probs_LTE = torch.softmax(torch.randn(L, T, E, generator=g) * 3, dim=-1)
    probs_LTE[2] = probs_LTE[0]
    bins_LTE = (probs_LTE * 100).floor().long().clamp(0, 99)
    expected = torch.zeros(L, L, dtype=torch.float64)
    for i in range(L):
        for j in range(L):
            per_token = [naive_plugin_mi(bins_LTE[i, t].tolist(), bins_LTE[j, t].tolist()) for t in range(T)]
            expected[i, j] = sum(per_token) / T
    mi_LL = binned_probability_mi_matrix(probs_LTE)
    torch.testing.assert_close(mi_LL, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(binned_probability_mi(probs_LTE[0], probs_LTE[1]).mean(), expected[0, 1])
    # chunking over tokens does not change the statistic
    torch.testing.assert_close(binned_log_count_sums(probs_LTE, max_chunk_bytes=1), binned_log_count_sums(probs_LTE))


def test_binned_mi_identical_layers_equals_entropy_and_matrix_is_symmetric():
    g = torch.Generator().manual_seed(3)
    a_TE = torch.softmax(torch.randn(512, 8, generator=g) * 3, dim=-1)
    b_TE = torch.softmax(torch.randn(512, 8, generator=g) * 3, dim=-1)
    mi_LL = binned_probability_mi_matrix([a_TE, a_TE, b_TE])
    torch.testing.assert_close(mi_LL, mi_LL.T, rtol=0, atol=0)
    torch.testing.assert_close(mi_LL[0, 1], mi_LL[0, 0])  # I(X; X) = H(X)
    bins_TE = (a_TE * 100).floor().long().clamp(0, 99)
    entropy = torch.stack([entropy_from_counts(torch.bincount(row, minlength=100)) for row in bins_TE]).mean()
    torch.testing.assert_close(mi_LL[0, 0], entropy, atol=1e-6, rtol=0)
    assert (mi_LL <= math.log(8) + 1e-9).all() and (mi_LL >= 0).all()
    # a uniform router puts all E probabilities in one bin: entropy 0, MI 0 with anything
    uniform = torch.full((16, 8), 1 / 8)
    mi_uniform = binned_probability_mi_matrix([uniform, a_TE[:16]])
    assert mi_uniform[0, 0] == 0 and mi_uniform[0, 1] == 0 and mi_uniform[1, 1] > 0


# ----------------------------------------------------------------------------------------------
# expert paths


def test_single_path():
    top1_LT = torch.full((4, 100), 2)
    assert expert_path_diversity(top1_LT, 8) == (1, 0.0)


def test_independent_uniform_paths():
    g = torch.Generator().manual_seed(4)
    E, L, T = 4, 3, 20_000  # E^L = 64 << T: every path shows up, close to uniform
    num_paths, entropy = expert_path_diversity(torch.randint(0, E, (L, T), generator=g), E)
    assert num_paths == E**L
    assert entropy == pytest.approx(math.log(E**L), abs=0.01)
    E, L, T = 8, 8, 4096  # E^L = 16.8M >> T: almost every token has its own path
    num_paths, entropy = expert_path_diversity(torch.randint(0, E, (L, T), generator=g), E)
    assert num_paths >= T - 5
    assert entropy == pytest.approx(math.log(T), abs=0.01)


def test_paths_fall_back_to_rows_when_codes_overflow():
    g = torch.Generator().manual_seed(5)
    E, L = 8, 30  # 8^30 > 2^62
    base_LT = torch.randint(0, E, (L, 7), generator=g)
    top1_LT = base_LT[:, torch.randint(0, 7, (500,), generator=g)]
    assert path_keys(top1_LT, E).dim() == 2
    num_paths, entropy = expert_path_diversity(top1_LT, E)
    codes = Counter(tuple(col) for col in top1_LT.T.tolist())
    assert num_paths == len(codes)
    assert entropy == pytest.approx(float(entropy_from_counts(torch.tensor(list(codes.values())))), abs=1e-12)


# ----------------------------------------------------------------------------------------------
# expert similarity (RMoE App. A.4.3)


def authors_similarity(w1_EFD, w3_EFD, w2_EDF):
    """get_similarities of the RMoE authors' analysis notebook (SwiGLU experts)."""
    vectors = [F.normalize(w1_EFD.mean(dim=1), dim=1), F.normalize(w3_EFD.mean(dim=1), dim=1)]
    vectors.append(F.normalize(w2_EDF.mean(dim=2), dim=1))
    x = torch.cat(vectors, dim=1)
    return (x @ x.T).mean()


def test_expert_similarity_matches_the_authors_formula():
    E, F_, D = 4, 6, 5
    g = torch.Generator().manual_seed(6)
    gate_up, down = torch.randn(E, 2 * F_, D, generator=g), torch.randn(E, D, F_, generator=g)
    expected = authors_similarity(gate_up[:, :F_], gate_up[:, F_:], down) / 3
    torch.testing.assert_close(expert_similarity(gate_up, down), expected)


def test_expert_similarity_identical_and_orthogonal():
    E, F_, D = 4, 6, 8
    g = torch.Generator().manual_seed(7)
    gate_up = torch.randn(1, 2 * F_, D, generator=g).repeat(E, 1, 1)
    down = torch.randn(1, D, F_, generator=g).repeat(E, 1, 1)
    torch.testing.assert_close(expert_similarity(gate_up, down), torch.tensor(1.0))
    torch.testing.assert_close(expert_similarity(gate_up, down, include_diagonal=False), torch.tensor(1.0))
    # expert e's rows (gate, up) and columns (down) all average to the basis vector e
    basis_ED = torch.eye(D)[:E]
    gate_up = basis_ED[:, None, :].repeat(1, 2 * F_, 1) + 0.0
    down = basis_ED[:, :, None].repeat(1, 1, F_) * 3.0
    torch.testing.assert_close(expert_similarity(gate_up, down, include_diagonal=False), torch.tensor(0.0))
    torch.testing.assert_close(expert_similarity(gate_up, down), torch.tensor(1 / E))


def test_expert_similarity_per_layer_of_a_model():
    model = MoeLM(tiny_config(num_layers=4, decoder_sparse_step=2))
    sims = expert_similarity_per_layer(model)
    assert sims.shape == (2,) and not sims.requires_grad
    layer = model.layers[1].mlp.experts
    torch.testing.assert_close(sims[0], expert_similarity(layer.gate_up_proj, layer.down_proj))


# ----------------------------------------------------------------------------------------------
# accumulation


def make_batches(num_batches: int, T: int, E: int, K: int, L: int, keep_rate: float | None = None):
    return [
        [random_routing(T, E, K, seed=100 * b + l, keep_rate=keep_rate) for l in range(L)] for b in range(num_batches)
    ]


COUNT_KEYS = (
    "tokens_per_expert",
    "num_dead_experts",
    "top1_mi",
    "top1_nmi",
    "top1_entropy",
    "load_cv",
    "load_max_vio",
    "load_entropy",
    "drop_ratio",
    "token_drop_ratio",
)


def assert_summaries_equal(a: dict, b: dict) -> None:
    for key in COUNT_KEYS:
        assert torch.equal(a[key], b[key]), key
    for key in ("num_tokens", "num_paths", "path_entropy", "path_num_tokens", "num_sampled_tokens"):
        assert a[key] == b[key], key
    for key in ("gate_entropy_mean", "router_z_mean", "router_logit_std", "binned_prob_mi"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-6)
    for key in ("gate_entropy_median", "inner_balance_median", "outer_balance_median"):
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("keep_rate", [None, 0.7])
def test_stats_over_batches_equal_summary_of_concatenation(keep_rate):
    batches = make_batches(num_batches=4, T=300, E=6, K=2, L=3, keep_rate=keep_rate)
    stats = RoutingStats(6)
    for routing in batches:
        stats.update(routing)
    assert_summaries_equal(stats.compute(), routing_summary(concat_routing(batches), 6))


def test_merge_and_pickle_equal_one_accumulator():
    batches = make_batches(num_batches=4, T=200, E=4, K=1, L=2)
    whole = RoutingStats(4)
    first, second = RoutingStats(4), RoutingStats(4)
    for b, routing in enumerate(batches):
        whole.update(routing)
        (first if b < 2 else second).update(routing)
    second = pickle.loads(pickle.dumps(second))
    assert_summaries_equal(first.merge(second).compute(), whole.compute())


def test_merge_after_all_reduce_adds_only_paths_and_samples():
    batches = make_batches(num_batches=2, T=100, E=4, K=2, L=2)
    a, b = RoutingStats(4).update(batches[0]), RoutingStats(4).update(batches[1])
    for name, tensor in a.state_tensors().items():  # what all_reduce(SUM) would do
        tensor += b.state_tensors()[name]
    a.merge(b, reducible=False)
    assert_summaries_equal(a.compute(), routing_summary(concat_routing(batches), 4))


def test_reservoir_is_bounded_and_uniform_over_batches():
    E, T, num_batches, cap = 4, 1000, 10, 2000
    stats = RoutingStats(E, max_samples=cap)
    for b in range(num_batches):  # batch b: every token has gate entropy b * 0.1 (distinct per batch)
        mix = b / num_batches
        probs_TE = (1 - mix) * F.one_hot(torch.zeros(T, dtype=torch.int64), E).float() + mix / E
        routing = RoutingOutput(probs_TE.log(), probs_TE, torch.ones(T, 1), torch.zeros(T, 1, dtype=torch.int64))
        stats.update([routing])
    out = stats.compute()
    assert out["num_sampled_tokens"] == cap and out["num_tokens"] == T * num_batches
    batch_of_sample = torch.bucketize(out["gate_entropy_sample"][:, 0], gate_entropy_of_mixes(E, num_batches))
    counts = torch.bincount(batch_of_sample, minlength=num_batches)
    assert counts.sum() == cap
    assert (counts - cap / num_batches).abs().max() < 60  # about 4.5 sigma of a binomial(2000, 0.1)


def gate_entropy_of_mixes(E: int, num_batches: int) -> torch.Tensor:
    """Boundaries between the distinct gate entropies of test_reservoir's batches."""
    values = []
    for b in range(num_batches):
        mix = b / num_batches
        p = (1 - mix) * F.one_hot(torch.tensor([0]), E).float() + mix / E
        values.append(float(gate_entropy(p)))
    return torch.tensor([(x + y) / 2 for x, y in itertools.pairwise(values)])


def test_path_cap_stops_updating_and_says_so():
    stats = RoutingStats(8, max_paths=10)
    stats.update([random_routing(5, 8, 2, seed=1), random_routing(5, 8, 2, seed=2)])
    stats.update([random_routing(500, 8, 2, seed=3), random_routing(500, 8, 2, seed=4)])
    out = stats.compute()
    assert out["paths_truncated"] and out["path_num_tokens"] == 5 and out["num_tokens"] == 505


def test_path_counts_fold_pending_batches_exactly():
    g = torch.Generator().manual_seed(8)
    batches = [torch.randint(0, 3, (4, 50), generator=g) for _ in range(7)]
    eager, lazy = PathCounts(None, flush_size=1), PathCounts(None)
    for top1_LT in batches:
        keys, counts = unique_with_counts(path_keys(top1_LT, 3))
        eager.add(keys, counts, 50)
        lazy.add(keys, counts, 50)
    _, expected = unique_with_counts(path_keys(torch.cat(batches, dim=1), 3))
    assert torch.equal(eager.counts(), expected) and torch.equal(lazy.counts(), expected)
    assert eager.num_tokens == lazy.num_tokens == 350


def test_summary_scalars_and_dense_model():
    summary = routing_summary([random_routing(64, 4, 2, seed=s) for s in range(3)], 4)
    scalars = summary_scalars(summary)
    assert scalars["routing/load_cv/layer_2"] == pytest.approx(float(summary["load_cv"][2]))
    assert "routing/top1_mi/layer_0_1" in scalars and "routing/binned_prob_mi/adjacent_mean" in scalars
    assert all(isinstance(v, float) for v in scalars.values())
    stats = RoutingStats(4).update([])
    with pytest.raises(ValueError, match="before any update"):
        stats.compute()


# ----------------------------------------------------------------------------------------------
# purity: no graph, inputs untouched


def test_metrics_build_no_graph_and_leave_inputs_untouched():
    logits = [torch.randn(64, 6, requires_grad=True) for _ in range(3)]
    routing = [topk_softmax(x * 2, 2, norm_topk_prob=True) for x in logits]
    routing[1].keep_TK = torch.rand(64, 2) < 0.8
    before = [{k: v.detach().clone() for k, v in vars(r).items() if v is not None} for r in routing]
    summary = routing_summary(routing, 6)
    stats = RoutingStats(6, max_samples=16).update(routing).update(routing).compute()
    outputs = [
        gate_entropy(routing[0].probs_TE),
        inner_balance(routing[0].probs_TE),
        outer_balance(routing[0].probs_TE, 2),
        router_z(routing[0].logits_TE),
        binned_probability_mi_matrix([r.probs_TE for r in routing]),
        top1_expert_ids(routing[1].expert_ids_TK, routing[1].weights_TK, routing[1].probs_TE, routing[1].keep_TK),
        load_entropy(tokens_per_expert(routing[0].expert_ids_TK, 6)),
    ]
    outputs += [v for d in (summary, stats) for v in d.values() if isinstance(v, torch.Tensor)]
    assert routing[0].probs_TE.requires_grad
    assert not any(t.requires_grad for t in outputs)
    for r, saved in zip(routing, before):
        for name, value in saved.items():
            assert torch.equal(getattr(r, name), value), name


# ----------------------------------------------------------------------------------------------
# real models: router gradients, capacity routers, expert choice


def test_router_grad_norms_match_backward_and_leave_grads_alone():
    torch.manual_seed(0)
    config = tiny_config(router=RecurrentRouter.name, router_options={"state_dim": 8})
    model = MoeLM(config)
    ids = torch.randint(0, config.vocab_size, (2, 12))
    out = model(ids)
    lm_loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, config.vocab_size), ids[:, 1:].reshape(-1))
    balance_loss, _, _ = average_over_layers(out.routing, config.num_experts)
    norms = router_grad_norms(model, lm_loss, 0.01 * balance_loss)
    assert all(p.grad is None for p in model.parameters())
    expected_keys = {"total", "shared", "layer_0", "layer_1", "layer_2"}
    assert {k.split("/", 1)[1] for k in norms if k.startswith("lm/")} == expected_keys
    for name, loss in (("lm", lm_loss), ("balance", 0.01 * balance_loss)):
        model.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        shared = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if n.startswith("shared_router")])
        layer1 = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if ".1.mlp.router" in n])
        assert norms[f"{name}/shared"] == pytest.approx(float(shared.norm()), rel=1e-5)
        assert norms[f"{name}/layer_1"] == pytest.approx(float(layer1.norm()), rel=1e-5)
        parts = [norms[f"{name}/{k}"] for k in expected_keys - {"total"}]
        assert norms[f"{name}/total"] == pytest.approx(math.sqrt(sum(x * x for x in parts)), rel=1e-6)
        assert norms[f"{name}/total"] > 0
    assert router_grad_norms(model, lm_loss, None)["balance/total"] == 0.0


@pytest.mark.parametrize(
    "router, options",
    [("locmoe", {"capacity_factor": 0.5}), ("expert_choice", {}), ("linear", {"bias_update_rate": 0.01})],
)
def test_summary_on_real_routers(router, options):
    torch.manual_seed(0)
    config = tiny_config(router=router, router_options=options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # expert choice warns that it is not causal
        model = MoeLM(config)
    out = model(torch.randint(0, config.vocab_size, (2, 16)))
    summary = routing_summary(out.routing, config.num_experts, top_k=config.top_k)
    for l, r in enumerate(out.routing):
        kept = r.keep_TK.sum() if r.keep_TK is not None else r.expert_ids_TK.numel()
        assert summary["tokens_per_expert"][l].sum() == kept
        expected_drop = 0.0 if r.keep_TK is None else 1 - r.keep_TK.float().mean()
        torch.testing.assert_close(summary["drop_ratio"][l], torch.as_tensor(expected_drop).float())
    assert summary["num_tokens"] == 32 and summary["binned_prob_mi"].shape == (3, 3)
    assert ((summary["outer_balance_median"] > 0) & (summary["outer_balance_median"] <= 1 + 1e-6)).all()


# ----------------------------------------------------------------------------------------------
# The catalog: every metric declared once, everything else derived from it
# ----------------------------------------------------------------------------------------------


def _two_layer_routing(seed: int = 0):
    from rmoe.routers import topk_softmax

    g = torch.Generator().manual_seed(seed)
    return [topk_softmax(torch.randn(40, 4, generator=g) * 2, 2, True) for _ in range(3)]


def test_every_declared_routing_metric_is_computed_and_logged():
    from rmoe.metrics.catalog import metrics

    summary = routing_summary(_two_layer_routing(), 4)
    scalars = summary_scalars(summary)
    for m in metrics(source="routing"):
        assert m.name in summary, m.name
        tag = {
            "layer": f"routing/{m.name}/layer_2",
            "pair": f"routing/{m.name}/layer_1_2",
            "matrix": f"routing/{m.name}/offdiag_mean",
            "scalar": f"routing/{m.name}",
        }[m.kind]
        assert tag in scalars, tag


def test_a_metric_is_one_declaration(monkeypatch):
    """Appending one Metric to the catalog is all it takes: accumulated, logged, charted, in HParams."""
    from rmoe.metrics import catalog
    from rmoe.training.tensorboard import custom_scalars_layout, hparam_metrics

    top1 = catalog.Metric(
        "top1_prob_mean",
        "layer",
        "mean top-1 probability",
        per_token=lambda b: b.probs_LTE.max(dim=-1).values,
        hparam=True,
    )
    monkeypatch.setattr(catalog, "METRICS", (*catalog.METRICS, top1))
    routing = _two_layer_routing()
    stats = RoutingStats(4, max_samples=None)
    stats.update(routing).update(routing)  # the same batch twice: the mean is unchanged
    out = stats.compute()
    expected = torch.stack([r.probs_TE.max(dim=-1).values.mean() for r in routing])
    torch.testing.assert_close(out["top1_prob_mean"], expected)
    scalars = summary_scalars(out, prefix="moe/val")
    assert scalars["moe/val/top1_prob_mean/layer_1"] == pytest.approx(float(expected[1]))
    assert "top1_prob_mean" in custom_scalars_layout(("val",))["moe (val)"]
    assert hparam_metrics({}, scalars)["hp/top1_prob_mean"] == pytest.approx(float(expected.double().mean()))


def test_a_routing_metric_declares_exactly_one_way_to_compute_it():
    from rmoe.metrics.catalog import Metric

    with pytest.raises(ValueError, match="exactly one of"):
        Metric("x", "layer", "", per_token=lambda b: b.probs_LTE, from_state=lambda a: a.state["num_pairs_L"])
    with pytest.raises(ValueError, match="exactly one of"):
        Metric("y", "layer", "")


def test_the_analytics_guide_lists_every_metric_as_declared():
    from rmoe.metrics.catalog import markdown_table

    guide = (Path(__file__).resolve().parents[1] / "docs/analytics.md").read_text()
    start, end = "<!-- metrics-table:start -->\n", "<!-- metrics-table:end -->"
    copy = guide[guide.index(start) + len(start) : guide.index(end)]
    assert copy == markdown_table(), (
        "the metrics table of docs/analytics.md is stale: paste rmoe.metrics.catalog.markdown_table()"
    )


def test_active_experts_metrics_count_kept_pairs_per_token():
    from rmoe.evaluation.routing_eval import active_experts_histogram
    from rmoe.metrics import RoutingStats, expert_pair_flops
    from rmoe.routers import RoutingOutput

    E, T = 4, 6
    probs = torch.full((T, E), 0.25)
    ids = torch.tensor([[0, 1, 2, 3]] * T)
    keep = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]]).bool()
    routing = RoutingOutput(probs.log(), probs, torch.ones(T, E), ids, keep, chosen_TK=keep)
    stats = RoutingStats(E, flops_per_pair=expert_pair_flops(8, 16))
    summary = stats.update([routing, routing]).compute()
    active = torch.tensor([1.0, 2, 3, 1, 0, 4])
    torch.testing.assert_close(summary["active_experts_mean"], torch.full((2,), active.mean().item()))
    torch.testing.assert_close(summary["active_experts_std"], torch.full((2,), active.std(unbiased=False).item()))
    assert summary["drop_ratio"].tolist() == [0.0, 0.0]  # unused slots are not drops
    assert summary["expert_flops_per_token"] == pytest.approx(2 * active.mean().item() * 6 * 3 * 8 * 16)
    assert summary["active_counts"][0].tolist() == [1, 2, 1, 1, 1]
    hist = active_experts_histogram(summary["active_counts"])
    assert hist["num"].tolist() == [6.0, 6.0] and hist["sum"].tolist() == [11.0, 11.0]
    assert hist["min"].tolist() == [0.0, 0.0] and hist["max"].tolist() == [4.0, 4.0]


def test_active_experts_by_token_frequency_splits_the_token_mass_into_quarters():
    from rmoe.metrics.specialization import active_experts_by_frequency

    occurrences_V = torch.tensor([6, 0, 1, 1])  # id 0 is 6 of the 8 tokens: the first three quarters
    counts_VE = torch.tensor([[6, 6], [0, 0], [1, 0], [1, 1]])  # id 0: 2 experts each time, ids 2, 3: 1 and 2
    by_q = active_experts_by_frequency(counts_VE, occurrences_V)
    assert by_q[0].item() == 2.0 and torch.isnan(by_q[2])  # id 0 starts the mass; quarter 3 starts at token 6
    assert by_q[3].item() == pytest.approx(3 / 2)  # ids 2 and 3: 3 pairs over 2 tokens


def test_router_saturation_ignores_pairs_that_are_not_computed():
    from rmoe.metrics.specialization import router_saturation

    final = torch.tensor([[0, 1], [2, -1], [-1, -1]])  # the second token uses one expert, the third none
    earlier = torch.tensor([[1, -1], [2, 3], [0, 1]])
    # token 0: {1} of {0, 1}; token 1: {2} of {2}; token 2 is left out
    assert router_saturation(earlier, final).item() == pytest.approx((0.5 + 1.0) / 2)
    top_k = torch.tensor([[0, 1], [2, 3]])
    assert router_saturation(top_k, top_k).item() == 1.0


def test_a_layer_with_no_chosen_pair_has_a_finite_balance_loss_and_soft_moe_no_expert_count():
    from rmoe.metrics import routing_summary
    from rmoe.model.losses import load_balancing_loss
    from rmoe.routers import RoutingOutput

    probs = torch.full((3, 4), 0.25)
    nothing = torch.zeros(3, 2, dtype=torch.bool)
    routing = RoutingOutput(probs.log(), probs, torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.long), nothing,
                            chosen_TK=nothing)  # fmt: skip
    assert load_balancing_loss(routing, 4).item() == 0.0
    soft = RoutingOutput(probs.log(), probs, torch.ones(3, 4), torch.arange(4).expand(3, 4), slot_logits_TN=probs)
    summary = routing_summary([soft], 4)
    assert torch.isnan(summary["active_experts_mean"]).all() and summary["active_counts"].sum() == 0
