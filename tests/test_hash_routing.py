"""Hash routing (Roller et al., arXiv 2106.04426): each token goes to its id's row of a fixed random map.

Known answers: the map against a naive draw-without-replacement loop, each token's routing against its id's row
(whatever its hidden state and the other tokens), the map's balance over experts, its seed and its state_dict round
trip; no trainable parameter and constant balance and z-losses; bad options and a missing vocabulary refused.
"""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch
from test_routers import VOCAB, build, routers_of, tiny_config

from rmoe import MoeLM, RmoeError
from rmoe.model.losses import load_balancing_loss, router_z_loss
from rmoe.routers.hash_routing import HashOptions, HashRouter, hash_map, layer_seed

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_map_rows_are_the_first_k_of_a_random_permutation_drawn_without_replacement():
    """Against a naive loop: for the k-th expert of each id, rank r of the k-th draw among the untaken experts."""
    V, E, K, seed = 50, 6, 3, 7
    gen = torch.Generator().manual_seed(seed)
    draws = [torch.randint(E - k, (V,), generator=gen).tolist() for k in range(K)]
    expected = []
    for v in range(V):
        row: list[int] = []
        for k in range(K):
            untaken = [e for e in range(E) if e not in row]
            row.append(untaken[draws[k][v]])
        expected.append(row)
    assert torch.equal(hash_map(V, E, K, seed), torch.tensor(expected))


def test_map_is_balanced_in_expectation_and_its_experts_are_distinct():
    V, E, K = 12_000, 8, 3
    map_VK = hash_map(V, E, K, seed=1)
    assert map_VK.min() >= 0 and map_VK.max() < E
    assert bool((map_VK.sort(dim=-1).values.diff(dim=-1) > 0).all())  # K distinct experts per id
    expected = V * K / E  # each expert gets ~V K / E ids; binomial std sqrt(V (K/E) (1 - K/E)) ~ 53
    counts_E = torch.bincount(map_VK.flatten(), minlength=E).float()
    assert (counts_E - expected).abs().max() < 5 * (V * K / E * (1 - K / E)) ** 0.5
    for k in range(K):  # every slot is uniform too (the first choice is not biased to low ids)
        slot_E = torch.bincount(map_VK[:, k], minlength=E).float()
        assert (slot_E - V / E).abs().max() < 5 * (V / E) ** 0.5


def test_a_token_routes_by_its_id_only():
    model = build("hash", {}, top_k=2)
    for router in routers_of(model):
        ids_BS = torch.randint(0, VOCAB, (3, 10))
        routing, state = router(torch.randn(30, 32), "opaque", ids_BS)
        assert state == "opaque"
        map_VK = router.expert_map_VK.long()
        assert torch.equal(routing.expert_ids_TK, map_VK[ids_BS.reshape(-1)])
        for t, v in enumerate(ids_BS.reshape(-1).tolist()):  # a naive per-token loop
            assert routing.expert_ids_TK[t].tolist() == map_VK[v].tolist()
        # independent of the hidden state and of the other tokens: new states, other neighbours, another batch
        other_BS = ids_BS.clone()
        other_BS[:, ::2] = torch.randint(0, VOCAB, (3, 5))
        again, _ = router(100 * torch.randn(30, 32), None, other_BS)
        assert torch.equal(again.expert_ids_TK.view(3, 10, 2)[:, 1::2], routing.expert_ids_TK.view(3, 10, 2)[:, 1::2])
        # the same id in two positions and two sequences routes the same
        same, _ = router(torch.randn(4, 32), None, torch.tensor([[5, 9], [9, 5]]))
        assert torch.equal(same.expert_ids_TK[0], same.expert_ids_TK[3])
        assert torch.equal(same.expert_ids_TK[1], same.expert_ids_TK[2])
        assert routing.keep_TK is None and routing.chosen_TK is None and routing.router_loss is None


@pytest.mark.parametrize(("top_k", "norm_topk_prob"), [(1, True), (2, True), (3, False)])
def test_weights_are_one_over_k_and_probs_uniform_whatever_norm_topk_prob(top_k, norm_topk_prob):
    model = build("hash", {}, top_k=top_k, norm_topk_prob=norm_topk_prob)
    out = model(torch.randint(0, VOCAB, (2, 7)))
    for r in out.routing:
        assert r.expert_ids_TK.shape == (14, top_k) and r.expert_ids_TK.dtype == torch.int64
        assert torch.equal(r.weights_TK, torch.full((14, top_k), 1 / top_k))
        assert torch.equal(r.logits_TE, torch.zeros(14, 4))
        assert torch.equal(r.probs_TE, torch.full((14, 4), 0.25))


