"""Every router: shapes, weights, its defining property, causality, capacities, configs.

Tiny models (hidden 32, 4 experts); the whole file runs in well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
import io
import math
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from tiny import tiny_config as shared_tiny_config

from rmoe import ModelConfig, MoeLM, RmoeError
from rmoe.routers import ROUTERS, Router, TokenChoiceRouter
from rmoe.routers.base import capacity_keep_mask

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "router"
VOCAB = 64


def tiny_config(router: str = "linear", router_options: dict | None = None, **overrides) -> ModelConfig:
    """tests/tiny.py's model with this router, the default init and a vocabulary of ``VOCAB``."""
    options = router_options or {}
    defaults = {"vocab_size": VOCAB, "initializer_range": ModelConfig.initializer_range}
    return shared_tiny_config(**{**defaults, "router": router, "router_options": options, **overrides})


def build(router: str, router_options: dict | None = None, seed: int = 0, **overrides) -> MoeLM:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # expert_choice's start-up warning has its own test
        return MoeLM(tiny_config(router, router_options, **overrides))


def routers_of(model: MoeLM) -> list[Router]:
    return [m for m in model.modules() if isinstance(m, Router)]


# (router, options): every registered router and every recurrent variant
CASES = [
    ("linear", {}),
    ("linear", {"bias_update_rate": 0.01}),
    ("linear", {"bias": True, "init": "torch"}),
    ("mlp", {"hidden_dim": 8}),
    ("random", {}),
    ("cosine", {}),
    ("xmoe", {}),
    ("hyper", {}),
    ("recurrent", {}),
    ("recurrent", {"pass_state": False}),
    ("recurrent", {"detach_state": True}),
    ("recurrent", {"residual_alpha": 0.5, "residual_detach": True}),
    ("recurrent", {"projector": "shared", "state_dim": 16}),
    ("recurrent", {"cell": "rnn"}),
    ("recurrent", {"cell": "lstm"}),
    ("recurrent", {"head": "cosine", "cosine_dim": 8}),
    ("recurrent", {"bias_update_rate": 0.01}),
    ("recurrent", {"bias": False}),
    ("recurrent", {"state_norm": "rms"}),
    ("recurrent", {"init": "normal", "head_init_std": 0.1}),
    ("recurrent", {"projector": "shared", "bias": True, "init": "normal"}),
    ("locmoe", {}),
    ("locmoe", {"learnable_keys": True, "capacity_factor": 0.5}),
    ("expert_choice", {}),
    ("deepseek_v3", {}),
    ("deepseek_v3", {"n_group": 2, "topk_group": 1, "bias_update_rate": 0.01, "routed_scaling_factor": 2.0}),
    ("top_p", {"threshold": 0.5}),
    ("linear", {"capacity_factor": 1.0}),
    ("linear", {"capacity_factor": 0.5, "capacity_priority": "probability", "eval_capacity_factor": 1.0}),
    ("top_p", {"threshold": 0.7, "capacity_factor": 0.5}),
    ("hash", {}),
    ("hash", {"per_layer": False, "seed": 1}),
    ("remoe", {}),
    ("remoe", {"target_experts": 1.0, "load_balanced": False}),
    ("null_experts", {}),
    ("null_experts", {"num_null_experts": 2, "normalize_over": "slots"}),
    ("null_experts", {"capacity_factor": 0.5}),
    ("null_experts", {"bias_update_rate": 0.01}),
]
CASE_IDS = [r + "".join(f"-{k}={v}" for k, v in o.items()) for r, o in CASES]
# the cases whose router declares itself causal in training (from the declaration, not from names),
# and locmoe at a capacity that cannot drop (C = T when capacity_factor >= E / K)
CAUSAL_CASES = [(r, o) for r, o in CASES if tiny_config(r, o).causality().training is None] + [
    ("locmoe", {"capacity_factor": 2.0})
]


def test_every_registered_router_is_covered():
    from test_router_study import STUDY_CASES  # the routers of the router study (arXiv 2401.15969) are tested there

    assert {r for r, _ in CASES + STUDY_CASES} == set(ROUTERS)


