"""``rmoe inspect``: which experts each token of a real text gets, and which tokens each expert gets.

``rmoe inspect --ckpt runs/base/version_0/checkpoints/last.ckpt --text "def f(x): return x"`` routes the text
(or ``--file``, or the first tokens of a data split with ``--split``) and prints, per MoE layer, each expert's
most frequent tokens and a few contexts, then each of the first tokens' experts and weights in every layer
(Qwen2-MoE's ``print(expert_idx, top_x.tolist())``, readable). ``--out page.html`` also writes a
self-contained interactive page. Every router works; pairs a capacity router dropped are shown as dropped.

Modules, in the order the command uses them: :mod:`~rmoe.inspection.pieces` (tokens as readable text),
:mod:`~rmoe.inspection.text_routing` (running the model on a text, the per-expert summary),
:mod:`~rmoe.inspection.report` (the terminal report), :mod:`~rmoe.inspection.page` (the HTML page, from
``page.html``, ``page.js`` and ``page.css``) and :mod:`~rmoe.inspection.inspect_cli` (the command line).
"""

from rmoe.inspection.inspect_cli import build_parser, main
from rmoe.inspection.page import page_data, render_html, write_page
from rmoe.inspection.pieces import Piece, byte_pieces, token_pieces
from rmoe.inspection.report import format_report
from rmoe.inspection.text_routing import TextRouting, expert_summary, route_text

__all__ = [
    "Piece",
    "TextRouting",
    "build_parser",
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
