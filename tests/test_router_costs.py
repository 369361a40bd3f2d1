"""What a router states about itself: its costs (routed pairs, saved bytes, extra FLOPs), its options'
docs (``rmoe routers``) and its aliases. The memory estimate and the FLOPs count ask the router
class; a router added in a module of its own is costed without a line changed elsewhere."""

from __future__ import annotations

import dataclasses
import sys
import warnings

import pytest
import torch
from tiny import tiny_config

from rmoe import MoeLM
from rmoe.cli import main
from rmoe.model.moe import GroupedExperts
from rmoe.router_catalog import describe, listing, option_docs
from rmoe.routers import ALIASES, ROUTERS, get_router_class
from rmoe.routers.recurrent import RecurrentRouter
from rmoe.training.callbacks import training_flops_per_token
from rmoe.training.memory import step_memory_terms

B, S = 2, 12
# every registered router with its defaults, and the capacity routers at a capacity that drops
CASES = [(name, {}) for name in sorted(ROUTERS)] + [
    ("locmoe", {"capacity_factor": 0.5}),
    ("expert_choice", {"capacity_factor": 0.5}),
]


def _build(router: str, options: dict, **overrides) -> MoeLM:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the start-up causality warnings have their own tests
        return MoeLM(tiny_config(router=router, router_options=options, **overrides))


@pytest.mark.parametrize(("router", "options"), CASES, ids=[f"{r}-{o}" for r, o in CASES])
def test_routed_pairs_is_what_the_experts_compute(router, options, monkeypatch):
    """``Router.routed_pairs`` is the number of (row, expert) pairs the experts compute: exact when the
    router keeps every pair it dispatches or declares fewer than it dispatches (a capacity per
    expert), an upper bound when a capacity may drop some of a token choice's pairs."""
    model = _build(router, options).train()
    computed: list[tuple[int, int]] = []  # (kept pairs, dispatched pairs) per MoE layer
    run = GroupedExperts.run

    def counting_run(self, x_TD, expert_ids_TK, weights_TK, keep_TK=None):
        kept = expert_ids_TK.numel() if keep_TK is None else int(keep_TK.sum())
        computed.append((kept, expert_ids_TK.numel()))
        return run(self, x_TD, expert_ids_TK, weights_TK, keep_TK)

    monkeypatch.setattr(GroupedExperts, "run", counting_run)
    model(torch.randint(0, model.config.vocab_size, (B, S)))
    context = model.config.router_context()
    declared = context.router_class.routed_pairs(context, B * S, B)
    assert len(computed) == len(model.config.moe_layers)
    for kept, dispatched in computed:
        assert kept <= declared
        if kept == dispatched or declared < dispatched:
            assert kept == declared, (kept, dispatched, declared)


def test_the_flops_count_of_token_choice_is_6_x_active_parameters_plus_attention():
    """For token choice the router's own count adds nothing: PaLM's estimate, unchanged."""
    model = _build("linear", {})
    cfg = model.config
    palm = 6 * model.num_parameters(active=True, exclude_embeddings=True) + 12 * cfg.num_layers * cfg.hidden_size * S
    assert training_flops_per_token(model, S) == pytest.approx(palm)


def test_expert_choice_counts_its_capacity_and_soft_moe_its_slots():
    tc, ec = _build("linear", {}), _build("expert_choice", {"capacity_factor": 0.5})
    experts = sum(p.numel() for n, p in tc.named_parameters() if "experts." in n)
    K, E = tc.config.top_k, tc.config.num_experts
    # half the capacity: K/2 pairs per token on average, so half the expert FLOPs of top-K
    assert training_flops_per_token(tc, S) - training_flops_per_token(ec, S) == pytest.approx(6 * experts / E * K / 2)
    soft = _build("soft_moe", {"slots_per_expert": 2})
    ctx = soft.config.router_context()
    assert ctx.router_class.routed_pairs(ctx, B * S, B) == B * E * 2  # every slot of every sequence
    assert ctx.router_class.extra_flops_per_token(ctx, S) == 4 * E * 2 * soft.config.hidden_size


TOY_ROUTER = '''
from rmoe.routers import register_router
from rmoe.routers.linear import LinearRouter


@register_router("toy_costly_for_test")
class ToyCostly(LinearRouter):
    """A linear router that states made-up costs."""

    @classmethod
    def routed_pairs(cls, config, num_tokens, num_sequences):
        return 3 * num_tokens * config.top_k

    @classmethod
    def saved_bytes(cls, config, num_tokens, num_sequences, act_bytes):
        return 1000 * num_tokens

    @classmethod
    def extra_flops_per_token(cls, config, seq_len):
        return 5000.0
'''