@pytest.mark.parametrize(("router", "options"), CASES, ids=CASE_IDS)
def test_model_forward_backward_shapes_and_gradients(router, options):
    model = build(router, options, shared_expert_intermediate_size=8).train()
    out = model(torch.randint(0, VOCAB, (2, 7)))
    assert out.logits.shape == (2, 7, VOCAB)
    assert len(out.routing) == 3
    for r in out.routing:
        K = r.expert_ids_TK.shape[1]
        # K columns, or more with a keep mask that says which pairs are computed (expert choice lists all E)
        assert K == 2 or (K == 4 and r.keep_TK is not None)
        assert r.logits_TE.shape == r.probs_TE.shape == (14, 4)
        assert r.weights_TK.shape == r.expert_ids_TK.shape == (14, K)
        assert r.logits_TE.dtype == r.probs_TE.dtype == r.weights_TK.dtype == torch.float32
        assert r.expert_ids_TK.dtype == torch.int64
        torch.testing.assert_close(r.probs_TE.sum(-1), torch.ones(14))
        if r.keep_TK is not None:  # a keep mask is a bool per pair; a dropped pair has no weight to pass on
            assert r.keep_TK.dtype == torch.bool and r.keep_TK.shape == (14, K)
    out.logits.float().pow(2).mean().backward()
    # every trainable parameter is in the graph (DDP without find_unused_parameters)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    router_grads = [p.grad for n, p in model.named_parameters() if "router" in n and p.requires_grad]
    if router_grads:
        assert sum(g.abs().sum() for g in router_grads) > 0


@pytest.mark.parametrize(("router", "options"), CAUSAL_CASES, ids=lambda x: str(x))
def test_token_choice_weights_sum_to_one_and_causal(router, options):
    model = build(router, options).eval()
    ids = torch.randint(0, VOCAB, (2, 12))
    changed = ids.clone()
    changed[:, 8:] = (ids[:, 8:] + 1 + torch.randint(0, VOCAB - 1, (2, 4))) % VOCAB
    with torch.no_grad():
        a, b = model(ids), model(changed)
    for router, ra, rb in zip(routers_of(model), a.routing, b.routing, strict=True):
        if type(router).weights_sum_to_one:  # as declared: not ReMoE's gates, nor a token of only null experts
            scale = router.weight_scale() if isinstance(router, TokenChoiceRouter) else 1.0  # DeepSeek's scaling
            torch.testing.assert_close(ra.weights_TK.sum(-1), torch.full((24,), scale))
        chosen = torch.ones_like(ra.weights_TK, dtype=torch.bool) if ra.chosen_TK is None else ra.chosen_TK
        assert ra.keep_TK is None or torch.equal(ra.keep_TK, chosen)  # nothing dropped in evaluation
        # the discrete routing of earlier tokens is exactly unchanged
        early = torch.arange(24).view(2, 12)[:, :8].reshape(-1)
        assert torch.equal(ra.expert_ids_TK[early], rb.expert_ids_TK[early])
    # logits: equal up to float rounding (BLAS blocking depends on how many tokens each expert gets)
    torch.testing.assert_close(a.logits[:, :8], b.logits[:, :8], atol=1e-5, rtol=0)
    assert (a.logits[:, 8:] - b.logits[:, 8:]).abs().max() > 1e-3


# ----- the recurrent router ---------------------------------------------------------------------------


