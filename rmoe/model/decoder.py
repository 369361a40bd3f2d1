"""The decoder LM: embedding -> L x [attention, MoE or dense MLP] -> RMSNorm -> head.

Qwen2-MoE architecture (pre-norm RMSNorm, rotary embeddings, grouped-query attention with q/k/v bias), or
Qwen3-MoE's (``qk_norm``: per-head q/k RMSNorm, no bias). The decoder threads an opaque router state from each MoE
layer to the next. For decoding, a :class:`KVCache` holds each layer's keys and values (the only state across
positions). Shapes: B batch, S new positions, K cached + new positions, D width, H heads, G key/value heads,
Dh head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rmoe.model.config import ModelConfig
from rmoe.model.moe import GroupedExperts, SparseMoeBlock, SwiGLU
from rmoe.routers import Router, RoutingOutput

ROUTED_EXPERT_PARAMETERS = ("experts.gate_up_proj", "experts.down_proj")
"""Name endings of the routed experts' weights (each token uses a share of them, see ``num_parameters``)."""


class RMSNorm(nn.Module):
    """``w * x / sqrt(mean(x^2) + eps)``, computed in fp32 (as transformers' Qwen2MoeRMSNorm)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_cos_sin(
    seq_len: int, head_dim: int, theta: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (S, Dh), in the rotate-half layout, for positions 0..S-1."""
    return rotary_cos_sin_at(torch.arange(seq_len, device=device), head_dim, theta)


