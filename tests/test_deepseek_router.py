"""DeepSeek-V3 routing: equal to transformers' ``DeepseekV3TopkRouter`` given the same weight, bias and input (with
and without groups, scaling, renormalisation), the bias steering the choice only, the group limit, the
sequence-wise balance loss, and options that contradict the model refused."""

from __future__ import annotations

import pytest
import torch
from test_routers import build, routers_of, tiny_config
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

from rmoe import MoeLM, RmoeError
from rmoe.model.losses import load_balancing_loss, sequence_balancing_loss
from rmoe.routers import RoutingOutput


def rmoe_router(E: int, K: int, D: int, norm: bool = True, **options):
    model = build(
        "deepseek_v3",
        {"bias_update_rate": 0.001, **options},
        num_experts=E,
        top_k=K,
        hidden_size=D,
        norm_topk_prob=norm,
    )
    return routers_of(model)[0]


def sorted_by_expert(ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = ids_TK.argsort(dim=-1)
    return ids_TK.gather(1, order), weights_TK.gather(1, order)


@pytest.mark.parametrize(
    ("E", "K", "n_group", "topk_group", "scale", "norm"),
    [(8, 2, 1, 1, 1.0, True), (8, 2, 4, 2, 2.5, True), (16, 4, 4, 2, 1.0, False), (16, 6, 8, 3, 2.5, True)],
)
def test_equal_to_transformers_deepseek_v3_router(E, K, n_group, topk_group, scale, norm):
    torch.manual_seed(E + K + n_group)
    D = 32
    router = rmoe_router(E, K, D, norm, n_group=n_group, topk_group=topk_group, routed_scaling_factor=scale)
    reference = DeepseekV3TopkRouter(
        DeepseekV3Config(
            hidden_size=D,
            n_routed_experts=E,
            num_experts_per_tok=K,
            n_group=n_group,
            topk_group=topk_group,
            routed_scaling_factor=scale,
            norm_topk_prob=norm,
        )
    )
    with torch.no_grad():
        router.weight.normal_(std=0.3)
        reference.weight.copy_(router.weight)
        router.balance_bias_E.copy_(torch.randn(E) * 0.2)
        reference.e_score_correction_bias.copy_(router.balance_bias_E)
    x_TD = torch.randn(257, D)
    routing, _ = router(x_TD, None)
    logits, weights, ids = reference(x_TD)
    torch.testing.assert_close(routing.logits_TE, logits)
    ours = sorted_by_expert(routing.expert_ids_TK, routing.weights_TK)
    theirs = sorted_by_expert(ids, weights)
    assert torch.equal(ours[0], theirs[0])
    torch.testing.assert_close(ours[1], theirs[1])


def test_bias_steers_the_choice_not_the_weights_and_groups_limit_it():
    torch.manual_seed(0)
    router = rmoe_router(8, 2, 32, n_group=4, topk_group=1)
    x_TD = torch.randn(64, 32)
    routing, _ = router(x_TD, None)
    assert torch.equal(routing.expert_ids_TK // 2, routing.expert_ids_TK[:, :1].expand(-1, 2) // 2)  # one group
    with torch.no_grad():
        router.balance_bias_E.copy_(torch.tensor([0, 0, 0, 0, 0, 0, 5.0, 5.0]))
    steered, _ = router(x_TD, None)
    assert torch.equal(steered.expert_ids_TK.sort(-1).values, torch.tensor([[6, 7]]).expand(64, 2))
    scores_TE = torch.sigmoid(steered.logits_TE)
    expected = scores_TE[:, 6:] / scores_TE[:, 6:].sum(-1, keepdim=True)
    torch.testing.assert_close(steered.weights_TK.sort(-1).values, expected.sort(-1).values)  # unbiased weights
    torch.testing.assert_close(steered.probs_TE.sum(-1), torch.ones(64))


def test_routed_scaling_factor_scales_the_renormalised_weights():
    torch.manual_seed(1)
    plain, scaled = rmoe_router(8, 2, 32), rmoe_router(8, 2, 32, routed_scaling_factor=2.5)
    x_TD = torch.randn(16, 32)
    torch.testing.assert_close(scaled(x_TD, None)[0].weights_TK, 2.5 * plain(x_TD, None)[0].weights_TK)


@pytest.mark.parametrize(
    ("options", "overrides", "fragment"),
    [
        ({"n_group": 2, "topk_group": 3}, {}, "topk_group=3 is more than n_group=2"),
        ({"n_group": 3}, {}, "n_group=3 does not divide model.arch.num_experts=4"),
        ({"n_group": 4, "topk_group": 1}, {}, "fewer than model.arch.top_k=2"),
        ({"group_score": "mean"}, {}, "group_score='mean'"),
        ({"routed_scaling_factor": 0.0}, {}, "routed_scaling_factor=0.0"),
        ({"n_group": 4, "topk_group": 2}, {}, "top2_sum needs 2 experts per group"),
        ({"n_group": 2, "topk_group": 2, "group_score": "topk_sum"}, {"top_k": 3}, "multiple of topk_group"),
    ],
)
def test_contradicting_options_are_refused_naming_the_keys(options, overrides, fragment):
    with pytest.raises(RmoeError, match="deepseek_v3") as err:
        tiny_config("deepseek_v3", options, **overrides)
    assert fragment in str(err.value)


def test_sequence_balance_loss_is_the_loss_of_each_sequence_averaged():
    torch.manual_seed(2)
    B, S, E, K = 3, 10, 4, 2
    probs_TE = torch.softmax(torch.randn(B * S, E), -1)
    ids_TK = torch.stack([torch.randperm(E)[:K] for _ in range(B * S)])
    routing = RoutingOutput(probs_TE.log(), probs_TE, torch.ones(B * S, K) / K, ids_TK)
    per_sequence = [
        load_balancing_loss(RoutingOutput(p.log(), p, torch.ones(S, K), i), E)
        for p, i in zip(probs_TE.split(S), ids_TK.split(S), strict=True)
    ]
    torch.testing.assert_close(sequence_balancing_loss(routing, E, B), torch.stack(per_sequence).mean())
    torch.testing.assert_close(sequence_balancing_loss(routing, E, 1), load_balancing_loss(routing, E))
    # DeepSeek-V3's form: sum_i f_i P_i with f_i = E / (K S) * count_i, P_i the mean of s'
    counts = torch.zeros(E).index_add_(0, ids_TK[:S].reshape(-1), torch.ones(S * K))
    deepseek = ((E / (K * S)) * counts * probs_TE[:S].mean(0)).sum()
    torch.testing.assert_close(per_sequence[0], deepseek)


def test_deepseek_model_trains_with_the_sequence_loss_through_the_module():
    from rmoe.training.module import MoeLMModule

    arch = tiny_config("deepseek_v3", {"bias_update_rate": 0.001})
    module = MoeLMModule(arch, aux_loss_coef=0.0001, aux_loss_scope="sequence")
    batch = torch.randint(0, arch.vocab_size, (3, 9))
    losses, routing = module._losses(batch)
    assert torch.isfinite(losses["aux_loss"]) and losses["aux_loss"] > 0
    losses["loss"].backward()
    assert module.model.layers[0].mlp.router.weight.grad.abs().sum() > 0
    assert isinstance(module.model, MoeLM) and len(routing) == arch.num_layers


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["model.arch.router=deepseek_v3", "model.arch.router_options.n_group=3"], "n_group=3 does not divide"),
        (
            [
                "model.arch.router=deepseek_v3",
                "model.arch.router_options.n_group=2",
                "model.arch.router_options.topk_group=3",
            ],
            "topk_group=3 is more than n_group=2",
        ),
        (["model.arch.router=top_p", "model.arch.router_options.threshold=1.5"], "threshold=1.5"),
        (["model.arch.router=linear", "model.arch.router_options.capacity_factor=0"], "capacity_factor=0"),
        (["model.arch.router=remoe", "model.arch.router_options.target_experts=8"], "target_experts"),
        (["model.arch.router=hash", "model.arch.router_options.vocab_size=10"], "vocab_size"),
    ],
)
def test_contradicting_router_options_stop_fit_with_one_paragraph(overrides, fragment, tmp_path, capsys):
    from tiny import BASE_CONFIGS, tiny_overrides

    from rmoe.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *BASE_CONFIGS, *tiny_overrides(tmp_path), *overrides])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.ckpt"))
