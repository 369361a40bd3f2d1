"""The LightningModule: LM loss + balance losses, AdamW with warmup-cosine, logging.

Shape legend: L MoE layers, E experts.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import warnings
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import lightning as L
import torch
import torch.nn.functional as F

from rmoe.errors import RmoeError, check_field_types
from rmoe.metrics.gradients import router_grad_norm_tensors
from rmoe.metrics.language import language_metrics
from rmoe.model.config import ModelConfig
from rmoe.model.decoder import MoeLM
from rmoe.model.expert_parallel import expert_parallel_of, expert_parameters
from rmoe.model.losses import average_over_layers, expert_counts
from rmoe.routers import Router, RoutingOutput
from rmoe.syncs import HostCopy, all_reduce_mean_, all_reduce_sum_, to_host
from rmoe.training.precision import expert_backend_of_run
from rmoe.training.resume import LRSchedule

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch.distributed.device_mesh import DeviceMesh

TRAIN_LOSSES = ("loss", "aux_loss", "z_loss", "router_loss", "total_loss")
"""``train/<name>`` scalars, each the mean over the optimiser step's micro-batches and processes
(with ``train/grad_norm``, the global gradient norm before clipping), logged every
``trainer.log_every_n_steps`` optimiser steps."""


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``min_lr_ratio * lr``.

    Args:
        lr: Peak learning rate.
        min_lr_ratio: Final learning rate as a fraction of ``lr``.
        warmup_steps: Linear warmup (optimiser steps).
        weight_decay: Decoupled weight decay, applied to matrices only (not to norms, biases or
            embeddings, and so not to a tied LM head either).
        beta1: Adam beta1.
        beta2: Adam beta2.
        eps: Adam epsilon.
        skip_nonfinite_steps: How many optimiser steps with a non-finite loss or gradient norm may be
            skipped (no parameter changes, a warning each) before the run stops; 0, the default,
            stops at the first.
    """

    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    skip_nonfinite_steps: int = 0

    def __post_init__(self) -> None:
        """Reject values AdamW or the schedule cannot work with, naming the key."""
        check_field_types(self, "model.optim")
        checks = (
            ("lr", math.isfinite(self.lr) and self.lr > 0, "a finite number > 0"),
            ("beta1", 0.0 <= self.beta1 < 1.0, "a number in [0, 1)"),
            ("beta2", 0.0 <= self.beta2 < 1.0, "a number in [0, 1)"),
            ("eps", self.eps > 0, "a number > 0"),
            ("weight_decay", self.weight_decay >= 0, "a number >= 0"),
            ("min_lr_ratio", 0.0 <= self.min_lr_ratio <= 1.0, "a number in [0, 1]"),
            ("warmup_steps", self.warmup_steps >= 0, "an integer >= 0"),
            ("skip_nonfinite_steps", self.skip_nonfinite_steps >= 0, "an integer >= 0"),
        )
        for key, ok, expected in checks:
            if not ok:
                raise RmoeError(f"model.optim.{key}={getattr(self, key)!r} is invalid; expected {expected}.")


