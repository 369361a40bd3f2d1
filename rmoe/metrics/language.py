"""Language-model metrics from ``loss``, the token-weighted mean cross entropy in nats. Bits per byte divide by
the split's UTF-8 bytes per token (``TextDataModule.bytes_per_token``), so runs with different tokenizers compare.
"""

from __future__ import annotations

import math

LN2 = math.log(2.0)
MAX_LOG_PERPLEXITY = 50.0
"""Perplexity is ``exp(min(loss, 50))``: finite (5e21) for a diverged run instead of inf."""


def perplexity(loss: float) -> float:
    """``exp(loss)``, capped at ``exp(50)``."""
    return math.exp(min(loss, MAX_LOG_PERPLEXITY))


def bits_per_byte(loss: float, bytes_per_token: float) -> float:
    """Bits per UTF-8 byte of text: ``loss / ln 2 / bytes_per_token``."""
    return loss / LN2 / bytes_per_token


def language_metrics(loss: float, bytes_per_token: float | None = None) -> dict[str, float]:
    """``{"loss", "ppl"}`` and, when the bytes per token are known, ``"bpb"``."""
    out = {"loss": loss, "ppl": perplexity(loss)}
    if bytes_per_token is not None:
        out["bpb"] = bits_per_byte(loss, bytes_per_token)
    return out
