"""The peak memory of one CPU training step, measured, against ``rmoe.training.memory``'s estimate.

``python benchmarks/bench_memory.py`` runs each shape in a fresh process (two training steps of
``MoeLMModule``: loss, backward, gradient clipping, fused AdamW) and prints the peak RSS growth next
to :func:`rmoe.training.memory.estimate_step_bytes`. The model is ``configs/base.yaml``'s
(read from the file) with the overrides of each row; ``deep_cpu`` is ``configs/size/deep_cpu.yaml``'s
shape. ``rmoe fit`` refuses a step whose estimate exceeds the free memory and warns above
``estimate x UNDERESTIMATE`` (the largest measured / estimated ratio of this table).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from rmoe.model.config import ModelConfig
from rmoe.training.memory import MIB, UNDERESTIMATE, estimate_step_bytes

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


# ----------------------------------------------------------------------------------------------
# Calibration: the real peak of a training step


def measure_step_bytes(arch: ModelConfig, batch_size: int, block_size: int, steps: int = 2) -> int:
    """Peak RSS growth (bytes) of ``steps`` CPU training steps in a fresh Python process.

    The child warms up with one step of a tiny model (thread pools, kernels), resets its peak RSS
    to the current one (``/proc/self/clear_refs``, read back as ``VmHWM``), then builds
    ``MoeLMModule(arch)`` and a fused AdamW and runs ``steps`` steps of ``_losses``, backward,
    ``clip_grad_norm_(1.0)``, ``step``, ``zero_grad``; the result is the peak RSS minus the RSS
    before the model was built.
    """
    spec = json.dumps({"arch": _arch_dict(arch), "batch_size": batch_size, "block_size": block_size, "steps": steps})
    out = subprocess.run(
        [sys.executable, __file__, "--child", spec],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


def _arch_dict(arch: ModelConfig) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(arch)


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _measure_child(spec_json: str) -> None:
    import gc
    import resource

    from rmoe.training.module import MoeLMModule

    def reset_peak() -> int:
        """Reset the peak RSS to the current RSS (``/proc/self/clear_refs``) and return it. Not
        ``ru_maxrss``: it survives ``execve``, so a child of a large process (a pytest worker)
        would inherit its parent's peak and measure nothing."""
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return _status_kib("VmRSS") or 0
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def peak() -> int:
        return _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def run(module: MoeLMModule, batch: torch.Tensor, steps: int) -> None:
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3, fused=True)
        for _ in range(steps):
            loss = module._losses(batch)[0]["loss"]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del loss

    spec = json.loads(spec_json)
    arch = ModelConfig(**spec["arch"])
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    import dataclasses

    tiny = dataclasses.replace(
        arch, hidden_size=32, num_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=0, mlp_only_layers=[]
    )
    run(MoeLMModule(tiny), torch.randint(0, arch.vocab_size, (2, 33)), 1)
    batch = torch.randint(0, arch.vocab_size, (spec["batch_size"], spec["block_size"] + 1))
    gc.collect()
    before = reset_peak()
    run(MoeLMModule(arch), batch, spec["steps"])
    print(peak() - before)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the two smallest shapes only")
    p.add_argument("--child", metavar="SPEC_JSON", help=argparse.SUPPRESS)  # measure_step_bytes's fresh process
    args = p.parse_args(argv)
    if args.child:
        _measure_child(args.child)
        return
    print(table(CASES[:1] + CASES[4:5] if args.quick else CASES))
    print(f"\nrmoe fit warns above estimate x {UNDERESTIMATE} of the free memory.")


if __name__ == "__main__":
    main()