class MoeLMModule(L.LightningModule):
    """Trains :class:`~rmoe.model.decoder.MoeLM` on batches of token blocks (B, S+1).

    Args:
        arch: The model architecture (``vocab_size`` is filled in from the data module).
        optim: Optimiser and schedule.
        aux_loss_coef: Weight of the load-balancing loss (mean over MoE layers; 1.0 = balanced).
        z_loss_coef: Weight of the router z-loss (mean over MoE layers).
        aux_loss_scope: Where the load-balancing loss counts its expert fractions ``f_e`` in
            training. ``micro_batch`` (default): each process's micro-batch, as most frameworks
            do. ``global_batch``: summed over every data-parallel process and over the
            micro-batches of the optimiser step so far (Qiu et al., "Demons in the Detail",
            arXiv 2501.11873: one extra all-reduce of an (L, E) count tensor per micro-batch).
            With one micro-batch per step it is exactly the loss of the whole global batch on one
            process; under gradient accumulation the k-th micro-batch uses the counts of
            micro-batches 1..k (later ones are not computed yet), so the last one sees the whole
            step. ``P_e`` is always the local mean (its gradient is averaged by DDP/FSDP).
            ``sequence``: the loss of each sequence alone, averaged over the sequences (DeepSeek-V3's
            sequence-wise balance loss, arXiv 2412.19437, in training and evaluation).
            Validation and test use each batch's own fractions.
        compile: ``torch.compile`` each decoder layer (in place, so checkpoint names don't change), with
            ``fullgraph=True`` on the ``grouped_mm`` path. The ``rmoe`` command refuses what cannot be
            compiled before anything runs (:func:`rmoe.training.precision.check_device_and_precision`).
        init_from: Start ``rmoe fit`` from the model weights of this rmoe checkpoint or export folder
            (e.g. the ``checkpoints/imported.ckpt`` of ``rmoe import``, or another run's) and nothing else:
            step, optimiser, schedule and data order start afresh (fine-tuning). The architecture
            must match (``model.arch``; the error names the mismatched weights). To continue a run,
            use ``--ckpt`` instead (it restores everything, and wins over this).
    """

    def __init__(
        self,
        arch: ModelConfig,
        optim: OptimConfig | None = None,
        aux_loss_coef: float = 0.01,
        z_loss_coef: float = 0.001,
        aux_loss_scope: Literal["micro_batch", "global_batch", "sequence"] = "micro_batch",
        compile: bool = False,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        for key, value in (("aux_loss_coef", aux_loss_coef), ("z_loss_coef", z_loss_coef)):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (math.isfinite(value) and value >= 0)
            ):
                raise RmoeError(f"model.{key}={value!r} is invalid; expected a finite number >= 0 (0: off).")
        if aux_loss_scope not in ("micro_batch", "global_batch", "sequence"):
            raise RmoeError(
                f"model.aux_loss_scope={aux_loss_scope!r} is invalid; expected micro_batch, global_batch or sequence."
            )
        self.save_hyperparameters()
        self.arch = arch
        self.optim = optim or OptimConfig()
        self.aux_loss_coef = aux_loss_coef
        self.z_loss_coef = z_loss_coef
        self.aux_loss_scope = aux_loss_scope
        self.compile_layers = compile
        self.init_from = init_from
        _check_model_fits(arch)
        self.model = MoeLM(arch)
        self.tokens_seen = 0
        self.skipped_steps = 0  # optimiser steps skipped for a non-finite loss (optim.skip_nonfinite_steps)
        # Set by RoutingAnalytics(grad_norms=True): every this many optimiser steps (0: never), the
        # first micro-batch's training_step on global rank 0 also measures the router gradient norms
        # per loss, while the graph is alive, and returns them with the step's outputs.
        self.router_grad_norms_every = 0
        self._grad_norms_step = -1  # the last step they were measured at
        self._step_counts_LE: torch.Tensor | None = None  # global_batch: expert counts of this step so far
        self._step_loss_sums: torch.Tensor | None = None  # TRAIN_LOSSES summed over this step's micro-batches
        self._finite_losses: deque[tuple[int, float]] = deque(maxlen=5)  # (step, train/loss), last finite steps
        self._step_micro_batches = 0
        self._pending: tuple[int, HostCopy] | None = None  # (step, its values on their way to the host)
        self._grad_norm: torch.Tensor | None = None  # this step's global gradient norm (device scalar)
        self._grad_share_scale = 1
        self._step_clock: float | None = None  # expert parallelism: the end of the previous step (perf_counter)
        self._resumed: tuple[int, LRSchedule | None] | None = None  # (step, saved schedule) of a resumed run
        self._evaluated: dict[str, tuple[int, int]] = {}  # split -> (tokens, batches) of this pass, this process
        self.lr_schedule: LRSchedule | None = None

    def setup(self, stage: str) -> None:
        """``init_from``: load the weights before the model is compiled or sharded (``configure_model``)
        and before Lightning restores a ``--ckpt``, which then overrides them."""
        if stage == "fit" and self.init_from:
            self._load_weights(self.init_from)

    def _load_weights(self, path: str) -> None:
        from rmoe.inference import load_model

        state = load_model(path, key="model.init_from", with_tokenizer=False).model.state_dict()
        own = self.model.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or wrong:
            parts = [f"{what}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                     for what, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", wrong))
                     if keys]  # fmt: skip
            raise RmoeError(
                f"model.init_from={path!r} does not fit model.arch ({'; '.join(parts)}); use the config the "
                "checkpoint was trained or imported with (its config.yaml)."
            )
        with torch.no_grad():
            self.model.load_state_dict(state, strict=True)

    def configure_model(self) -> None:
        """Compile the layers if asked, then shard with FSDP2 under a ``ModelParallelStrategy`` (it
        sets ``self.device_mesh``; see :class:`rmoe.training.strategies.FSDP2Strategy`)."""
        from torch.distributed.fsdp import FSDPModule

        if isinstance(self.model, FSDPModule):  # Lightning calls this hook again for validate / test
            return
        if self.compile_layers:
            # One graph per decoder layer, in place (checkpoint names unchanged; FSDP2 then wraps each
            # layer as torchtitan does). Without a host read inside (grouped_mm) each layer is traced
            # whole (fullgraph: a graph break is an error, not a silent slowdown); sliced/tiled read
            # the group sizes on the host, so their layers break there once.
            backend = expert_backend_of_run(self.arch, self.trainer.strategy.root_device, self.trainer.precision)
            fullgraph = backend in ("grouped_mm", "none")
            for layer in self.model.layers:
                layer.compile(fullgraph=fullgraph)
        if self.device_mesh is not None:
            self._fully_shard(self.device_mesh)

    def _fully_shard(self, mesh: DeviceMesh) -> None:
        """FSDP2 (``torch.distributed.fsdp.fully_shard``; Zhao et al., "PyTorch FSDP", arXiv 2304.11277)
        over the data-parallel mesh: each decoder layer is one unit (its parameters all-gathered just
        before its forward and backward, freed after, gradients reduce-scattered), the root holds the
        rest (embeddings and tied LM head, final norm, RMoE's shared recurrent cell). Every parameter
        is sharded on dim 0: the 3-D expert weights ``(E, F, D)`` split across experts."""
        from torch.distributed.fsdp import fully_shard

        names = mesh.mesh_dim_names or ()
        if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
            raise RmoeError(
                f"trainer.strategy: tensor_parallel_size={mesh['tensor_parallel'].size()} is not supported (rmoe "
                "shards with FSDP2 only); use rmoe.training.strategies.FSDP2Strategy (configs/strategy/fsdp.yaml)."
            )
        dp_mesh = mesh["data_parallel"] if "data_parallel" in names else mesh
        for layer in self.model.layers:
            fully_shard(layer, mesh=dp_mesh)
        fully_shard(self.model, mesh=dp_mesh)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids).logits

    def _losses(
        self, batch: torch.Tensor, sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> tuple[dict[str, torch.Tensor], list[RoutingOutput]]:
        """LM, balance and total losses of a batch (B, S+1), and the routing of every MoE layer.

        Args:
            batch: Token blocks; inputs ``[:, :-1]``, targets ``[:, 1:]``.
            sum_over_ranks: Given (``aux_loss_scope="global_batch"`` in training), the
                load-balancing loss takes its expert fractions from the counts of this optimiser
                step so far, summed across processes by this function (an all-reduce).
        """
        inputs, targets = batch[:, :-1], batch[:, 1:]
        out = self.model(inputs)
        lm_loss = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten())
        fraction_LE = self._step_fractions(out.routing, sum_over_ranks) if sum_over_ranks and out.routing else None
        num_sequences = inputs.shape[0] if self.aux_loss_scope == "sequence" else None
        aux_loss, z_loss, router_loss = (
            loss.to(lm_loss.device)
            for loss in average_over_layers(out.routing, self.arch.num_experts, fraction_LE, num_sequences)
        )
        # the routers' own losses (top-p's entropy, ReMoE's L1) carry their coefficients
        balance_loss = self.aux_loss_coef * aux_loss + self.z_loss_coef * z_loss + router_loss
        losses = {
            "loss": lm_loss + balance_loss,
            "lm_loss": lm_loss,
            "aux_loss": aux_loss,
            "z_loss": z_loss,
            "router_loss": router_loss,
        }
        return {**losses, "balance_loss": balance_loss}, out.routing

    @torch.no_grad()
    def _step_fractions(
        self, routing: list[RoutingOutput], sum_over_ranks: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """Global-batch ``f_e`` per MoE layer (L, E): this micro-batch's expert counts summed over the
        processes, added to the step's earlier micro-batches, normalised per layer."""
        counts_LE = sum_over_ranks(torch.stack([expert_counts(r, self.arch.num_experts) for r in routing]))
        if self._step_counts_LE is not None:
            counts_LE = counts_LE + self._step_counts_LE
        self._step_counts_LE = counts_LE
        return counts_LE / counts_LE.sum(dim=-1, keepdim=True).clamp(min=1.0)

    def _sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum_(tensor.clone())

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> dict[str, Any]:
        """The loss to back-propagate (``"loss"``) and, for callbacks (the ``outputs`` of
        ``on_train_batch_end``): ``"routing"``, every MoE layer's :class:`RoutingOutput` (detached),
        and on the steps :attr:`router_grad_norms_every` asks for, ``"router_grad_norms"``
        (:func:`~rmoe.metrics.gradients.router_grad_norm_tensors` of the LM loss and of the balance
        loss, device scalars; the balance part only when it has a gradient)."""
        global_batch = self.aux_loss_scope == "global_batch"
        losses, routing = self._losses(batch, self._sum_over_ranks if global_batch else None)
        self.tokens_seen += batch[:, 1:].numel() * self.trainer.world_size
        values = torch.stack([losses[k] for k in ("lm_loss", "aux_loss", "z_loss", "router_loss", "loss")]).detach()
        self._step_loss_sums = values if self._step_loss_sums is None else self._step_loss_sums + values
        self._step_micro_batches += 1
        out: dict[str, Any] = {"loss": losses["loss"], "routing": [r.detach() for r in routing]}
        step = self.trainer.global_step
        every = self.router_grad_norms_every
        if every and step % every == 0 and step != self._grad_norms_step and self.trainer.is_global_zero:
            self._grad_norms_step = step
            balance = losses["balance_loss"]
            has_own = any(r.router_loss is not None for r in routing)
            weighted = (self.aux_loss_coef or self.z_loss_coef or has_own) and balance.requires_grad  # else none
            named = {"lm": losses["lm_loss"], **({"balance": balance} if weighted else {})}
            out["router_grad_norms"] = router_grad_norm_tensors(self.model, named)
        return out

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The end of an optimiser step's backward: its losses and gradient norm, checked and logged.

        The step's losses (mean over its micro-batches) and this process's share of the squared
        gradient norm go through ONE all-reduce, so ``train/loss`` is the loss of the global batch
        whatever the split into devices and accumulation steps, and every process takes the same
        decision. The divergence guard (:meth:`_check_step`) never makes the host wait for the GPU
        outside logged steps: with fused AdamW the update of a non-finite step is cancelled on the
        device (the optimiser's ``found_inf``, as a gradient scaler does), and the values reach the
        host through a non-blocking copy that is checked at the next step, before its update. On the
        steps Lightning logs (``trainer.log_every_n_steps``), the values are read at once, in one
        transfer, and logged from the host. Without a fused optimiser (fp16 with clipping) the check
        reads every step (one host synchronisation per step).
        """
        if self._step_loss_sums is None:
            return
        local = torch.cat([self._step_loss_sums / self._step_micro_batches, self._grad_norm_share()])
        reduced = all_reduce_mean_(local)
        self._step_loss_sums, self._step_micro_batches = None, 0
        means, grad_square = reduced[: len(TRAIN_LOSSES)], reduced[-1] * self._grad_share_scale
        self._grad_norm = grad_square.sqrt()  # the clipping below reads it (one pass over the gradients)
        step = int(self.trainer.global_step)
        self._check_pending()  # the previous step's values, copied without waiting
        found_inf = self._device_skip(optimizer, reduced)
        if logs_this_step(self.trainer) or found_inf is None:
            values = to_host([torch.cat([means, self._grad_norm.reshape(1)])])[0]
            if self._check_step(step, values.tolist()) and logs_this_step(self.trainer):
                scaled = getattr(self.trainer.precision_plugin, "scaler", None) is not None  # norm not measured
                for name, value in zip((*TRAIN_LOSSES, "grad_norm"), values, strict=True):
                    if not (scaled and name == "grad_norm"):
                        self.log(f"train/{name}", value, prog_bar=name == "loss")
                self.log("train/tokens_seen", torch.tensor(float(self.tokens_seen)))
                self.log("train/lr", torch.tensor(float(optimizer.param_groups[0]["lr"])))
                if self.optim.skip_nonfinite_steps:
                    self.log("train/skipped_steps", torch.tensor(float(self.skipped_steps)))
        else:
            self._pending = (step, HostCopy(torch.cat([means, self._grad_norm.reshape(1)])))
        self._log_expert_parallel()

    def _log_expert_parallel(self) -> None:
        """Under expert parallelism, on logged steps: each process's all-to-all traffic of the step (``ep/sent/
        rank<r>``, ``ep/received/rank<r>``: (token, expert) rows, each of the model width, summed over the MoE
        layers and forward + backward counted once), ``ep/load_imbalance`` (the busiest process's expert rows over
        the mean: what the balance loss buys in time) and ``ep/all_to_all_share`` (the mean share of the step's
        wall time spent inside the all-to-alls). One all-gather on logged steps only."""
        ep = expert_parallel_of(self)
        if ep is None:
            return
        stats = ep.stats
        now = time.perf_counter()
        step_seconds, self._step_clock = now - (self._step_clock or now), now
        taken = stats.take()
        if not logs_this_step(self.trainer):
            return
        mine = torch.tensor([taken["sent"], taken["received"], taken["computed"], taken["seconds"], step_seconds])
        device = self._step_loss_sums.device if self._step_loss_sums is not None else mine.device
        everyone = [torch.empty(5, device=device) for _ in range(self.trainer.world_size)]
        torch.distributed.all_gather(everyone, mine.to(device))
        table = torch.stack(everyone).cpu()  # (W, 5)
        for rank, row in enumerate(table):
            self.log(f"ep/sent/rank{rank}", row[0], rank_zero_only=True)
            self.log(f"ep/received/rank{rank}", row[1], rank_zero_only=True)
        computed = table[:, 2]
        self.log("ep/load_imbalance", computed.max() / computed.mean().clamp(min=1.0), rank_zero_only=True)
        if bool((table[:, 4] > 0).all()):
            self.log("ep/all_to_all_share", (table[:, 3] / table[:, 4]).mean(), rank_zero_only=True)

    def _grad_norm_share(self) -> torch.Tensor:
        """``(1,)`` fp32: this process's share of the squared gradient norm, such that the mean over the
        processes times ``_grad_share_scale`` is the squared norm of the whole gradient (FSDP2 shards:
        each process holds a part, scale = world size; DDP: each holds all of it, scale = 1).

        0 under a GradScaler (fp16): infinite gradients are its normal signal to skip a step and
        lower the scale, not a divergence.
        """
        device = self._step_loss_sums.device
        self._grad_share_scale = 1
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return torch.zeros(1, device=device)
        ep = expert_parallel_of(self)  # expert parallelism: this process holds some of the experts
        sharded = set(map(id, expert_parameters(self))) if ep is not None else set()
        grads = [p.grad for p in self.parameters() if p.grad is not None and id(p) not in sharded]
        expert_grads = [p.grad for p in self.parameters() if p.grad is not None and id(p) in sharded]
        if any(hasattr(g, "to_local") for g in grads):  # FSDP2's DTensor shards
            grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
            self._grad_share_scale = self.trainer.world_size
        share = torch.zeros(1, device=device)
        if grads:
            share = torch.nn.utils.get_total_norm(grads).float().pow(2).reshape(1).to(device)
        if expert_grads:
            # ep processes hold disjoint experts, each replicated W/ep times: ep x the local square, averaged
            # over the W processes, is the experts' whole square
            square = torch.nn.utils.get_total_norm(expert_grads).float().pow(2).reshape(1).to(device)
            share = share + ep.size * square
        return share

    def _device_skip(self, optimizer: torch.optim.Optimizer, reduced: torch.Tensor) -> torch.Tensor | None:
        """Cancel this step's update on the device when a value is not finite: the fused optimiser's
        ``found_inf`` (1.0 skips every parameter and moment, as a gradient scaler's does). None where
        the optimiser cannot (not fused, or a gradient scaler owns ``found_inf``)."""
        optimizer = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps the torch one
        fused = all(group.get("fused") for group in optimizer.param_groups)
        if not fused or getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return None
        found_inf = (~torch.isfinite(reduced).all()).float()  # () like the step counters it is subtracted from
        optimizer.found_inf = found_inf
        return found_inf

    def _check_pending(self) -> None:
        """Check the values of an earlier step that were copied to the host without waiting."""
        if self._pending is not None:
            step, copy = self._pending
            self._pending = None
            self._check_step(step, copy.tolist())

    def _check_step(self, step: int, values: list[float]) -> bool:
        """Stop ``fit`` at the first optimiser step whose loss or gradient norm is not finite (or skip it,
        up to ``optim.skip_nonfinite_steps`` times): returns False for a skipped step, True for a finite one.

        Raised before any later update, so no parameter (and no checkpoint) ever holds a value of a
        non-finite step: where the check runs a step late, the device already cancelled that step's
        update (:meth:`_device_skip`); where it runs at once, the gradients are dropped here.
        """
        lm_loss, grad_norm = values[0], values[-1]
        if all(math.isfinite(v) for v in values):
            self._finite_losses.append((step, lm_loss))
            return True
        bad = [f"train/{n}={v}" for n, v in zip(TRAIN_LOSSES, values, strict=False) if not math.isfinite(v)]
        if not math.isfinite(grad_norm):
            bad.append("the gradient norm is not finite")
        last = ", ".join(f"step {s}: {v:.4f}" for s, v in self._finite_losses) or "none (the first step diverged)"
        if self.skipped_steps < self.optim.skip_nonfinite_steps:
            # no gradient, no update: AdamW leaves a parameter without .grad (and its moments) untouched;
            # every process decided on the same all-reduced values, so all of them skip
            if step == self.trainer.global_step:
                for p in self.parameters():
                    p.grad = None
            self.skipped_steps += 1
            warnings.warn(
                f"optimiser step {step} skipped ({'; '.join(bad)}): {self.skipped_steps} of at most "
                f"{self.optim.skip_nonfinite_steps} (model.optim.skip_nonfinite_steps).",
                stacklevel=2,
            )
            return False
        skipped = f" after {self.skipped_steps} skipped step(s)" if self.skipped_steps else ""
        raise RmoeError(
            f"training diverged at optimiser step {step}{skipped}: {'; '.join(bad)}. "
            f"The last finite losses were {last}. "
            f"The run stopped before this step changed any parameter: no checkpoint holds a non-finite value. "
            f"Lower model.optim.lr (now {self.optim.lr:g}), keep trainer.gradient_clip_val on, or resume from "
            "the run's last finite checkpoint (checkpoints/last.ckpt) with other settings."
        )

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip by the global gradient norm already computed for the divergence guard (no second pass
        over the gradients), as ``torch.nn.utils.clip_grads_with_norm_``: every gradient times
        ``min(1, clip / (norm + 1e-6))``, on the device; by value as ``clip_grad_value_``. Lightning
        clips itself only under fp16's scaler (the gradients are still scaled here): it refuses a
        fused optimiser under mixed precision even in bf16, where no scaler is involved, so this is
        what keeps fused AdamW on under ``bf16-mixed`` with ``gradient_clip_val``."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        by_norm = gradient_clip_algorithm in (None, "norm")
        if not gradient_clip_val or scaler is not None or (by_norm and self._grad_norm is None):
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        if not by_norm:  # by value: each gradient entry into [-clip, clip] (clip_grad_value_)
            for g in grads:
                g.clamp_(-float(gradient_clip_val), float(gradient_clip_val))
            return
        coef = (float(gradient_clip_val) / (self._grad_norm + 1e-6)).clamp(max=1.0)
        for device_grads in _by_device(grads).values():
            torch._foreach_mul_(device_grads, coef.to(device_grads[0].device))

    def _eval_step(self, batch: torch.Tensor, split: str) -> dict[str, Any]:
        """Logs the batch's losses; returns ``{"routing": ...}`` for callbacks (``on_validation_batch_end``)."""
        losses, routing = self._losses(batch)
        n = batch[:, 1:].numel()  # token-weighted mean over the split
        tokens, batches = self._evaluated.get(split, (0, 0))
        self._evaluated[split] = (tokens + n, batches + 1)
        self.log(f"{split}/loss", losses["lm_loss"], batch_size=n, sync_dist=True, prog_bar=split == "val")
        self.log(f"{split}/aux_loss", losses["aux_loss"], batch_size=n, sync_dist=True)
        self.log(f"{split}/z_loss", losses["z_loss"], batch_size=n, sync_dist=True)
        self.log(f"{split}/router_loss", losses["router_loss"], batch_size=n, sync_dist=True)
        return {"routing": routing}

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, "val")

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, "test")

    def _log_derived(self, split: str) -> None:
        """Perplexity and bits per byte from the epoch's token-weighted mean loss."""
        loss = self.trainer.callback_metrics.get(f"{split}/loss")
        if loss is None or self.trainer.sanity_checking:
            return
        loss = float(loss)
        # the same value on every process (from the synced loss): sync_dist only says so to Lightning
        datamodule = getattr(self.trainer, "datamodule", None)
        bytes_per_token = datamodule.bytes_per_token(split) if hasattr(datamodule, "bytes_per_token") else None
        derived = language_metrics(loss, bytes_per_token)
        for name in ("ppl", "bpb"):
            if name in derived:
                self.log(f"{split}/{name}", derived[name], sync_dist=True)

    def on_validation_epoch_start(self) -> None:
        self._evaluated.pop("val", None)

    def on_test_epoch_start(self) -> None:
        self._evaluated.pop("test", None)

    def on_validation_epoch_end(self) -> None:
        self._log_derived("val")
        self._report_evaluated("val")

    def on_test_epoch_end(self) -> None:
        self._log_derived("test")
        self._report_evaluated("test")

    def _report_evaluated(self, split: str) -> None:
        """``rmoe validate`` / ``test``: say how much of the split was evaluated (the loss of 5 batches is
        not the loss of 20), summed over the processes."""
        from lightning.pytorch.trainer.states import TrainerFn

        if self.trainer.state.fn not in (TrainerFn.VALIDATING, TrainerFn.TESTING) or self.trainer.sanity_checking:
            return
        counts = torch.tensor(self._evaluated.get(split, (0, 0)), dtype=torch.float64, device=self.device)
        tokens, batches = (int(v) for v in all_reduce_sum_(counts).tolist())
        limit = getattr(self.trainer, f"limit_{'val' if split == 'val' else 'test'}_batches", None)
        key = "trainer.limit_val_batches" if split == "val" else "trainer.limit_test_batches"
        if self.trainer.is_global_zero:
            print(f"rmoe {self.trainer.state.fn.value}: evaluated {tokens} tokens of the {split} split in {batches} "
                  f"batches ({key}={limit})", file=sys.stderr, flush=True)  # fmt: skip

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self._step_counts_LE = None  # global_batch fractions start afresh with the next step
        for module in self.model.modules():  # e.g. auxiliary-loss-free bias balancing
            if isinstance(module, Router):
                module.after_optimizer_step()

    def on_train_end(self) -> None:
        self._check_pending()  # the last step's values

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        seen: set[int] = set()
        for name, p in self.model.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            is_embedding = "embed_tokens" in name or "lm_head" in name
            (decay if p.dim() >= 2 and not is_embedding else no_decay).append(p)
        o = self.optim
        # The fused kernel (one pass over every parameter) exists for CPU and CUDA; on CPU it is ~6x
        # faster than foreach (benchmarks/bench_step.py), most of it on the 3-D expert weights, and it
        # cancels a non-finite step on the device (found_inf). Under fp16's gradient scaler the
        # gradients are still scaled when clipping runs, and the fused step unscales them itself:
        # Lightning refuses the pair, so fp16 with clipping keeps the foreach implementation.
        clipping = bool(self.trainer.gradient_clip_val) if self._trainer is not None else False
        scaler = getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer is not None else None
        fused = self.device.type in ("cpu", "cuda") and not (clipping and scaler is not None)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr,
            betas=(o.beta1, o.beta2),
            eps=o.eps,
            fused=fused,
        )
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = LRSchedule(o.lr, o.warmup_steps, total_steps, o.min_lr_ratio)
        if self._resumed is not None:  # the run's schedule goes on (rmoe.training.resume)
            step, saved = self._resumed
            schedule = schedule.resumed(saved, step)
        self.lr_schedule = schedule
        # a closure, not a bound method or an object: LambdaLR would save and restore its attributes
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule.multiplier(step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        self._step_counts_LE, self._step_loss_sums, self._step_micro_batches = None, None, 0
        self._pending, self._grad_norm = None, None
        if self._resumed is not None:
            self._apply_resumed_settings()

    def _apply_resumed_settings(self) -> None:
        """After Lightning restored the optimiser and scheduler of a resumed run (their saved settings),
        put this run's in: the peak learning rate and the schedule's current value, weight decay,
        betas and eps. Unchanged settings give back exactly what was restored."""
        o, schedule = self.optim, self.lr_schedule
        scheduler = self.lr_schedulers()
        optimizer = self.optimizers(use_pl_optimizer=False)
        scheduler.base_lrs = [schedule.peak_lr for _ in optimizer.param_groups]
        lr = schedule.peak_lr * schedule.multiplier(scheduler.last_epoch)
        for group, weight_decay in zip(optimizer.param_groups, (o.weight_decay, 0.0), strict=True):
            group.update(lr=lr, initial_lr=schedule.peak_lr, weight_decay=weight_decay, betas=(o.beta1, o.beta2),
                         eps=o.eps)  # fmt: skip
        scheduler._last_lr = [lr for _ in optimizer.param_groups]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._check_pending()  # no checkpoint after a divergence that is not reported yet
        checkpoint["tokens_seen"] = self.tokens_seen
        checkpoint["skipped_steps"] = self.skipped_steps
        if self.lr_schedule is not None:
            checkpoint["lr_schedule"] = dataclasses.asdict(self.lr_schedule)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokens_seen = checkpoint.get("tokens_seen", 0)
        self.skipped_steps = checkpoint.get("skipped_steps", 0)
        saved = checkpoint.get("lr_schedule")
        self._resumed = (int(checkpoint.get("global_step", 0)), LRSchedule(**saved) if saved else None)


def _check_model_fits(arch: ModelConfig) -> None:
    """The model is built in host memory first: refuse, naming the sizes, one whose fp32 weights cannot be
    allocated there (the allocator would stop with a traceback; the step's memory is checked later)."""
    from rmoe.training.memory import _num_parameters, available_bytes

    available = available_bytes("cpu")
    try:
        num_parameters = _num_parameters(arch)
        size = f"{num_parameters:,} parameters ({4 * num_parameters / 2**30:,.1f} GiB in fp32)"
    except RuntimeError:  # a tensor whose byte size overflows 64 bits: no machine holds it
        num_parameters, size = 2**62, "tensors whose byte sizes overflow 64 bits"
    if available is not None and 4 * num_parameters > available:
        raise RmoeError(
            f"model.arch: {size} do not fit in "
            f"this machine's {available / 2**30:.1f} GiB of free memory (num_experts={arch.num_experts}, "
            f"hidden_size={arch.hidden_size}, num_layers={arch.num_layers}, moe_intermediate_size="
            f"{arch.moe_intermediate_size}, vocab_size={arch.vocab_size}); choose smaller ones."
        )


def _by_device(tensors: list[torch.Tensor]) -> dict[torch.device, list[torch.Tensor]]:
    groups: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.device, []).append(t)
    return groups


def logs_this_step(trainer: L.Trainer) -> bool:
    """Whether Lightning writes the training metrics of the step in progress to the loggers and the
    progress bar (``trainer.log_every_n_steps``; always when that cannot be told)."""
    return bool(getattr(trainer._logger_connector, "should_update_logs", True))
