"""Token choice with a capacity (Switch Transformer / GShard), for every token-choice router: each expert
computes at most C = ceil(f * S * K / E) of each sequence's pairs, by position (causal) or by probability (not
causal in training), dropped pairs pass through the residual, the drop rate is logged, evaluation has its own
capacity (none by default), and bad options are refused naming the key."""

from __future__ import annotations

import math

import pytest
import torch
from test_routers import build, routers_of, tiny_config
from tiny import BASE_CONFIGS, scalars, tiny_overrides

from rmoe import RmoeError
from rmoe.cli import main
from rmoe.metrics import routing_summary
from rmoe.routers import expert_capacity


def naive_keep(ids_TK, weights_TK, B, E, C, priority):
    """Per sequence and expert, the first C pairs (by position then k, or by weight descending)."""
    T, K = ids_TK.shape
    S = T // B
    keep = torch.zeros(T, K, dtype=torch.bool)
    for b in range(B):
        for e in range(E):
            pairs = [(t, k) for t in range(b * S, (b + 1) * S) for k in range(K) if ids_TK[t, k] == e]
            if priority == "probability":
                # stable: ties keep the position order
                pairs = sorted(pairs, key=lambda p: -float(weights_TK.detach()[p]))
            for t, k in pairs[:C]:
                keep[t, k] = True
    return keep


@pytest.mark.parametrize("priority", ["position", "probability"])
@pytest.mark.parametrize("router", ["linear", "recurrent", "deepseek_v3"])
def test_each_expert_keeps_its_first_c_pairs_per_sequence(router, priority):
    model = build(router, {"capacity_factor": 0.5, "capacity_priority": priority}, seed=3).train()
    ids_BS = torch.randint(0, 64, (3, 16))
    out = model(ids_BS)
    C = expert_capacity(16, 4, 2, 0.5)
    assert C == 4
    for router, r in zip(routers_of(model), out.routing, strict=True):
        scores_TK = router.gate_scores(r.logits_TE)[0].gather(1, r.expert_ids_TK)  # the router's probabilities
        expected = naive_keep(r.expert_ids_TK, scores_TK, 3, 4, C, priority)
        assert torch.equal(r.keep_TK, expected)
        assert not r.keep_TK.all()  # the capacity binds at 0.5
    model.eval()
    assert all(r.keep_TK is None for r in model(ids_BS).routing)  # evaluation: no capacity unless asked


def test_dropped_pairs_contribute_nothing_and_a_fully_dropped_token_passes_through():
    torch.manual_seed(0)
    model = build("linear", {"capacity_factor": 0.25}, seed=1).train()
    block = model.layers[0].mlp
    x_BSD = torch.randn(2, 16, 32)
    ids_BS = torch.randint(0, 64, (2, 16))
    out_BSD, routing, _ = block(x_BSD, None, ids_BS)
    x_TD = x_BSD.reshape(32, 32)
    expected = torch.zeros(32, 32)
    for t in range(32):
        for k in range(2):
            if routing.keep_TK[t, k]:
                e = int(routing.expert_ids_TK[t, k])
                gate_up = x_TD[t] @ block.experts.gate_up_proj[e].T
                gate, up = gate_up.chunk(2)
                expected[t] += routing.weights_TK[t, k] * (
                    block.experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up)
                )
    torch.testing.assert_close(out_BSD.reshape(32, 32), expected, atol=1e-5, rtol=1e-4)
    fully_dropped = ~routing.keep_TK.any(-1)
    assert fully_dropped.any() and bool((out_BSD.reshape(32, 32)[fully_dropped] == 0).all())


def test_position_priority_is_causal_and_probability_priority_is_not():
    position = tiny_config("linear", {"capacity_factor": 0.5})
    probability = tiny_config("linear", {"capacity_factor": 0.5, "capacity_priority": "probability"})
    assert position.causality().causal
    assert probability.causality().training is not None and probability.causality().evaluation is None
    assert "later token can take an earlier token's slot" in probability.causality().training
    # nothing can be dropped when an expert can take the whole sequence (f * K >= E): causal again
    assert tiny_config("linear", {"capacity_factor": 2.0, "capacity_priority": "probability"}).causality().causal
    with_eval = tiny_config("linear", {"capacity_priority": "probability", "eval_capacity_factor": 0.5})
    assert with_eval.causality().evaluation is not None
    assert with_eval.causal_evaluation_options() == {"eval_capacity_factor": None}
    by_position = tiny_config("linear", {"eval_capacity_factor": 0.5})
    assert by_position.causality().causal and "a cached decoding step" in by_position.causality().decoding
    with pytest.warns(UserWarning, match="not causal in training"):
        build_warning = __import__("rmoe").MoeLM
        build_warning(probability)