def router_chain_logits(model: MoeLM, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run the routers alone, layer after layer, on independent inputs (no residual coupling)."""
    state, logits = None, []
    for router, x_TD in zip(routers_of(model), xs):
        routing, state = router(x_TD, state)
        logits.append(routing.logits_TE)
    return logits


@pytest.mark.parametrize("cell", ["gru", "rnn", "lstm"])
@pytest.mark.parametrize(
    ("options", "reaches_layer0"),
    [
        ({}, True),
        ({"detach_state": True}, False),
        ({"pass_state": False}, False),
        ({"detach_state": True, "residual_alpha": 0.5}, True),  # through the previous logits
        ({"detach_state": True, "residual_alpha": 0.5, "residual_detach": True}, False),
    ],
    ids=["passed", "detached", "np", "detached+r-alpha", "detached+r-alpha-detached"],
)
def test_last_layer_logits_reach_layer0_projector_only_through_the_state(cell, options, reaches_layer0):
    model = build("recurrent", {"cell": cell, "state_dim": 16, **options})
    torch.manual_seed(1)
    xs = [torch.randn(10, 32) for _ in range(3)]
    logits = router_chain_logits(model, xs)
    logits[-1].pow(2).sum().backward()
    layer0, last = routers_of(model)[0], routers_of(model)[-1]
    assert last.proj.grad.abs().sum() > 0
    grad0 = layer0.proj.grad
    if reaches_layer0:
        assert grad0 is not None and grad0.abs().sum() > 0
    else:
        assert grad0 is None or torch.count_nonzero(grad0) == 0


def test_gru_router_equals_reference_grucell_and_state_is_depth_only():
    """logits_i = G_i GRUCell(Proj_i x_i, h_{i-1}), h_0 = 0: against torch.nn.GRUCell itself."""
    model = build("recurrent", {"state_dim": 16, "bias": False})
    cell = model.shared_router.cell
    assert isinstance(cell, torch.nn.GRUCell) and cell.bias
    torch.manual_seed(2)
    xs = [torch.randn(10, 32) for _ in range(3)]
    ours = router_chain_logits(model, xs)
    h = torch.zeros(10, 16)
    for router, x, logits in zip(routers_of(model), xs, ours):
        h = cell(x @ router.proj.T, h)
        torch.testing.assert_close(logits, h @ router.gate.T, atol=1e-6, rtol=1e-5)
    # the state of one token depends on that token only (no recurrence across positions)
    xs_changed = [x.clone() for x in xs]
    for x in xs_changed:
        x[5:] = torch.randn(5, 32)
    changed = router_chain_logits(model, xs_changed)
    for a, b in zip(ours, changed):
        torch.testing.assert_close(a[:5], b[:5], atol=0, rtol=0)


def test_lstm_state_carries_h_and_c_and_residual_adds_previous_logits():
    model = build("recurrent", {"cell": "lstm", "state_dim": 8, "residual_alpha": 0.25, "bias": False})
    r0, r1 = routers_of(model)[:2]
    x0, x1 = torch.randn(6, 32), torch.randn(6, 32)
    out0, s0 = r0(x0, None)
    assert s0.h_TP.shape == s0.c_TP.shape == (6, 8)
    out1, _ = r1(x1, s0)
    h1, _ = model.shared_router.cell(x1 @ r1.proj.T, (s0.h_TP, s0.c_TP))
    torch.testing.assert_close(out1.logits_TE, h1 @ r1.gate.T + 0.25 * out0.logits_TE, atol=1e-6, rtol=1e-5)


def test_recurrent_router_math_is_fp32_under_autocast():
    model = build("recurrent", {"state_dim": 8, "head": "cosine"})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randint(0, VOCAB, (1, 5)))
    assert all(r.logits_TE.dtype == torch.float32 for r in out.routing)


def router_parameter_count(router: str, options: dict | None = None) -> int:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=VOCAB,
        hidden_size=352,
        num_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=32,
        num_experts=16,
        top_k=2,
        moe_intermediate_size=8,
        router=router,
        router_options=options or {},
    )
    model = MoeLM(config)
    return sum(p.numel() for n, p in model.named_parameters() if "router" in n)


def test_parameter_count_matches_rmoe_table_1():
    """8 layers, d=352, 16 experts, p=128: GRU router ~0.47M, linear ~0.04M (RMoE, Table 1)."""
    gru, linear = router_parameter_count("recurrent", {"bias": False}), router_parameter_count("linear")
    per_layer = 352 * 128 + 128 * 16  # Proj_i and G_i
    cell = 3 * (128 * 128 + 128 * 128) + 2 * 3 * 128  # one GRU cell for all layers, with biases
    assert gru == 8 * per_layer + cell == 475_904
    assert router_parameter_count("recurrent") == gru + 8 * (128 + 16) == 477_056  # default: the authors' biases
    assert linear == 8 * 352 * 16 == 45_056
    assert round(gru / 1e6, 2) in (0.47, 0.48) and round(linear / 1e6, 2) in (0.04, 0.05)


def test_gru_biases_are_added_to_the_projector_and_head_and_counted():
    """``bias: true``: x'_i = W_i x + b_i and logits_i = G_i h_i + c_i (the authors' models' biases)."""
    model = build("recurrent", {"state_dim": 16, "bias": True})
    cell = model.shared_router.cell
    torch.manual_seed(2)
    xs = [torch.randn(10, 32) for _ in range(3)]
    ours = router_chain_logits(model, xs)
    h = torch.zeros(10, 16)
    for router, x, logits in zip(routers_of(model), xs, ours):
        assert router.proj_bias.abs().sum() > 0 and router.gate_bias.abs().sum() > 0  # U(+-1/sqrt(fan_in))
        h = cell(x @ router.proj.T + router.proj_bias, h)
        torch.testing.assert_close(logits, h @ router.gate.T + router.gate_bias, atol=1e-6, rtol=1e-5)
    ours[-1].sum().backward()
    assert routers_of(model)[-1].gate_bias.grad.abs().sum() > 0
    assert routers_of(model)[0].proj_bias.grad.abs().sum() > 0  # through the state
    without = sum(
        p.numel() for r in routers_of(build("recurrent", {"state_dim": 16, "bias": False})) for p in r.parameters()
    )
    with_bias = sum(p.numel() for r in routers_of(model) for p in r.parameters())
    assert with_bias - without == len(routers_of(model)) * (16 + 4)  # P + E per layer


def test_linear_router_bias_and_init_match_nn_linear():
    """``bias: true, init: torch`` is exactly ``nn.Linear(D, E)`` (the authors' enwik8 baseline): same
    draws from the same seed, same logits; the bias is trained. Without options: no bias, N(0, 0.02)."""
    model = build("linear", {"bias": True, "init": "torch"}, seed=3)
    router = routers_of(model)[0]
    assert router.bias is not None and router.bias.shape == (4,)
    reference = torch.nn.Linear(32, 4)
    bound = 1 / math.sqrt(32)
    for ours, theirs in ((router.weight, reference.weight), (router.bias, reference.bias)):
        assert ours.abs().max() <= bound and ours.std().item() == pytest.approx(theirs.std().item(), rel=0.5)
    with torch.no_grad():
        reference.weight.copy_(router.weight)
        reference.bias.copy_(router.bias)
    x = torch.randn(10, 32)
    routing, _ = router(x, None)
    torch.testing.assert_close(routing.logits_TE, reference(x), atol=1e-6, rtol=1e-5)
    routing.logits_TE.sum().backward()
    assert router.bias.grad is not None and router.bias.grad.abs().sum() > 0
    plain = routers_of(build("linear"))[0]
    assert plain.bias is None and "bias" not in dict(plain.named_parameters())
    assert plain.weight.std().item() == pytest.approx(0.02, rel=0.2)
    zero_bias = routers_of(build("linear", {"bias": True}))[0]  # init: normal -> zero bias
    assert torch.count_nonzero(zero_bias.bias) == 0
    count = sum(p.numel() for r in routers_of(model) for p in r.parameters())
    assert count - sum(p.numel() for r in routers_of(build("linear")) for p in r.parameters()) == 4 * len(
        routers_of(model)
    )


@pytest.mark.parametrize(
    ("options", "fragment"),
    [({"init": "xavier"}, "init='xavier'; expected one of: normal, torch"), ({"gain": 1}, "valid options: bias")],
)
def test_bad_linear_options_are_clear_errors(options, fragment):
    with pytest.raises(RmoeError, match=fragment):
        build("linear", options)


def first_gru_router(**options) -> Router:
    """Layer 0's recurrent router of a model with d=256, 16 experts and p=128."""
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=VOCAB, hidden_size=256, num_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=32, num_experts=16, top_k=2, moe_intermediate_size=8, router="gru",
        router_options={"state_dim": 128, **options},
    )  # fmt: skip
    return routers_of(MoeLM(config))[0]


