"""rmoe.tags: the one schema of the routing tags, built by the writers and parsed by the readers."""

from __future__ import annotations

import re

from rmoe.metrics.stats import summary_scalars
from rmoe.runs import layer_series
from rmoe.tags import layer_pattern, layer_tag, parse_layer_tag, series


def test_tags_round_trip():
    assert series("val", "load_cv") == "moe/val/load_cv" and series("train") == "moe/train"
    assert layer_tag(series("val", "load_cv"), 3) == "moe/val/load_cv/layer_3"
    assert layer_tag(series("val", "top1_mi"), (0, 1)) == "moe/val/top1_mi/layer_0_1"
    assert parse_layer_tag("moe/val/top1_mi/layer_0_1") == ("moe/val/top1_mi", "0_1")
    assert parse_layer_tag("moe/val/load_cv/mean") is None
    pattern = re.compile(layer_pattern("val", ["load_cv", "top1_mi"]))
    assert pattern.match("moe/val/top1_mi/layer_0_1")[1] == "top1_mi"
    assert not pattern.match("moe/train/load_cv/layer_0") and not pattern.match("moe/val/load_cv/mean")


def test_what_the_writer_logs_the_readers_find():
    """summary_scalars (the writer) and layer_series (the reader) agree through the schema."""
    import torch

    from rmoe.metrics.stats import routing_summary
    from rmoe.routers.base import topk_softmax

    torch.manual_seed(0)
    routing = [topk_softmax(torch.randn(32, 4), 2, True) for _ in range(3)]
    scalars = {tag: [(1, value)] for tag, value in summary_scalars(routing_summary(routing, 4), series("val")).items()}
    found = layer_series(scalars, series("val", "load_cv"))
    assert list(found) == ["0", "1", "2"]
    assert list(layer_series(scalars, series("val", "top1_mi"))) == ["0_1", "1_2"]
