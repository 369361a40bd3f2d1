"""The TensorBoard tags of the routing analytics, built and parsed here and nowhere else.

A routing tag is ``moe/{split}/{name}`` followed, for a per-layer value, by ``/layer_{l}`` (``l``
counts the MoE layers, or is the decoder layer index where a tag says so) or, for a value of two
consecutive MoE layers, ``/layer_{l}_{l+1}``; summaries of a series end in ``/mean``,
``/diag_mean``, ... Writers (:mod:`rmoe.metrics.stats`, the analytics callback) call
:func:`series` and :func:`layer_tag`; readers (:mod:`rmoe.runs`, ``rmoe report``) call
:func:`parse_layer_tag` and :func:`layer_pattern`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

PREFIX = "moe"
"""The first part of every routing tag (and the name of its custom-scalars section)."""

_LAYER_TAG = re.compile(r"^(?P<series>.+)/layer_(?P<layer>\d+(?:_\d+)?)$")


def series(split: str, *parts: str) -> str:
    """``moe/{split}/{part}/...``: the tag of a scalar, or the series a per-layer value belongs to
    (``series("val")`` is the root of a split's tags)."""
    return "/".join((PREFIX, split, *parts))


def layer_label(layer: int | tuple[int, int]) -> str:
    """``layer_{l}`` for one layer, ``layer_{l}_{m}`` for a pair of layers."""
    return f"layer_{layer}" if isinstance(layer, int) else f"layer_{layer[0]}_{layer[1]}"


def layer_tag(series_tag: str, layer: int | tuple[int, int]) -> str:
    """``{series}/layer_{l}`` (one layer) or ``{series}/layer_{l}_{m}`` (a pair of layers)."""
    return f"{series_tag}/{layer_label(layer)}"


def parse_layer_tag(tag: str) -> tuple[str, str] | None:
    """``(series, layer)`` of a per-layer tag (``layer`` as written: ``"3"`` or ``"0_1"``), else None."""
    match = _LAYER_TAG.match(tag)
    return (match["series"], match["layer"]) if match else None


def scalar_pattern(split: str, names: Iterable[str]) -> str:
    """A regex of the model-level tags ``moe/{split}/{name}`` of ``names``, the name captured."""
    return rf"^{re.escape(PREFIX)}/{split}/({'|'.join(re.escape(n) for n in names)})$"


def layer_pattern(split: str, names: Iterable[str]) -> str:
    """A regex of the per-layer (and per-pair) tags of ``names`` in ``split``, the name captured."""
    return rf"^{re.escape(PREFIX)}/{split}/({'|'.join(re.escape(n) for n in names)})/layer_\d+(?:_\d+)?$"
