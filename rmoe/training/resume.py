"""What ``rmoe fit --ckpt`` may change about a run, and what the learning rate does when it does.

* **What the run is** cannot change: ``model.arch.*`` (but ``expert_backend``), ``data.tokenizer``,
  ``data.bpe_vocab_size``, ``data.block_size``; :func:`check_resume_config` refuses a difference before anything
  is written (a new run from the weights: ``model.init_from``).
* **The data position**: batch size, seed, processes and accumulation must be the checkpoint's
  (checked by :mod:`rmoe.data.sampler`).
* **Everything else applies from the resume step**, the learning-rate schedule by :class:`LRSchedule`'s rule:
  unchanged, it continues exactly; a new peak ``model.optim.lr`` scales the rest of it; a changed shape
  (``warmup_steps``, ``min_lr_ratio``, ``trainer.max_steps``) restarts a cosine from the multiplier reached at the
  resume step to the new end, without a jump.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from rmoe.errors import RmoeError
from rmoe.model.config import arch_differences

DATA_KEYS_THAT_MAY_NOT_CHANGE = ("tokenizer", "bpe_vocab_size", "block_size")


def _plain(value: Any) -> Any:
    """Namespaces, dataclasses and tuples as plain dicts and lists, for comparison and messages."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def check_resume_config(config: Any, checkpoint: dict[str, Any], ckpt_path: str) -> None:
    """Refuse a ``fit --ckpt`` whose parsed ``fit`` config changes what the run is, naming every differing key."""
    saved_arch = _plain(checkpoint.get("hyper_parameters", {}).get("arch") or {})
    saved_data = _plain(checkpoint.get("datamodule_hyper_parameters") or {})
    arch = _plain(getattr(getattr(config, "model", None), "arch", None) or {})
    data = _plain(getattr(config, "data", None) or {})
    if not saved_arch:  # not written by rmoe fit (an imported model): nothing to compare
        return
    differences = arch_differences(saved_arch, arch, "in the checkpoint", "given")
    for key in DATA_KEYS_THAT_MAY_NOT_CHANGE:
        if key in saved_data and key in data and saved_data[key] != data[key]:
            if key == "bpe_vocab_size" and data.get("tokenizer") != "bpe":
                continue
            differences.append(f"data.{key}: {saved_data[key]!r} in the checkpoint, {data[key]!r} given")
    if differences:
        raise RmoeError(
            f"--ckpt {ckpt_path}: a resumed run cannot change what it is, and the config given differs from the "
            f"checkpoint's: {'; '.join(differences)}. Resume with the run's own config (its config.yaml) and change "
            "only what a resumed run can take (docs/configs-and-cli.md, resuming), or start a new run from these "
            f"weights with model.init_from={ckpt_path}."
        )


@dataclasses.dataclass(frozen=True)
class LRSchedule:
    """The learning rate of every optimiser step: ``peak_lr`` times :meth:`multiplier`.

    Linear warmup to 1 over ``warmup_steps``, then a cosine to ``min_lr_ratio`` at ``total_steps``. A resumed run
    whose schedule changed restarts it at ``restart_step``: a cosine from ``restart_multiplier`` (what the earlier
    schedule had reached; after finishing the new warmup, if any). Saved in every checkpoint.
    """

    peak_lr: float
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float
    restart_step: int | None = None
    restart_multiplier: float | None = None

    def multiplier(self, step: int) -> float:
        if self.restart_step is None or step < self.restart_step:
            return warmup_cosine(step, self.warmup_steps, self.total_steps, self.min_lr_ratio)
        r, start = self.restart_step, float(self.restart_multiplier)
        if step < self.warmup_steps:  # the new warmup is not over: on from `start` to 1 at its end
            return start + (1.0 - start) * (step - r) / (self.warmup_steps - r)
        if r < self.warmup_steps:  # warmed up to 1 after the restart: the cosine starts there
            r, start = self.warmup_steps, 1.0
        progress = min(1.0, (step - r) / max(1, self.total_steps - r))
        return self.min_lr_ratio + (start - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def resumed(self, saved: LRSchedule | None, step: int) -> LRSchedule:
        """This run's schedule when resuming at ``step`` a run that had ``saved`` (None: as unchanged)."""
        if saved is None:
            return self
        if (saved.warmup_steps, saved.total_steps, saved.min_lr_ratio) == (
            self.warmup_steps, self.total_steps, self.min_lr_ratio
        ):  # fmt: skip
            return dataclasses.replace(saved, peak_lr=self.peak_lr)  # the same shape, at the peak now given
        return dataclasses.replace(self, restart_step=step, restart_multiplier=saved.multiplier(step))


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup from ~0 to 1, then cosine from 1 down to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
