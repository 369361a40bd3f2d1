"""Typed model configuration, validated on construction.

Field names follow transformers' ``Qwen2MoeConfig`` where the concept is the same, so the adapter in
:mod:`rmoe.interop.qwen2_moe` is one small mapping. Qwen3-MoE is ``qk_norm: true, qkv_bias: false,
shared_expert_intermediate_size: 0`` (``configs/arch/qwen3_moe.yaml``), with ``head_dim`` where needed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from rmoe.errors import RmoeError, check_field_types
from rmoe.routers import ALIASES, Causality, RouterContext, get_router_class

EXPERT_BACKENDS = ("auto", "grouped_mm", "sliced", "tiled")


@dataclass
class ModelConfig:
    """Architecture of a Qwen2-MoE-style decoder LM.

    Args:
        vocab_size: Number of token ids (set from the tokenizer by the data module when 0).
        hidden_size: Model width D.
        num_layers: Number of decoder layers L.
        num_attention_heads: Query heads; ``hidden_size`` must be divisible by it.
        num_key_value_heads: Key/value heads for grouped-query attention (divides the query heads).
        rope_theta: Base of the rotary position embedding.
        rms_norm_eps: Epsilon of every RMSNorm.
        qkv_bias: Bias on the q/k/v projections (Qwen2 uses it; Qwen3 does not).
        qk_norm: Per-head RMSNorm on the queries and keys before the rotary embedding, as in Qwen3.
        head_dim: Width Dh of each attention head; 0 means ``hidden_size // num_attention_heads``.
        tie_word_embeddings: Share the input embedding with the LM head.
        intermediate_size: Width of the SwiGLU MLP in dense (non-MoE) layers.
        num_experts: Number of routed experts E.
        top_k: Experts per token K (``num_experts_per_tok`` in transformers).
        moe_intermediate_size: Width F of each routed SwiGLU expert.
        norm_topk_prob: Renormalise the top-k probabilities to sum to 1.
        shared_expert_intermediate_size: Width of the always-on shared expert (0: none), gated by
            ``sigmoid(Linear(D -> 1))`` as in Qwen2-MoE.
        decoder_sparse_step: Layer i is an MoE layer when ``(i + 1) % decoder_sparse_step == 0``.
        mlp_only_layers: Layer indices that use a dense MLP whatever ``decoder_sparse_step`` says.
        router: Registered router name (``rmoe routers`` lists them).
        router_options: Options of that router (``rmoe routers NAME`` lists them with their docs).
        expert_backend: How experts run: ``grouped_mm`` (one fused grouped matmul per projection, CUDA),
            ``sliced`` (a matmul on each expert's contiguous slice of the sorted tokens, hand-written backward),
            ``tiled`` (the same, each expert's rows gathered just before: no (T*K, D) copies) or ``auto``
            (``grouped_mm`` where its fused kernel is proven; on CPU ``tiled`` when the copies would reach
            16 MiB, else ``sliced``).
        initializer_range: Std of the normal init; residual output projections are further scaled
            by ``1/sqrt(2 * num_layers)`` (GPT-2) unless ``scale_residual_init`` is false.
        scale_residual_init: See ``initializer_range``.
    """

    vocab_size: int = 0
    hidden_size: int = 128
    num_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = True
    qk_norm: bool = False
    head_dim: int = 0
    tie_word_embeddings: bool = True
    intermediate_size: int = 512
    num_experts: int = 8
    top_k: int = 2
    moe_intermediate_size: int = 128
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    router: str = "linear"
    router_options: dict[str, Any] = field(default_factory=dict)
    expert_backend: Literal["auto", "grouped_mm", "sliced", "tiled"] = "auto"
    initializer_range: float = 0.02
    scale_residual_init: bool = True

    def __post_init__(self) -> None:
        self.mlp_only_layers = list(self.mlp_only_layers)
        self.router_options = dict(self.router_options or {})
        self.validate()

    @property
    def attention_head_dim(self) -> int:
        """The head width Dh: ``head_dim``, or ``hidden_size // num_attention_heads`` when it is 0."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.num_experts > 0
            and layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.is_moe_layer(i)]

    def validate(self) -> None:
        """Check every invariant; raise :class:`RmoeError` naming the key and the expected values."""
        check_field_types(self, "model.arch")
        positive = (
            "hidden_size",
            "num_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "moe_intermediate_size",
            "decoder_sparse_step",
        )
        for key in positive:
            if getattr(self, key) <= 0:
                raise RmoeError(f"model.arch.{key}={getattr(self, key)} must be a positive integer.")
        for key, ok, expected in (
            ("rope_theta", self.rope_theta > 0, "a finite number > 0"),
            ("rms_norm_eps", self.rms_norm_eps > 0, "a finite number > 0"),
            ("initializer_range", self.initializer_range >= 0, "a finite number >= 0"),
        ):
            if not (ok and math.isfinite(getattr(self, key))):
                raise RmoeError(f"model.arch.{key}={getattr(self, key)!r} is invalid; expected {expected}.")
        if self.head_dim < 0:
            raise RmoeError(f"model.arch.head_dim={self.head_dim} must be >= 0 (0: hidden_size / num_attention_heads).")
        if self.head_dim == 0 and self.hidden_size % self.num_attention_heads:
            raise RmoeError(
                f"model.arch.hidden_size={self.hidden_size} is not divisible by "
                f"model.arch.num_attention_heads={self.num_attention_heads}; choose a head count that divides "
                f"it (e.g. {', '.join(str(h) for h in _divisors(self.hidden_size)[:6])})."
            )
        if self.attention_head_dim % 2:
            raise RmoeError(
                f"the head width (model.arch.head_dim, or hidden_size/num_attention_heads)={self.attention_head_dim} "
                "must be even for rotary embeddings."
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise RmoeError(
                f"model.arch.num_attention_heads={self.num_attention_heads} is not divisible by "
                f"model.arch.num_key_value_heads={self.num_key_value_heads} (grouped-query attention needs it)."
            )
        if self.num_experts < 0 or self.shared_expert_intermediate_size < 0:
            raise RmoeError("model.arch.num_experts and model.arch.shared_expert_intermediate_size must be >= 0.")
        if self.num_experts > 0 and not 1 <= self.top_k <= self.num_experts:
            raise RmoeError(
                f"model.arch.top_k={self.top_k} must be between 1 and model.arch.num_experts={self.num_experts}."
            )
        bad_layers = [i for i in self.mlp_only_layers if not 0 <= i < self.num_layers]
        if bad_layers:
            raise RmoeError(
                f"model.arch.mlp_only_layers has {bad_layers}, outside the layer range 0..{self.num_layers - 1}."
            )
        if self.expert_backend not in EXPERT_BACKENDS:
            raise RmoeError(
                f"model.arch.expert_backend={self.expert_backend!r}; expected one of: {', '.join(EXPERT_BACKENDS)}."
            )
        if self.expert_backend == "grouped_mm" and not hasattr(torch.nn.functional, "grouped_mm"):
            raise RmoeError(
                f"model.arch.expert_backend='grouped_mm' needs torch.nn.functional.grouped_mm, which torch "
                f"{torch.__version__} does not have; use 'auto' (it picks grouped_mm where it exists and is "
                "fast), 'sliced' or 'tiled'."
            )
        router_class = get_router_class(self.router)
        # The one parse of the router options: every router of the model gets this object.
        self._router_context = RouterContext(
            router_class=router_class,
            options=router_class.parse_options(self.router_options),
            hidden_size=self.hidden_size,
            num_experts=self.num_experts,
            top_k=self.top_k,
            norm_topk_prob=self.norm_topk_prob,
            initializer_range=self.initializer_range,
            moe_layers=tuple(self.moe_layers),
            vocab_size=self.vocab_size,
        )
        if self.num_experts > 0:
            router_class.check_context(self._router_context)

    def router_context(self) -> RouterContext:
        """What the routers are told about this model (the router seam's only view of the config)."""
        return self._router_context

    def causality(self) -> Causality:
        """Whether this model's router is causal in training and in evaluation (:class:`~rmoe.routers.Causality`)."""
        return self._router_context.causality()

    def causal_evaluation_options(self) -> dict[str, Any] | None:
        """The ``router_options`` that make evaluation causal, training unchanged: ``{}`` when it already is;
        None when the router offers none (``Router.causal_evaluation``). Raises if the offer is not causal."""
        if self.causality().evaluation is None:
            return {}
        offer = self._router_context.router_class.causal_evaluation
        if offer is None:
            return None
        causal = dataclasses.replace(self, router_options={**self.router_options, **offer})
        if causal.causality().evaluation is not None:
            raise RmoeError(f"router {self.router!r}: its causal evaluation {dict(offer)} is not causal in evaluation.")
        return dict(offer)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0 and (n // d) % 2 == 0]


ARCH_KEYS_OF_EXECUTION = ("expert_backend",)
"""``ModelConfig`` keys that say how the model runs, not what it computes."""


def arch_differences(saved: Any, given: Any, saved_name: str, given_name: str) -> list[str]:
    """``model.arch.<key>: <saved> <saved_name>, <given> <given_name>`` for every key that differs between two
    architectures (ModelConfig objects or dicts), except :data:`ARCH_KEYS_OF_EXECUTION`, an unknown (0 or None)
    vocabulary size and router aliases."""
    a, b = (dataclasses.asdict(x) if dataclasses.is_dataclass(x) else dict(x) for x in (saved, given))
    out = []
    for key in sorted(set(a) | set(b)):
        if (
            key in ARCH_KEYS_OF_EXECUTION
            or key.startswith("_")
            or (key == "vocab_size" and not (a.get(key) and b.get(key)))
        ):
            continue
        left, right = _plain(a.get(key)), _plain(b.get(key))
        same_router = key == "router" and ALIASES.get(left, left) == ALIASES.get(right, right)  # an alias
        if left != right and not same_router:
            out.append(f"model.arch.{key}: {left!r} {saved_name}, {right!r} {given_name}")
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
