"""What a run's ``trainer.precision`` (Lightning's spellings) means for the model, and the checks before it starts."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from rmoe.errors import RmoeError
from rmoe.model.config import ModelConfig
from rmoe.model.moe import grouped_mm_unavailable, resolve_expert_backend


def compute_dtype(precision: Any) -> torch.dtype:
    """The dtype the matmuls run in: the autocast dtype of ``*-mixed``, the weights' of ``*-true``."""
    p = str(precision).lower()
    if p in ("64", "64-true", "double"):
        return torch.float64
    if "bf16" in p:
        return torch.bfloat16
    if "16" in p or p == "half":
        return torch.float16
    return torch.float32


def check_device_and_precision(arch: ModelConfig, device: torch.device, precision: Any, compile: bool = False) -> str:
    """Refuse, before anything runs, a precision, expert backend or compilation that cannot run on ``device``;
    returns the expert backend that will run. A forced ``grouped_mm`` without its fused kernel only warns (torch's
    per-group fallback computes the same numbers, with a host sync per call).
    """
    dtype = compute_dtype(precision)
    if device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] < 8:
        # bf16 needs Ampere (8.0) or newer; torch.cuda.is_bf16_supported() also says yes where it is emulated
        raise RmoeError(
            f"trainer.precision={precision!s} needs bf16, which {torch.cuda.get_device_name(device)} does not "
            "support; use 16-mixed (fp16 with a gradient scaler) or 32-true."
        )
    if arch.num_experts == 0:
        return "none"
    D, F_ = arch.hidden_size, arch.moe_intermediate_size
    backend = expert_backend_of_run(arch, device, precision)
    if compile:
        problem = arch.router_context().router_class.compile_problem
        if problem is not None:
            raise RmoeError(
                f"model.compile=true cannot compile router {arch.router!r}: {problem}. Set model.compile=false."
            )
        if backend == "grouped_mm" and dtype != torch.bfloat16:
            raise RmoeError(
                f"model.compile=true with model.arch.expert_backend=grouped_mm needs bf16 (torch traces grouped_mm "
                f"in bf16 only), not trainer.precision={precision!s}; use bf16-mixed, or expert_backend 'sliced'."
            )
    if arch.expert_backend == "grouped_mm" and device.type == "cuda":
        reason = grouped_mm_unavailable(device, dtype, D, F_)
        if reason is not None:
            warnings.warn(
                f"model.arch.expert_backend=grouped_mm runs torch's per-group fallback here ({reason}): the same "
                "numbers, with a host sync per call; 'auto' would run 'sliced'.",
                stacklevel=2,
            )
    return backend


def expert_backend_of_run(arch: ModelConfig, device: torch.device, precision: Any) -> str:
    """The expert backend a run's MoE layers take (``none`` without experts; ``auto`` resolved)."""
    if arch.num_experts == 0:
        return "none"
    dtype = compute_dtype(precision)
    return resolve_expert_backend(arch.expert_backend, device, dtype, arch.hidden_size, arch.moe_intermediate_size, 0)