def test_gru_init_torch_is_pytorch_linear_default_and_normal_is_the_model_std():
    router = first_gru_router(bias=True)  # init: torch (the default)
    for weight, fan_in in ((router.proj, 256), (router.gate, 128), (router.proj_bias, 256)):
        bound = 1 / math.sqrt(fan_in)
        assert weight.abs().max() <= bound
        assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)  # std of U(-b, b)
    normal = first_gru_router(init="normal", bias=True)
    assert normal.proj.std().item() == pytest.approx(0.02, rel=0.05)
    assert normal.gate.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.count_nonzero(normal.proj_bias) == 0 and torch.count_nonzero(normal.gate_bias) == 0
    wide = first_gru_router(init="normal", head_init_std=0.2)
    assert wide.gate.std().item() == pytest.approx(0.2, rel=0.1)
    assert wide.proj.std().item() == pytest.approx(0.02, rel=0.05)


def test_gru_state_norm_makes_the_logit_scale_independent_of_the_state_scale(monkeypatch):
    """With ``state_norm: rms`` the head reads h / rms(h): scaling the state leaves the logits as they are."""
    for state_norm, invariant in (("rms", True), ("none", False)):
        model = build("recurrent", {"state_dim": 16, "state_norm": state_norm, "bias": False})
        core, router = model.shared_router, routers_of(model)[0]
        x = torch.randn(10, 32)
        step = core.step
        logits = {}
        for scale in (0.01, 1.0):

            def scaled_step(x_TP, h_TP, c_TP, scale=scale, step=step):
                return scale * step(x_TP, h_TP, c_TP)[0], None

            monkeypatch.setattr(core, "step", scaled_step)
            logits[scale] = router(x, None)[0].logits_TE
        monkeypatch.setattr(core, "step", step)
        if invariant:
            torch.testing.assert_close(logits[0.01], logits[1.0], atol=1e-4, rtol=1e-4)
        else:
            torch.testing.assert_close(logits[0.01], 0.01 * logits[1.0], atol=1e-7, rtol=1e-4)


