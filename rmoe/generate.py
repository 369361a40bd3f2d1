"""Text generation: batched, left-padded, with a KV cache; and the ``rmoe generate`` command.

``rmoe generate --ckpt runs/base/version_0/checkpoints/last.ckpt "def main(" --max-new-tokens 200``

Decoding (:func:`generate`):

1. The prompts are **left**-padded; the attention mask hides the padding and positions count real tokens
   only, so each row gets the logits it would get alone. ``--unconditional`` adds an empty prompt that
   starts from ``<eos>``, the document separator; an empty prompt given as text (an unset shell variable?)
   is refused.
2. One forward over the prompts fills the :class:`~rmoe.model.decoder.KVCache`; every later step feeds one
   token per row (``use_cache=False``: the whole sequence again, for comparison).
3. The next token is the argmax (``temperature == 0``) or a sample from ``softmax(logits / temperature)``
   restricted to the ``top_k`` most likely tokens, then to the ``top_p`` nucleus (Holtzman et al.,
   arXiv 1904.09751), in transformers' order. Ids the tokenizer lacks (the vocabulary is rounded up to a
   multiple of 64) are never chosen.
4. A row that produced ``<eos>`` is finished (``stop_at_eos``) and gets padding afterwards; decoding stops
   when all rows are finished or after ``max_new_tokens``.

Context: a prompt longer than the trained context (``data.block_size``) is refused, or with
``truncate_prompt`` cut to its last ``context - max_new_tokens`` tokens (at least half the context), with a
warning; ``max_new_tokens`` is lowered with a warning so that nothing is generated beyond the trained context.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import torch

from rmoe.errors import RmoeError, ToolArgumentParser
from rmoe.model.decoder import KVCache, MoeLM

if TYPE_CHECKING:
    from rmoe.data.tokenizer import Tokenizer


@dataclass
class SamplingConfig:
    """How the next token is chosen: greedy (``temperature`` 0) or sampled among the ``top_k`` most likely
    tokens (0: all) within the ``top_p`` nucleus (1: all). ``seed`` None: nondeterministic;
    ``use_cache`` False: a full forward per token, the reference."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_at_eos: bool = True
    use_cache: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise RmoeError(f"--max-new-tokens={self.max_new_tokens} must be >= 0.")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise RmoeError(f"--temperature={self.temperature} must be a finite number >= 0 (0: greedy).")
        if self.top_k < 0:
            raise RmoeError(f"--top-k={self.top_k} must be >= 0 (0: no top-k filter).")
        if not 0 < self.top_p <= 1:
            raise RmoeError(f"--top-p={self.top_p} must be in (0, 1] (1: no nucleus filter).")


@dataclass
class StepRouting:
    """The experts of one generated token in every MoE layer: ids, combine weights, and ``kept_LK`` False
    where a capacity router dropped the pair; (MoE layers, K) each."""

    expert_ids_LK: torch.Tensor
    weights_LK: torch.Tensor
    kept_LK: torch.Tensor


@dataclass
class Generation:
    """One prompt's result of :func:`generate`: the prompt's ids as fed, the generated ids (ending with
    ``<eos>`` when it stopped there) and, with ``record_routing``, each generated token's routing."""

    prompt_ids: list[int]
    new_ids: list[int]
    routing: list[StepRouting] = field(default_factory=list)


