"""Every router config on the ``grouped_mm`` expert backend against ``sliced``: one training step each.

For each ``configs/router/*.yaml`` (every registered router and every ablation), a model is built
twice from the same seed, once per backend, and takes one forward and backward in bf16 autocast on
the same batch: the loss and the gradient norm must agree to ``--rtol`` and every gradient entry to
``--grad-tol`` of the largest (the routing is fp32 in both, so only the experts' bf16 matmuls
differ, in summation order), and all must be finite: the rows ``F.grouped_mm`` leaves
uninitialised (dropped pairs of capacity routers) must not reach the gradients. The same
comparison runs on CPU in ``tests/test_backends.py``.

Usage::

    python benchmarks/router_check.py                       # on the GPU (cuda), the default shape
    python benchmarks/router_check.py --device cpu --tokens 256 --hidden-size 64   # a CPU dry run
    python benchmarks/router_check.py --json routers.json

Prints one line per router config and exits 1 if any disagrees.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from rmoe.model.config import ModelConfig
from rmoe.model.decoder import MoeLM

ROOT = Path(__file__).resolve().parents[1]


def router_configs() -> dict[str, tuple[str, dict]]:
    """``configs/router/<name>.yaml`` -> (router, router_options)."""
    out = {}
    for path in sorted((ROOT / "configs/router").glob("*.yaml")):
        arch = yaml.safe_load(path.read_text())["model"]["arch"]
        out[path.stem] = (arch["router"], dict(arch.get("router_options") or {}))
    return out


def one_step(config: ModelConfig, ids: torch.Tensor, device: torch.device, seed: int) -> tuple[float, torch.Tensor]:
    """(loss, flat gradient) of one forward and backward in bf16 autocast."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-causal routers warn at construction
        model = MoeLM(config).to(device).train()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        logits = model(ids[:, :-1]).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    grads = [p.grad.float().flatten() for p in model.parameters() if p.grad is not None]
    return float(loss.detach()), torch.cat(grads)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per step (batch x sequence)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-experts", type=int, default=16)
    p.add_argument("--expert-size", type=int, default=256)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--rtol", type=float, default=0.02, help="allowed relative difference of loss and grad norm")
    p.add_argument("--grad-tol", type=float, default=0.05, help="allowed largest |gradient difference|, as a fraction "
                   "of the largest gradient entry")  # fmt: skip
    p.add_argument("--only", nargs="*", help="router config names (default: all of configs/router/)")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    configs = router_configs()
    if args.only:
        configs = {name: configs[name] for name in args.only}
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab_size, (args.tokens // args.seq_len, args.seq_len + 1), generator=gen).to(device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"router_check: torch {torch.__version__} on {card}, "
          f"{ids.shape[0]}x{args.seq_len} tokens, d={args.hidden_size}, {args.num_layers} layers, "
          f"E={args.num_experts} K={args.top_k} F={args.expert_size}, bf16 autocast")  # fmt: skip
    results, failed = [], []
    for name, (router, options) in configs.items():
        heads = max(1, args.hidden_size // 64)
        arch = dict(vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_layers=args.num_layers,
                    num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                    intermediate_size=args.top_k * args.expert_size, num_experts=args.num_experts, top_k=args.top_k,
                    moe_intermediate_size=args.expert_size, router=router, router_options=options)  # fmt: skip
        start = time.perf_counter()
        row = {"config": name, "router": router}
        try:
            ref_loss, ref_grad = one_step(ModelConfig(**arch, expert_backend="sliced"), ids, device, seed=0)
            loss, grad = one_step(ModelConfig(**arch, expert_backend="grouped_mm"), ids, device, seed=0)
            ref_norm, norm = float(ref_grad.norm()), float(grad.norm())
            max_diff = float((grad - ref_grad).abs().max() / ref_grad.abs().max().clamp(min=1e-12))
            ok = (
                all(math.isfinite(v) for v in (loss, norm))
                and bool(torch.isfinite(grad).all())
                and abs(loss - ref_loss) <= args.rtol * abs(ref_loss)
                and abs(norm - ref_norm) <= args.rtol * ref_norm
                and max_diff <= args.grad_tol
            )
            row.update(loss_sliced=ref_loss, loss_grouped_mm=loss, grad_norm_sliced=ref_norm,
                       grad_norm_grouped_mm=norm, max_grad_diff_rel=max_diff, ok=ok)  # fmt: skip
            line = (f"loss {ref_loss:.5f} / {loss:.5f}, grad norm {ref_norm:.4f} / {norm:.4f}, "
                    f"max |grad diff| {max_diff:.1e} of the largest")  # fmt: skip
        except Exception as err:
            row.update(ok=False, error=f"{type(err).__name__}: {err}")
            line = row["error"][:300]
        row["seconds"] = round(time.perf_counter() - start, 2)
        results.append(row)
        if not row["ok"]:
            failed.append(name)
        print(f"router_check: {'ok  ' if row['ok'] else 'FAIL'} {name:<30} {line} ({row['seconds']} s)", flush=True)
    print(f"router_check: {len(results) - len(failed)} of {len(results)} router configs agree (sliced / grouped_mm)"
          + (f"; disagree: {', '.join(failed)}" if failed else ""))  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