def rotary_cos_sin_at(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each ``(*positions.shape, Dh)``, at arbitrary integer positions (fp32), as transformers'
    default ``RotaryEmbedding``: ``inv_freq_j = theta^(-2j/Dh)``, angle ``position * inv_freq`` over both halves."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x_BHSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_BHSD.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x_BHSD * cos + rotated * sin).to(x_BHSD.dtype)


class KVCache:
    """Keys and values of every attention layer, for incremental decoding.

    Per layer two buffers ``(B, G, capacity, Dh)`` that grow by doubling, so appending a token copies that token
    only. The methods are those of transformers' ``Cache`` (``update(key, value, layer_idx)``,
    ``get_seq_length()``), so :class:`Attention` also accepts a ``DynamicCache`` (the exported remote code relies
    on it).

    Only attention has state across positions: routers route each token from its own hidden state, and RMoE's
    router recurs over *depth* (layer to layer within a forward call, for the same token), so a decoding step
    recomputes it for the new token only.
    """

    def __init__(self) -> None:
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._lengths: list[int] = []

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions already cached (0 before the first forward)."""
        return self._lengths[layer_idx] if layer_idx < len(self._lengths) else 0

    def update(
        self, key_BGSD: torch.Tensor, value_BGSD: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new positions of layer ``layer_idx``; return all its keys and values so far."""
        S = key_BGSD.shape[2]
        if layer_idx == len(self._keys):  # first call for this layer: the prompt
            capacity = max(16, 2 * S)
            self._keys.append(key_BGSD.new_empty(*key_BGSD.shape[:2], capacity, key_BGSD.shape[-1]))
            self._values.append(value_BGSD.new_empty(*value_BGSD.shape[:2], capacity, value_BGSD.shape[-1]))
            self._lengths.append(0)
        start = self._lengths[layer_idx]
        end = start + S
        if end > self._keys[layer_idx].shape[2]:  # grow by doubling (amortised O(1) per token)
            for buffers in (self._keys, self._values):
                old = buffers[layer_idx]
                grown = old.new_empty(*old.shape[:2], 2 * end, old.shape[-1])
                grown[:, :, :start] = old[:, :, :start]
                buffers[layer_idx] = grown
        self._keys[layer_idx][:, :, start:end] = key_BGSD
        self._values[layer_idx][:, :, start:end] = value_BGSD
        self._lengths[layer_idx] = end
        return self._keys[layer_idx][:, :, :end], self._values[layer_idx][:, :, :end]


class Attention(nn.Module):
    """Causal grouped-query self-attention through ``scaled_dot_product_attention``.

    Qwen2: q/k/v bias. Qwen3 (``qk_norm``): RMSNorm over each head's Dh of q and k, before the
    rotary embedding (transformers' ``Qwen3MoeAttention``), no bias.
    """

    def __init__(self, config: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.attention_head_dim
        D, Dh = config.hidden_size, self.head_dim
        self.q_proj = nn.Linear(D, self.num_heads * Dh, bias=config.qkv_bias)
        self.k_proj = nn.Linear(D, self.num_kv_heads * Dh, bias=config.qkv_bias)
        self.v_proj = nn.Linear(D, self.num_kv_heads * Dh, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * Dh, D, bias=False)
        self.q_norm = RMSNorm(Dh, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(Dh, config.rms_norm_eps) if config.qk_norm else None

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask_B1SK: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Attention over the S new positions (and the cached ones).

        Args:
            x_BSD: Normalised input of the new positions.
            cos, sin: Rotary tables broadcastable to (B, H, S, Dh).
            mask_B1SK: Boolean, True where query s may attend to key k (K = cached + S); None: plain causal
                attention over these S positions.
            cache: Keys and values of earlier positions, appended to in place.
        """
        B, S, _ = x_BSD.shape
        q = self.q_proj(x_BSD).view(B, S, self.num_heads, self.head_dim)
        k = self.k_proj(x_BSD).view(B, S, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x_BSD).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, G, S, Dh)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q.transpose(1, 2), cos, sin)  # (B, H, S, Dh)
        k = apply_rotary(k.transpose(1, 2), cos, sin)  # (B, G, S, Dh)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, G, K, Dh)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask_B1SK, is_causal=mask_B1SK is None, enable_gqa=self.num_heads != self.num_kv_heads
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, S, -1))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, shared_router: nn.Module | None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp: SparseMoeBlock | SwiGLU
        if config.is_moe_layer(layer_idx):
            self.mlp = SparseMoeBlock(config, layer_idx, shared_router)
        else:
            self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        router_state: Any,
        mask_B1SK: torch.Tensor | None = None,
        cache: KVCache | None = None,
        token_ids_BS: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, RoutingOutput | None, Any]:
        x_BSD = x_BSD + self.self_attn(self.input_layernorm(x_BSD), cos, sin, mask_B1SK, cache)
        h_BSD = self.post_attention_layernorm(x_BSD)
        if isinstance(self.mlp, SparseMoeBlock):
            out_BSD, routing, router_state = self.mlp(h_BSD, router_state, token_ids_BS)
        else:
            out_BSD, routing = self.mlp(h_BSD), None
        return x_BSD + out_BSD, routing, router_state


def attention_mask_and_positions(
    attention_mask_BK: torch.Tensor | None, num_new: int, num_cached: int, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The boolean attention mask (B, 1, S, K) and position ids of S new tokens after K - S cached ones.

    Args:
        attention_mask_BK: 1 for real tokens, 0 for (left) padding, over all K = cached + new positions
            (transformers' 2-D ``attention_mask``); None: no padding.

    Returns:
        ``(mask_B1SK, positions)``: mask None when plain causal attention is exact (no padding, nothing cached);
        positions (S,) without padding, else (B, S) counted over real tokens only (``cumsum(mask) - 1``, as
        transformers does), so a left-padded prompt gets the positions it would have alone. Each query always sees
        itself, so a padding row is never all masked (which would give NaN); padding outputs are never read.
    """
    K = num_cached + num_new
    if attention_mask_BK is None:
        positions = torch.arange(num_cached, K, device=device)
        if num_cached == 0:
            return None, positions
        query_S1 = positions[:, None]
        mask_SK = torch.arange(K, device=device)[None, :] <= query_S1
        return mask_SK[None, None], positions
    if attention_mask_BK.shape[1] != K:
        raise ValueError(f"attention_mask has {attention_mask_BK.shape[1]} positions; expected cached + new = {K}")
    real_BK = attention_mask_BK.to(device=device, dtype=torch.bool)
    positions_BS = (real_BK.long().cumsum(-1) - 1).clamp(min=0)[:, num_cached:]
    query_S = torch.arange(num_cached, K, device=device)
    key_K = torch.arange(K, device=device)
    causal_SK = key_K[None, :] <= query_S[:, None]
    mask_BSK = (causal_SK[None] & real_BK[:, None, :]) | (key_K[None, :] == query_S[:, None])[None]
    return mask_BSK[:, None], positions_BS


@dataclass
class MoeLMOutput:
    """Logits (B, S, V), the routers' decisions per MoE layer in depth order, and the KV cache passed in (if any)."""

    logits: torch.Tensor
    routing: list[RoutingOutput]
    cache: KVCache | None = None


class MoeLM(nn.Module):
    """Decoder-only MoE language model (pure PyTorch, no Lightning)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (the data module sets it from the tokenizer)")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        # Router parameters shared by all layers (e.g. RMoE's GRU cell); owned here, once.
        self.shared_router = (
            config.router_context().router_class.build_shared(config.router_context()) if config.moe_layers else None
        )
        self.layers = nn.ModuleList(DecoderLayer(config, i, self.shared_router) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) for every matrix; residual outputs scaled by 1/sqrt(2L)."""
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.num_layers) if self.config.scale_residual_init else std
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual_out = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(module.weight, std=residual_std if is_residual_out else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, GroupedExperts):
                nn.init.normal_(module.gate_up_proj, std=std)
                nn.init.normal_(module.down_proj, std=residual_std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for module in self.modules():  # routers (and their shared part) own their init
            if isinstance(module, Router) or (module is self.shared_router and module is not None):
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()

    def forward(
        self,
        input_ids_BS: torch.Tensor,
        attention_mask_BK: torch.Tensor | None = None,
        cache: KVCache | None = None,
        position_ids_BS: torch.Tensor | None = None,
    ) -> MoeLMOutput:
        """Logits of every position; each MoE layer's router takes the previous MoE layer's router state.

        Args:
            input_ids_BS: Token ids of the new positions.
            attention_mask_BK: Optional 1/0 mask over cached + new positions (0: left padding).
            cache: Optional :class:`KVCache` (or a transformers ``Cache``) of the earlier positions; the new ones
                are appended. Training passes none of these and takes the plain causal path.
            position_ids_BS: Optional explicit positions (default: from the mask, else consecutive).
        """
        B, S = input_ids_BS.shape
        x_BSD = self.embed_tokens(input_ids_BS)
        Dh, theta = self.config.attention_head_dim, self.config.rope_theta
        if attention_mask_BK is None and cache is None and position_ids_BS is None:  # training: plain causal
            mask_B1SK = None
            cos, sin = rotary_cos_sin(S, Dh, theta, x_BSD.device)
        else:
            num_cached = cache.get_seq_length() if cache is not None else 0
            mask_B1SK, positions = attention_mask_and_positions(attention_mask_BK, S, num_cached, x_BSD.device)
            if position_ids_BS is not None:
                positions = position_ids_BS
            cos, sin = rotary_cos_sin_at(positions, Dh, theta)
            if cos.dim() == 3:  # (B, S, Dh) -> (B, 1, S, Dh): broadcast over heads
                cos, sin = cos[:, None], sin[:, None]
        router_state: Any = None
        routing: list[RoutingOutput] = []
        for layer in self.layers:
            x_BSD, layer_routing, router_state = layer(x_BSD, cos, sin, router_state, mask_B1SK, cache, input_ids_BS)
            if layer_routing is not None:
                routing.append(layer_routing)
        logits = self.lm_head(self.norm(x_BSD))
        return MoeLMOutput(logits=logits, routing=routing, cache=cache)

    def num_parameters(self, *, active: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameter count; ``active`` counts only K of the E routed experts per MoE layer."""
        total = 0
        for name, p in self.named_parameters():
            if exclude_embeddings and ("embed_tokens" in name or "lm_head" in name):
                continue
            n = p.numel()
            if active and name.endswith(ROUTED_EXPERT_PARAMETERS):
                n = n * self.config.top_k // self.config.num_experts
            total += n
        return total
