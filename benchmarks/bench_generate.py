"""Decoding speed with and without the KV cache (``rmoe.generate.generate``), tokens per second.

``python benchmarks/bench_generate.py`` times greedy decoding of one sequence (batch 1, and a
batch of 8) from a 16-token prompt to a total length of 64, 256 and 512 tokens, with the
architecture of ``configs/base.yaml`` (4 layers, d=192, 8 experts of 192, top-2, vocabulary
320) and random weights, for the linear and the recurrent (GRU) router; min over the repeats.
Without the cache every step recomputes the whole sequence (quadratic in the length); with it a
step costs one token per row plus attention over the cache.
"""

from __future__ import annotations

import argparse
import time

import torch

from rmoe import ModelConfig, MoeLM
from rmoe.generate import SamplingConfig, generate

BASE = dict(
    vocab_size=320,
    hidden_size=192,
    num_layers=4,
    num_attention_heads=6,
    num_key_value_heads=2,
    intermediate_size=384,
    num_experts=8,
    top_k=2,
    moe_intermediate_size=192,
)


def tokens_per_second(model: MoeLM, batch: int, prompt: int, total: int, use_cache: bool, repeats: int) -> float:
    prompts = [torch.randint(0, 256, (prompt,)).tolist() for _ in range(batch)]
    sampling = SamplingConfig(max_new_tokens=total - prompt, stop_at_eos=False, use_cache=use_cache)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        generate(model, prompts, sampling, eos_id=256, pad_id=257)
        best = min(best, time.perf_counter() - start)
    return batch * (total - prompt) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, prompt 16 tokens, greedy; tokens/s (min time)")
    print("| router | batch | total length | no cache | KV cache | speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    for router, options in (("linear", {}), ("gru", {})):
        model = MoeLM(ModelConfig(**BASE, router=router, router_options=options)).eval()
        for batch in args.batches:
            for total in args.lengths:
                slow = tokens_per_second(model, batch, 16, total, use_cache=False, repeats=args.repeats)
                fast = tokens_per_second(model, batch, 16, total, use_cache=True, repeats=args.repeats)
                print(f"| {router} | {batch} | {total} | {slow:.0f} | {fast:.0f} | {fast / slow:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
