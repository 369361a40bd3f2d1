"""Hash routing (Roller et al., "Hash Layers For Large Sparse Models", arXiv 2106.04426): a fixed random map from
token id to experts, no router parameter, no balancing.

Eq. of Sec. 3: ``h_t = sum_{e in hash(x_t)} (1/K) FFN_e(h_t)``, with ``x_t`` the token's id (the layer's input token,
not its hidden state) and ``hash(v)`` the K distinct experts of id ``v``: the first K of a uniformly random
permutation of the E experts, drawn once per id (the paper's "Random Hash"; K = 1 is its Hash Layer).

Choices the paper leaves open, made here:
- K > 1: the K experts are combined with weights ``1/K``, whatever ``norm_topk_prob`` (they already sum to one).
  Roller's MultiHash is not this: it splits one FFN into K segments, each picked by its own hash, and concatenates
  them; the mean of K whole experts is its token-choice form, equal in active compute to top-K token choice.
- Each MoE layer draws its own map (``per_layer``): the authors' code (ParlAI, ``projects/params_vs_compute``) has
  one hash layer, and its map would be the same in every layer (it reseeds the same generator).
- The map is drawn from a CPU generator seeded from ``seed`` and the layer index only: the same for every run,
  process and device, whatever the global RNG. It is a persistent buffer, so checkpoints and exports carry it and
  stay right if torch's generator ever changes; it covers every id below ``max(vocab_size option, model vocab)``,
  so no id the embedding accepts can fall outside it.
- ``logits_TE`` are zeros (so ``probs_TE`` is uniform): the router has no scores to learn. The balance loss then
  reads ``E sum_e f_e / E = 1`` and the z-loss ``log(E)^2`` whatever the routing, neither with a gradient, and the
  metrics see uniform probabilities (gate entropy ``log E``); the loads are the map's.

Causal: a token's experts read its own id only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rmoe.errors import RmoeError
from rmoe.routers.base import CAUSAL, Causality, Router, RoutingOutput
from rmoe.routers.registry import register_router

if TYPE_CHECKING:
    from rmoe.routers.base import RouterContext


@dataclass
class HashOptions:
    """Args:
    seed: Seed of the random maps (each layer's is drawn from it and the layer's index; the global RNG plays
        no part).
    vocab_size: Token ids the map covers: null for the model's vocabulary (``model.arch.vocab_size``); at least
        that when set (a larger map routes the model's ids by its first rows).
    per_layer: Each MoE layer draws its own map; false: every layer routes with the same map (layer 0's).
    """

    seed: int = 0
    vocab_size: int | None = None
    per_layer: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed={self.seed} must be an integer in [0, 2**63)")
        if self.vocab_size is not None and self.vocab_size <= 0:
            raise ValueError(f"vocab_size={self.vocab_size} must be a positive integer (null: model.arch.vocab_size)")


def hash_map(num_ids: int, num_experts: int, top_k: int, seed: int) -> torch.Tensor:
    """``(V, K)`` int64 on the CPU: row ``v`` is the first K of a uniformly random permutation of the E experts,
    drawn independently for every id from a CPU generator seeded with ``seed`` (O(V K^2), no (V, E) buffer)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    experts_VK = torch.empty(num_ids, top_k, dtype=torch.int64, device="cpu")
    for k in range(top_k):
        # uniform rank r among the E - k experts the id has not taken; skipping the taken ones in ascending order
        # turns it into the r-th untaken expert
        pick_V = torch.randint(num_experts - k, (num_ids,), generator=gen, device="cpu")
        for taken_V in experts_VK[:, :k].sort(dim=-1).values.unbind(dim=-1):
            pick_V += pick_V >= taken_V
        experts_VK[:, k] = pick_V
    return experts_VK


def layer_seed(seed: int, layer_idx: int) -> int:
    """The map seed of decoder layer ``layer_idx``: the ``layer_idx``-th of a stream of 62-bit seeds drawn from
    ``seed`` (no two (seed, layer) pairs share a stream position, unlike ``seed + layer_idx``)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return int(torch.randint(2**62, (layer_idx + 1,), generator=gen, device="cpu")[layer_idx])


def map_size(config: RouterContext) -> int:
    """Rows of the map: ``router_options.vocab_size``, or the model's vocabulary; refused when it cannot cover it."""
    wanted, model_vocab = config.options.vocab_size, config.vocab_size
    if wanted is None and model_vocab <= 0:
        raise RmoeError(
            "router 'hash' builds its map when the model is built and needs the vocabulary size, but "
            "model.arch.vocab_size is 0 (not set yet: the data module sets it from the tokenizer) and "
            "model.arch.router_options.vocab_size is null; set either."
        )
    if wanted is not None and wanted < model_vocab:
        raise RmoeError(
            f"model.arch.router_options.vocab_size={wanted} is smaller than model.arch.vocab_size={model_vocab}: "
            "router 'hash' needs a map row for every token id; set it to at least the model's vocabulary, or null "
            "to take it."
        )
    return model_vocab if wanted is None else wanted


@register_router("hash")
class HashRouter(Router):
    """Hash Layers (arXiv 2106.04426): token id ``v`` goes to the K experts of row ``v`` of a fixed random map (the
    first K of a random permutation of the experts), each with weight ``1/K``; causal, no trainable parameter.

    The map ``expert_map_VK`` is a persistent int buffer (int16 up to 2**15 experts), saved with the model.
    """

    Options = HashOptions

    def __init__(self, config: RouterContext, layer_idx: int, shared: nn.Module | None = None) -> None:
        super().__init__(config, layer_idx, shared)
        num_ids = map_size(config)
        seed = layer_seed(self.options.seed, layer_idx if self.options.per_layer else 0)
        dtype = torch.int16 if config.num_experts <= 2**15 else torch.int32  # a quarter of int64's memory
        experts_VK = hash_map(num_ids, config.num_experts, config.top_k, seed).to(dtype)
        self.expert_map_VK: torch.Tensor
        self.register_buffer("expert_map_VK", experts_VK, persistent=True)

    @classmethod
    def causality(cls, config: RouterContext) -> Causality:
        return CAUSAL  # a token's experts and weights read its own id only

    def forward(
        self, x_TD: torch.Tensor, state: Any, token_ids_BS: torch.Tensor | None = None
    ) -> tuple[RoutingOutput, Any]:
        if token_ids_BS is None:
            raise RmoeError(
                "router 'hash' routes each token by its id, so it needs the token ids: call it as "
                "router(x_TD, state, token_ids_BS) (the decoder always passes them)."
            )
        T, E, K = x_TD.shape[0], self.num_experts, self.top_k
        if token_ids_BS.numel() != T:
            raise RmoeError(f"router 'hash' got {token_ids_BS.numel()} token ids for {T} hidden states.")
        expert_ids_TK = self.expert_map_VK[token_ids_BS.reshape(-1)].long()
        # no scores: zero logits, uniform probabilities (the balance loss and z-loss are constants without gradient)
        logits_TE = torch.zeros(T, E, dtype=torch.float32, device=x_TD.device)
        probs_TE = torch.full((T, E), 1.0 / E, dtype=torch.float32, device=x_TD.device)
        weights_TK = torch.full((T, K), 1.0 / K, dtype=torch.float32, device=x_TD.device)
        return RoutingOutput(logits_TE, probs_TE, weights_TK, expert_ids_TK), state
