"""How much memory one training step needs, and a refusal before training when the machine lacks it.

:func:`check_step_memory` estimates the peak of one training step (forward, backward, optimiser step) from the
architecture, the micro-batch and the precision, compares it with the device's free memory
(:func:`available_bytes`) and raises :class:`~rmoe.errors.RmoeError` naming the keys to lower.
``RMOE_SKIP_MEMORY_CHECK=1`` skips the check.

The terms (:func:`step_memory_terms`; B batch, S block, T = B*S tokens, D width, V vocab, K top-k, F expert
width, P parameters):

* ``parameters``, ``gradients``, ``optimizer``: P in the parameter dtype twice, AdamW's two fp32 moments, and
  under ``*-mixed`` autocast's low-precision copy of every weight (kept for the backward).
* ``activations``: what each layer saves for the backward, read off the code: the residual stream and both
  RMSNorms; q, k (after rotary), v, the attention output and its reshape copy, the logsumexp; per routed
  (token, expert) pair the three (T*K, F) SwiGLU activations, the sort indices, and the (T*K, D) gathered
  inputs and outputs of the ``sliced`` backend; the router's (T, E) logits and probabilities and
  ``Router.saved_bytes``; a shared expert's or dense layer's four (T, F) SwiGLU tensors. The (B, H, S, S)
  scores count (twice) only where ``scaled_dot_product_attention`` takes the math path rather than a fused
  kernel (asked of torch at run time: :func:`attention_materialises_scores`).
* ``logits``: the (T, V) logits in fp32 three times at the start of the backward (log-softmax, its gradient,
  the logits' gradient), plus the fp32 copy and the low-precision gradient under autocast.
* ``backward working set``: the largest layer's temporary gradients; the peak is the larger of the start of the
  backward (activations + logits) and a layer's backward (activations + working set).

Gradient accumulation does not change the peak (only the gradients persist across micro-batches, and they are
counted). Evaluation needs less per block; ``data.eval_batch_size`` is not checked.

The estimate is a **lower bound** of the measured peak (``benchmarks/bench_memory.py``; docs/speed.md): it does not
count the allocator's transient buffers of the backward. Hence the check **refuses** a step whose estimate alone
exceeds the free memory and **warns** when the estimate times :data:`UNDERESTIMATE` does.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from rmoe.errors import RmoeError
from rmoe.model.config import ModelConfig

SKIP_ENV = "RMOE_SKIP_MEMORY_CHECK"  # set to 1 to skip check_step_memory

GIB = 2**30
MIB = 2**20

UNDERESTIMATE = 1.8
"""The largest measured / estimated peak of the calibration (docs/speed.md): the margin above which
:func:`check_step_memory` warns."""

# Where the CPU memory figures are read (module attributes so tests can point them elsewhere).
PROC_MEMINFO = Path("/proc/meminfo")
CGROUP_ROOT = Path("/sys/fs/cgroup")


# ----------------------------------------------------------------------------------------------
# The estimate


def _dtype_sizes(precision: Any) -> tuple[int, int, int, bool]:
    """``(parameter, residual/norm, matmul activation)`` bytes per element and whether autocast is on.
    Under autocast the residual stream and the RMSNorms stay fp32; matmul outputs are half precision."""
    p = str(precision).lower()
    if p in ("64", "64-true", "double"):
        return 8, 8, 8, False
    if p in ("16-true", "bf16-true", "half"):
        return 2, 2, 2, False
    if "16" in p or "mixed" in p or "transformer-engine" in p:
        return 4, 4, 2, True
    return 4, 4, 4, False


def _num_parameters(arch: ModelConfig) -> int:
    """Exact parameter count (a tied head once), from a model built on the meta device (no memory)."""
    from rmoe.model.decoder import MoeLM

    config = arch if arch.vocab_size > 0 else dataclasses.replace(arch, vocab_size=256)
    with warnings.catch_warnings():  # routers warn about causality on construction
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            return MoeLM(config).num_parameters()


def _device(device: Any) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


def attention_materialises_scores(arch: ModelConfig, device: Any = None, precision: Any = "32-true") -> bool:
    """Whether training attention takes the math path of ``scaled_dot_product_attention`` (a (B, H, S, S) score
    matrix) rather than a fused kernel, per ``torch._fused_sdp_choice`` on tiny tensors of the model's head shape.
    A CUDA device not available here is assumed to take the math path."""
    dev = _device(device)
    _, _, act, mixed = _dtype_sizes(precision)
    dtype = {8: torch.float64, 4: torch.float32}.get(act, torch.bfloat16)
    if dev.type == "cuda" and not torch.cuda.is_available():
        return True
    H, G, Dh = arch.num_attention_heads, arch.num_key_value_heads, arch.attention_head_dim
    try:
        q = torch.zeros(1, H, 8, Dh, device=dev, dtype=dtype, requires_grad=True)
        kv = torch.zeros(1, G, 8, Dh, device=dev, dtype=dtype, requires_grad=True)
        choice = torch._fused_sdp_choice(q, kv, kv, is_causal=True, enable_gqa=H != G)
    except Exception:  # an old torch, an odd device: assume the worst
        return True
    return int(choice) == int(torch.nn.attention.SDPBackend.MATH)


def _expert_backend(arch: ModelConfig, device: torch.device, pairs: int, precision: Any) -> str:
    """The backend :class:`rmoe.model.moe.GroupedExperts` runs (:func:`rmoe.model.moe.resolve_expert_backend`)."""
    from rmoe.model.moe import resolve_expert_backend
    from rmoe.training.precision import compute_dtype

    D, F_ = arch.hidden_size, arch.moe_intermediate_size
    return resolve_expert_backend(arch.expert_backend, device, compute_dtype(precision), D, F_, pairs)


def step_memory_terms(
    arch: ModelConfig,
    batch_size: int,
    block_size: int,
    precision: Any = "32-true",
    accumulate: int = 1,
    device: Any = None,
) -> dict[str, int]:
    """The terms of :func:`estimate_step_bytes` in bytes, largest first (see the module docstring)."""
    del accumulate  # the peak is per micro-batch; the gradients it keeps are counted anyway
    dev = _device(device)
    p_size, r, a, mixed = _dtype_sizes(precision)
    B, S = int(batch_size), int(block_size)
    T = B * S
    D, L, V = arch.hidden_size, arch.num_layers, max(arch.vocab_size, 256)
    H, G, Dh = arch.num_attention_heads, arch.num_key_value_heads, arch.attention_head_dim
    E, F = arch.num_experts, arch.moe_intermediate_size
    moe_layers = len(arch.moe_layers)
    dense_layers = L - moe_layers
    n_params = _num_parameters(arch)

    terms: dict[str, int] = {}
    terms["parameters"] = n_params * p_size
    terms["gradients"] = n_params * p_size
    terms["optimizer"] = 2 * n_params * p_size  # AdamW's two moments, in the parameters' dtype
    if mixed:  # autocast's half-precision weight copies, saved for the backward
        terms["parameters"] += n_params * a

    # --- attention, per layer
    attn = 3 * T * D * r  # residual input, normalised input, norm output
    attn += T * D * a if mixed else 0  # the norm output cast for q/k/v
    attn += 3 * T * H * Dh * a  # q after rotary, attention output, its reshape copy for o_proj
    attn += 2 * T * G * Dh * a  # k after rotary, v
    attn += T * H * 4  # logsumexp per query row
    scores = 0
    if attention_materialises_scores(arch, dev, precision):
        scores = L * 2 * B * H * S * S * a
        attn += 2 * T * H * Dh * a if G != H else 0  # k and v repeated to H heads

    # --- MoE block, per MoE layer (the router states its own share: rmoe.routers.Router's costs)
    context = arch.router_context()
    router = context.router_class
    pairs = router.routed_pairs(context, T, B)
    backend = _expert_backend(arch, dev, pairs, precision)
    moe = 3 * T * D * r  # residual after attention, normalised input, norm output
    moe += T * D * a if mixed else 0  # input cast to the expert dtype
    moe += 4 * T * E * 4  # fp32 logits, probabilities, z-loss, weights
    moe += router.saved_bytes(context, T, B, a)
    moe += 3 * pairs * F * a + 3 * pairs * 8 + pairs * a  # gate, up, silu*up; sort indices; pair weights
    if backend == "sliced":
        moe += 2 * pairs * D * a  # gathered inputs and expert outputs
    elif backend == "grouped_mm":
        moe += 3 * pairs * D * a + pairs * F * a
    if arch.shared_expert_intermediate_size:
        moe += 4 * T * arch.shared_expert_intermediate_size * a + T * D * a
    dense = 3 * T * D * r + 4 * T * arch.intermediate_size * a + (T * D * a if mixed else 0)

    final = 3 * T * D * r + 8 * T * 3  # final norm; input ids, targets
    terms["activations"] = L * attn + moe_layers * moe + dense_layers * dense + final
    if scores:
        terms["attention scores"] = scores
    terms["logits"] = T * V * (12 + (6 if mixed else 0))

    # --- the larger of the working sets of one layer's backward
    working = 3 * T * D * r  # gradients of the residual stream and of a norm
    layer_working = 0
    if moe_layers:
        layer_working = 3 * pairs * F * a + (2 * pairs * D * a if backend != "tiled" else 0)
    if dense_layers:
        layer_working = max(layer_working, 3 * T * arch.intermediate_size * a)
    layer_working = max(layer_working, 4 * T * H * Dh * a + (2 * B * H * S * S * a if scores else 0))
    # the peak is the start of the backward (logits) or a layer's backward, whichever is larger
    terms["backward working set"] = max(0, working + layer_working - terms["logits"])
    return dict(sorted(terms.items(), key=lambda kv: -kv[1]))


def estimate_step_bytes(
    arch: ModelConfig,
    batch_size: int,
    block_size: int,
    precision: str = "32-true",
    accumulate: int = 1,
    *,
    device: Any = None,
) -> int:
    """Estimated peak bytes of one training step (forward, backward, AdamW step) of one process's micro-batch.

    Args:
        arch: The model (``vocab_size`` 0 counts 256).
        accumulate: ``trainer.accumulate_grad_batches``: does not change the peak.
        device: Where the step runs (default CPU): decides the attention kernel and the expert backend.
    """
    return sum(step_memory_terms(arch, batch_size, block_size, precision, accumulate, device).values())


# ----------------------------------------------------------------------------------------------
# What the machine has


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _meminfo_available() -> int | None:
    try:
        for line in PROC_MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_available() -> int | None:
    """The cgroup's memory limit minus its usage (less reclaimable inactive page cache), None without a limit."""
    v2, v1 = CGROUP_ROOT, CGROUP_ROOT / "memory"
    for limit_file, usage_file, stat_file, cache_key in (
        (v2 / "memory.max", v2 / "memory.current", v2 / "memory.stat", "inactive_file"),
        (v1 / "memory.limit_in_bytes", v1 / "memory.usage_in_bytes", v1 / "memory.stat", "total_inactive_file"),
    ):
        limit = _read_int(limit_file)  # "max" (v2, no limit) reads as None
        if limit is None or limit >= 2**60:  # v1 writes "no limit" as a huge number
            continue
        usage = _read_int(usage_file) or 0
        usage -= min(usage, _stat_value(stat_file, cache_key))
        return max(0, limit - usage)
    return None