def test_gru_logits_start_near_the_linear_routers_scale_only_with_the_torch_init():
    """The scale study (docs/results.md): N(0, 0.02) projector and head start the GRU router's logits
    an order of magnitude below a linear router's; PyTorch's default init (the authors') does not."""
    from rmoe.metrics.stats import routing_summary

    def logit_std(router: str, options: dict) -> float:
        stds = []
        for seed in range(3):
            torch.manual_seed(seed)
            config = ModelConfig(
                vocab_size=VOCAB, hidden_size=96, num_layers=4, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=32, num_experts=8, top_k=2, moe_intermediate_size=8, router=router,
                router_options=options,
            )  # fmt: skip
            with torch.no_grad():
                routing = MoeLM(config)(torch.randint(0, VOCAB, (4, 32))).routing
            stds.append(routing_summary(routing, 8)["router_logit_std"].mean().item())
        return sum(stds) / len(stds)

    linear = logit_std("linear", {})
    assert 0.1 < linear < 0.3  # ~ 0.02 sqrt(96) = 0.196
    assert logit_std("recurrent", {"state_dim": 48, "init": "normal"}) < linear / 8
    assert linear / 3 < logit_std("recurrent", {"state_dim": 48}) < linear * 1.5
    assert linear / 3 < logit_std("recurrent", {"state_dim": 48, "init": "normal", "state_norm": "rms"}) < linear * 1.5


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"pass_state": False, "detach_state": True}, "detach_state: true does nothing"),
        ({"residual_detach": True}, "residual_detach: true does nothing"),
        ({"cosine_dim": 8}, "only apply to head: cosine"),
        ({"cell": "transformer"}, "cell='transformer'; expected one of: gru, rnn, lstm"),
        ({"state_dim": 0}, "state_dim=0 must be a positive integer"),
        ({"bias_update_rate": -1.0}, "bias_update_rate=-1.0 must be >= 0"),
        (
            {"hidden": 3},
            "valid options: bias_update_rate, capacity_factor, capacity_priority, eval_capacity_factor, state_dim",
        ),
        ({"init": "xavier"}, "init='xavier'; expected one of: torch, normal"),
        ({"state_norm": "layer"}, "state_norm='layer'; expected one of: none, rms"),
        ({"head_init_std": 0.1}, "head_init_std only applies to init: normal"),
        ({"init": "normal", "head_init_std": 0.0}, "head_init_std=0.0 must be > 0"),
    ],
)
def test_bad_recurrent_options_are_clear_errors(options, fragment):
    with pytest.raises(RmoeError, match=fragment.replace("(", r"\(")):
        tiny_config("recurrent", options)


