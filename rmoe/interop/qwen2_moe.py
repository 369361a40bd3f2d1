"""Adapter between rmoe's :class:`~rmoe.model.decoder.MoeLM` and transformers' ``Qwen2MoeForCausalLM``.

Our parameter names mirror transformers' under a ``model.`` prefix, with one difference: our
router is ``mlp.router`` (a pluggable component) where transformers has ``mlp.gate``. The whole
mapping is :func:`to_hf_name` / :func:`from_hf_name`. Only the ``linear`` router has a
transformers counterpart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from rmoe.model.config import ModelConfig
from rmoe.model.decoder import MoeLM

if TYPE_CHECKING:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM


def to_hf_name(name: str) -> str:
    if name.startswith("lm_head."):
        return name
    return "model." + name.replace(".mlp.router.", ".mlp.gate.")


def from_hf_name(name: str) -> str:
    if name.startswith("lm_head."):
        return name
    return name.removeprefix("model.").replace(".mlp.gate.", ".mlp.router.")


def to_hf_config(config: ModelConfig, **overrides: Any) -> Qwen2MoeConfig:
    """The ``Qwen2MoeConfig`` of the same architecture (linear router only)."""
    from transformers import Qwen2MoeConfig

    if config.router != "linear":
        raise ValueError(f"only the linear router exists in transformers, not {config.router!r}")
    return Qwen2MoeConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        hidden_act="silu",
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=config.tie_word_embeddings,
        decoder_sparse_step=config.decoder_sparse_step,
        moe_intermediate_size=config.moe_intermediate_size,
        shared_expert_intermediate_size=config.shared_expert_intermediate_size,
        num_experts_per_tok=config.top_k,
        num_experts=config.num_experts,
        norm_topk_prob=config.norm_topk_prob,
        mlp_only_layers=list(config.mlp_only_layers),
        qkv_bias=config.qkv_bias,
        initializer_range=config.initializer_range,
        **overrides,
    )


def to_hf_state_dict(model: MoeLM) -> dict[str, torch.Tensor]:
    return {to_hf_name(k): v for k, v in model.state_dict().items()}


def from_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {from_hf_name(k): v for k, v in state_dict.items()}


def to_hf_model(model: MoeLM, **config_overrides: Any) -> Qwen2MoeForCausalLM:
    """A ``Qwen2MoeForCausalLM`` holding a copy of ``model``'s weights."""
    from transformers import Qwen2MoeForCausalLM

    hf = Qwen2MoeForCausalLM(to_hf_config(model.config, **config_overrides))
    state = to_hf_state_dict(model)
    if model.config.shared_expert_intermediate_size == 0:
        # transformers always builds a shared expert; an empty one (width 0) adds exactly zero.
        state.update({k: v for k, v in hf.state_dict().items() if "shared_expert" in k})
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping mismatch: missing={missing}, unexpected={unexpected}")
    return hf.to(next(model.parameters()).dtype).eval()


def from_hf_model(hf: Qwen2MoeForCausalLM) -> MoeLM:
    """An rmoe ``MoeLM`` with the weights of a transformers ``Qwen2MoeForCausalLM``."""
    c = hf.config
    config = ModelConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        rope_theta=c.rope_parameters["rope_theta"],
        rms_norm_eps=c.rms_norm_eps,
        qkv_bias=getattr(c, "qkv_bias", True),
        tie_word_embeddings=c.tie_word_embeddings,
        intermediate_size=c.intermediate_size,
        num_experts=c.num_experts,
        top_k=c.num_experts_per_tok,
        moe_intermediate_size=c.moe_intermediate_size,
        norm_topk_prob=c.norm_topk_prob,
        shared_expert_intermediate_size=c.shared_expert_intermediate_size,
        decoder_sparse_step=c.decoder_sparse_step,
        mlp_only_layers=list(c.mlp_only_layers),
    )
    model = MoeLM(config)
    state = from_hf_state_dict(hf.state_dict())
    if config.shared_expert_intermediate_size == 0:  # transformers' empty (width 0) shared expert
        state = {k: v for k, v in state.items() if ".shared_expert" not in k}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model.load_state_dict(state, strict=not config.tie_word_embeddings)
    return model