def available_bytes(device: Any) -> int | None:
    """Bytes a training step can still allocate on ``device``; None when unknown. CUDA: the device's free memory.
    CPU: ``MemAvailable`` of ``/proc/meminfo``, or the room under the cgroup's memory limit if lower."""
    dev = _device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return None
        try:
            return int(torch.cuda.mem_get_info(dev)[0])
        except Exception:
            return None
    if dev.type != "cpu":
        return None
    figures = [f for f in (_meminfo_available(), _cgroup_available()) if f is not None]
    return min(figures) if figures else None


# ----------------------------------------------------------------------------------------------
# The check


def _largest_fitting(fits: Any, upper: int) -> int:
    """The largest n in [0, upper) with ``fits(n)`` (monotone), 0 if none."""
    lo, hi = 0, upper
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def check_step_memory(
    arch: ModelConfig,
    batch_size: int,
    block_size: int,
    device: Any,
    precision: Any = "32-true",
    accumulate: int = 1,
    processes: int = 1,
) -> None:
    """Raise :class:`RmoeError` when one training step certainly needs more memory than ``device`` has (the
    estimate, a lower bound, exceeds it), and warn when it may (times :data:`UNDERESTIMATE`). The message names
    the largest block size and batch size that would fit with the margin.

    ``processes``: how many processes share this machine's memory, each with its own step (CPU DDP).
    Does nothing when ``RMOE_SKIP_MEMORY_CHECK=1`` or the free memory is unknown.
    """
    if os.environ.get(SKIP_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return
    available = available_bytes(device)
    if available is None:
        return
    processes = max(1, int(processes))
    terms = step_memory_terms(arch, batch_size, block_size, precision, accumulate, device)
    needed = sum(terms.values()) * processes
    dev = _device(device)
    where = "this machine" if dev.type == "cpu" else f"device {dev}"
    if needed <= available:
        if needed * UNDERESTIMATE > available:
            warnings.warn(
                f"data.block_size={block_size} with data.batch_size={batch_size} needs at least "
                f"{needed / GIB:.1f} GiB per training step (up to {UNDERESTIMATE}x that measured on similar shapes) "
                f"and {where} has {available / GIB:.1f} GiB available: it may run out of memory.",
                stacklevel=2,
            )
        return

    def fits(blocks: int, block: int) -> bool:  # with the margin: what the hints propose should really fit
        estimate = estimate_step_bytes(arch, blocks, block, precision, accumulate, device=device)
        return estimate * processes * UNDERESTIMATE <= available

    max_block = _largest_fitting(lambda n: n > 0 and fits(batch_size, n), block_size)
    max_batch = _largest_fitting(lambda n: n > 0 and fits(n, block_size), batch_size)
    biggest = ", ".join(f"{name} {value / GIB:.1f} GiB" for name, value in list(terms.items())[:3])
    hints = []
    if max_block:
        hints.append(f"data.block_size={max_block} would fit at data.batch_size={batch_size}")
    if max_batch:
        hints.append(
            f"data.batch_size={max_batch} at this block size (raise trainer.accumulate_grad_batches "
            "to keep the tokens per step)"
        )
    hint = f" ({'; '.join(hints)})" if hints else ""
    per = f" over its {processes} processes" if processes > 1 else ""
    raise RmoeError(
        f"data.block_size={block_size} with data.batch_size={batch_size} needs at least {needed / GIB:.1f} GiB per "
        f"training step{per} ({biggest}; model.arch.num_layers={arch.num_layers}, "
        f"model.arch.hidden_size={arch.hidden_size}, trainer.precision={precision}) but {where} has "
        f"{available / GIB:.1f} GiB available; lower data.block_size or data.batch_size{hint}, or "
        f"model.arch.num_layers / model.arch.hidden_size. Set {SKIP_ENV}=1 to train anyway."
    )
