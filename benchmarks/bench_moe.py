"""Forward+backward time of our sparse MoE block against a dense MLP and transformers' Qwen2-MoE block.

Compared, on the same input and with the same weights:

* ``dense``: a SwiGLU MLP of width ``top_k * expert_size`` (``rmoe.model.moe.SwiGLU``, three
  ``nn.Linear``), i.e. the same active parameters per token as the MoE block, router aside;
* ``ours``: ``rmoe.model.moe.SparseMoeBlock`` (linear router + ``GroupedExperts``) with its ``auto``
  expert backend, and ``ours-<backend>`` with each backend forced (``sliced``, ``tiled`` and
  ``grouped_mm``; ``auto`` is one of them, printed; ``grouped_mm`` runs on CPU but is not chosen there);
* ``hf-eager`` / ``hf-grouped_mm``: transformers' ``Qwen2MoeSparseMoeBlock`` with
  ``config._experts_implementation`` set to that name (read at call time by
  ``transformers.integrations.moe.use_experts_implementation``).

Neither MoE block has a shared expert (``shared_expert_intermediate_size=0``). transformers always
builds one, of width 0: its (exactly zero) branch still costs a few elementwise ops, so the
transformers rows run the block's own router and experts without it (``--hf-full-block`` times the
unmodified ``forward`` instead). The router is random-init as at the start of training, so expert
loads are uneven; the script prints them.

One step is forward + backward (gradients of every parameter and of the input). Before timing,
every MoE row's output and input gradient are compared with ours (max abs difference printed;
in bf16 transformers' router computes its logits in bf16, ours in fp32, so a few near-tied tokens
pick other experts and the difference is O(1e-2) without anything being wrong).
After warmup the implementations are timed in a rotating order within each repetition, so machine
noise hits all of them alike; the median is the headline, min and quartiles show the noise.

Usage::

    python benchmarks/bench_moe.py                      # 4096 tokens, d=256, 8 experts of 512, top-2
    python benchmarks/bench_moe.py --tokens 8192 --dtype bf16 --json bench.json
    python benchmarks/bench_moe.py --sweep              # default, fine-grained (E=64, K=8), small batch (T=768)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from rmoe.interop.qwen2_moe import to_hf_config
from rmoe.model.config import ModelConfig
from rmoe.model.moe import SparseMoeBlock, SwiGLU

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Result:
    """Timings of one implementation (milliseconds per forward+backward step)."""

    name: str
    median_ms: float
    min_ms: float
    p25_ms: float
    p75_ms: float
    samples_ms: list[float]
    max_abs_diff_vs_ours: float | None  # of the output and of d(input)
    peak_mib: float  # peak memory of one forward+backward: parameters, gradients, activations, temporaries


SWEEP_SHAPES = {
    "default": {"tokens": 4096, "seq_len": 512, "hidden_size": 256, "num_experts": 8, "expert_size": 512, "top_k": 2},
    "fine-grained": {
        "tokens": 4096,
        "seq_len": 512,
        "hidden_size": 256,
        "num_experts": 64,
        "expert_size": 64,
        "top_k": 8,
    },
    "small batch": {"tokens": 768, "seq_len": 64, "hidden_size": 128, "num_experts": 8, "expert_size": 176, "top_k": 2},
}
"""The shapes of ``--sweep``: the default block, fine-grained experts (E=64, K=8) and the small batch
of CPU router studies (T=768, d=128)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096, help="tokens T per step (batch x sequence)")
    p.add_argument("--seq-len", type=int, default=512, help="sequence length; batch = tokens / seq-len")
    p.add_argument("--hidden-size", type=int, default=256, help="model width D")
    p.add_argument("--num-experts", type=int, default=8, help="routed experts E")
    p.add_argument("--expert-size", type=int, default=512, help="width F of each expert")
    p.add_argument("--top-k", type=int, default=2, help="experts per token K")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--repeats", type=int, default=30, help="timed steps per implementation")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per implementation first")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:i]")
    p.add_argument("--init-std", type=float, default=0.02, help="std of the normal init of every weight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--hf-full-block", action="store_true", help="time transformers' whole forward, with its width-0 shared expert"
    )
    p.add_argument("--json", metavar="PATH", help="also write the results here")
    p.add_argument(
        "--sweep",
        action="store_true",
        help="run every shape of SWEEP_SHAPES (the shape flags are ignored) and print one table of ratios",
    )
    return p.parse_args(argv)