def test_no_trainable_parameter_and_the_router_losses_are_constants_without_gradient():
    model = build("hash", {}).train()
    assert [n for n, _ in model.named_parameters() if "router" in n] == []
    out = model(torch.randint(0, VOCAB, (2, 9)))
    for r in out.routing:
        balance, z = load_balancing_loss(r, 4), router_z_loss(r)
        assert not balance.requires_grad and not z.requires_grad
        torch.testing.assert_close(balance, torch.tensor(1.0))  # E sum_e f_e (1/E) = 1 whatever the loads
        torch.testing.assert_close(z, torch.log(torch.tensor(4.0)) ** 2)
    out.logits.pow(2).mean().backward()
    experts = [p for n, p in model.named_parameters() if "experts" in n]
    assert experts and all(p.grad is not None and p.grad.abs().sum() > 0 for p in experts)


def test_map_comes_from_the_seed_alone_and_survives_state_dict():
    a, b, c = build("hash", {}, seed=1), build("hash", {}, seed=2), build("hash", {"seed": 3})
    maps = [[r.expert_map_VK for r in routers_of(m)] for m in (a, b, c)]
    assert all(torch.equal(x, y) for x, y in zip(maps[0], maps[1]))  # the global RNG plays no part
    assert not any(torch.equal(x, y) for x, y in zip(maps[0], maps[2]))  # another seed, another map
    assert not torch.equal(maps[0][0], maps[0][1])  # per_layer: each layer its own map
    assert torch.equal(maps[0][0].long(), hash_map(VOCAB, 4, 2, layer_seed(0, 0)))
    assert maps[0][0].shape == (VOCAB, 2) and maps[0][0].dtype == torch.int16
    state = a.state_dict()
    assert "layers.1.mlp.router.expert_map_VK" in state  # persistent: checkpoints and exports carry it
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    c.load_state_dict(torch.load(buffer))
    assert all(torch.equal(r.expert_map_VK, m) for r, m in zip(routers_of(c), maps[0]))
    ids = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        ra, rc = a.eval()(ids).routing, c.eval()(ids).routing
    assert all(torch.equal(x.expert_ids_TK, y.expert_ids_TK) for x, y in zip(ra, rc))


def test_per_layer_false_routes_every_layer_with_the_same_map():
    maps = [r.expert_map_VK for r in routers_of(build("hash", {"per_layer": False}))]
    assert all(torch.equal(m, maps[0]) for m in maps)
    assert torch.equal(maps[0], routers_of(build("hash", {}))[0].expert_map_VK)  # layer 0's map


def test_a_larger_map_covers_the_model_vocabulary():
    router = routers_of(build("hash", {"vocab_size": 1000}))[0]
    assert router.expert_map_VK.shape == (1000, 2)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"vocab_size": VOCAB - 1}, f"router_options.vocab_size={VOCAB - 1} is smaller than model.arch.vocab_size="),
        ({"vocab_size": 0}, "vocab_size=0 must be a positive integer"),
        ({"seed": -1}, "seed=-1 must be an integer"),
        ({"seed": 0.5}, "router_options.seed=0.5 is invalid"),
        ({"weights": "uniform"}, "valid options: seed, vocab_size, per_layer"),
    ],
)
def test_bad_options_are_refused_naming_the_key(options, fragment):
    with pytest.raises(RmoeError, match=fragment.replace("(", r"\(")):
        build("hash", options)


def test_no_vocabulary_to_build_the_map_is_refused():
    context = tiny_config("hash", {}).router_context()
    unset = dataclasses.replace(context, vocab_size=0)  # a router built before the data module set the vocabulary
    with pytest.raises(RmoeError, match=r"vocab_size is 0 .*router_options\.vocab_size is null"):
        HashRouter(unset, 0)
    given = dataclasses.replace(unset, options=HashOptions(vocab_size=9))
    assert HashRouter(given, 0).expert_map_VK.shape == (9, 2)


def test_calling_it_without_token_ids_is_a_clear_error():
    router = routers_of(build("hash", {}))[0]
    with pytest.raises(RmoeError, match="needs the token ids"):
        router(torch.randn(6, 32), None)
    with pytest.raises(RmoeError, match="got 4 token ids for 6 hidden states"):
        router(torch.randn(6, 32), None, torch.zeros(2, 2, dtype=torch.long))


def test_the_map_is_built_on_the_cpu_under_a_meta_device():
    """The memory estimate builds the model on the meta device: the map is drawn all the same."""
    with torch.device("meta"):
        model = MoeLM(tiny_config("hash", {}))
    assert routers_of(model)[0].expert_map_VK.device.type == "cpu"
