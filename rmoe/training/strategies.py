"""Sharded data parallelism (FSDP2) through Lightning's own ``ModelParallelStrategy``, and expert parallelism
over a device mesh on top of Lightning's DDP."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch.nn.parallel import DistributedDataParallel

from rmoe.errors import RmoeError
from rmoe.model import expert_parallel as ep_lib

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from torch.distributed.device_mesh import DeviceMesh

    from rmoe.model.config import ModelConfig


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


class ExpertParallelStrategy(DDPStrategy):
    """Expert parallelism (EP) over a ``(W / ep, ep)`` device mesh (``expert_data_parallel`` x ``expert_parallel``),
    the rest of the model data parallel (DDP) over all W processes. See :mod:`rmoe.model.expert_parallel` for the
    layout and the token exchange, docs/devices.md#expert-parallelism for how to choose ``ep``.

    Gradients: DDP averages the replicated parameters over the W processes; each expert's gradient already holds
    the contributions of every process of its EP group (the all-to-all's backward brings them), so it is summed
    over the processes that hold the same experts and divided by W, which is the gradient of the mean loss, as on
    one process with the whole batch. Checkpoints hold all E experts (gathered on every save, cut again on every
    load): they load on one process and resume at any ``ep``.

    Args:
        expert_parallel_size: ``ep``, the processes that share one copy of the experts; it divides the number of
            processes and ``model.arch.num_experts``.
        process_group_backend: ``nccl`` on GPUs, ``gloo`` on CPUs by default.
        timeout: Timeout of the collectives.
    """

    def __init__(
        self,
        expert_parallel_size: int = 2,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(process_group_backend=process_group_backend, timeout=timeout)
        self.expert_parallel_size = expert_parallel_size
        self.device_mesh: DeviceMesh | None = None

    def check_model(self, arch: ModelConfig, compile: bool) -> None:
        """Refuse, before any process starts, an ``ep`` this run cannot use (one paragraph naming the keys)."""
        ep, world = self.expert_parallel_size, self.num_nodes * self.num_processes
        key = "trainer.strategy.init_args.expert_parallel_size"
        if isinstance(ep, bool) or not isinstance(ep, int) or ep < 1:
            raise RmoeError(
                f"{key}={ep!r} is invalid; expected an integer >= 1 that divides the number of processes and "
                "model.arch.num_experts."
            )
        problems = []
        if world % ep:
            problems.append(
                f"{key}={ep} must divide the number of processes, trainer.devices x trainer.num_nodes = "
                f"{self.num_processes} x {self.num_nodes} = {world}"
            )
        if arch.num_experts == 0 or arch.num_experts % ep:
            problems.append(f"{key}={ep} must divide model.arch.num_experts={arch.num_experts}")
        if compile:
            problems.append(
                "model.compile=true is not supported under expert parallelism (the all-to-all's split sizes are "
                "read on the host in every MoE layer); set model.compile=false"
            )
        if problems:
            raise RmoeError("Expert parallelism cannot run this config: " + "; ".join(problems) + ".")

    def setup_environment(self) -> None:
        super().setup_environment()  # the default process group
        from torch.distributed.device_mesh import init_device_mesh

        ep, world = self.expert_parallel_size, self.world_size
        if world % ep:
            raise RmoeError(
                f"trainer.strategy.init_args.expert_parallel_size={ep} does not divide the {world} processes."
            )
        self.device_mesh = init_device_mesh(
            self.root_device.type, (world // ep, ep), mesh_dim_names=("expert_data_parallel", "expert_parallel")
        )

    def _shard(self, module: torch.nn.Module) -> list[str]:
        mesh = self.device_mesh["expert_parallel"]
        return ep_lib.shard_experts(module, mesh.get_group(), mesh.size(), mesh.get_local_rank())

    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        if trainer.state.fn != TrainerFn.FITTING:  # not wrapped (no gradients): shard after Lightning's state sync
            self._shard(self.lightning_module)

    def _setup_model(self, model: torch.nn.Module) -> DistributedDataParallel:
        """Keep this process's experts, then DDP for the rest (it leaves the expert weights alone)."""
        names = self._shard(model)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
        return super()._setup_model(model)

    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        """Average the expert gradients right after the step's last backward, before any hook reads them."""

        def closure_then_sync() -> Any:
            loss = closure()
            self.sync_expert_grads()
            return loss

        return super().optimizer_step(optimizer, closure_then_sync, model, **kwargs)

    @torch.no_grad()
    def sync_expert_grads(self) -> None:
        """Sum each expert gradient over the processes that hold the same experts, divide by the world size
        (an expert without a gradient gets a zero one, as an expert without tokens has on one process)."""
        params = ep_lib.expert_parameters(self.lightning_module)
        if not params:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])  # one collective for every layer
        replicas = self.device_mesh["expert_data_parallel"]
        if replicas.size() > 1:
            dist.all_reduce(flat, group=replicas.get_group())
        flat.div_(self.world_size)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """All E experts in the checkpoint (every process gathers, rank 0 writes)."""
        return ep_lib.gather_expert_state(self.lightning_module, self.lightning_module.state_dict())

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        state = ep_lib.slice_expert_state(self.lightning_module, checkpoint["state_dict"])
        self.lightning_module.load_state_dict(state, strict=strict)

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the torch one
        return ep_lib.gather_optimizer_state(self.lightning_module, optimizer)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        sliced = [ep_lib.slice_optimizer_state(self.lightning_module, getattr(o, "_optimizer", o), state)
                  for o, state in zip(self.optimizers, checkpoint["optimizer_states"], strict=True)]  # fmt: skip
        super().load_optimizer_state_dict({**checkpoint, "optimizer_states": sliced})