def model_config(args: argparse.Namespace, backend: str = "auto") -> ModelConfig:
    return ModelConfig(
        vocab_size=1,
        hidden_size=args.hidden_size,
        num_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        intermediate_size=args.top_k * args.expert_size,
        num_experts=args.num_experts,
        top_k=args.top_k,
        moe_intermediate_size=args.expert_size,
        shared_expert_intermediate_size=0,
        norm_topk_prob=True,
        initializer_range=args.init_std,
        expert_backend=backend,
    )


def build_ours(args: argparse.Namespace, backend: str) -> SparseMoeBlock:
    block = SparseMoeBlock(model_config(args, backend), layer_idx=0, shared_router=None)
    with torch.no_grad():
        for p in block.parameters():
            nn.init.normal_(p, std=args.init_std)
    return block


def build_hf(ours: SparseMoeBlock, config: ModelConfig, implementation: str) -> nn.Module:
    """transformers' block with ``ours``' weights (router ``weight`` = ``gate.weight``, same expert layout)."""
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    hf_config = to_hf_config(config)
    hf_config._experts_implementation = implementation
    with warnings.catch_warnings():  # "Initializing zero-element tensors is a no-op" (the width-0 shared expert)
        warnings.simplefilter("ignore", UserWarning)
        hf = Qwen2MoeSparseMoeBlock(hf_config)
    with torch.no_grad():
        hf.gate.weight.copy_(ours.router.weight)
        hf.experts.gate_up_proj.copy_(ours.experts.gate_up_proj)
        hf.experts.down_proj.copy_(ours.experts.down_proj)
    assert sum(p.numel() for p in hf.shared_expert.parameters()) == 0  # width 0: adds exactly zero
    return hf


