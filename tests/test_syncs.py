"""Host synchronisations: the counter sees every kind, and a training step stays within its budget.

Budgets, counted on CPU by :class:`rmoe.syncs.HostSyncCounter` (which plays the GPU's part) through
the real ``rmoe fit`` with validation and routing analytics on:

* a training step that logs nothing: 0 on the ``grouped_mm`` backend (the divergence guard reads
  the step's values a step later, from a copy that did not wait); ``sliced`` reads each MoE
  layer's group sizes once (one per MoE layer per forward, the price of its per-expert slices);
* a step Lightning logs (``trainer.log_every_n_steps``): 1, the step's scalars in one transfer;
  a step the routing analytics log: 1 more, everything they need in one transfer;
* a validation batch: 1, the routing in one transfer (the metrics accumulate on the host).
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny import BASE_CONFIGS, tiny_overrides

from rmoe.cli import main
from rmoe.syncs import HostCopy, HostSyncCounter, to_host

# ------------------------------------------------------------------------------------------------
# The counter


def kinds(counter: HostSyncCounter) -> list[str]:
    return [e.kind for e in counter.events]


def test_the_counter_sees_every_kind_of_synchronisation_and_says_where():
    weight = torch.randn(6)  # made before the counter: a "device" tensor
    with HostSyncCounter() as syncs:
        x = weight * 2
        x.sum().item()
        x.tolist()
        bool(x[0] > 0)
        x[x > 0]
        x.nonzero()
        torch.unique(x)
        torch.bincount((x > 0).long())
        x.cpu()
        torch.tensor([1.0, 2.0], device=x.device)  # host data to the device
        torch.repeat_interleave(x.long().abs() % 3)
    assert kinds(syncs) == [
        "_local_scalar_dense", "Tensor.tolist", "_local_scalar_dense", "index", "nonzero", "_unique2", "bincount",
        "Tensor.cpu", "torch.tensor", "repeat_interleave",
    ]  # fmt: skip
    assert all(e.where.startswith("tests/test_syncs.py:") for e in syncs.events)


def test_host_tensors_and_what_is_computed_from_them_alone_are_free():
    weight = torch.randn(6)
    with HostSyncCounter() as syncs:
        on_host = torch.arange(6.0)  # no device: the host
        (on_host * 2)[on_host > 2].tolist()
        torch.zeros(3, device=on_host.device).sum().item()  # a host tensor's device is the host
        torch.tensor([1, 2]).sum().item()
        values = weight * 3
        moved = to_host([values, values.long(), values > 0])  # one transfer for all three
        moved[0].tolist(), moved[1][moved[2]].tolist()
        copied = HostCopy(values).tolist()  # read later: no wait
        values.to(on_host.device, non_blocking=True)  # a non-blocking copy to the host does not wait
    assert kinds(syncs) == ["Tensor.cpu"]  # to_host's transfer
    assert syncs.events[0].where.startswith("tests/test_syncs.py:")
    assert (
        torch.equal(moved[0], weight * 3) and torch.equal(moved[1], (weight * 3).long()) and copied == moved[0].tolist()
    )
    assert moved[2].dtype == torch.bool and torch.equal(moved[2], weight > 0)


# ------------------------------------------------------------------------------------------------
# The budget of a training step and a validation batch


def count(tmp_path, *overrides: str) -> dict:
    """Fit 8 steps (validation after step 5, Lightning logs steps 4 and 9, analytics at 0 and 4) and
    count steps 0-6 and the first two validation batches."""
    out = tmp_path / "syncs.json"
    probe = (
        f"{{class_path: sync_probe.SyncProbe, init_args: {{out: {out}, steps: [0, 1, 2, 3, 4, 5, 6], val_batches: 2}}}}"
    )
    analytics = "{class_path: rmoe.training.analytics.RoutingAnalytics, init_args: {every_n_steps: 4}}"
    main(["fit", *BASE_CONFIGS, *tiny_overrides(tmp_path), f"trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
          "trainer.max_steps=8", "trainer.val_check_interval=6", "trainer.limit_val_batches=3",
          "trainer.log_every_n_steps=5", f"trainer.callbacks=[{analytics}]", f"--trainer.callbacks+={probe}",
          "trainer.enable_progress_bar=true", *overrides])  # fmt: skip
    return json.loads(out.read_text())


def places(events: list) -> list[str]:
    return sorted(f"{kind} at {where.split(':')[0]}" for kind, where in events)


ROUTING = "Tensor.cpu at evaluation/routing_eval.py"  # routing_to_host: the routing metrics' one transfer
SCALARS = "Tensor.cpu at training/module.py"  # the step's logged scalars


@pytest.mark.parametrize(
    ("router", "precision"), [("linear", "32-true"), ("locmoe", "bf16-mixed"), ("gru", "bf16-mixed")]
)
def test_a_training_step_waits_for_the_device_only_to_log(router, precision, tmp_path):
    counted = count(tmp_path, f"model.arch.router={router}", f"trainer.precision={precision}",
                    "model.arch.expert_backend=grouped_mm")  # fmt: skip
    train = {int(step): places(events) for step, events in counted["train"].items()}
    assert train[0] == [ROUTING]  # the analytics step
    assert train[4] == sorted([ROUTING, SCALARS])  # analytics and Lightning's logging
    for step in (1, 2, 3, 5, 6):
        assert train[step] == [], f"step {step}: {train[step]}"
    assert [places(events) for events in counted["val"]] == [[ROUTING], [ROUTING]]


def test_sliced_reads_the_group_sizes_once_per_moe_layer(tmp_path):
    counted = count(tmp_path, "model.arch.expert_backend=sliced")
    layer_syncs = ["Tensor.tolist at model/moe.py"] * 2  # tiny_overrides: 2 MoE layers
    assert places(counted["train"]["3"]) == layer_syncs
    assert places(counted["val"][0]) == sorted([*layer_syncs, ROUTING])
