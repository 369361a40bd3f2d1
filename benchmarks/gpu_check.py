"""The GPU check: a short training run on the fast paths, printing throughput and MFU.

On a GPU machine (every visible GPU; DDP when there are several)::

    python benchmarks/gpu_check.py                    # base.yaml + size/gpu.yaml model, 300 steps
    python benchmarks/gpu_check.py --steps 100 trainer.devices=1
    python benchmarks/gpu_check.py --cpu              # the reduced CPU mode (what the tests run)

It trains ``configs/base.yaml`` + ``configs/size/gpu.yaml`` (~70M parameters, 16 experts, top-2) on the
embedded byte-level corpus with ``bf16-mixed``, compiled layers (``model.compile=true``) and the
``grouped_mm`` expert backend, with validation (3 times) and the routing analytics on and no
checkpoints, then prints the median of
``train/tokens_per_sec`` and ``train/mfu`` (logged by :class:`~rmoe.training.callbacks.TokenThroughput`)
over the second half of the steps (after compilation). ``--cpu`` runs the same command on the CPU
(2 processes with DDP, bf16 autocast, ``grouped_mm``; not compiled: no C++ toolchain is assumed) on
the quick model, so the script itself is tested without a GPU. Extra ``key=value`` arguments go to
``rmoe fit``.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]  # the repository: configs/ are read from it


def fit_args(cpu: bool, steps: int, num_devices: int, overrides: list[str]) -> list[str]:
    """The ``rmoe fit`` arguments of the check."""
    size = "configs/quick.yaml" if cpu else "configs/size/gpu.yaml"
    args = ["--config", str(ROOT / "configs/base.yaml"), "--config", str(ROOT / size)]
    throughput = "{class_path: rmoe.training.callbacks.TokenThroughput, init_args: {window: 10}}"
    analytics = (
        f"{{class_path: rmoe.training.analytics.RoutingAnalytics, init_args: {{every_n_steps: {max(1, steps // 6)}}}}}"
    )
    args += [
        f"trainer.accelerator={'cpu' if cpu else 'gpu'}",
        f"trainer.devices={num_devices}",
        f"trainer.strategy={'ddp' if num_devices > 1 else 'auto'}",
        "trainer.precision=bf16-mixed",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={max(1, steps // 3)}",  # validation and routing analytics on, as in a real run
        f"trainer.limit_val_batches={2 if cpu else 10}",
        "trainer.enable_checkpointing=false",
        f"trainer.callbacks=[{throughput}, {analytics}]",
        "trainer.logger.init_args.name=gpu_check",
        f"model.compile={'false' if cpu else 'true'}",
        "model.arch.expert_backend=grouped_mm",
        "data.tokenizer=byte",
    ]
    if not cpu:
        args += ["data.max_train_bytes=20000000", "data.max_eval_bytes=1000000"]
    return args + overrides


def summarise(log_dir: Path, steps: int) -> dict[str, float]:
    """Median of ``train/tokens_per_sec`` and ``train/mfu`` over the second half of the steps (robust to
    the few windows a validation falls in), the last ``val/loss`` and how many routing-analytics
    scalars were logged."""
    from rmoe.runs import read_scalars

    series = read_scalars(log_dir, pattern=r"^(train/(tokens_per_sec|mfu)|val/loss|moe/.*)$")
    out = {
        tag.split("/")[1]: statistics.median(v for s, v in points if s >= steps // 2)
        for tag, points in series.items()
        if tag.startswith("train/") and any(s >= steps // 2 for s, _ in points)
    }
    if series.get("val/loss"):
        out["val_loss"] = series["val/loss"][-1][1]
    out["analytics_tags"] = float(sum(1 for tag in series if tag.startswith("moe/")))
    return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the check; returns (and on rank 0 prints) the measured tokens/s and MFU."""
    parser = argparse.ArgumentParser(prog="python benchmarks/gpu_check.py", description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="reduced mode: the quick model on 2 CPU processes")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: 300 on GPU, 6 on CPU)")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for rmoe fit")
    args = parser.parse_args(argv)
    steps = args.steps or (6 if args.cpu else 300)
    num_devices = 2 if args.cpu else max(1, torch.cuda.device_count())
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA device is visible; use --cpu for the reduced CPU mode")

    from rmoe.cli import build_cli

    cli = build_cli(["fit", *fit_args(args.cpu, steps, num_devices, args.overrides)])
    trainer = cli.trainer
    if not trainer.is_global_zero:
        return {}
    measured = summarise(Path(trainer.logger.log_dir), steps)
    device = "cpu" if args.cpu else torch.cuda.get_device_name(0)
    print(
        f"gpu_check: {trainer.world_size} x {device}, {trainer.strategy.__class__.__name__}, bf16-mixed, "
        f"compile={not args.cpu}, grouped_mm, {steps} steps: "
        f"tokens/s {measured.get('tokens_per_sec', float('nan')):.0f}, "
        f"MFU {measured.get('mfu', float('nan')):.3f}"
        + (" (no peak FLOP/s known for the CPU)" if args.cpu else "")
        + f", val/loss {measured.get('val_loss', float('nan')):.4f}, {measured['analytics_tags']:.0f} routing tags"
    )
    return measured


if __name__ == "__main__":
    main()
