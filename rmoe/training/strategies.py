"""Sharded data parallelism (FSDP2) through Lightning's own ``ModelParallelStrategy``."""

from __future__ import annotations

from datetime import timedelta

from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as pure FSDP2: one data-parallel mesh dimension over every process and
    no tensor parallelism (its ``"auto"`` sizes would mean tensor parallel within a node, which this model does
    not implement). :meth:`rmoe.training.module.MoeLMModule.configure_model` applies ``fully_shard`` on that mesh.

    Args:
        save_distributed_checkpoint: False (default): each checkpoint is one ordinary ``.ckpt`` file
            with the full weights and optimiser state, gathered on rank 0; it loads on one process
            (``rmoe validate --ckpt ...``). True: a folder with one shard per process (faster to
            write for large models; ``python -m lightning.pytorch.utilities.consolidate_checkpoint``
            turns it into a single file).
        process_group_backend: ``nccl`` on GPUs, ``gloo`` on CPUs by default.
        timeout: Timeout of the collectives.
    """

    def __init__(
        self,
        save_distributed_checkpoint: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()
