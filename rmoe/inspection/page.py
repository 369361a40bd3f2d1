"""The HTML page of ``rmoe inspect``: one self-contained file (inline CSS, JS and data; nothing is
fetched at view time).

It is built from the template ``page.html`` (placeholders ``{{title}}``, ``{{meta}}``, ``{{css}}``,
``{{data}}``, ``{{js}}``), ``page.css`` and ``page.js``, which renders the JSON of :func:`page_data`: the text
coloured by each token's top expert in a chosen layer, a layer switch, hover or click for a token's experts
and weights in every layer, and per expert its top tokens (``#layer=1&token=3`` selects a layer and a token).
"""

from __future__ import annotations

import html
import json
import os
import re
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from rmoe.inspection.text_routing import TextRouting, expert_summary

_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


@cache
def _asset(name: str) -> str:
    """The text of ``page.html``, ``page.css`` or ``page.js``."""
    return resources.files("rmoe.inspection").joinpath(name).read_text(encoding="utf-8")


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
    """The page's HTML."""
    values = {
        "title": html.escape(data["title"]),
        "meta": html.escape(data["meta"]),
        "css": _asset("page.css"),
        "js": _asset("page.js"),
        "data": json.dumps(data, ensure_ascii=False).replace("</", "<\\/"),
    }
    # one pass: a value that happens to contain "{{...}}" (a title, the text) is not substituted again
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], _asset("page.html"))


def write_page(
    routing: TextRouting, path: str | os.PathLike[str], *, title: str = "rmoe inspect", layer: int = 0
) -> Path:
    """Write the HTML page of a :class:`TextRouting` (for scripts and notebooks)."""
    path = Path(path)
    page = render_html(page_data(routing, expert_summary(routing), title=title, meta="", layer=layer))
    path.write_text(page, encoding="utf-8")
    return path