# ----- cosine / xmoe / hyper / random ------------------------------------------------------------------


def test_xmoe_projects_to_16_and_temperature_is_clamped():
    model = build("xmoe")
    scorer = routers_of(model)[0].scorer
    assert scorer.proj.shape == (16, 32) and scorer.expert_embeddings.shape == (4, 16)
    torch.testing.assert_close(scorer.temperature, torch.tensor(0.07))
    with torch.no_grad():
        scorer.log_inv_temperature.fill_(50.0)  # tau -> e^-50, clamped at 0.01
    logits = scorer(torch.randn(9, 32))
    assert logits.abs().max() <= 100.0 + 1e-3 and logits.abs().max() > 10
    assert routers_of(build("cosine"))[0].scorer.proj is None


def test_hyper_router_trains_only_per_layer_embeddings_through_a_frozen_shared_hypernetwork():
    model = build("hyper", {"embedding_dim": 4, "hypernet_hidden_dim": 8})
    trainable = {n for n, p in model.named_parameters() if "router" in n and p.requires_grad}
    assert trainable == {f"layers.{i}.mlp.router.embedding" for i in range(3)}
    assert {n for n, _ in model.named_buffers() if "router" in n} == {"shared_router.w1", "shared_router.w2"}
    weights = [r.shared(r.embedding) for r in routers_of(model)]
    assert weights[0].shape == (4, 32)
    assert not torch.allclose(weights[0], weights[1])
    assert 0.005 < weights[0].std() < 0.08  # about initializer_range


def test_frozen_routers_have_no_trainable_parameters():
    for router, options in [("random", {}), ("locmoe", {}), ("random", {"bias_update_rate": 0.1})]:
        model = build(router, options)
        assert [n for n, _ in model.named_parameters() if "router" in n] == []
    assert [n for n, _ in build("locmoe", {"learnable_keys": True}).named_parameters() if "router" in n]


def test_random_router_is_reproducible_from_the_seed_and_survives_state_dict():
    a, b, c = build("random", seed=3), build("random", seed=3), build("random", seed=4)
    wa, wb, wc = (routers_of(m)[1].weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert "layers.1.mlp.router.weight" in a.state_dict()
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    c.load_state_dict(torch.load(buffer))
    assert torch.equal(routers_of(c)[1].weight, wa)
    ids = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(ids).logits, c.eval()(ids).logits, atol=0, rtol=0)
    c.reset_parameters()  # re-draws from the global RNG: still random, not zeroed
    assert routers_of(c)[1].weight.std() > 0.01


# ----- capacity routers ----------------------------------------------------------------------------------


def test_locmoe_affinity_is_grouped_average_pooling_cosine():
    router = routers_of(build("locmoe"))[0]
    x = torch.randn(5, 32)
    expected = math.sqrt(32 / 4) * x.view(5, 4, 8).mean(-1) / x.norm(dim=-1, keepdim=True)
    routing, _ = router(x, None)
    torch.testing.assert_close(routing.logits_TE, expected / router.options.temperature, atol=1e-5, rtol=1e-5)


