"""Router logit scale at initialisation: ``router_logit_std`` per MoE layer for a set of routers.

The RMoE scale study (docs/results.md, section 3): how large each router's logits start, on real
text, before any training. The same quantity is logged live by the routing analytics
(``moe/{split}/router_logit_std/layer_l``).

    python experiments/router_scale.py --layers 12 --hidden-size 96 --state-dim 48

prints, per router setting, the per-layer logit std (the RMS over tokens of each token's std over
experts) and the gate entropy (uniform = ln E), averaged over ``--seeds`` initialisations.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from rmoe.metrics.stats import routing_summary
from rmoe.model.config import ModelConfig
from rmoe.model.decoder import MoeLM

SETTINGS: dict[str, tuple[str, dict]] = {
    "linear": ("linear", {}),
    "gru init=normal, no bias (before)": ("gru", {"init": "normal", "bias": False}),
    "gru init=torch, no bias": ("gru", {"init": "torch", "bias": False}),
    "gru init=torch + bias (paper, default)": ("gru", {"init": "torch", "bias": True}),
    "gru init=normal, state_norm=rms": ("gru", {"init": "normal", "bias": False, "state_norm": "rms"}),
    "gru paper np (pass_state=false)": ("gru", {"pass_state": False}),
}


def text_batch(path: Path | None, batch: int, seq: int, seed: int) -> torch.Tensor:
    """(batch, seq) byte ids from a text file (random windows), or random bytes without one."""
    g = torch.Generator().manual_seed(seed)
    if path is None or not path.is_file():
        return torch.randint(0, 256, (batch, seq), generator=g)
    data = torch.frombuffer(bytearray(path.read_bytes()[:4_000_000]), dtype=torch.uint8).long()
    starts = torch.randint(0, data.numel() - seq, (batch,), generator=g)
    return torch.stack([data[s : s + seq] for s in starts])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python experiments/router_scale.py", description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden-size", type=int, default=96)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--state-dim", type=int, default=48)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--text", type=Path, default=Path("../shared/data/wikitext-2/valid.txt"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    x = text_batch(args.text, 16, 128, seed=0)
    print(
        f"{args.layers} layers, d={args.hidden_size}, {args.experts} experts top-2, p={args.state_dim}; "
        f"{'text ' + str(args.text) if args.text.is_file() else 'random bytes'}; mean over {args.seeds} inits"
    )
    print(f"{'router':40s} {'logit std: first / mid / last layer':>38s}   {'mean':>6s}  {'gate entropy':>12s}")
    for name, (router, options) in SETTINGS.items():
        if router == "gru":
            options = {"state_dim": args.state_dim, **options}
        stds, entropies = [], []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            config = ModelConfig(
                vocab_size=320,
                hidden_size=args.hidden_size,
                num_layers=args.layers,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=2 * args.hidden_size,
                num_experts=args.experts,
                top_k=2,
                moe_intermediate_size=args.hidden_size,
                router=router,
                router_options=options,
            )
            with torch.no_grad():
                summary = routing_summary(MoeLM(config).eval()(x).routing, args.experts)
            stds.append(summary["router_logit_std"])
            entropies.append(float(summary["gate_entropy_mean"].mean()))
        std_L = torch.stack(stds).mean(0)
        L = std_L.numel()
        cells = " / ".join(f"{float(std_L[i]):.3f}" for i in (0, L // 2, L - 1))
        print(f"{name:40s} {cells:>38s}   {float(std_L.mean()):6.3f}  {statistics.fmean(entropies):12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