def hf_routed_forward(hf: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``Qwen2MoeSparseMoeBlock.forward`` without the shared-expert branch (width 0, exactly zero)."""

    def forward(x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.view(-1, D)
        _, weights_TK, expert_ids_TK = hf.gate(x_TD)
        return hf.experts(x_TD, expert_ids_TK, weights_TK).view(B, S, D)

    return forward


def ours_forward(block: SparseMoeBlock) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x_BSD: block(x_BSD, None)[0]


def matmul_floor(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """Median ms of the nine matmuls of one SwiGLU forward+backward, dense vs per-expert.

    Dense: (T, D) x (D, K F) and its gradients, as in ``dense``. Per expert: the same FLOPs as E
    matmuls on equal slices of T K / E rows (perfect balance, no gather, no router), as the sliced
    and tiled backends run them. Their ratio is what any design that runs one matmul per expert
    pays on this machine before dispatch, routing or imbalance: the floor of ``ours / dense``.
    """
    T, D, E, F_, K = args.tokens, args.hidden_size, args.num_experts, args.expert_size, args.top_k
    n = T * K // E
    g = torch.Generator(device=device).manual_seed(args.seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    x, h, dy = rand(T, D), rand(T, K * F_), rand(T, D)
    w_up, w_down = rand(K * F_, D), rand(D, K * F_)
    xs, hs, dys = rand(E, n, D), rand(E, n, F_), rand(E, n, D)
    ws_up, ws_down = rand(E, F_, D), rand(E, D, F_)

    def dense() -> None:  # gate, up, down; d(gate, up): weight and input; d down: weight and input
        for _ in range(2):
            torch.mm(x, w_up.t()), torch.mm(h.t(), x), torch.mm(h, w_up)
        torch.mm(h, w_down.t()), torch.mm(dy.t(), h), torch.mm(dy, w_down)

    def experts() -> None:
        for e in range(E):
            for _ in range(2):
                torch.mm(xs[e], ws_up[e].t()), torch.mm(hs[e].t(), xs[e]), torch.mm(hs[e], ws_up[e])
            torch.mm(hs[e], ws_down[e].t()), torch.mm(dys[e].t(), hs[e]), torch.mm(dys[e], ws_down[e])

    samples: dict[str, list[float]] = {"dense": [], "experts": []}
    for rep in range(args.warmup + args.repeats):
        pair = (("dense", dense), ("experts", experts))
        for name, fn in pair if rep % 2 else pair[::-1]:
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if rep >= args.warmup:
                samples[name].append(1e3 * (time.perf_counter() - start))
    return statistics.median(samples["dense"]), statistics.median(samples["experts"])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(
    forward: Callable[[torch.Tensor], torch.Tensor], module: nn.Module, x_BSD: torch.Tensor, grad_BSD: torch.Tensor
) -> torch.Tensor:
    """One forward + backward; gradients of every parameter and of the input, freed before the next."""
    module.zero_grad(set_to_none=True)
    x_BSD.grad = None
    out_BSD = forward(x_BSD)
    out_BSD.backward(grad_BSD)
    return out_BSD


def peak_memory_mib(
    forward: Callable[[torch.Tensor], torch.Tensor], module: nn.Module, x_BSD: torch.Tensor, grad_BSD: torch.Tensor
) -> float:
    """Peak memory of one forward+backward step, in MiB: parameters, gradients, activations and
    temporaries. CUDA: ``torch.cuda.max_memory_allocated``; CPU: torch's ``MemTracker`` (a dispatch
    mode that follows every tensor's storage), so both count what the step itself holds."""
    if x_BSD.device.type == "cuda":
        torch.cuda.synchronize(x_BSD.device)
        torch.cuda.reset_peak_memory_stats(x_BSD.device)
        base = torch.cuda.memory_allocated(x_BSD.device)
        step(forward, module, x_BSD, grad_BSD)
        torch.cuda.synchronize(x_BSD.device)
        return (torch.cuda.max_memory_allocated(x_BSD.device) - base) / 2**20
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(module)
    with tracker:
        step(forward, module, x_BSD, grad_BSD)
    return tracker.get_tracker_snapshot("peak")[x_BSD.device]["Total"] / 2**20


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.sweep:
        run_shape(args)
        return
    rows = {}
    for label, shape in SWEEP_SHAPES.items():
        print(f"\n== {label} ==")
        rows[label] = run_shape(argparse.Namespace(**{**vars(args), **shape, "json": None}))
    names = list(dict.fromkeys(n for row in rows.values() for n in row["results"] if n != "dense"))
    print("\nforward+backward time / dense (median), and peak MiB (dense | ours | others)")
    print(
        f"{'shape':<14} {'T':>5} {'D':>4} {'E':>3} {'F':>4} {'K':>2} {'auto':>7} {'mm floor':>9} "
        + " ".join(f"{n:>16}" for n in names)
        + "  peak MiB"
    )
    for label, row in rows.items():
        a, res, floor = row["args"], row["results"], row["matmul_floor"]
        ratios = " ".join(
            f"{res[n]['median_ms'] / res['dense']['median_ms']:>15.2f}x" if n in res else f"{'failed':>16}"
            for n in names
        )
        peaks = " | ".join(f"{res[n]['peak_mib']:.1f}" if n in res else "-" for n in ["dense", *names])
        print(
            f"{label:<14} {a['tokens']:>5} {a['hidden_size']:>4} {a['num_experts']:>3} {a['expert_size']:>4} "
            f"{a['top_k']:>2} {row['ours_backend']:>7} {floor['experts_ms'] / floor['dense_ms']:>8.2f}x "
            f"{ratios}  {peaks}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


def run_shape(args: argparse.Namespace) -> dict:
    """Time every implementation at one shape, print its table and return the results."""
    if args.tokens % args.seq_len:
        raise SystemExit(f"--tokens={args.tokens} must be a multiple of --seq-len={args.seq_len}")
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if args.device == "auto"
        else args.device
    )
    dtype = DTYPES[args.dtype]
    torch.manual_seed(args.seed)

    ours = build_ours(args, backend="auto")
    candidates: dict[str, tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]] = {}
    dense = SwiGLU(args.hidden_size, args.top_k * args.expert_size)
    with torch.no_grad():
        for p in dense.parameters():
            nn.init.normal_(p, std=args.init_std)
    candidates["dense"] = (dense, dense)
    candidates["ours"] = (ours, ours_forward(ours))
    ours.to(device=device, dtype=dtype)
    probe_TD = torch.empty(args.tokens, args.hidden_size, device=device, dtype=dtype)
    backend = ours.experts._resolve_backend(probe_TD, args.tokens * args.top_k)
    for other_backend in ("sliced", "tiled", "grouped_mm"):  # each forced, ``ours`` (auto) is one of them
        if other_backend == "grouped_mm" and not hasattr(torch.nn.functional, "grouped_mm"):
            continue
        ours_other = copy.deepcopy(ours)
        ours_other.experts.backend = other_backend
        candidates[f"ours-{other_backend}"] = (ours_other, ours_forward(ours_other))
    for implementation in ("eager", "grouped_mm"):
        hf = build_hf(ours, model_config(args), implementation)
        candidates[f"hf-{implementation}"] = (hf, hf if args.hf_full_block else hf_routed_forward(hf))
    for module, _ in candidates.values():
        module.to(device=device, dtype=dtype)

    x_BSD = torch.randn(args.tokens // args.seq_len, args.seq_len, args.hidden_size, device=device, dtype=dtype)
    x_BSD.requires_grad_(True)
    grad_BSD = torch.randn_like(x_BSD)

    # Loads and correctness first: every MoE implementation must agree with ours (output and dx).
    with torch.no_grad():
        _, routing, _ = ours(x_BSD, None)
        tokens_per_expert = torch.bincount(routing.expert_ids_TK.flatten(), minlength=args.num_experts).tolist()
    outputs = {}
    left_out: dict[str, str] = {}
    for name, (module, forward) in list(candidates.items()):
        try:
            out_BSD = step(forward, module, x_BSD, grad_BSD)
        except Exception as error:  # another torch/transformers (a GPU image): that row goes, loudly
            if name in ("dense", "ours"):
                raise
            left_out[name] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            del candidates[name]
            continue
        outputs[name] = (out_BSD.detach().float(), x_BSD.grad.float())
    diffs = {
        name: max(float((a - b).abs().max()) for a, b in zip(outputs[name], outputs["ours"]))
        for name in candidates
        if name != "dense"
    }

    names = list(candidates)
    for _ in range(args.warmup):
        for name in names:
            step(candidates[name][1], candidates[name][0], x_BSD, grad_BSD)
    samples_ms: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(args.repeats):
        for i in range(len(names)):  # rotate the order every repetition
            name = names[(rep + i) % len(names)]
            module, forward = candidates[name]
            synchronize(device)
            start = time.perf_counter()
            step(forward, module, x_BSD, grad_BSD)
            synchronize(device)
            samples_ms[name].append(1e3 * (time.perf_counter() - start))

    floor_dense_ms, floor_experts_ms = matmul_floor(args, device, dtype)
    results = []
    for name in names:
        samples = samples_ms[name]
        q25, q50, q75 = statistics.quantiles(samples, n=4, method="inclusive") if len(samples) > 1 else samples * 3
        peak = peak_memory_mib(candidates[name][1], candidates[name][0], x_BSD, grad_BSD)
        results.append(Result(name, q50, min(samples_ms[name]), q25, q75, samples_ms[name], diffs.get(name), peak))
    by_name = {r.name: r for r in results}

    print(
        f"torch {torch.__version__}, device {device}, dtype {args.dtype}, threads {torch.get_num_threads()}; "
        f"ours: expert backend auto -> {backend}"
    )
    print(
        f"T={args.tokens} D={args.hidden_size} E={args.num_experts} F={args.expert_size} K={args.top_k}; "
        f"{args.repeats} repeats after {args.warmup} warmup; forward+backward"
    )
    print(
        f"tokens per expert: max {max(tokens_per_expert)}, min {min(tokens_per_expert)} "
        f"(mean {args.tokens * args.top_k / args.num_experts:.0f}): {tokens_per_expert}"
    )
    print(
        f"{'implementation':<16} {'median ms':>10} {'min ms':>8} {'p25-p75 ms':>16} {'vs dense':>9} {'vs ours':>8} "
        f"{'peak MiB':>9} {'max|diff| vs ours (out, dx)':>28}"
    )
    print(
        f"matmul floor: the nine matmuls alone, per expert (equal groups) / dense = "
        f"{floor_experts_ms:.2f} / {floor_dense_ms:.2f} ms = {floor_experts_ms / floor_dense_ms:.2f}x"
    )
    for r in results:
        diff = "-" if r.max_abs_diff_vs_ours is None else f"{r.max_abs_diff_vs_ours:.2e}"
        print(
            f"{r.name:<16} {r.median_ms:>10.2f} {r.min_ms:>8.2f} {f'{r.p25_ms:.2f}-{r.p75_ms:.2f}':>16} "
            f"{r.median_ms / by_name['dense'].median_ms:>8.3f}x {r.median_ms / by_name['ours'].median_ms:>7.3f}x "
            f"{r.peak_mib:>9.1f} {diff:>28}"
        )
    for name, why in left_out.items():
        print(f"{name:<16} left out: it failed here ({why})")

    summary = {
        "args": vars(args),
        "device": str(device),
        "torch": torch.__version__,
        "num_threads": torch.get_num_threads(),
        "ours_backend": backend,
        "tokens_per_expert": tokens_per_expert,
        "matmul_floor": {"dense_ms": floor_dense_ms, "experts_ms": floor_experts_ms},
        "results": {r.name: asdict(r) for r in results},
        "left_out": left_out,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