def filter_logits(logits_BV: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top-k, then outside the top-p nucleus (as transformers'
    ``TopKLogitsWarper`` and ``TopPLogitsWarper``: at least one token survives)."""
    if top_k > 0 and top_k < logits_BV.shape[-1]:
        kth_B1 = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p < 1.0:
        sorted_BV, order_BV = torch.sort(logits_BV, descending=False, dim=-1)
        cumulative_BV = sorted_BV.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted_BV = cumulative_BV <= 1 - top_p
        remove_sorted_BV[:, -1] = False  # the most likely token always stays
        remove_BV = remove_sorted_BV.scatter(1, order_BV, remove_sorted_BV)
        logits_BV = logits_BV.masked_fill(remove_BV, float("-inf"))
    return logits_BV


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids_BS, mask_BS)``: prompts right-aligned, padding on the left, mask 0 on the padding."""
    S = max(len(p) for p in prompts)
    ids_BS = torch.full((len(prompts), S), pad_id, dtype=torch.long)
    mask_BS = torch.zeros((len(prompts), S), dtype=torch.long)
    for b, prompt in enumerate(prompts):
        if prompt:
            ids_BS[b, S - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
            mask_BS[b, S - len(prompt) :] = 1
    return ids_BS, mask_BS


@torch.no_grad()
def generate(
    model: MoeLM,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    *,
    eos_id: int,
    pad_id: int,
    num_valid_ids: int | None = None,
    record_routing: bool = False,
    on_step: Callable[[list[int | None]], None] | None = None,
) -> list[Generation]:
    """Continue every (non-empty) prompt, as the module docstring describes; one :class:`Generation` each.

    Args:
        pad_id: Id used for left padding and after a row finished.
        num_valid_ids: Ids ``>=`` this are never generated (the tokenizer's vocabulary size).
        record_routing: Keep each generated token's experts per MoE layer.
        on_step: Called after each step with each row's new id (None for a finished row).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise RmoeError("every prompt needs at least one token.")
    model.eval()
    device = next(model.parameters()).device
    ids_BS, mask_BS = left_pad(prompts, pad_id)
    ids_BS, mask_BS = ids_BS.to(device), mask_BS.to(device)
    B = ids_BS.shape[0]
    generator = None
    if sampling.temperature > 0:
        generator = torch.Generator(device=device)
        if sampling.seed is not None:
            generator.manual_seed(sampling.seed)
        else:
            generator.seed()  # nondeterministic, and the global RNG is left alone
    results = [Generation(list(p), []) for p in prompts]
    unfinished_B = torch.ones(B, dtype=torch.bool, device=device)
    cache = KVCache() if sampling.use_cache else None
    step_ids_BS = ids_BS
    for _ in range(sampling.max_new_tokens):
        if cache is not None:
            out = model(step_ids_BS, attention_mask_BK=mask_BS, cache=cache)
        else:
            out = model(ids_BS, attention_mask_BK=mask_BS)
        logits_BV = out.logits[:, -1].float()
        if num_valid_ids is not None and num_valid_ids < logits_BV.shape[-1]:
            logits_BV[:, num_valid_ids:] = float("-inf")
        if sampling.temperature == 0:
            next_B = logits_BV.argmax(dim=-1)
        else:
            filtered_BV = filter_logits(logits_BV / sampling.temperature, sampling.top_k, sampling.top_p)
            next_B = torch.multinomial(filtered_BV.softmax(dim=-1), 1, generator=generator).squeeze(1)
        next_B = torch.where(unfinished_B, next_B, torch.full_like(next_B, pad_id))
        if record_routing:
            _record(results, out.routing, unfinished_B, B)
        step = next_B.tolist()
        alive = unfinished_B.tolist()
        for b in range(B):
            if alive[b]:
                results[b].new_ids.append(step[b])
        if on_step is not None:
            on_step([step[b] if alive[b] else None for b in range(B)])
        if sampling.stop_at_eos:
            unfinished_B &= next_B != eos_id
        step_ids_BS = next_B[:, None]
        ids_BS = torch.cat([ids_BS, step_ids_BS], dim=1)
        mask_BS = torch.cat([mask_BS, torch.ones_like(step_ids_BS)], dim=1)
        if not unfinished_B.any():
            break
    return results


def _record(results: list[Generation], routing: list, unfinished_B: torch.Tensor, B: int) -> None:
    """Append, for each unfinished row, the routing of its last position in every MoE layer."""
    if not routing:
        return
    ids_BLK = torch.stack([r.expert_ids_TK.view(B, -1, r.expert_ids_TK.shape[-1])[:, -1] for r in routing], dim=1)
    weights_BLK = torch.stack([r.weights_TK.view(B, -1, r.weights_TK.shape[-1])[:, -1] for r in routing], dim=1)
    kept = [
        r.keep_TK.view(B, -1, r.keep_TK.shape[-1])[:, -1] if r.keep_TK is not None else torch.ones_like(ids, dtype=bool)
        for r, ids in zip(routing, ids_BLK.unbind(1))
    ]
    kept_BLK = torch.stack(kept, dim=1)
    for b in range(B):
        if unfinished_B[b]:
            results[b].routing.append(StepRouting(ids_BLK[b].cpu(), weights_BLK[b].float().cpu(), kept_BLK[b].cpu()))


def check_encodable(text: str, tokenizer: Tokenizer, source: str) -> None:
    """RmoeError naming ``source`` if ``text`` has characters the tokenizer cannot encode (a WordPiece or
    SentencePiece tokenizer maps them to its unknown token: the model would read another text)."""
    bad = tokenizer.unencodable(text)
    if bad:
        shown = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in bad[:8]) + (" ..." if len(bad) > 8 else "")
        raise RmoeError(
            f"{source} has characters the model's tokenizer ({tokenizer.kind}) cannot encode: {shown}; they would "
            "become its unknown token. Remove or replace them."
        )


def check_context(
    prompts: list[list[int]], max_new_tokens: int, context_length: int | None, truncate: bool
) -> tuple[list[list[int]], int]:
    """Apply the context policy of the module docstring; returns the prompts and max_new_tokens to use."""
    if context_length is None:
        return prompts, max_new_tokens
    longest = max(len(p) for p in prompts)
    if longest > context_length:
        if not truncate:
            raise RmoeError(
                f"a prompt is {longest} tokens long, longer than the model's trained context of "
                f"{context_length} tokens (data.block_size); shorten it, or pass --truncate-prompt to keep its "
                "last tokens."
            )
        # keep room for the new tokens: a prompt cut to the whole context could generate nothing
        keep = max(context_length - max_new_tokens, (context_length + 1) // 2)
        warnings.warn(
            f"prompts longer than {keep} tokens were cut to their last {keep} tokens (the trained context is "
            f"{context_length} tokens, {max_new_tokens} of them asked for by --max-new-tokens).",
            stacklevel=2,
        )
        prompts = [p[-keep:] for p in prompts]
        longest = max(len(p) for p in prompts)
    room = context_length - longest
    if max_new_tokens > room:
        warnings.warn(
            f"--max-new-tokens={max_new_tokens} lowered to {room}: the longest prompt ({longest} tokens) plus the new "
            f"tokens must fit in the trained context of {context_length} tokens.",
            stacklevel=2,
        )
        max_new_tokens = room
    return prompts, max_new_tokens


class _Streamer:
    """Prints one row's text as it grows, holding back an incomplete UTF-8 sequence (U+FFFD at the end)."""

    def __init__(self, decode: Callable[[list[int]], str], out: TextIO) -> None:
        self.decode, self.out = decode, out
        self.ids: list[int] = []
        self.printed = 0

    def add(self, token: int) -> None:
        self.ids.append(token)
        text = self.decode(self.ids)
        stable = len(text.rstrip("\ufffd"))
        if stable > self.printed:
            self.out.write(text[self.printed : stable])
            self.out.flush()
            self.printed = stable

    def finish(self) -> None:
        text = self.decode(self.ids)
        self.out.write(text[self.printed :])
        self.out.flush()


def format_routing(generation: Generation, decode: Callable[[list[int]], str], moe_layers: list[int]) -> list[str]:
    """One line per generated token: the token, then per MoE layer its experts with their weights."""
    lines = []
    for token, step in zip(generation.new_ids, generation.routing):
        parts = []
        for layer, ids, weights, kept in zip(moe_layers, step.expert_ids_LK, step.weights_LK, step.kept_LK):
            chosen = [f"{int(e)}:{float(w):.2f}" + ("" if k else "(dropped)") for e, w, k in zip(ids, weights, kept)]
            parts.append(f"L{layer}[{' '.join(chosen)}]")
        lines.append(f"  {decode([token])!r:>10}  {' '.join(parts)}")
    return lines


def build_parser() -> argparse.ArgumentParser:
    """The ``rmoe generate`` argument parser (errors raise :class:`RmoeError`)."""
    p = ToolArgumentParser(
        prog="rmoe generate",
        description="Continue prompts with a trained model (a checkpoint of `rmoe fit` or a directory of "
        "`rmoe export`); text is streamed to stdout.",
    )
    p.add_argument(
        "--ckpt", required=True, help="the model: a checkpoint (<run>/checkpoints/*.ckpt) or an `rmoe export` folder."
    )
    p.add_argument("prompts", nargs="*", help="prompt(s); several are decoded as one left-padded batch.")
    p.add_argument("--prompt-file", action="append", default=[], help="a file whose whole text is one prompt.")
    p.add_argument(
        "--unconditional", action="store_true", help="also generate from nothing (a prompt that starts at <eos>)."
    )
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (default 64).")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampling.")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: off).")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1: off).")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler (default 0).")
    p.add_argument("--no-stop", action="store_true", help="do not stop at <eos>.")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence at every step.")
    p.add_argument("--show-routing", action="store_true", help="print each generated token's experts per layer.")
    p.add_argument("--truncate-prompt", action="store_true", help="cut prompts longer than the trained context.")
    p.add_argument("--tokenizer", help="override the tokenizer (default: the run's / the export's).")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (default cpu).")
    return p


