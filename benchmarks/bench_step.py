"""Time of a whole training step (forward, loss, backward, AdamW step) of the MoE model against the
dense model with the same active parameters, and where the MoE step's time goes.

For each shape the same step is timed, in a rotating order within each repetition, for:

* ``dense``: the decoder with dense SwiGLU MLPs of width ``top_k x expert width`` (the same active
  parameters per token as the MoE, router aside);
* ``moe-linear``: the MoE decoder with the linear router;
* ``moe-gru``: the same with RMoE's GRU router (state ``p``), to measure the recurrent router's
  overhead next to its share of the FLOPs;
* ``moe-linear+foreach-adamw``: the linear-router step with ``foreach`` AdamW instead of the fused
  kernel the training module uses (on CPU too, since this benchmark);
* with ``--compile``, the compiled-layers variant of each (``MoeLMModule(compile=True)``'s
  per-layer ``torch.compile``).

Each step's peak memory (parameters, gradients, AdamW's moments, activations; torch's
``MemTracker``) is printed next to its time. Then one profile (``torch.profiler``, a few steps of
``moe-linear``) splits the step's CPU time by where each aten op runs: the expert matmuls (inside
the sliced experts' forward and backward), attention, the other matmuls (projections, router, LM
head), the dispatch (sort, gathers, scatters, ``embedding_bag``), the router's softmax and top-k,
the optimiser step, and the rest.
The loop is plain PyTorch (no Lightning), so Lightning's per-step overhead is what
``configs/base.yaml``'s ``train/tokens_per_sec`` loses against this (compare the two).

Usage::

    python benchmarks/bench_step.py                   # the small shape and configs/base.yaml's, fp32
    python benchmarks/bench_step.py --shapes table1_cpu medium   # the GRU router's overhead at those sizes
    python benchmarks/bench_step.py --compile --json step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from rmoe.model.config import ModelConfig
from rmoe.model.decoder import MoeLM
from rmoe.model.losses import average_over_layers

SHAPES = {
    "small": {"hidden_size": 128, "num_layers": 4, "heads": 4, "kv_heads": 2, "experts": 8, "expert_size": 176,
              "top_k": 2, "block": 64, "batch": 12},
    "base.yaml": {"hidden_size": 192, "num_layers": 4, "heads": 6, "kv_heads": 2, "experts": 8, "expert_size": 192,
                  "top_k": 2, "block": 256, "batch": 16},
    "table1_cpu": {"hidden_size": 128, "num_layers": 4, "heads": 4, "kv_heads": 2, "experts": 8, "expert_size": 128,
                   "top_k": 2, "block": 256, "batch": 16},
    "medium": {"hidden_size": 352, "num_layers": 8, "heads": 8, "kv_heads": 8, "experts": 16, "expert_size": 232,
               "top_k": 2, "block": 512, "batch": 2, "state_dim": 128},
}  # fmt: skip
"""``small``: the issue's small shape (4 layers, d=128, 8 experts of 176, top-2, 12 x 64 tokens);
``base.yaml``: ``configs/base.yaml``'s model and batch (16 x 256 tokens); ``table1_cpu``: the
Table-1 replica's size (``configs/size/cpu.yaml``); ``medium``: the paper's medium model
(``configs/size/medium_gpu.yaml``, p=128) with 2 of its 48 sequences per step, to fit a CPU.
The GRU state is p=32 unless the shape says ``state_dim``."""

CATEGORIES = ("expert matmuls", "attention", "other matmuls", "dispatch", "router softmax/top-k", "optimizer", "other")


@dataclass
class Timing:
    name: str
    median_ms: float
    p25_ms: float
    p75_ms: float
    active_params: int
    peak_mib: float


def router_file(path: str) -> tuple[str, dict]:
    """``(router, router_options)`` of a ``configs/router/*.yaml`` file."""
    arch = yaml.safe_load(Path(path).read_text())["model"]["arch"]
    return arch["router"], dict(arch.get("router_options") or {})


def model_config(
    shape: dict, *, moe: bool, router: str = "linear", state_dim: int = 32, options: dict | None = None
) -> ModelConfig:
    return ModelConfig(
        vocab_size=320,
        hidden_size=shape["hidden_size"],
        num_layers=shape["num_layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        intermediate_size=shape["top_k"] * shape["expert_size"],
        num_experts=shape["experts"] if moe else 0,
        top_k=shape["top_k"],
        moe_intermediate_size=shape["expert_size"],
        router=router,
        router_options=options if options is not None else ({"state_dim": state_dim} if router == "gru" else {}),
    )


def make_step(
    config: ModelConfig, batch_BS1: torch.Tensor, compile_layers: bool, fused_adamw: bool = True
) -> tuple[Callable[[], None], MoeLM, torch.optim.Optimizer]:
    """One training step as ``MoeLMModule.training_step`` computes it (LM loss + 0.01 x balance loss
    + 0.001 x z-loss, ``configs/base.yaml``'s coefficients)."""
    torch.manual_seed(0)
    model = MoeLM(config)
    if compile_layers:
        for layer in model.layers:
            layer.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=fused_adamw)
    inputs, targets = batch_BS1[:, :-1], batch_BS1[:, 1:]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = model(inputs)
        loss = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten())
        if out.routing:
            aux, z, _ = average_over_layers(out.routing, config.num_experts)
            loss = loss + 0.01 * aux + 0.001 * z
        loss.backward()
        optimizer.step()

    return step, model, optimizer


def peak_memory_mib(step: Callable[[], None], model: MoeLM, optimizer: torch.optim.Optimizer) -> float:
    """Peak memory of one whole training step after warmup, in MiB: parameters, gradients, AdamW's
    two moments, activations and temporaries (torch's ``MemTracker``, as ``bench_moe.py`` uses)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        step()
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"] / 2**20


def time_steps(steps: dict[str, Callable[[], None]], repeats: int, warmup: int) -> dict[str, list[float]]:
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    names = list(steps)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(repeats):
        for i in range(len(names)):
            name = names[(rep + i) % len(names)]
            start = time.perf_counter()
            steps[name]()
            samples[name].append(1e3 * (time.perf_counter() - start))
    return samples


def _category(event: object, parents: list[str]) -> str:
    name = event.name
    if any(p.startswith("Optimizer.step") for p in parents):
        return "optimizer"
    experts = ("_SlicedExperts", "_TiledExperts")
    if any(p.startswith(experts) for p in parents) and name in ("aten::mm", "aten::addmm_", "aten::addmm"):
        return "expert matmuls"
    if "scaled_dot_product" in name or any("scaled_dot_product" in p for p in parents):
        return "attention"
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::addmm_", "aten::linear"):
        return "other matmuls"
    if name in ("aten::sort", "aten::argsort", "aten::index_select", "aten::index", "aten::embedding_bag",
                "aten::_embedding_bag", "aten::_embedding_bag_forward_only", "aten::_embedding_bag_backward",
                "aten::scatter_add_", "aten::index_put_", "aten::gather", "aten::bincount"):  # fmt: skip
        return "dispatch"
    if name in ("aten::_softmax", "aten::topk", "aten::_softmax_backward_data"):
        return "router softmax/top-k"
    return "other"


def breakdown(step: Callable[[], None], steps: int = 5) -> tuple[dict[str, float], dict[str, float]]:
    """Share of the step's self CPU time per category (aten ops attributed by their ancestors), and
    the shares of the five largest ops of ``other``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    totals: dict[str, float] = defaultdict(float)
    others: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parents, parent = [], event.cpu_parent
        while parent is not None:
            parents.append(parent.name)
            parent = parent.cpu_parent
        category = _category(event, parents)
        totals[category] += event.self_cpu_time_total
        if category == "other":
            others[event.name] += event.self_cpu_time_total
    everything = sum(totals.values()) or 1.0
    top = dict(sorted(others.items(), key=lambda kv: -kv[1])[:5])
    return {c: totals.get(c, 0.0) / everything for c in CATEGORIES}, {n: v / everything for n, v in top.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["small", "base.yaml"], choices=list(SHAPES))
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--compile", action="store_true", help="also time compiled layers (torch.compile per layer)")
    p.add_argument(
        "--routers",
        nargs="+",
        default=[],
        metavar="YAML",
        help="also time these router configs (configs/router/*.yaml; a gru file gets the shape's state_dim, 32) "
        "and print each one's step time against moe-linear",
    )
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, CPU; one step = fwd + loss + bwd + AdamW"
    )
    report = {}
    for label in args.shapes:
        shape = SHAPES[label]
        batch = torch.randint(0, 256, (shape["batch"], shape["block"] + 1), generator=torch.Generator().manual_seed(0))
        configs = {
            "dense": model_config(shape, moe=False),
            "moe-linear": model_config(shape, moe=True),
            "moe-gru": model_config(shape, moe=True, router="gru", state_dim=shape.get("state_dim", 32)),
        }
        for path in args.routers:
            router, options = router_file(path)
            if router == "gru":  # the width the other gru rows (and the CPU sweeps) use
                options["state_dim"] = shape.get("state_dim", 32)
            configs[f"router:{Path(path).stem}"] = model_config(shape, moe=True, router=router, options=options)
        steps, models = {}, {}  # models: name -> (model, optimizer)
        for name, config in configs.items():
            steps[name], *models[name] = make_step(config, batch, compile_layers=False)
            if name == "moe-linear":  # the optimiser as it was: foreach AdamW instead of the fused kernel
                steps["moe-linear+foreach-adamw"], *models["moe-linear+foreach-adamw"] = make_step(
                    config, batch, compile_layers=False, fused_adamw=False
                )
            if args.compile:
                steps[f"{name}+compile"], *models[f"{name}+compile"] = make_step(config, batch, compile_layers=True)
        samples = time_steps(steps, args.repeats, args.warmup)
        timings = {}
        for name, values in samples.items():
            q25, q50, q75 = statistics.quantiles(values, n=4, method="inclusive")
            model, optimizer = models[name]
            peak = peak_memory_mib(steps[name], model, optimizer)
            timings[name] = Timing(name, q50, q25, q75, model.num_parameters(active=True), peak)
        dense = timings["dense"].median_ms
        print(f"\n== {label}: {shape} ==")
        print(
            f"{'model':<22} {'median ms':>10} {'p25-p75 ms':>16} {'vs dense':>9} {'active params':>14} "
            f"{'peak MiB':>9} {'vs dense':>9}"
        )
        dense_peak = timings["dense"].peak_mib
        for t in timings.values():
            print(
                f"{t.name:<22} {t.median_ms:>10.1f} {f'{t.p25_ms:.1f}-{t.p75_ms:.1f}':>16} "
                f"{t.median_ms / dense:>8.2f}x {t.active_params:>14,} "
                f"{t.peak_mib:>9.1f} {t.peak_mib / dense_peak:>8.2f}x"
            )
        gru, lin = timings["moe-gru"].median_ms, timings["moe-linear"].median_ms
        router_flops = {n: _router_flops_share(configs[n], shape) for n in ("moe-linear", "moe-gru")}
        print(
            f"GRU router step overhead over linear: {gru / lin - 1:+.1%}; router share of the forward FLOPs: "
            f"linear {router_flops['moe-linear']:.1%}, gru {router_flops['moe-gru']:.1%}"
        )
        if args.routers:
            ratios = [f"{n[7:]} {t.median_ms / lin:.2f}x" for n, t in timings.items() if n.startswith("router:")]
            print("router configs, step time vs moe-linear: " + ", ".join(ratios))
        shares, top_other = breakdown(steps["moe-linear"])
        print("moe-linear step, share of CPU time: " + ", ".join(f"{c} {v:.0%}" for c, v in shares.items()))
        print("  largest of other: " + ", ".join(f"{n} {v:.1%}" for n, v in top_other.items()))
        report[label] = {
            "shape": shape,
            "timings": {n: vars(t) for n, t in timings.items()},
            "router_flops_share": router_flops,
            "breakdown": shares,
            "largest_other_ops": top_other,
        }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


def _router_flops_share(config: ModelConfig, shape: dict) -> float:
    """The router's share of the forward matmul FLOPs per token (2 x multiply-adds), analytically."""
    D, E, L, S = config.hidden_size, config.num_experts, config.num_layers, shape["block"]
    dense_per_layer = 2 * D * (D + 2 * config.num_key_value_heads * config.attention_head_dim + D)  # q, k, v, o
    dense_per_layer += 2 * 2 * S * D  # attention scores and values (causal mean ~ S/2, both matmuls x2)
    dense_per_layer += 2 * 3 * D * config.top_k * config.moe_intermediate_size  # the active experts
    if config.router == "gru":
        p = config.router_options["state_dim"]
        router = 2 * (D * p + 3 * p * p + 3 * p * p + p * E)  # projector, GRU cell (ih, hh), head
    else:
        router = 2 * D * E
    lm_head = 2 * D * config.vocab_size / L
    return router / (dense_per_layer + router + lm_head)


if __name__ == "__main__":
    main()