def test_a_new_router_states_its_costs_and_the_estimates_pick_them_up(tmp_path, monkeypatch):
    """The acceptance test of the router cost seam: a router in a module of its own, and the memory
    estimate and the FLOPs count change by what it declares, with no other line changed."""
    (tmp_path / "toy_router_for_test.py").write_text(TOY_ROUTER)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "toy_router_for_test", raising=False)
    try:
        __import__("toy_router_for_test")
        base, toy = tiny_config(router="linear"), tiny_config(router="toy_costly_for_test")
        T, L = B * S, len(base.moe_layers)
        plain, costly = (step_memory_terms(arch, B, S) for arch in (base, toy))
        pair_bytes = costly["activations"] - plain["activations"]
        F_, K = base.moe_intermediate_size, base.top_k
        # 1000 bytes per token, and at least the three (pairs, F) SwiGLU activations of the extra 2TK pairs
        assert pair_bytes >= L * (1000 * T + 2 * T * K * 3 * F_ * 4)
        models = [_build(r, {}) for r in ("linear", "toy_costly_for_test")]
        flops = [training_flops_per_token(m, S) for m in models]
        experts = sum(p.numel() for n, p in models[0].named_parameters() if "experts." in n)
        expected = 6 * experts / base.num_experts * 2 * K + 3 * L * 5000
        assert flops[1] - flops[0] == pytest.approx(expected)
    finally:
        ROUTERS.pop("toy_costly_for_test", None)


def test_memory_estimate_has_no_router_names():
    """The estimate asks the router; it never branches on a router's name."""
    import inspect

    import rmoe.training.memory as memory

    source = inspect.getsource(memory)
    assert not [name for name in [*ROUTERS, *ALIASES] if f'"{name}"' in source]
    assert "router_options" not in source


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_every_option_of_every_router_is_documented(router):
    """``rmoe routers NAME`` shows each option with its doc: every option has one."""
    cls = get_router_class(router)
    docs = option_docs(cls.Options)
    fields = [f.name for f in dataclasses.fields(cls.Options)]
    assert [f for f in fields if not docs.get(f)] == []
    page = describe(router)
    assert all(f"  {f}: " in page for f in fields)


def test_rmoe_routers_lists_every_router_and_alias(capsys):
    main(["routers"])
    out = capsys.readouterr().out
    assert out.strip() == listing().strip()
    assert all(f"  {name} " in out for name in [*ROUTERS, *ALIASES])
    main(["routers", "gru"])
    out = capsys.readouterr().out
    assert out.startswith("recurrent ") and "also answers to: gru" in out and "state_dim: int = 128" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["routers", "no_such_router"])
    assert exit_info.value.code == 2
    assert "no_such_router" in capsys.readouterr().err


def test_gru_is_an_alias_of_the_recurrent_router():
    """``router: gru`` (the paper's cell and the old name) builds the recurrent router; the config keeps
    the name it was given, so runs and checkpoints made under it read the same."""
    assert ALIASES["gru"] == "recurrent" and get_router_class("gru") is RecurrentRouter
    old, new = _build("gru", {"state_dim": 8}), _build("recurrent", {"state_dim": 8})
    assert old.config.router == "gru"
    for (name, a), (_, b) in zip(old.state_dict().items(), new.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_router_options_are_parsed_once_per_model(monkeypatch):
    """The config parses them at validation; the routers of every layer get that object."""
    calls = []
    parse = RecurrentRouter.parse_options.__func__

    def counting(cls, options):
        calls.append(options)
        return parse(cls, options)

    monkeypatch.setattr(RecurrentRouter, "parse_options", classmethod(counting))
    model = _build("recurrent", {"state_dim": 8}, num_layers=3)
    assert len(calls) == 1
    routers = [m.mlp.router for m in model.layers if hasattr(m.mlp, "router")]
    assert len(routers) == 3 and all(r.options is routers[0].options for r in routers)


def test_a_run_made_under_the_alias_resumes_under_the_new_name():
    from rmoe.model.config import arch_differences

    old = dataclasses.asdict(tiny_config(router="gru", router_options={"state_dim": 8}))
    assert arch_differences(old, tiny_config(router="recurrent", router_options={"state_dim": 8}), "a", "b") == []
    assert arch_differences(old, tiny_config(router="linear"), "a", "b")