def test_locmoe_respects_capacity_and_keeps_highest_affinity():
    torch.manual_seed(0)
    router = routers_of(build("locmoe", {"capacity_factor": 0.75}))[0]
    x = torch.randn(64, 32)
    x[:, :8] += 1.5  # most tokens prefer expert 0: its capacity binds
    routing, _ = router(x, None)
    C = router.capacity(64)
    assert C == math.ceil(0.75 * 64 * 2 / 4) == 24
    affinity_TE = routing.logits_TE * router.options.temperature
    dropped_somewhere = False
    for e in range(4):
        chose_e = routing.expert_ids_TK == e
        kept = affinity_TE[:, e][(chose_e & routing.keep_TK).any(-1)]
        dropped = affinity_TE[:, e][(chose_e & ~routing.keep_TK).any(-1)]
        assert kept.numel() == min(C, int(chose_e.sum()))
        if dropped.numel():
            dropped_somewhere = True
            assert kept.min() >= dropped.max()
    assert dropped_somewhere


def test_locmoe_eval_routing_topk_drops_in_training_only():
    """``eval_routing: topk``: training as before (the capacity drops), evaluation with no capacity: the model
    in eval mode equals LocMoE at a capacity that cannot drop, given the same weights."""
    torch.manual_seed(0)
    x = torch.randn(64, 32)
    x[:, :8] += 1.5  # most tokens prefer expert 0: a capacity of 0.75 binds
    same = routers_of(build("locmoe", {"capacity_factor": 0.75}))[0]
    topk = routers_of(build("locmoe", {"capacity_factor": 0.75, "eval_routing": "topk"}))[0]
    trained_same, trained_topk = same.train()(x, None)[0], topk.train()(x, None)[0]
    assert not trained_same.keep_TK.all() and torch.equal(trained_topk.keep_TK, trained_same.keep_TK)
    assert not same.eval()(x, None)[0].keep_TK.all()  # "same": the capacity drops in evaluation too
    evaluated = topk.eval()(x, None)[0]
    assert evaluated.keep_TK is None and torch.equal(evaluated.expert_ids_TK, trained_topk.expert_ids_TK)

    ids = torch.randint(0, VOCAB, (2, 16))
    model = build("locmoe", {"capacity_factor": 0.75, "eval_routing": "topk"}).eval()
    no_drops = build("locmoe", {"capacity_factor": 2.0}).eval()
    no_drops.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, no_drops(ids).logits)
        assert not torch.allclose(model.train()(ids).logits, no_drops.train()(ids).logits)


def test_capacity_keep_mask_against_a_naive_loop():
    torch.manual_seed(5)
    T, K, E, C = 40, 2, 5, 6
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    affinity = torch.randn(T, K)
    keep = capacity_keep_mask(ids, affinity, E, C)
    expected = torch.zeros(T, K, dtype=torch.bool)
    for e in range(E):
        pairs = [(float(affinity[t, k]), t, k) for t in range(T) for k in range(K) if ids[t, k] == e]
        for _, t, k in sorted(pairs, key=lambda p: -p[0])[:C]:
            expected[t, k] = True
    assert torch.equal(keep, expected)


def test_expert_choice_each_expert_takes_its_top_c_tokens_and_warns_once():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="not causal") as record:
        model = MoeLM(tiny_config("expert_choice", {"capacity_factor": 1.5}))
    assert sum("not causal" in str(w.message) for w in record) == 1
    router = routers_of(model)[0]
    x = torch.randn(20, 32)
    routing, state = router(x, "opaque")
    assert state == "opaque"
    C = math.ceil(1.5 * 20 * 2 / 4)
    assert torch.equal(routing.keep_TK.sum(0), torch.full((4,), C))
    for e in range(4):
        top = set(torch.topk(routing.probs_TE[:, e], C).indices.tolist())
        assert set(torch.nonzero(routing.keep_TK[:, e]).flatten().tolist()) == top
    assert torch.equal(routing.weights_TK, routing.probs_TE * routing.keep_TK)
    assert torch.equal(routing.expert_ids_TK, torch.arange(4).expand(20, 4))


# ----- auxiliary-loss-free bias balancing ----------------------------------------------------------


