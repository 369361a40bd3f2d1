"""transformers configuration of an rmoe model exported with custom code (written by ``rmoe export``).

The architecture is rmoe's ``ModelConfig``, stored as a dict under ``rmoe["arch"]``; the usual
transformers attributes (``vocab_size``, ``hidden_size``...) are copied from it for tools that read them.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class RmoeConfig(PretrainedConfig):
    model_type = "rmoe_moe"

    def __init__(self, rmoe: dict[str, Any] | None = None, tie_word_embeddings: bool = True, **kwargs: Any) -> None:
        self.rmoe = dict(rmoe or {})
        arch = self.rmoe.get("arch", {})
        for ours, theirs in (
            ("vocab_size", "vocab_size"),
            ("hidden_size", "hidden_size"),
            ("num_layers", "num_hidden_layers"),
            ("num_attention_heads", "num_attention_heads"),
            ("num_key_value_heads", "num_key_value_heads"),
            ("num_experts", "num_experts"),
            ("top_k", "num_experts_per_tok"),
        ):
            if ours in arch:
                kwargs.setdefault(theirs, arch[ours])
        if self.rmoe.get("context_length"):
            kwargs.setdefault("max_position_embeddings", self.rmoe["context_length"])
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
