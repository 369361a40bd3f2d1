"""The routing of one text through every MoE layer (:func:`route_text`) and, per expert, its most
frequent tokens and a few contexts (:func:`expert_summary`).

Pairs a capacity router dropped (``keep_TK`` False) are kept as dropped; for expert choice, whose
``expert_ids_TK`` lists all E experts, only the experts that took a token count.

Shape legend: T tokens, K chosen experts per token, L MoE layers, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from rmoe.errors import RmoeError
from rmoe.inspection.pieces import Piece, escape, token_pieces
from rmoe.routers import tokens_per_expert

if TYPE_CHECKING:
    from rmoe.data.tokenizer import Tokenizer
    from rmoe.model.decoder import MoeLM

DEFAULT_TOP = 6
DEFAULT_CONTEXTS = 3
CONTEXT_WIDTH = 6  # tokens each side of a context


@dataclass
class TextRouting:
    """The routing of one text, every MoE layer.

    Attributes:
        token_ids: (T,) int64.
        expert_ids_LTK, weights_LTK: Chosen experts and combine weights.
        keep_LTK: False where a capacity router dropped the pair (all True without capacity).
        layer_indices: The decoder layer of each MoE layer.
        expert_choice: ``expert_ids_TK`` lists all E experts: an unkept pair means "not chosen", not "dropped".
        chosen_LTK: A dynamic-k router's used slots (None: all); an unused slot is neither shown nor dropped.
    """

    token_ids: torch.Tensor
    pieces: list[Piece]
    expert_ids_LTK: torch.Tensor
    weights_LTK: torch.Tensor
    keep_LTK: torch.Tensor
    num_experts: int
    layer_indices: list[int]
    expert_choice: bool
    chosen_LTK: torch.Tensor | None = None

    @property
    def num_layers(self) -> int:
        return self.expert_ids_LTK.shape[0]

    def token_experts(self, layer: int, t: int) -> list[tuple[int, float, bool]]:
        """``[(expert, weight, kept)]`` of token t in MoE layer ``layer``, highest weight first;
        for expert choice only the experts that took it."""
        chosen = self.chosen_LTK[layer, t] if self.chosen_LTK is not None else [True] * self.keep_LTK.shape[-1]
        pairs = [
            (int(e), float(w), bool(k))
            for e, w, k, c in zip(
                self.expert_ids_LTK[layer, t], self.weights_LTK[layer, t], self.keep_LTK[layer, t], chosen
            )
            if c
        ]
        if self.expert_choice:
            pairs = [p for p in pairs if p[2]]
        return sorted(pairs, key=lambda p: (not p[2], -p[1], p[0]))

    def top_expert_LT(self) -> torch.Tensor:
        """Each token's highest-weight kept expert per layer, -1 where every pair was dropped: (L, T)."""
        weights = self.weights_LTK.masked_fill(~self.keep_LTK, float("-inf"))
        best = weights.argmax(dim=-1, keepdim=True)
        top = self.expert_ids_LTK.gather(-1, best).squeeze(-1)
        return top.masked_fill(~self.keep_LTK.any(dim=-1), -1)

    def expert_token_counts(self, layer: int) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """``(load_E, {expert: (V',2) [token id, count] most frequent first})`` for one layer, kept pairs."""
        ids_TK, keep_TK = self.expert_ids_LTK[layer], self.keep_LTK[layer]
        E = self.num_experts
        load_E = tokens_per_expert(ids_TK, E, keep_TK)
        tokens_TK = self.token_ids[:, None].expand_as(ids_TK)
        out = {}
        for e in range(E):
            mask = (ids_TK == e) & keep_TK
            values, counts = torch.unique(tokens_TK[mask], return_counts=True)
            order = torch.argsort(counts, descending=True, stable=True)
            out[e] = torch.stack([values[order], counts[order]], dim=1)
        return load_E, out