def test_bias_balancing_moves_bias_toward_balance_and_changes_selection_not_weights():
    torch.manual_seed(0)
    model = build("linear", {"bias_update_rate": 0.05})
    router = routers_of(model)[0]
    assert isinstance(router, TokenChoiceRouter) and torch.equal(router.balance_bias_E, torch.zeros(4))
    with torch.no_grad():  # expert 0 overloaded: every token's favourite
        router.weight.normal_(std=0.01)
        router.weight[0] += 0.05
    x = torch.randn(32, 32) + 1.0  # positive mean: logit 0 is about +1.6 for every token
    router.train()
    before, _ = router(x, None)
    assert bool((before.expert_ids_TK == 0).any(-1).all())
    load_before = torch.bincount(before.expert_ids_TK.flatten(), minlength=4)
    router.after_optimizer_step()
    expected = 0.05 * torch.sign(load_before.float().mean() - load_before)  # b += u sign(mean - load)
    torch.testing.assert_close(router.balance_bias_E, expected)
    assert router.balance_bias_E[0] < 0  # the overloaded expert's bias decreases
    for _ in range(30):
        router(x, None)
        router.after_optimizer_step()
    after, _ = router(x, None)
    load_after = torch.bincount(after.expert_ids_TK.flatten(), minlength=4)
    assert load_after.max() < load_before.max()  # the selection moved toward balance
    # the weights still come from the unbiased probabilities of the chosen experts
    torch.testing.assert_close(after.probs_TE, before.probs_TE)
    chosen = after.probs_TE.gather(1, after.expert_ids_TK)
    torch.testing.assert_close(after.weights_TK, chosen / chosen.sum(-1, keepdim=True))
    # eval forwards do not count; the bias is saved with the model
    router.after_optimizer_step()  # consumes the count of the last training forward
    router.eval()
    router(x, None)
    bias = router.balance_bias_E.clone()
    router.after_optimizer_step()
    assert torch.equal(router.balance_bias_E, bias)
    assert "layers.0.mlp.router.balance_bias_E" in model.state_dict()


def test_bias_balancing_off_is_a_no_op_and_adds_no_state():
    model = build("linear")
    assert not any("balance_bias" in k for k in model.state_dict())
    for router in routers_of(model):
        router.after_optimizer_step()


# ----- configs -------------------------------------------------------------------------------------------


def config_files() -> list[Path]:
    return sorted(CONFIG_DIR.glob("*.yaml"))


def test_router_configs_exist_for_every_router_and_variant():
    names = {p.stem for p in config_files()}
    expected = {
        "linear",
        "mlp",
        "random",
        "cosine",
        "xmoe",
        "hyper",
        "gru",
        "gru_np",
        "gru_detach",
        "gru_ralpha",
        "gru_shared_proj",
        "rnn",
        "lstm",
        "xmoe_gru",
        "locmoe",
        "expert_choice",
        "linear_bias_balance",
        "linear_torch",
        "gru_init_normal",
        "gru_state_norm",
        "deepseek_v3",
        "top_p",
        "linear_capacity",
        "hash",
        "remoe",
        "null_experts",
    }
    assert expected <= names


@pytest.mark.parametrize("path", config_files(), ids=lambda p: p.stem)
def test_router_config_parses_and_trains_one_step(path):
    text = path.read_text()
    assert text.startswith("# ")
    data = yaml.safe_load(text)
    assert list(data) == ["model"] and "router" in data["model"]["arch"]
    # a router config may set the model keys its router needs (top_k, num_experts, ...): any ModelConfig key
    assert set(data["model"]["arch"]) <= {f.name for f in dataclasses.fields(ModelConfig)}
    torch.manual_seed(0)
    tiny = {"vocab_size": 64, "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = MoeLM(ModelConfig(**{**tiny, "num_experts": 4, "top_k": 2, **data["model"]["arch"]}))
    model(torch.randint(0, 64, (2, 6))).logits.pow(2).mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    for router in routers_of(model):
        router.after_optimizer_step()


def test_cross_layer_options_warn_with_a_single_moe_layer():
    with pytest.warns(UserWarning, match="pass_state do nothing with a single MoE layer"):
        MoeLM(tiny_config("recurrent", {"pass_state": False}, num_layers=1))
