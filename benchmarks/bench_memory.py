"""The peak memory of one CPU training step, measured, against ``rmoe.training.memory``'s estimate.

``python benchmarks/bench_memory.py`` runs each shape in a fresh process (two training steps of
``MoeLMModule``: loss, backward, gradient clipping, fused AdamW) and prints the peak RSS growth next
to :func:`rmoe.training.memory.estimate_step_bytes`. The model is ``configs/base.yaml``'s
(read from the file) with the overrides of each row; ``deep_cpu`` is ``configs/experiment/deep_cpu.yaml``'s
shape. ``rmoe fit`` refuses a step whose estimate exceeds the free memory and warns above
``estimate x UNDERESTIMATE`` (the largest measured / estimated ratio of this table).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from rmoe.model.config import ModelConfig
from rmoe.training.memory import MIB, UNDERESTIMATE, estimate_step_bytes, measure_step_bytes

ROOT = Path(__file__).resolve().parents[1]
DEEP_CPU = {"hidden_size": 96, "num_layers": 12, "intermediate_size": 192, "moe_intermediate_size": 96}

CASES: tuple[tuple[str, dict[str, Any], int, int], ...] = (
    # name, ModelConfig overrides of base.yaml's model, batch size, block size
    ("base", {}, 16, 256),
    ("base", {}, 16, 2048),
    ("base", {}, 4, 16384),
    ("base", {}, 1, 65536),
    ("deep_cpu", DEEP_CPU, 16, 128),
    ("deep_cpu", DEEP_CPU, 8, 4096),
    ("K=4,shared", {"top_k": 4, "shared_expert_intermediate_size": 256}, 8, 2048),
    ("dense", {"num_experts": 0, "intermediate_size": 384}, 8, 4096),
    ("gru", {"router": "gru", "router_options": {"state_dim": 128}}, 8, 2048),
)


def base_arch() -> dict[str, Any]:
    """``model.arch`` of configs/base.yaml, with the byte tokenizer's padded vocabulary (320)."""
    arch = yaml.safe_load((ROOT / "configs/base.yaml").read_text())["model"]["arch"]
    return {**arch, "vocab_size": 320}


def table(cases: tuple[tuple[str, dict[str, Any], int, int], ...] = CASES) -> str:
    rows = [
        "| model | batch | block | tokens | measured MiB | estimated MiB | est/meas |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, overrides, batch, block in cases:
        arch = ModelConfig(**{**base_arch(), **overrides})
        measured = measure_step_bytes(arch, batch, block)
        estimated = estimate_step_bytes(arch, batch, block)
        rows.append(
            f"| {name} | {batch} | {block} | {batch * block} | {measured / MIB:.0f} | {estimated / MIB:.0f} | "
            f"{estimated / measured:.2f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the two smallest shapes only")
    args = p.parse_args(argv)
    print(table(CASES[:1] + CASES[4:5] if args.quick else CASES))
    print(f"\nrmoe fit warns above estimate x {UNDERESTIMATE} of the free memory.")


if __name__ == "__main__":
    main()