@torch.no_grad()
def route_text(
    model: MoeLM, tokenizer: Tokenizer, token_ids: Sequence[int], context_length: int | None = None
) -> TextRouting:
    """Run ``model`` on ``token_ids`` and gather every MoE layer's routing.

    Each chunk of at most ``context_length`` tokens is one sequence of a batch of one, so capacity routers
    route it as they would a batch of that many tokens. RmoeError for empty input or no MoE layer.
    """
    config = model.config
    if not config.moe_layers:
        raise RmoeError("the model has no MoE layer: there is no routing to inspect.")
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    if ids.numel() == 0:
        raise RmoeError("the text is empty after tokenisation: nothing to inspect.")
    if int(ids.max()) >= config.vocab_size:
        raise RmoeError(f"token id {int(ids.max())} is outside the model's vocabulary of {config.vocab_size}.")
    device = next(model.parameters()).device
    chunk = context_length or ids.numel()
    model.eval()
    per_layer: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in config.moe_layers]
    dynamic = False
    for start in range(0, ids.numel(), chunk):
        out = model(ids[start : start + chunk][None].to(device))
        for l, r in enumerate(out.routing):
            every = torch.ones_like(r.expert_ids_TK, dtype=torch.bool)
            keep = r.keep_TK if r.keep_TK is not None else every
            dynamic = dynamic or r.chosen_TK is not None
            chosen = r.chosen_TK if r.chosen_TK is not None else every
            per_layer[l].append((r.expert_ids_TK.cpu(), r.weights_TK.float().cpu(), keep.cpu(), chosen.cpu()))
    stacked = [torch.stack([torch.cat([part[i] for part in layer]) for layer in per_layer]) for i in range(4)]
    expert_ids_LTK, weights_LTK, keep_LTK, chosen_LTK = stacked
    return TextRouting(
        token_ids=ids,
        pieces=token_pieces(tokenizer, ids.tolist()),
        expert_ids_LTK=expert_ids_LTK,
        weights_LTK=weights_LTK,
        keep_LTK=keep_LTK,
        num_experts=config.num_experts,
        layer_indices=list(config.moe_layers),
        expert_choice=expert_ids_LTK.shape[-1] == config.num_experts
        and config.top_k < config.num_experts
        and not dynamic,
        chosen_LTK=chosen_LTK if dynamic else None,
    )


def expert_summary(routing: TextRouting, *, top: int = DEFAULT_TOP, num_contexts: int = DEFAULT_CONTEXTS) -> list[Any]:
    """Per layer, per expert: ``{"expert", "load", "share_of_layer", "top": [{"token_id", "label",
    "count", "share"}], "contexts": [{"position", "left", "token", "right"}]}`` (share = of the
    expert's load; contexts: the first occurrences of its top tokens routed to it)."""
    layers = []
    total_pairs = routing.keep_LTK.sum(dim=(1, 2))
    for l in range(routing.num_layers):
        load_E, tokens = routing.expert_token_counts(l)
        ids_TK, keep_TK = routing.expert_ids_LTK[l], routing.keep_LTK[l]
        experts = []
        for e in range(routing.num_experts):
            load = int(load_E[e])
            rows = tokens[e][:top].tolist()
            top_tokens = [
                {
                    "token_id": v,
                    "label": routing.pieces[int((routing.token_ids == v).nonzero()[0])].label,
                    "count": c,
                    "share": c / load if load else 0.0,
                }
                for v, c in rows
            ]
            routed_T = ((ids_TK == e) & keep_TK).any(dim=-1)
            contexts = []
            for v, _ in rows:
                if len(contexts) >= num_contexts:
                    break
                positions = (routed_T & (routing.token_ids == v)).nonzero().flatten().tolist()
                if positions:
                    contexts.append(_context(routing, positions[0]))
            experts.append(
                {
                    "expert": e,
                    "load": load,
                    "share_of_layer": load / max(int(total_pairs[l]), 1),
                    "top": top_tokens,
                    "contexts": contexts,
                }
            )
        layers.append(experts)
    return layers


def _context(routing: TextRouting, t: int) -> dict[str, Any]:
    def text(a: int, b: int) -> str:
        return escape("".join(p.text for p in routing.pieces[max(a, 0) : b]))

    return {
        "position": t,
        "left": text(t - CONTEXT_WIDTH, t),
        "token": routing.pieces[t].label,
        "right": text(t + 1, t + 1 + CONTEXT_WIDTH),
    }
