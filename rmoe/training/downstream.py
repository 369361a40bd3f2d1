"""Downstream tasks during training: lm-eval's scores of the model being trained, logged to TensorBoard.

Off by default; on with a callback (lm-eval installed: ``pip install -e '.[eval]'``)::

    rmoe fit --config configs/base.yaml --config configs/eval/downstream.yaml

(``configs/eval/downstream.yaml`` adds ``DownstreamEval(tasks=small, every_n_steps=1000, limit=200)``.)

Each time, global rank 0 scores the model as ``rmoe eval`` does (:class:`rmoe.evaluation.lm_eval_model.RmoeLM`, the
run's tokenizer, ``data.block_size`` as the context) and logs ``downstream/<task>/<metric>`` (``acc``, ``acc_norm``,
``perplexity``, ...) at the optimiser step; the other processes wait at a barrier. ``rmoe report`` picks these up as
columns (``--paired-metric downstream/arc_easy/acc``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.strategies import ModelParallelStrategy

from rmoe.errors import RmoeError


class DownstreamEval(L.Callback):
    """Run lm-eval tasks every ``every_n_steps`` optimiser steps and at the end of training.

    Args:
        tasks: Comma-separated lm-eval task names or a preset of :data:`rmoe.evaluation.harness.PRESETS`.
        every_n_steps: Optimiser steps between two evaluations.
        limit: At most this many examples per task (None: all).
        num_fewshot: Few-shot examples (None: the task's default, 0 for most).
        include_path: A folder of your own lm-eval task YAMLs.
        batch_size: Rows per forward pass.
    """

    def __init__(
        self,
        tasks: str = "small",
        every_n_steps: int = 1000,
        limit: int | None = None,
        num_fewshot: int | None = None,
        include_path: str | None = None,
        batch_size: int = 8,
    ) -> None:
        self.tasks, self.every_n_steps, self.limit = tasks, every_n_steps, limit
        self.num_fewshot, self.include_path, self.batch_size = num_fewshot, include_path, batch_size
        self._names: list[str] = []
        self._manager: Any = None
        self._last_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Refuse, before training, what cannot run: lm-eval missing, a bad option, an unknown task or one whose
        data is not here, a router that is not causal in evaluation, sharded weights."""
        from rmoe.evaluation.harness import MISSING_EXTRA, expand_tasks, load_tasks
        from rmoe.inference import non_causal_reason
        from rmoe.training.strategies import ExpertParallelStrategy

        if stage != "fit":
            return
        if importlib.util.find_spec("lm_eval") is None:
            raise RmoeError(f"DownstreamEval: {MISSING_EXTRA}")
        key = "DownstreamEval"
        for option, value, minimum in (("every_n_steps", self.every_n_steps, 1), ("limit", self.limit, 1),
                                       ("batch_size", self.batch_size, 1)):  # fmt: skip
            if value is not None and value < minimum:
                raise RmoeError(f"{key}: {option}={value} is invalid; expected an integer >= {minimum}.")
        if isinstance(trainer.strategy, (ModelParallelStrategy, ExpertParallelStrategy)):
            raise RmoeError(
                f"{key}: the weights are sharded under {type(trainer.strategy).__name__}, and rank 0 alone cannot "
                "run the model; evaluate the checkpoints with `rmoe eval` instead."
            )
        reason = non_causal_reason(pl_module.arch)
        if reason is not None:
            raise RmoeError(f"{key}: lm-eval scores each token from the tokens before it; {reason}.")
        self._names = expand_tasks(self.tasks)
        if self.include_path is not None and not Path(self.include_path).is_dir():
            raise RmoeError(f"{key}: include_path={self.include_path}: no such folder.")
        if trainer.is_global_zero:
            self._manager, _ = load_tasks(self._names, self.include_path)  # unknown or unreadable: refused now

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self._evaluate(trainer, pl_module)

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step
        if trainer.is_global_zero:
            scores = self.scores(trainer, pl_module)
            for logger in trainer.loggers:
                logger.log_metrics(scores, step=trainer.global_step)
        trainer.strategy.barrier("DownstreamEval")

    def scores(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """``{downstream/<task>/<metric>: value}`` of the model as it is now."""
        import lm_eval

        from rmoe.evaluation.lm_eval_model import RmoeLM
        from rmoe.inference import LoadedModel

        datamodule = trainer.datamodule
        model = pl_module.model
        was_training = model.training
        loaded = LoadedModel(model, datamodule.tokenizer, datamodule.block_size, source=Path("."))
        try:
            results = lm_eval.simple_evaluate(
                model=RmoeLM(loaded, batch_size=self.batch_size),
                tasks=self._names,
                num_fewshot=self.num_fewshot,
                limit=self.limit,
                task_manager=self._manager,
                log_samples=False,
                bootstrap_iters=0,  # lm-eval's process pool can hang beside torch's threads
            )
        finally:
            model.train(was_training)
        out = {}
        for task, metrics in results["results"].items():
            for name, value in metrics.items():
                metric, _, _filter = name.partition(",")
                if isinstance(value, (int, float)) and not isinstance(value, bool) and not metric.endswith("_stderr"):
                    out[f"downstream/{task}/{metric}"] = float(value)
        return out
