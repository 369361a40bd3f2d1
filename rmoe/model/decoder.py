"""The decoder LM: embedding -> L x [attention, MoE or dense MLP] -> RMSNorm -> head.

Qwen2-MoE architecture (pre-norm RMSNorm, rotary embeddings, grouped-query attention with q/k/v
bias). The decoder threads an opaque router state from each MoE layer to the next; it never
looks inside it. Shapes: B batch, S sequence, D width, H heads, G key/value heads, Dh head dim.
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
from rmoe.routers import Router, RoutingOutput, get_router_class


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
    """cos and sin tables, each (S, Dh), in the rotate-half layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x_BHSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_BHSD.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x_BHSD * cos + rotated * sin).to(x_BHSD.dtype)


class Attention(nn.Module):
    """Causal grouped-query self-attention through ``scaled_dot_product_attention``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        D, Dh = config.hidden_size, self.head_dim
        self.q_proj = nn.Linear(D, self.num_heads * Dh, bias=config.qkv_bias)
        self.k_proj = nn.Linear(D, self.num_kv_heads * Dh, bias=config.qkv_bias)
        self.v_proj = nn.Linear(D, self.num_kv_heads * Dh, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * Dh, D, bias=False)

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q = self.q_proj(x_BSD).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, S, Dh)
        k = self.k_proj(x_BSD).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, G, S, Dh)
        v = self.v_proj(x_BSD).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.num_heads != self.num_kv_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, S, -1))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, shared_router: nn.Module | None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp: SparseMoeBlock | SwiGLU
        if config.is_moe_layer(layer_idx):
            self.mlp = SparseMoeBlock(config, layer_idx, shared_router)
        else:
            self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(
        self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, router_state: Any
    ) -> tuple[torch.Tensor, RoutingOutput | None, Any]:
        x_BSD = x_BSD + self.self_attn(self.input_layernorm(x_BSD), cos, sin)
        h_BSD = self.post_attention_layernorm(x_BSD)
        if isinstance(self.mlp, SparseMoeBlock):
            out_BSD, routing, router_state = self.mlp(h_BSD, router_state)
        else:
            out_BSD, routing = self.mlp(h_BSD), None
        return x_BSD + out_BSD, routing, router_state


@dataclass
class MoeLMOutput:
    """Logits (B, S, V) and, per MoE layer in depth order, the router's decisions."""

    logits: torch.Tensor
    routing: list[RoutingOutput]


class MoeLM(nn.Module):
    """Decoder-only MoE language model (pure PyTorch, no Lightning)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (the data module sets it from the tokenizer)")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        # Router parameters shared by all layers (e.g. RMoE's GRU cell); owned here, once.
        self.shared_router = get_router_class(config.router).build_shared(config) if config.moe_layers else None
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

    def forward(self, input_ids_BS: torch.Tensor) -> MoeLMOutput:
        B, S = input_ids_BS.shape
        x_BSD = self.embed_tokens(input_ids_BS)
        cos, sin = rotary_cos_sin(S, self.config.head_dim, self.config.rope_theta, x_BSD.device)
        router_state: Any = None
        routing: list[RoutingOutput] = []
        for layer in self.layers:
            x_BSD, layer_routing, router_state = layer(x_BSD, cos, sin, router_state)
            if layer_routing is not None:
                routing.append(layer_routing)
        logits = self.lm_head(self.norm(x_BSD))
        return MoeLMOutput(logits=logits, routing=routing)

    def num_parameters(self, *, active: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameter count; ``active`` counts only K of the E routed experts per MoE layer."""
        total = 0
        for name, p in self.named_parameters():
            if exclude_embeddings and ("embed_tokens" in name or "lm_head" in name):
                continue
            n = p.numel()
            if active and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                n = n * self.config.top_k // self.config.num_experts
            total += n
        return total