def main(argv: list[str], out: TextIO | None = None) -> None:
    """``rmoe generate ...``; RmoeError for bad input (exit 2 in ``rmoe``)."""
    from rmoe.inference import load_model, non_causal_reason

    out = out or sys.stdout
    args = build_parser().parse_intermixed_args(argv)  # prompts may come after options
    texts = list(args.prompts)
    for name in args.prompt_file:
        try:
            texts.append(Path(name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            raise RmoeError(f"--prompt-file {name}: cannot read it as UTF-8 text ({err}).") from None
    if not texts and not args.unconditional:
        raise RmoeError(
            "no prompt: give one or more prompts, --prompt-file, or --unconditional to generate from nothing "
            "(see --help)."
        )
    for i, text in enumerate(texts):
        if not text:
            raise RmoeError(
                f"prompt {i} is empty (an unset shell variable?); give text to continue, or --unconditional to "
                "generate from nothing."
            )
    if args.max_new_tokens < 1:
        raise RmoeError(f"--max-new-tokens={args.max_new_tokens}: must be at least 1 (the tokens to generate).")
    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop_at_eos=not args.no_stop,
        use_cache=not args.no_cache,
    )
    loaded = load_model(args.ckpt, tokenizer=args.tokenizer, device=args.device)
    reason = non_causal_reason(loaded.model.config)
    if reason:
        raise RmoeError(f"cannot generate with {args.ckpt}: {reason}.")
    tok = loaded.tokenizer
    for i, text in enumerate(texts):
        check_encodable(text, tok, f"prompt {i}")
    texts += [""] if args.unconditional else []
    prompts = [tok.encode(text) or [tok.eos_id] for text in texts]
    prompts, sampling.max_new_tokens = check_context(
        prompts, sampling.max_new_tokens, loaded.context_length, args.truncate_prompt
    )
    streamer = _Streamer(tok.decode, out) if len(prompts) == 1 else None
    if streamer is not None:
        out.write(texts[0] if not args.truncate_prompt else tok.decode(prompts[0]))

    def on_step(step: list[int | None]) -> None:
        if streamer is not None and step[0] is not None and step[0] != tok.eos_id:
            streamer.add(step[0])

    start = time.perf_counter()
    results = generate(
        loaded.model,
        prompts,
        sampling,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
        num_valid_ids=tok.vocab_size,
        record_routing=args.show_routing,
        on_step=on_step,
    )
    elapsed = time.perf_counter() - start
    if streamer is not None:
        streamer.finish()
        out.write("\n")
    else:
        for i, (text, result) in enumerate(zip(texts, results)):
            new = [t for t in result.new_ids if t != tok.eos_id]
            out.write(f"=== prompt {i} ===\n{text}{tok.decode(new)}\n")
    if args.show_routing:
        for i, result in enumerate(results):
            out.write(f"--- routing of prompt {i} (token, then per MoE layer expert:weight) ---\n")
            out.write("\n".join(format_routing(result, tok.decode, loaded.model.config.moe_layers)) + "\n")
    num_new = sum(len(r.new_ids) for r in results)
    print(
        f"rmoe generate: {num_new} tokens in {elapsed:.2f} s ({num_new / max(elapsed, 1e-9):.1f} tokens/s, "
        f"{'KV cache' if sampling.use_cache else 'no cache'}).",
        file=sys.stderr,
    )
