"""Looking at the routing of real text: which experts each token gets, which tokens each expert gets
(the ``rmoe inspect`` command).

``rmoe inspect --ckpt runs/base/version_0/checkpoints/last.ckpt --text "def f(x): return x"`` runs
the model on the text (or ``--file``, or the first tokens of a data split with ``--split``) and
prints, per MoE layer, each expert's most frequent tokens (decoded, with counts and share of the
expert's load) and a few short contexts, then, for the first tokens, each token's experts and
weights in every layer and its path through depth (the view of Qwen2-MoE's
``print(expert_idx, top_x.tolist())``, readable). ``--html page.html`` also writes one
self-contained page (inline CSS and JS, no network at view time): the text coloured by each token's
top expert in a chosen layer, a layer switch, hover or click for a token's experts and weights in
every layer, and per expert its top tokens.

Routers: every router works. Pairs a capacity router dropped (LocMoE; ``keep_TK`` False) are shown
as dropped (``x`` in the terminal, struck through on the page); for expert choice, whose
``expert_ids_TK`` lists all E experts, only the experts that took the token are shown, and a
token no expert took is dropped. The model sees each chunk of at most ``context_length`` tokens
as one sequence of a batch of one, so capacity routers route it as they would a batch of that
many tokens. Tokenizers: each token is shown as the text it decodes to; a byte of a multi-byte
UTF-8 character (byte tokenizer) shows the character on its first byte (``é[1/2]``) and a BPE
piece that is not valid UTF-8 on its own shows its bytes (``<0xE2 0x80>``); control characters
are escaped (``\\n``, ``<0x07>``), special tokens are ``<eos>``, ``<pad>``.

Shape legend: T tokens, K chosen experts per token, L MoE layers, V vocabulary.
"""

from __future__ import annotations

import argparse
import html
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rmoe.errors import RmoeError, ToolArgumentParser
from rmoe.routers import tokens_per_expert

if TYPE_CHECKING:
    from rmoe.data.tokenizer import Tokenizer
    from rmoe.model.decoder import MoeLM

DEFAULT_MAX_TOKENS = 2048
DEFAULT_TABLE_TOKENS = 40
DEFAULT_TOP = 6
DEFAULT_CONTEXTS = 3
CONTEXT_WIDTH = 6  # tokens each side of a context


# ----------------------------------------------------------------------------------------------
# Tokens as readable text
# ----------------------------------------------------------------------------------------------


@dataclass
class Piece:
    """One token for display.

    Attributes:
        text: What the token adds to the running text ("" for a continuation byte of a character).
        label: A readable name of the token alone (spaces as ``␣``, ``\\n``, ``é[2/2]``, ``<0xFF>``).
    """

    text: str
    label: str


def _escape(text: str) -> str:
    """Control characters as escapes (``\\n``, ``\\t``, ``<0x07>``); the rest unchanged."""
    out = []
    for ch in text:
        if ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 32 or 0x7F <= ord(ch) < 0xA0:
            out.append(f"<0x{ord(ch):02X}>")
        else:
            out.append(ch)
    return "".join(out)


def _label(text: str) -> str:
    return _escape(text).replace(" ", "␣") if text else "∅"


def _hex(data: bytes) -> str:
    return "<" + " ".join(f"0x{b:02X}" for b in data) + ">"


def _utf8_length(lead: int) -> int:
    """Length of the UTF-8 sequence a lead byte starts (0: not a lead byte)."""
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


def byte_pieces(ids: Sequence[int], specials: dict[int, str]) -> list[Piece]:
    """Pieces of byte-tokenizer ids: each complete UTF-8 character is shown on its first byte
    (``é[1/2]``, then ``é[2/2]`` with no text), stray bytes as ``<0xHH>``, specials by name."""
    pieces: list[Piece | None] = [None] * len(ids)
    i = 0
    while i < len(ids):
        b = ids[i]
        if b in specials or not 0 <= b < 256:
            name = specials.get(b, f"<id {b}>")
            pieces[i] = Piece(name, name)
            i += 1
            continue
        n = _utf8_length(b)
        chunk = bytes(ids[i : i + n]) if n and all(0 <= x < 256 for x in ids[i : i + n]) else b""
        try:
            char = chunk.decode("utf-8") if len(chunk) == n and n else None
        except UnicodeDecodeError:
            char = None
        if char is None:
            pieces[i] = Piece(_hex(bytes([b])), _hex(bytes([b])))
            i += 1
            continue
        if n == 1:
            text = char if char in "\n\t" or (ord(char) >= 32 and ord(char) != 0x7F) else _hex(chunk)
            pieces[i] = Piece(text, _label(char))
        else:
            for k in range(n):
                pieces[i + k] = Piece(char if k == 0 else "", f"{_escape(char)}[{k + 1}/{n}]")
        i += n
    return [p for p in pieces if p is not None]


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (each byte as a printable character), inverted: char -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _raw_token(tokenizer: Tokenizer, token_id: int) -> str | None:
    backend = getattr(tokenizer, "backend", None)
    if backend is None:
        return None
    if hasattr(backend, "id_to_token"):  # tokenizers.Tokenizer (our BPE)
        return backend.id_to_token(token_id)
    if hasattr(backend, "convert_ids_to_tokens"):  # transformers
        return backend.convert_ids_to_tokens(token_id)
    return None


