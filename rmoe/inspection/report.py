"""The terminal report of ``rmoe inspect``: per MoE layer each expert's load, top tokens and
contexts, then the per-token table (experts and weights in every layer, path through depth)."""

from __future__ import annotations

from typing import Any

from rmoe.inspection.text_routing import TextRouting

DEFAULT_TABLE_TOKENS = 40


def _pairs_text(pairs: list[tuple[int, float, bool]]) -> str:
    """``3:0.62 1:x`` (expert:weight, x = dropped); ``dropped`` when no expert took the token."""
    if not pairs:
        return "dropped"
    return " ".join(f"{e}:{w:.2f}" if k else f"{e}:x" for e, w, k in pairs)


def format_report(
    routing: TextRouting, summary: list[Any], *, table_tokens: int = DEFAULT_TABLE_TOKENS, header: str = ""
) -> str:
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
