"""Looking at the routing of real text: which experts each token gets, which tokens each expert gets
(the ``rmoe inspect`` command).

``rmoe inspect --ckpt runs/base/version_0/checkpoints/last.ckpt --text "def f(x): return x"`` runs
the model on the text (or ``--file``, or the first tokens of a data split with ``--split``) and
prints, per MoE layer, each expert's most frequent tokens (decoded, with counts and share of the
expert's load) and a few short contexts, then, for the first tokens, each token's experts and
weights in every layer and its path through depth (the view of Qwen2-MoE's
``print(expert_idx, top_x.tolist())``, readable). ``--out page.html`` also writes one
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

The package, in the order the command uses it: :mod:`rmoe.inspection.pieces` (tokens as readable
text), :mod:`rmoe.inspection.text_routing` (running the model on a text: :class:`TextRouting`, and the
per-expert summary), :mod:`rmoe.inspection.report` (the terminal report),
:mod:`rmoe.inspection.page` (the HTML page; its template, script and style sheet are the files
``page.html``, ``page.js`` and ``page.css`` next to it, inlined into one file on output) and
:mod:`rmoe.inspection.inspect_cli` (the argument parser and :func:`main`).

Shape legend: T tokens, K chosen experts per token, L MoE layers, V vocabulary.
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
