"""The Qwen3-MoE option set (``qk_norm``, no bias, no shared expert, explicit ``head_dim``) against
transformers' ``Qwen3MoeForCausalLM``: logits and every layer's router logits in fp32."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_config

from rmoe import MoeLM
from rmoe.interop.qwen2_moe import from_hf_model, native_model_type, to_hf_model

QWEN3 = dict(qk_norm=True, qkv_bias=False, shared_expert_intermediate_size=0)


def randomize_vectors(model: torch.nn.Module) -> None:
    """Norms (q_norm / k_norm included) away from 1, so a missing or misplaced norm shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name else 0.0))


@pytest.mark.parametrize(
    "overrides",
    [
        dict(norm_topk_prob=False),
        dict(norm_topk_prob=True, mlp_only_layers=[1]),
        dict(decoder_sparse_step=2, tie_word_embeddings=False, num_key_value_heads=4),
        dict(head_dim=16, num_key_value_heads=1),  # 4 heads of 16 at width 32, as Qwen3's wide heads
    ],
    ids=["no-norm", "norm-dense-layer", "sparse-step-untied-mha", "head-dim-16-mqa"],
)
def test_matches_transformers_qwen3_moe(overrides):
    torch.manual_seed(0)
    model = MoeLM(tiny_config(**QWEN3, **overrides)).eval()
    randomize_vectors(model)
    assert native_model_type(model.config) == "qwen3_moe"
    hf = to_hf_model(model, attn_implementation="eager")
    assert type(hf).__name__ == "Qwen3MoeForCausalLM"
    for shape in ((2, 13), (1, 1), (3, 7)):
        ids = torch.randint(0, 97, shape)
        with torch.no_grad():
            ours = model(ids)
            theirs = hf(ids, output_router_logits=True)
        assert ours.logits.abs().max() > 0.1
        torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
        assert len(ours.routing) == len(theirs.router_logits) == len(model.config.moe_layers)
        for mine, hf_logits in zip(ours.routing, theirs.router_logits):
            torch.testing.assert_close(mine.logits_TE, hf_logits.float(), atol=1e-5, rtol=0)

    back = from_hf_model(hf)  # the adapter is a round trip, Qwen3's options included
    assert (
        back.config.qk_norm
        and not back.config.qkv_bias
        and back.config.attention_head_dim == model.config.attention_head_dim
    )
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ours.logits, atol=1e-6, rtol=0)


def test_qk_norm_changes_the_model_and_is_in_the_state_dict():
    config = tiny_config(**QWEN3)
    names = MoeLM(config).state_dict().keys()
    assert "layers.0.self_attn.q_norm.weight" in names and "layers.0.self_attn.k_norm.weight" in names
    assert not any(n.endswith("q_proj.bias") for n in names)
    assert not any("q_norm" in n for n in MoeLM(tiny_config()).state_dict())
    # Qwen3 constraints: with a shared expert or a q/k/v bias there is no native Qwen3 model
    assert native_model_type(tiny_config(qk_norm=True)) is None
    assert native_model_type(tiny_config(**{**QWEN3, "shared_expert_intermediate_size": 8})) is None


def test_only_the_plain_linear_router_is_native():
    """transformers' gate has no logit bias and no bias balancing; the init does not matter once trained."""
    assert native_model_type(tiny_config(router_options={"init": "torch"})) == "qwen2_moe"
    assert native_model_type(tiny_config(router_options={"bias": True})) is None
    assert native_model_type(tiny_config(router_options={"bias_update_rate": 0.01})) is None