def token_pieces(tokenizer: Tokenizer, ids: Sequence[int]) -> list[Piece]:
    """Readable pieces of ``ids`` for any tokenizer (see the module docstring)."""
    specials = {tokenizer.eos_id: "<eos>", tokenizer.pad_id: "<pad>"}
    if tokenizer.kind == "byte":
        return byte_pieces(list(ids), specials)
    decoder = _byte_level_decoder()
    cache: dict[int, Piece] = {}
    out = []
    for token_id in ids:
        if token_id not in cache:
            if token_id in specials:
                cache[token_id] = Piece(specials[token_id], specials[token_id])
            else:
                text = tokenizer.decode([token_id])
                if "\ufffd" in text or not text:
                    raw = _raw_token(tokenizer, token_id) or ""
                    if raw and all(ch in decoder for ch in raw):  # byte-level BPE: its bytes
                        text = _hex(bytes(decoder[ch] for ch in raw))
                    else:
                        text = raw or f"<id {token_id}>"
                    cache[token_id] = Piece(text, _escape(text))
                else:
                    cache[token_id] = Piece(text, _label(text))
        out.append(cache[token_id])
    return out


# ----------------------------------------------------------------------------------------------
# Routing of a text
# ----------------------------------------------------------------------------------------------


@dataclass
class TextRouting:
    """The routing of one text, every MoE layer.

    Attributes:
        token_ids: (T,) int64.
        pieces: One :class:`Piece` per token.
        expert_ids_LTK, weights_LTK: Chosen experts and combine weights per MoE layer.
        keep_LTK: False where a capacity router dropped the pair (all True without capacity).
        num_experts: E.
        layer_indices: The decoder layer of each MoE layer.
        expert_choice: Whether ``expert_ids_TK`` lists all E experts (expert choice): then an
            unkept pair means "not chosen", not "dropped".
    """

    token_ids: torch.Tensor
    pieces: list[Piece]
    expert_ids_LTK: torch.Tensor
    weights_LTK: torch.Tensor
    keep_LTK: torch.Tensor
    num_experts: int
    layer_indices: list[int]
    expert_choice: bool

    @property
    def num_layers(self) -> int:
        return self.expert_ids_LTK.shape[0]

    def token_experts(self, layer: int, t: int) -> list[tuple[int, float, bool]]:
        """``[(expert, weight, kept)]`` of token t in MoE layer ``layer``, highest weight first;
        for expert choice only the experts that took it."""
        pairs = [
            (int(e), float(w), bool(k))
            for e, w, k in zip(self.expert_ids_LTK[layer, t], self.weights_LTK[layer, t], self.keep_LTK[layer, t])
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
    """Run ``model`` on ``token_ids`` in chunks of at most ``context_length`` tokens (one sequence each)
    and gather every MoE layer's routing.

    Raises:
        RmoeError: Empty input, or a model without MoE layers.
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
    per_layer: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = [[] for _ in config.moe_layers]
    for start in range(0, ids.numel(), chunk):
        out = model(ids[start : start + chunk][None].to(device))
        for l, r in enumerate(out.routing):
            keep = r.keep_TK if r.keep_TK is not None else torch.ones_like(r.expert_ids_TK, dtype=torch.bool)
            per_layer[l].append((r.expert_ids_TK.cpu(), r.weights_TK.float().cpu(), keep.cpu()))
    stacked = [torch.stack([torch.cat([part[i] for part in layer]) for layer in per_layer]) for i in range(3)]
    expert_ids_LTK, weights_LTK, keep_LTK = stacked
    return TextRouting(
        token_ids=ids,
        pieces=token_pieces(tokenizer, ids.tolist()),
        expert_ids_LTK=expert_ids_LTK,
        weights_LTK=weights_LTK,
        keep_LTK=keep_LTK,
        num_experts=config.num_experts,
        layer_indices=list(config.moe_layers),
        expert_choice=expert_ids_LTK.shape[-1] == config.num_experts and config.top_k < config.num_experts,
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
        return _escape("".join(p.text for p in routing.pieces[max(a, 0) : b]))

    return {
        "position": t,
        "left": text(t - CONTEXT_WIDTH, t),
        "token": routing.pieces[t].label,
        "right": text(t + 1, t + 1 + CONTEXT_WIDTH),
    }


# ----------------------------------------------------------------------------------------------
# Terminal report
# ----------------------------------------------------------------------------------------------


def _pairs_text(pairs: list[tuple[int, float, bool]]) -> str:
    """``3:0.62 1:x`` (expert:weight, x = dropped); ``dropped`` when no expert took the token."""
    if not pairs:
        return "dropped"
    return " ".join(f"{e}:{w:.2f}" if k else f"{e}:x" for e, w, k in pairs)


def format_report(
    routing: TextRouting,
    summary: list[Any],
    *,
    table_tokens: int = DEFAULT_TABLE_TOKENS,
    header: str = "",
) -> str:
    """The terminal report: per layer each expert's top tokens and contexts, then the per-token table."""
    lines = [header] if header else []
    for l, experts in enumerate(summary):
        lines.append(f"\n== MoE layer {l} (decoder layer {routing.layer_indices[l]}) ==")
        for ex in experts:
            lines.append(
                f"expert {ex['expert']}: {ex['load']} tokens ({100 * ex['share_of_layer']:.1f}% of the layer's pairs)"
            )
            if ex["top"]:
                lines.append(
                    "   top: " + "  ".join(f"'{t['label']}' {t['count']} ({100 * t['share']:.0f}%)" for t in ex["top"])
                )
            for c in ex["contexts"]:
                lines.append(f"   …{c['left']}[{c['token']}]{c['right']}…")
    n = min(table_tokens, routing.token_ids.numel())
    if n:
        lines.append(f"\n== Routing of the first {n} tokens (expert:weight, highest first; x = dropped by capacity) ==")
        widths = [
            max(len(_pairs_text(routing.token_experts(l, t))) for t in range(n)) for l in range(routing.num_layers)
        ]
        label_width = max(min(max(len(routing.pieces[t].label) for t in range(n)) + 2, 14), len("token"))
        head = f"{'pos':>5}  {'token':<{label_width}}  " + "  ".join(
            f"{'layer ' + str(l):<{max(w, 7)}}" for l, w in enumerate(widths)
        )
        lines.append(head + "  path (top-1 per layer)")
        top_LT = routing.top_expert_LT()
        for t in range(n):
            cells = "  ".join(f"{_pairs_text(routing.token_experts(l, t)):<{max(w, 7)}}" for l, w in enumerate(widths))
            path = " → ".join("x" if e < 0 else str(int(e)) for e in top_LT[:, t])
            label = "'" + routing.pieces[t].label + "'"
            lines.append(f"{t:>5}  {label:<{label_width}}  {cells}  {path}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# HTML page
# ----------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.2em; color: #222; }
h1 { font-size: 1.15em; margin: 0 0 .3em; } .meta { color: #555; font-size: .85em; margin-bottom: .8em; }
#controls { margin-bottom: .6em; } #controls select { font-size: 1em; }
#legend span { display: inline-block; padding: 0 .45em; margin: .15em; border-radius: 3px; font-size: .85em; }
#text { font-family: ui-monospace, monospace; font-size: 14px; line-height: 1.9; white-space: pre-wrap;
  border: 1px solid #ccc; padding: .6em; max-height: 22em; overflow-y: auto; }
#text span.tok { border-radius: 2px; cursor: pointer; padding: 1px 0; }
#text span.tok.empty { display: inline-block; min-width: 3px; }
#text span.tok.dropped { background: #ddd !important; text-decoration: line-through; outline: 1px dashed #888; }
#text span.tok.selected { outline: 2px solid #000; }
#panes { display: flex; gap: 1.5em; margin-top: .8em; align-items: flex-start; }
#detail { min-width: 22em; } #experts { flex: 1; }
table { border-collapse: collapse; font-size: .85em; } td, th { padding: .15em .5em; border-bottom: 1px solid #eee;
  text-align: left; vertical-align: top; }
.sw { display: inline-block; width: .9em; height: .9em; border-radius: 2px; vertical-align: middle;
  margin-right: .3em; }
.drop { color: #a00; } .path { font-family: ui-monospace, monospace; }
"""

_JS = r"""
"use strict";
window.addEventListener("error", function (ev) {
  document.body.setAttribute("data-errors", (document.body.getAttribute("data-errors") || "") + ev.message + ";");
});
(function () {
  const D = JSON.parse(document.getElementById("rmoe-data").textContent);
  const E = D.num_experts, L = D.num_layers;
  // tab10 lightened (its grey left out: grey is "dropped"); more experts: golden-angle hues
  const PALETTE = ["#8fbbd9", "#ffbf86", "#95cf95", "#ea9393", "#c9b3de", "#c5aaa5", "#f1bbe0", "#dddd90", "#8bdee7"];
  const color = function (e) {
    if (e < 0) return "#ddd";
    return E <= PALETTE.length ? PALETTE[e] : "hsl(" + Math.round((e * 137.508) % 360) + ", 65%, 78%)";
  };
  const el = function (tag, attrs, text) {
    const n = document.createElement(tag);
    for (const k in attrs || {}) n.setAttribute(k, attrs[k]);
    if (text !== undefined) n.textContent = text;
    return n;
  };
  const params = new URLSearchParams(location.hash.slice(1));
  let layer = Math.min(Math.max(parseInt(params.get("layer") || D.layer, 10) || 0, 0), L - 1);
  let pinned = params.has("token") ? parseInt(params.get("token"), 10) : null;
  const select = document.getElementById("layer");
  for (let l = 0; l < L; l++) {
    select.appendChild(el("option", {value: l}, "MoE layer " + l + " (decoder layer " + D.layer_indices[l] + ")"));
  }
  select.value = layer;
  const legend = document.getElementById("legend");
  for (let e = 0; e < E; e++) {
    const s = el("span", {}, "expert " + e);
    s.style.background = color(e);
    legend.appendChild(s);
  }
  const dropped = el("span", {}, "dropped");
  dropped.style.background = "#ddd";
  dropped.style.textDecoration = "line-through";
  legend.appendChild(dropped);

  const text = document.getElementById("text");
  const spans = D.tokens.map(function (tok, t) {
    const s = el("span", {"class": "tok" + (tok.t === "" ? " empty" : ""), "data-t": t}, tok.t);
    s.title = tok.l;
    s.addEventListener("mouseenter", function () { if (pinned === null) showToken(t); });
    s.addEventListener("click", function () { pinned = pinned === t ? null : t; paint(); showToken(t); });
    text.appendChild(s);
    return s;
  });
  const pairsText = function (pairs) {
    if (!pairs.length) return "dropped";
    return pairs.map(function (p) { return "e" + p[0] + " " + (p[2] ? p[1].toFixed(2) : "dropped"); }).join(", ");
  };
  function showToken(t) {
    const box = document.getElementById("detail");
    box.replaceChildren();
    const tok = D.tokens[t];
    box.appendChild(el("h3", {}, "token " + t + ": '" + tok.l + "' (id " + tok.id + ")"));
    const path = D.routes.map(function (r) { return r[t].length && r[t][0][2] ? "e" + r[t][0][0] : "x"; });
    box.appendChild(el("div", {"class": "path", "id": "path"}, "path: " + path.join(" \u2192 ")));
    const table = el("table", {"id": "token-table"});
    const head = el("tr"); head.appendChild(el("th", {}, "layer")); head.appendChild(el("th", {}, "experts (weight)"));
    table.appendChild(head);
    for (let l = 0; l < L; l++) {
      const row = el("tr", {"data-layer": l});
      row.appendChild(el("td", {}, String(l)));
      const cell = el("td");
      const pairs = D.routes[l][t];
      if (!pairs.length) cell.appendChild(el("span", {"class": "drop"}, "dropped"));
      pairs.forEach(function (p) {
        const item = el("span", {}, "");
        const sw = el("span", {"class": "sw"}); sw.style.background = color(p[0]);
        item.appendChild(sw);
        const label = "e" + p[0] + " " + (p[2] ? p[1].toFixed(3) : "dropped") + "  ";
        item.appendChild(el("span", {"class": p[2] ? "" : "drop"}, label));
        cell.appendChild(item);
      });
      row.appendChild(cell);
      table.appendChild(row);
    }
    box.appendChild(table);
    box.setAttribute("data-token", t);
    box.setAttribute("data-pairs", pairsText(D.routes[layer][t]));
  }
  function showExperts() {
    const box = document.getElementById("experts");
    box.replaceChildren();
    const title = "Experts of MoE layer " + layer + ": most frequent tokens (share of the expert's load)";
    box.appendChild(el("h3", {}, title));
    const table = el("table", {"id": "expert-table"});
    D.experts[layer].forEach(function (ex) {
      const row = el("tr", {"data-expert": ex.expert});
      const name = el("td"); const sw = el("span", {"class": "sw"}); sw.style.background = color(ex.expert);
      name.appendChild(sw); name.appendChild(document.createTextNode("e" + ex.expert + " (" + ex.load + ")"));
      row.appendChild(name);
      row.appendChild(el("td", {}, ex.top.map(function (t) {
        return "'" + t.label + "' " + t.count + " (" + Math.round(100 * t.share) + "%)";
      }).join("   ")));
      table.appendChild(row);
    });
    box.appendChild(table);
  }
  function paint() {
    D.tokens.forEach(function (tok, t) {
      const e = D.top[layer][t];
      spans[t].style.background = color(e);
      spans[t].classList.toggle("dropped", e < 0);
      spans[t].classList.toggle("selected", pinned === t);
      spans[t].setAttribute("data-expert", e);
    });
  }
  select.addEventListener("change", function () {
    layer = parseInt(select.value, 10);
    paint();
    showExperts();
    if (pinned !== null) showToken(pinned);
  });
  paint(); showExperts();
  if (pinned !== null && pinned >= 0 && pinned < D.tokens.length) showToken(pinned); else pinned = null;
  document.body.setAttribute("data-status", "ready");
})();
"""


def page_data(routing: TextRouting, summary: list[Any], *, title: str, meta: str, layer: int = 0) -> dict[str, Any]:
    """The JSON the page renders: tokens, per layer each token's ``[expert, weight, kept]`` pairs and
    top expert (-1: dropped), per layer each expert's load and top tokens."""
    top_LT = routing.top_expert_LT()
    return {
        "title": title,
        "meta": meta,
        "num_experts": routing.num_experts,
        "num_layers": routing.num_layers,
        "layer_indices": routing.layer_indices,
        "layer": layer,
        "tokens": [
            {"t": p.text, "l": p.label, "id": int(i)} for p, i in zip(routing.pieces, routing.token_ids.tolist())
        ],
        "routes": [
            [[[e, round(w, 4), k] for e, w, k in routing.token_experts(l, t)] for t in range(routing.token_ids.numel())]
            for l in range(routing.num_layers)
        ],
        "top": top_LT.tolist(),
        "experts": [
            [{"expert": ex["expert"], "load": ex["load"], "top": ex["top"]} for ex in experts] for experts in summary
        ],
    }


def render_html(data: dict[str, Any]) -> str:
    """A self-contained page (inline CSS, JS and data; nothing fetched at view time)."""
    payload = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(data["title"])}</title>
<style>{_CSS}</style></head>
<body>
<h1>{html.escape(data["title"])}</h1>
<div class="meta">{html.escape(data["meta"])}</div>
<div id="controls"><label>colour by the top expert of <select id="layer"></select></label>
<span id="legend"></span></div>
<div id="text"></div>
<div id="panes"><div id="detail"><h3>hover a token (click to pin it)</h3></div><div id="experts"></div></div>
<script type="application/json" id="rmoe-data">{payload}</script>
<script>{_JS}</script>
</body></html>
"""


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``rmoe inspect`` argument parser (errors raise :class:`RmoeError`)."""
    parser = ToolArgumentParser(
        prog="rmoe inspect",
        description="Which experts each token of a text gets and which tokens each expert gets, "
        "in the terminal and as a self-contained HTML page.",
    )
    parser.add_argument("--ckpt", required=True, help="checkpoint (<run>/checkpoints/*.ckpt) or `rmoe export` folder.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="the text to route.")
    source.add_argument("--file", help="a UTF-8 text file to route.")
    source.add_argument("--split", help="route the first tokens of this data split (train, val, test).")
    parser.add_argument(
        "--config", action="append", help="with --split: YAML config(s) whose data: section rebuilds the data."
    )
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="tokens to route at most.")
    parser.add_argument("--html", help="also write the interactive page to this file.")
    parser.add_argument("--layer", type=int, default=0, help="MoE layer the page colours by at first (default 0).")
    parser.add_argument("--top", type=int, default=DEFAULT_TOP, help="top tokens per expert (default 6).")
    parser.add_argument(
        "--table-tokens", type=int, default=DEFAULT_TABLE_TOKENS, help="tokens in the per-token table (default 40)."
    )
    parser.add_argument("--tokenizer", help="override the tokenizer (default: the run's).")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu).")
    return parser


def _split_ids(ckpt: Path, split: str, config: list[str] | None, vocab_size: int, max_tokens: int) -> list[int]:
    from rmoe.evaluation.splits import split_datamodule

    try:
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise RmoeError(f"--ckpt {ckpt} is not a readable rmoe checkpoint: {type(err).__name__}: {err}") from None
    datamodule, _ = split_datamodule(ckpt, checkpoint, split, vocab_size, config)
    ids: list[int] = []
    for batch in getattr(datamodule, f"{split}_dataloader")():
        for row in batch:
            ids.extend(row[:-1].tolist())  # consecutive blocks share their boundary token
            if len(ids) >= max_tokens:
                return ids[:max_tokens]
    return ids


def inspect(args: argparse.Namespace) -> tuple[TextRouting, list[Any], str]:
    """Load, tokenise, route; returns the routing, the expert summary and the report header."""
    from rmoe.inference import load_model

    for name in ("max_tokens", "top", "table_tokens"):
        if getattr(args, name) < 1:
            raise RmoeError(f"--{name.replace('_', '-')}={getattr(args, name)} must be a positive integer.")
    loaded = load_model(args.ckpt, tokenizer=args.tokenizer, device=args.device)
    tokenizer, config = loaded.tokenizer, loaded.model.config
    if args.split is not None:
        if Path(args.ckpt).is_dir():
            raise RmoeError("--split needs a training checkpoint (*.ckpt), not an export folder: use --text or --file.")
        ids = _split_ids(Path(args.ckpt), args.split, args.config, config.vocab_size, args.max_tokens)
        source = f"the first tokens of the {args.split} split"
    else:
        if args.file is not None:
            path = Path(args.file)
            if not path.is_file():
                raise RmoeError(f"--file {path}: no such file.")
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as err:
                raise RmoeError(f"--file {path} is not UTF-8 text (byte {err.start}).") from None
            source = str(path)
        else:
            text, source = args.text, "--text"
        if not text.strip():
            raise RmoeError(f"the text ({source}) is empty: nothing to inspect.")
        ids = tokenizer.encode(text)[: args.max_tokens]
    if not 0 <= args.layer < len(config.moe_layers):
        raise RmoeError(f"--layer={args.layer}: the model has MoE layers 0..{len(config.moe_layers) - 1}.")
    routing = route_text(loaded.model, tokenizer, ids, loaded.context_length)
    summary = expert_summary(routing, top=args.top)
    header = (
        f"rmoe inspect: {args.ckpt} (router {config.router}, {routing.num_layers} MoE layers, "
        f"{config.num_experts} experts, top-{config.top_k}); {routing.token_ids.numel()} tokens of {source}"
    )
    return routing, summary, header


def main(argv: list[str]) -> None:
    """``rmoe inspect ...``: print the routing of a text and optionally write the HTML page.

    Raises:
        RmoeError: For any bad input (the ``rmoe`` entry point prints it and exits with 2).
    """
    args = build_parser().parse_args(argv)
    routing, summary, header = inspect(args)
    print(format_report(routing, summary, table_tokens=args.table_tokens, header=header))
    if args.html:
        path = Path(args.html)
        path.parent.mkdir(parents=True, exist_ok=True)
        title = f"rmoe inspect: {Path(args.ckpt).name}"
        data = page_data(routing, summary, title=title, meta=header.removeprefix("rmoe inspect: "), layer=args.layer)
        path.write_text(render_html(data), encoding="utf-8")
        print(f"\nrmoe inspect: wrote {path}")


def write_page(
    routing: TextRouting, path: str | os.PathLike[str], *, title: str = "rmoe inspect", layer: int = 0
) -> Path:
    """Write the HTML page of a :class:`TextRouting` (for scripts and notebooks)."""
    path = Path(path)
    path.write_text(render_html(page_data(routing, expert_summary(routing), title=title, meta="", layer=layer)))
    return path


__all__ = [
    "Piece",
    "TextRouting",
    "byte_pieces",
    "expert_summary",
    "format_report",
    "main",
    "page_data",
    "render_html",
    "route_text",
    "token_pieces",
    "write_page",
]
