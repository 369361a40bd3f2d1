"""The model against references: transformers' Qwen2-MoE, a naive per-token loop, causality."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_config

from rmoe import MoeLM, RmoeError
from rmoe.model.moe import GroupedExperts, SparseMoeBlock
from rmoe.routers import RoutingOutput


def randomize_vectors(model: torch.nn.Module) -> None:
    """Give norms and biases non-trivial values so the comparison is sharp."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))


@pytest.mark.parametrize(
    "overrides",
    [
        dict(shared_expert_intermediate_size=0, norm_topk_prob=True),
        dict(shared_expert_intermediate_size=24, norm_topk_prob=False),
        dict(shared_expert_intermediate_size=24, norm_topk_prob=True, mlp_only_layers=[1]),
        dict(decoder_sparse_step=2, tie_word_embeddings=False, num_key_value_heads=4),
    ],
    ids=["no-shared-norm", "shared-no-norm", "dense-layer", "sparse-step-untied-mha"],
)
def test_matches_transformers_qwen2_moe(overrides):
    pytest.importorskip("transformers")
    from rmoe.interop.qwen2_moe import from_hf_model, to_hf_model

    torch.manual_seed(0)
    model = MoeLM(tiny_config(**overrides)).eval()
    randomize_vectors(model)
    hf = to_hf_model(model, attn_implementation="eager")
    ids = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(ids, output_router_logits=True)
    assert ours.logits.abs().max() > 0.1  # not a trivially small comparison
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
    assert len(ours.routing) == len(theirs.router_logits) == len(model.config.moe_layers)
    for mine, hf_logits in zip(ours.routing, theirs.router_logits):
        torch.testing.assert_close(mine.logits_TE, hf_logits.float(), atol=1e-5, rtol=0)

    back = from_hf_model(hf)  # and the adapter is a round trip
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ours.logits, atol=1e-6, rtol=0)


