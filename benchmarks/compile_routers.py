"""Does ``model.compile=true`` (``torch.compile`` of every decoder layer) work for every router, and
does it help on this machine?

For each registered router (its default options, plus the variants of ``configs/router/`` that
change the code path), a small model runs a training step (forward, loss, backward) eager and with
compiled layers from the same initialisation: the losses and gradients must agree, and both are
timed (median of ``--repeats`` after ``--warmup``, compile time excluded). Routers that fail to
compile are listed with the error. Compilation takes tens of seconds per router on a CPU; this
is a script, not a test.

Usage::

    python benchmarks/compile_routers.py                     # every router, the small shape
    python benchmarks/compile_routers.py --routers linear gru --json compile.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback

import torch
import torch.nn.functional as F

from rmoe.model.config import ModelConfig
from rmoe.model.decoder import MoeLM
from rmoe.routers import ROUTERS

OPTIONS = {"gru": {"state_dim": 32}, "lstm": {"state_dim": 32}, "rnn": {"state_dim": 32}}


def step_fn(model: MoeLM, inputs: torch.Tensor, targets: torch.Tensor):
    def step() -> tuple[float, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(inputs).logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        return float(loss), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    return step


def median_ms(fns: dict[str, object], repeats: int, warmup: int) -> dict[str, float]:
    """Median step time of each function, timed alternately (machine noise hits both alike)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(1e3 * (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--routers", nargs="+", default=sorted(ROUTERS))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    batch = torch.randint(0, 256, (12, 65), generator=torch.Generator().manual_seed(0))
    inputs, targets = batch[:, :-1], batch[:, 1:]
    rows = []
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        "4 layers, d=128, 8 experts of 176, top-2, 12 x 64 tokens"
    )
    print(
        f"{'router':<26} {'eager ms':>9} {'compiled ms':>12} {'speedup':>8} {'compile s':>10} "
        f"{'max|dgrad|':>11}  status"
    )
    for router in args.routers:
        config = ModelConfig(
            vocab_size=320,
            hidden_size=128,
            num_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=8,
            top_k=2,
            moe_intermediate_size=176,
            router=router,
            router_options=OPTIONS.get(router, {}),
        )
        torch.manual_seed(0)
        eager = MoeLM(config)
        torch.manual_seed(0)
        compiled = MoeLM(config)
        compiled.load_state_dict(eager.state_dict())
        row = {"router": router}
        try:
            loss_e, grads_e = step_fn(eager, inputs, targets)()
            for layer in compiled.layers:
                layer.compile()
            start = time.perf_counter()
            loss_c, grads_c = step_fn(compiled, inputs, targets)()
            row["compile_s"] = time.perf_counter() - start
            row["max_grad_diff"] = max(float((a - b).abs().max()) for a, b in zip(grads_e, grads_c))
            row["loss_diff"] = abs(loss_e - loss_c)
            medians = median_ms(
                {"eager": step_fn(eager, inputs, targets), "compiled": step_fn(compiled, inputs, targets)},
                args.repeats,
                args.warmup,
            )
            row["eager_ms"], row["compiled_ms"] = medians["eager"], medians["compiled"]
            row["status"] = "ok" if row["max_grad_diff"] < 1e-3 and row["loss_diff"] < 1e-4 else "DIFFERS"
            print(
                f"{router:<26} {row['eager_ms']:>9.1f} {row['compiled_ms']:>12.1f} "
                f"{row['eager_ms'] / row['compiled_ms']:>7.2f}x {row['compile_s']:>10.1f} "
                f"{row['max_grad_diff']:>11.1e}  {row['status']}"
            )
        except Exception as err:  # report and go on: the point is the list of what does not compile
            row["status"] = f"FAILS: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
            row["traceback"] = traceback.format_exc(limit=3)
            print(f"{router:<26} {'':>9} {'':>12} {'':>8} {'':>10} {'':>11}  {row['status']}")
        rows.append(row)
        torch._dynamo.reset()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
