"""Adapter between rmoe's :class:`~rmoe.model.decoder.MoeLM` and transformers' ``Qwen2MoeForCausalLM`` /
``Qwen3MoeForCausalLM``.

Parameter names are transformers' under a ``model.`` prefix, except that our router is ``mlp.router`` where
transformers has ``mlp.gate`` (:func:`to_hf_name` / :func:`from_hf_name`). Only the ``linear`` router without
a logit bias or bias balancing has a transformers counterpart; a model with ``qk_norm`` maps to Qwen3-MoE
(no q/k/v bias, no shared expert), one without to Qwen2-MoE.

Config names (transformers -> rmoe): ``num_hidden_layers`` -> ``num_layers``, ``num_experts_per_tok`` ->
``top_k``, ``rope_parameters["rope_theta"]`` -> ``rope_theta``, Qwen3's ``attention_bias`` -> ``qkv_bias``
(only false: Qwen3's bias also sits on ``o_proj``, which we do not have); the rest keep their names.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rmoe.errors import RmoeError
from rmoe.model.config import ModelConfig
from rmoe.model.decoder import MoeLM

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedModel

SUPPORTED_MODEL_TYPES = ("qwen2_moe", "qwen3_moe")


def to_hf_name(name: str) -> str:
    if name.startswith("lm_head."):
        return name
    return "model." + name.replace(".mlp.router.", ".mlp.gate.")


def from_hf_name(name: str) -> str:
    if name.startswith("lm_head."):
        return name
    return name.removeprefix("model.").replace(".mlp.gate.", ".mlp.router.")


def native_model_type(config: ModelConfig) -> str | None:
    """``"qwen2_moe"`` or ``"qwen3_moe"`` if transformers has this exact architecture natively, else None.

    transformers' gate has no bias and its top-k is not bias-balanced; Qwen3 has no q/k/v bias and no shared
    expert.
    """
    if config.router != "linear":
        return None
    options = config.router_context().options
    if options.bias or options.bias_update_rate:
        return None
    if not config.qk_norm:
        return "qwen2_moe"
    if not config.qkv_bias and config.shared_expert_intermediate_size == 0:
        return "qwen3_moe"
    return None


def to_hf_config(config: ModelConfig, **overrides: Any) -> PreTrainedConfig:
    """The ``Qwen2MoeConfig`` or ``Qwen3MoeConfig`` of the same architecture (see :func:`native_model_type`)."""
    model_type = native_model_type(config)
    if model_type is None:
        raise ValueError(
            f"router {config.router!r} (options {config.router_options}), qk_norm={config.qk_norm}, "
            f"qkv_bias={config.qkv_bias}, shared expert {config.shared_expert_intermediate_size}: "
            "no native transformers architecture (only the plain linear router; Qwen3 has no bias, no shared expert)"
        )
    common = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.attention_head_dim,
        hidden_act="silu",
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=config.tie_word_embeddings,
        decoder_sparse_step=config.decoder_sparse_step,
        moe_intermediate_size=config.moe_intermediate_size,
        num_experts_per_tok=config.top_k,
        num_experts=config.num_experts,
        norm_topk_prob=config.norm_topk_prob,
        mlp_only_layers=list(config.mlp_only_layers),
        initializer_range=config.initializer_range,
    )
    if model_type == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(**common, attention_bias=False, **overrides)
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        **common,
        shared_expert_intermediate_size=config.shared_expert_intermediate_size,
        qkv_bias=config.qkv_bias,
        **overrides,
    )


def from_hf_config(c: Any) -> ModelConfig:
    """Our :class:`ModelConfig` of a transformers Qwen2-MoE / Qwen3-MoE config (object or ``config.json`` dict).

    Raises:
        RmoeError: Another architecture, or a feature we do not implement (sliding-window
            attention, a rotary scaling, another activation, Qwen3's attention bias).
    """
    get = c.get if isinstance(c, dict) else lambda key, default=None: getattr(c, key, default)
    model_type = get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise RmoeError(
            f"model_type={model_type!r} is not supported; expected one of: {', '.join(SUPPORTED_MODEL_TYPES)} "
            "(transformers' Qwen2MoeForCausalLM / Qwen3MoeForCausalLM)."
        )
    rope = get("rope_parameters") or {}
    if get("rope_theta") is not None and "rope_theta" not in rope:  # older configs
        rope = {"rope_type": "default", "rope_theta": get("rope_theta")}
    problems = []
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_type={rope.get('rope_type')!r} (only the default rotary embedding)")
    if get("use_sliding_window", False):
        problems.append("use_sliding_window=true (sliding-window attention)")
    if get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={get('hidden_act')!r} (only silu)")
    if model_type == "qwen3_moe" and get("attention_bias", False):
        problems.append("attention_bias=true (a bias on o_proj)")
    if problems:
        raise RmoeError(f"this {model_type} config uses what rmoe does not implement: {'; '.join(problems)}.")
    num_heads = get("num_attention_heads")
    head_dim = get("head_dim") or get("hidden_size") // num_heads
    qwen3 = model_type == "qwen3_moe"
    return ModelConfig(
        vocab_size=get("vocab_size"),
        hidden_size=get("hidden_size"),
        num_layers=get("num_hidden_layers"),
        num_attention_heads=num_heads,
        num_key_value_heads=get("num_key_value_heads") or num_heads,
        head_dim=0 if head_dim * num_heads == get("hidden_size") else head_dim,
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        rms_norm_eps=get("rms_norm_eps"),
        qkv_bias=False if qwen3 else get("qkv_bias", True),
        qk_norm=qwen3,
        tie_word_embeddings=get("tie_word_embeddings", False),
        intermediate_size=get("intermediate_size"),
        num_experts=get("num_experts"),
        top_k=get("num_experts_per_tok"),
        moe_intermediate_size=get("moe_intermediate_size"),
        norm_topk_prob=get("norm_topk_prob", False),
        shared_expert_intermediate_size=0 if qwen3 else get("shared_expert_intermediate_size", 0),
        decoder_sparse_step=get("decoder_sparse_step", 1),
        mlp_only_layers=list(get("mlp_only_layers") or []),
        initializer_range=get("initializer_range", 0.02),
    )


def to_hf_state_dict(model: MoeLM) -> dict[str, torch.Tensor]:
    """Our weights under transformers' names (tied LM head omitted, as transformers saves it)."""
    state = {to_hf_name(k): v for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def from_hf_state_dict(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers' weights under our names, without Qwen2-MoE's empty shared expert and a tied head."""
    state = {from_hf_name(k): v for k, v in state_dict.items()}
    if config.shared_expert_intermediate_size == 0:  # transformers' empty (width 0) shared expert
        state = {k: v for k, v in state.items() if ".shared_expert" not in k}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def load_hf_weights(model: MoeLM, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load transformers-named weights into ``model``; every parameter must be there (RmoeError names the keys)."""
    state = from_hf_state_dict(state_dict, model.config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise RmoeError(
            f"the weights in {source} do not fit the architecture of its config: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}."
        )


@contextlib.contextmanager
def empty_shared_expert_is_quiet() -> Iterator[None]:
    """Silence torch's "Initializing zero-element tensors is a no-op" while transformers builds a Qwen2-MoE.

    ``Qwen2MoeSparseMoeBlock`` always builds a shared expert: without one it gets width-0 ``nn.Linear``s,
    whose init torch warns about although nothing is wrong.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        yield


def to_hf_model(model: MoeLM, **config_overrides: Any) -> PreTrainedModel:
    """A ``Qwen2MoeForCausalLM`` / ``Qwen3MoeForCausalLM`` holding a copy of ``model``'s weights."""
    from transformers import AutoModelForCausalLM

    with empty_shared_expert_is_quiet():
        hf = AutoModelForCausalLM.from_config(to_hf_config(model.config, **config_overrides))
    state = to_hf_state_dict(model)
    if native_model_type(model.config) == "qwen2_moe" and model.config.shared_expert_intermediate_size == 0:
        # transformers always builds a shared expert; an empty one (width 0) adds exactly zero.
        state.update({k: v for k, v in hf.state_dict().items() if "shared_expert" in k})
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping mismatch: missing={missing}, unexpected={unexpected}")
    return hf.to(next(model.parameters()).dtype).eval()


def read_hf_checkpoint(path: str | os.PathLike[str]) -> PreTrainedModel:
    """A local Qwen2-MoE / Qwen3-MoE directory loaded by transformers (fp32, on CPU, no network), so every
    layout it reads works (fused or per-expert tensors, sharded or not).

    Raises:
        RmoeError: Not a directory with a ``config.json`` of a supported ``model_type``, or weights
            transformers cannot load.
    """
    import json

    path = Path(path).expanduser()
    config_file = path / "config.json"
    if not config_file.is_file():
        raise RmoeError(f"{path} is not a transformers model directory: it has no config.json.")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError) as err:
        raise RmoeError(f"{config_file} is not a valid JSON config: {err}") from None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise RmoeError(
            f"{config_file} has model_type={model_type!r}; expected one of: {', '.join(SUPPORTED_MODEL_TYPES)} "
            "(transformers' Qwen2MoeForCausalLM / Qwen3MoeForCausalLM)."
        )
    from transformers import AutoModelForCausalLM

    from rmoe.checkpoints import verify_weights_files

    meta = json.loads(config_file.read_text()).get("rmoe")
    recorded = meta.get("weights_sha256") if isinstance(meta, dict) else None
    if recorded or not any(path.glob("*.bin")):  # safetensors weights (an rmoe export records their digests)
        verify_weights_files(path, recorded, "the model directory")
    try:
        with empty_shared_expert_is_quiet():
            model, info = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=torch.float32, local_files_only=True, output_loading_info=True
            )
    except Exception as err:  # missing or corrupt weights, a config transformers rejects
        raise RmoeError(
            f"transformers could not load {path}: {type(err).__name__}: {' '.join(str(err).split())[:400]}"
        ) from None
    missing = sorted(set(info.get("missing_keys") or ()) - set(getattr(model, "_tied_weights_keys", None) or ()))
    if missing or info.get("mismatched_keys"):
        wrong = [str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or ()]
        raise RmoeError(
            f"the weights in {path} are incomplete: missing {', '.join(missing[:4])}"
            f"{' ...' if len(missing) > 4 else ''}"
            f"{'; other shape: ' + ', '.join(wrong[:4]) if wrong else ''} (transformers would initialise them at "
            "random). Is a weights shard missing?"
        )
    return model.eval()


def from_hf_model(hf: PreTrainedModel) -> MoeLM:
    """An rmoe ``MoeLM`` with the weights of a transformers ``Qwen2MoeForCausalLM`` / ``Qwen3MoeForCausalLM``."""
    model = MoeLM(from_hf_config(hf.config))
    load_hf_weights(model, hf.state_dict(), type(hf).__name__)
    return model