def naive_experts(experts: GroupedExperts, x_TD: torch.Tensor, routing: RoutingOutput) -> torch.Tensor:
    """One token, one expert at a time: the definition the fast dispatch must equal."""
    out = torch.zeros_like(x_TD)
    T, K = routing.expert_ids_TK.shape
    for t in range(T):
        for k in range(K):
            if routing.keep_TK is not None and not routing.keep_TK[t, k]:
                continue
            e = int(routing.expert_ids_TK[t, k])
            gate, up = (experts.gate_up_proj[e] @ x_TD[t]).chunk(2)
            out[t] = out[t] + routing.weights_TK[t, k] * (experts.down_proj[e] @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("backend", ["sliced", "tiled"])
@pytest.mark.parametrize("with_drops", [False, True])
def test_dispatch_equals_naive_loop_forward_and_backward(with_drops, backend):
    torch.manual_seed(1)
    T, D, F_, E, K = 23, 16, 8, 5, 2
    experts = GroupedExperts(E, D, F_, backend=backend)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.3)
    torch.nn.init.normal_(experts.down_proj, std=0.3)
    x = torch.randn(T, D, requires_grad=True)
    logits = torch.randn(T, E, requires_grad=True)
    # skew so expert 4 gets no token: it must still be in the graph (zero gradient, not None)
    logits_masked = logits.masked_fill(torch.arange(E) == 4, -1e9)
    probs = logits_masked.softmax(-1)
    weights, ids = probs.topk(K, dim=-1)
    keep = (torch.rand(T, K) > 0.3) if with_drops else None
    routing = RoutingOutput(logits, probs, weights, ids, keep)

    fast = experts(x, routing)
    slow = naive_experts(experts, x, routing)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)

    grad_out = torch.randn_like(fast)
    fast_grads = torch.autograd.grad(
        fast, [x, logits, experts.gate_up_proj, experts.down_proj], grad_out, retain_graph=True
    )
    slow_grads = torch.autograd.grad(
        slow, [x, logits, experts.gate_up_proj, experts.down_proj], grad_out, retain_graph=True
    )
    for a, b in zip(fast_grads, slow_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert fast_grads[2][4].abs().sum() == 0  # the idle expert: in the graph, zero gradient
    again = torch.autograd.grad(fast, [x, logits, experts.gate_up_proj, experts.down_proj], grad_out)
    for a, b in zip(again, fast_grads):  # a second backward (retain_graph) reads unmodified saved tensors
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_auto_backend_takes_tiled_on_cpu_once_the_pair_copies_are_large():
    from rmoe.model.moe import TILED_MIN_BYTES

    experts = GroupedExperts(8, 256, 64, backend="auto")
    x = torch.zeros(4, 256)
    pairs_at_threshold = TILED_MIN_BYTES // (256 * 4)  # fp32 rows of width 256
    assert experts._resolve_backend(x, pairs_at_threshold - 1) == "sliced"
    assert experts._resolve_backend(x, pairs_at_threshold) == "tiled"
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the compute dtype: half the bytes
        assert experts._resolve_backend(x, pairs_at_threshold) == "sliced"
        assert experts._resolve_backend(x, 2 * pairs_at_threshold) == "tiled"
    assert GroupedExperts(8, 256, 64, backend="sliced")._resolve_backend(x, 10**9) == "sliced"


def test_tiled_equals_sliced_in_half_precision_and_without_input_gradient():
    torch.manual_seed(0)
    T, D, F_, E, K = 64, 32, 16, 8, 4
    sliced, tiled = GroupedExperts(E, D, F_, backend="sliced"), GroupedExperts(E, D, F_, backend="tiled")
    for p in sliced.parameters():
        torch.nn.init.normal_(p, std=0.2)
    tiled.load_state_dict(sliced.state_dict())
    x = torch.randn(T, D)  # no gradient wanted for the input: the backward skips dx
    weights, ids = torch.randn(T, E).softmax(-1).topk(K, dim=-1)
    for module in (sliced, tiled):
        module.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module.run(x, ids, weights)
        assert out.dtype == torch.float32
        out.square().sum().backward()
    torch.testing.assert_close(tiled.run(x, ids, weights), sliced.run(x, ids, weights), atol=1e-5, rtol=1e-5)
    for a, b in zip(tiled.parameters(), sliced.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=0.05, rtol=0.05)  # bf16 matmuls, other summation order


def test_every_expert_gets_a_gradient_even_when_idle():
    """DDP without find_unused_parameters needs every parameter to receive a .grad."""
    torch.manual_seed(0)
    model = MoeLM(tiny_config(num_experts=8, top_k=1))
    with torch.no_grad():  # route everything to expert 0
        for layer in model.layers:
            layer.mlp.router.weight.zero_()
            layer.mlp.router.weight[0].fill_(1.0)
    ids = torch.randint(0, 97, (1, 5))
    model(ids).logits.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_causality_later_tokens_never_change_earlier_logits():
    torch.manual_seed(0)
    model = MoeLM(tiny_config(shared_expert_intermediate_size=16)).eval()
    ids = torch.randint(0, 97, (2, 16))
    changed = ids.clone()
    changed[:, 10:] = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    # equal up to float rounding (the BLAS blocking depends on how many tokens each expert gets)
    torch.testing.assert_close(a[:, :10], b[:, :10], atol=1e-5, rtol=0)
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-2


def test_shapes_and_routing_outputs():
    model = MoeLM(tiny_config(mlp_only_layers=[0]))
    out = model(torch.randint(0, 97, (3, 7)))
    assert out.logits.shape == (3, 7, 97)
    assert len(out.routing) == 2  # layers 1 and 2
    r = out.routing[0]
    assert r.logits_TE.shape == r.probs_TE.shape == (21, 4)
    assert r.weights_TK.shape == r.expert_ids_TK.shape == (21, 2)
    assert r.logits_TE.dtype == torch.float32
    torch.testing.assert_close(r.weights_TK.sum(-1), torch.ones(21))


def test_sparse_moe_block_shared_expert_gate():
    torch.manual_seed(0)
    config = tiny_config(shared_expert_intermediate_size=16)
    block = SparseMoeBlock(config, 0, None)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 5, 32)
    out, routing, state = block(x, "opaque")
    assert state == "opaque"  # a linear router passes the state through untouched
    x_TD = x.reshape(10, 32)
    expected = naive_experts(block.experts, x_TD, routing) + torch.sigmoid(
        block.shared_expert_gate(x_TD)
    ) * block.shared_expert(x_TD)
    torch.testing.assert_close(out.reshape(10, 32), expected, atol=1e-5, rtol=1e-5)


def test_active_parameter_count():
    config = tiny_config(num_layers=2, mlp_only_layers=[], tie_word_embeddings=True)
    model = MoeLM(config)
    total = model.num_parameters()
    active = model.num_parameters(active=True)
    expert_params = 2 * 4 * (3 * 16 * 32)  # layers x experts x SwiGLU(32 -> 16)
    assert total - active == expert_params * (4 - 2) // 4


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (dict(hidden_size=30, num_attention_heads=4), "not divisible by model.arch.num_attention_heads=4"),
        (dict(top_k=5, num_experts=4), "model.arch.top_k=5 must be between 1 and model.arch.num_experts=4"),
        (dict(router="nope"), "model.arch.router='nope' is not a known choice; expected one of: "),
        (dict(router_options={"bogus": 1}), "valid options"),
        (dict(mlp_only_layers=[7]), "outside the layer range"),
    ],
)
def test_bad_config_is_a_clear_error(overrides, fragment):
    with pytest.raises(RmoeError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        tiny_config(**overrides)


def test_forcing_grouped_mm_on_a_torch_without_it_is_a_clear_error(monkeypatch):
    """An older torch (no F.grouped_mm): the forced backend is refused up front, naming the key;
    ``auto`` still builds (it picks another backend)."""
    monkeypatch.delattr(torch.nn.functional, "grouped_mm", raising=False)
    message = "model.arch.expert_backend='grouped_mm' needs torch.nn.functional.grouped_mm"
    with pytest.raises(RmoeError, match=re.escape(message)):
        tiny_config(expert_backend="grouped_mm")
    assert tiny_config(expert_backend="auto").expert_backend == "auto"