def test_the_drop_rate_counts_chosen_pairs_and_the_cost_bound_holds():
    model = build("linear", {"capacity_factor": 0.5}, seed=2).train()
    out = model(torch.randint(0, 64, (4, 16)))
    summary = routing_summary(out.routing, 4, top_k=2)
    for l, r in enumerate(out.routing):
        dropped = 1.0 - r.keep_TK.sum().item() / r.keep_TK.numel()
        assert summary["drop_ratio"][l].item() == pytest.approx(dropped, abs=1e-6)
        assert summary["active_experts_mean"][l].item() == pytest.approx(r.keep_TK.sum().item() / 64, abs=1e-6)
    context = model.config.router_context()
    bound = context.router_class.routed_pairs(context, 64, 4)
    assert bound == 4 * 4 * math.ceil(0.5 * 16 * 2 / 4) == 64
    assert all(int(r.keep_TK.sum()) <= bound for r in out.routing)


def test_top_p_unused_slots_take_no_capacity():
    model = build("top_p", {"threshold": 0.3, "capacity_factor": 0.25}, seed=4, top_k=4, initializer_range=0.5)
    r = model.train()(torch.randint(0, 64, (2, 16))).routing[0]
    assert not r.chosen_TK.all()
    assert bool((r.keep_TK <= r.chosen_TK).all())  # unused slots are never kept
    C = expert_capacity(16, 4, 4, 0.25)  # K: the slots, top_k
    expected = naive_keep(r.expert_ids_TK.masked_fill(~r.chosen_TK, -1), r.weights_TK, 2, 4, C, "position")
    assert torch.equal(r.keep_TK, expected)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"capacity_factor": 0.0}, "capacity_factor=0.0 must be > 0"),
        ({"capacity_factor": -1.0}, "capacity_factor=-1.0 must be > 0"),
        ({"eval_capacity_factor": 0.0}, "eval_capacity_factor=0.0 must be > 0"),
        ({"capacity_priority": "random"}, "capacity_priority='random'; expected one of: position, probability"),
    ],
)
def test_bad_capacity_options_are_refused_naming_the_key(options, fragment):
    with pytest.raises(RmoeError, match="router_options") as err:
        tiny_config("linear", options)
    assert fragment in str(err.value)


def test_a_capacity_run_logs_its_drop_rate_through_the_command(tmp_path):
    args = [*BASE_CONFIGS, "--config", "configs/router/linear_capacity.yaml", *tiny_overrides(tmp_path)]
    logger = [f"trainer.logger.init_args.save_dir={tmp_path / 'runs'}", "trainer.logger.init_args.name=cap"]
    main(["fit", *args, *logger, "trainer.max_steps=3", "trainer.enable_progress_bar=false",
          "model.arch.router_options.capacity_factor=0.5"])  # fmt: skip
    run = tmp_path / "runs" / "cap" / "version_0"
    drop = scalars(run, "moe/train/drop_ratio/layer_0")
    assert drop and 0 < next(iter(drop.values())) < 1
    active = scalars(run, "moe/train/active_experts_mean/layer_0")
    assert active and next(iter(active.values())) < 2
    flops = scalars(run, "moe/train/expert_flops_per_token")
    assert flops and next(iter(flops.values())) > 0


def test_an_evaluation_capacity_by_position_cannot_decode_and_generate_says_so():
    from rmoe.inference import non_causal_reason
    from rmoe.model.decoder import KVCache

    config = tiny_config("linear", {"eval_capacity_factor": 0.5}, top_k=1, initializer_range=0.5)
    assert "cannot decode token by token" in non_causal_reason(config)
    model = build("linear", {"eval_capacity_factor": 0.5}, top_k=1, initializer_range=0.5).eval()
    ids_BS = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids_BS).routing[0].keep_TK
        cache = KVCache()
        steps = [model(ids_BS[:, t : t + 1], cache=cache).routing[0].keep_TK for t in range(16)]
    assert not full.all() and all(step is None or step.all() for step in steps)  # the full forward drops, decoding not


def test_probability_priority_ranks_by_the_router_probability_even_at_top_1():
    model = build("linear", {"capacity_factor": 0.5, "capacity_priority": "probability"}, top_k=1, seed=5).train()
    router = routers_of(model)[0]
    r = model(torch.randint(0, 64, (2, 16))).routing[0]
    assert bool((r.weights_TK == 1).all())  # renormalised top-1 weights carry no order
    scores_TK = r.probs_TE.gather(1, r.expert_ids_TK)
    C = expert_capacity(16, 4, 1, 0.5)
    assert torch.equal(r.keep_TK, naive_keep(r.expert_ids_TK, scores_TK, 2, 4, C, "probability"))
    assert not torch.equal(r.keep_TK, naive_keep(r.expert_ids_TK, scores_TK, 2, 4, C, "position"))
    assert router.options.capacity_priority == "probability"
