"""Expert parallelism: the all-to-all's traffic per token and MoE layer against the expert compute.

``python benchmarks/ep_comm.py`` prints the model on paper (no GPU cluster at hand): for
``configs/size/gpu.yaml`` and ``configs/size/medium_gpu.yaml`` (the RMoE paper's medium model), at
ep = 2, 4, 8, the bytes one token sends and receives per MoE layer in a training step, and that traffic's
time at NVLink and InfiniBand bandwidths over the time of the same token's expert FLOPs at an H100's bf16
peak. ``--measure`` also runs ``rmoe fit`` with ``configs/strategy/ep.yaml`` on CPU processes (gloo) at
ep = 2 and 4 and prints the rows each process sent per token and MoE layer next to the model's value, and
the measured share of the step spent in the all-to-alls (``ep/*`` in TensorBoard), as a check of the
model's shape.

The model, per token and MoE layer, uniform routing over the E experts, bf16 (2 bytes):
- a token's K (token, expert) pairs leave its process with probability (ep - 1) / ep; each is a row of D
  values sent there and its output sent back (forward), and the same two rows of gradients (backward):
  ``4 K D 2 (ep - 1) / ep`` bytes per training step;
- the experts compute ``6 K D F`` FLOPs per token forward (three D x F matmuls per pair), 3x that in training;
- ratio = comm time / compute time = ``(4 K D 2 (ep-1)/ep / bandwidth) / (18 K D F / peak)``, which does not
  depend on D or K: ``4 peak (ep-1)/ep / (9 F bandwidth)``. Small experts (F = 232-256 here) cannot hide
  their all-to-all behind their matmuls; the overlap torchtitan and Megatron-Core build is worth it from
  F of a few thousand at NVLink speed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
H100_BF16_PEAK = 989e12  # FLOP/s, dense (rmoe.training.callbacks.PEAK_BF16_FLOPS)
LINKS = {"NVLink 4 (450 GB/s)": 450e9, "InfiniBand NDR (50 GB/s)": 50e9}  # per GPU, one direction
BYTES = 2  # bf16


def arch_of(config: str) -> dict:
    return yaml.safe_load((ROOT / config).read_text())["model"]["arch"]


def paper_rows() -> list[str]:
    lines = [
        "| config | D | F | K | ep | bytes / token / MoE layer (train step) | expert GFLOP / token / layer |"
        + "".join(f" comm / compute, {name} |" for name in LINKS),
        "|---|---|---|---|---|---|---|" + "---|" * len(LINKS),
    ]
    for config in ("configs/size/gpu.yaml", "configs/size/medium_gpu.yaml"):
        arch = arch_of(config)
        D, F, K = arch["hidden_size"], arch["moe_intermediate_size"], arch["top_k"]
        flops = 18 * K * D * F
        for ep in (2, 4, 8):
            comm = 4 * K * D * BYTES * (ep - 1) / ep
            ratios = "".join(f" {(comm / bw) / (flops / H100_BF16_PEAK):.1f} |" for bw in LINKS.values())
            lines.append(f"| {config} | {D} | {F} | {K} | {ep} | {comm:,.0f} | {flops / 1e9:.4f} |{ratios}")
    return lines


def scalars(log_dir: Path, prefix: str) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {t: [e.value for e in events.Scalars(t)] for t in events.Tags()["scalars"] if t.startswith(prefix)}


def measure(steps: int) -> list[str]:
    lines = [
        "| ep | processes | rows sent / token / MoE layer (measured, mean over steps and processes) | model "
        "(uniform) | load imbalance (mean) | all-to-all share of the step (mean) |",
        "|---|---|---|---|---|---|",
    ]
    arch = {**arch_of("configs/base.yaml"), **arch_of("configs/quick.yaml")}
    K, layers, batch, block = arch["top_k"], arch["num_layers"], 4, 128
    with tempfile.TemporaryDirectory() as tmp:
        for ep in (2, 4):
            name = f"ep{ep}"
            command = [
                sys.executable, "-m", "rmoe", "fit", "--config", "configs/base.yaml", "--config", "configs/quick.yaml",
                "--config", "configs/strategy/ep.yaml", "trainer.accelerator=cpu", f"trainer.devices={ep}",
                f"trainer.strategy.init_args.expert_parallel_size={ep}", f"trainer.max_steps={steps}",
                "trainer.log_every_n_steps=1", "trainer.val_check_interval=null", "trainer.limit_val_batches=0",
                f"data.batch_size={batch}", f"trainer.logger.init_args.save_dir={tmp}",
                f"trainer.logger.init_args.name={name}",
            ]  # fmt: skip
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
            values = scalars(Path(tmp) / name / "version_0", "ep/")
            tokens_per_process = batch * block * layers
            sent = [v for r in range(ep) for v in values[f"ep/sent/rank{r}"][1:]]  # step 0 warms up
            per_token = sum(sent) / len(sent) / tokens_per_process
            imbalance = sum(values["ep/load_imbalance"][1:]) / (len(values["ep/load_imbalance"]) - 1)
            share = values["ep/all_to_all_share"]
            lines.append(
                f"| {ep} | {ep} | {per_token:.3f} | {K * (ep - 1) / ep:.3f} | {imbalance:.3f} | "
                f"{sum(share) / len(share):.3f} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true", help="also run rmoe fit on CPU processes at ep=2 and 4")
    parser.add_argument("--steps", type=int, default=12, help="optimiser steps of each measured run")
    args = parser.parse_args()
    print("\n".join(paper_rows()))
    if args.measure:
        print()
        print("\n".join(measure(args.steps)))


if __name__ == "__main__":
    main()
