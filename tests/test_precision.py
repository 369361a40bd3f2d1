"""Mixed precision, the optimiser and clipping, and MFU: what the GPU path does differently.

* bf16-mixed with ``gradient_clip_val`` keeps fused AdamW (Lightning refuses the pair and would
  turn it off): rmoe clips by the gradient norm it already computed, exactly as
  ``torch.nn.utils.clip_grad_norm_`` does through Lightning;
* fp16 keeps Lightning's gradient-scaler path (the foreach optimiser when clipping);
* MFU is measured against a table of the cards users train on.
"""

from __future__ import annotations

import pytest
import torch
from tiny import BASE_CONFIGS, scalars, tiny_overrides

from rmoe.training.callbacks import PEAK_BF16_FLOPS, peak_bf16_flops
from rmoe.training.module import MoeLMModule


def fit(tmp_path, *overrides: str):
    from rmoe.cli import build_cli

    tmp_path.mkdir(exist_ok=True)
    cli = build_cli([*BASE_CONFIGS, *tiny_overrides(tmp_path), f"trainer.logger.init_args.save_dir={tmp_path}",
                     "trainer.logger.init_args.name=t", "trainer.max_steps=4", "trainer.limit_val_batches=0",
                     "trainer.callbacks=[]", "model.optim.warmup_steps=0", "model.optim.lr=0.01",
                     *overrides], run=False)  # fmt: skip
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    losses = scalars(tmp_path / "t/version_0", "train/loss")
    return cli.trainer, torch.tensor([losses[s] for s in range(4)])


def lightning_clipping(monkeypatch, fused: bool) -> None:
    """Make the module clip through Lightning (``clip_grad_norm_``) with a chosen optimiser kind."""
    import lightning as L

    monkeypatch.setattr(MoeLMModule, "configure_gradient_clipping", L.LightningModule.configure_gradient_clipping)
    configure = MoeLMModule.configure_optimizers

    def configure_optimizers(self):
        out = configure(self)
        for group in out["optimizer"].param_groups:
            group["fused"], group["foreach"] = fused, not fused
        out["optimizer"]._step_supports_amp_scaling = fused  # what Lightning reads to refuse clipping
        return out

    monkeypatch.setattr(MoeLMModule, "configure_optimizers", configure_optimizers)


def test_clipping_by_the_computed_norm_equals_lightnings_clip_grad_norm(tmp_path, monkeypatch):
    """fp32, clip 0.05 (every step clips): the same training curve as Lightning's own clipping."""
    ours = fit(tmp_path / "ours", "trainer.gradient_clip_val=0.05")[1]
    grad_norms = scalars(tmp_path / "ours/t/version_0", "train/grad_norm")
    assert min(grad_norms.values()) > 0.05  # the clip was active at every step
    lightning_clipping(monkeypatch, fused=True)
    theirs = fit(tmp_path / "lightning", "trainer.gradient_clip_val=0.05")[1]
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_bf16_mixed_with_clipping_keeps_fused_adamw(tmp_path, monkeypatch):
    trainer, ours = fit(tmp_path / "ours", "trainer.precision=bf16-mixed", "trainer.gradient_clip_val=0.05")
    assert all(group["fused"] for group in trainer.optimizers[0].param_groups)
    lightning_clipping(monkeypatch, fused=False)  # what Lightning allows: foreach AdamW, its clipping
    trainer, theirs = fit(tmp_path / "lightning", "trainer.precision=bf16-mixed", "trainer.gradient_clip_val=0.05")
    assert not any(group["fused"] for group in trainer.optimizers[0].param_groups)
    torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=0)  # fused vs foreach AdamW in bf16 autocast


def test_bf16_mixed_with_clipping_by_value_keeps_fused_adamw(tmp_path, monkeypatch):
    clip = ["trainer.precision=bf16-mixed", "trainer.gradient_clip_val=0.01", "trainer.gradient_clip_algorithm=value"]
    trainer, ours = fit(tmp_path / "ours", *clip)
    assert all(group["fused"] for group in trainer.optimizers[0].param_groups)
    lightning_clipping(monkeypatch, fused=False)
    theirs = fit(tmp_path / "lightning", *clip)[1]
    torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=0)


def test_fp16_keeps_the_foreach_optimiser_for_lightnings_gradient_scaler():
    """Under fp16's GradScaler the gradients are still scaled when clipping runs (and Lightning turns
    16-mixed into bf16 on a CPU, so this is the decision, not a run)."""
    from types import SimpleNamespace

    from tiny import tiny_config

    def optimiser(precision_plugin, clip):
        module = MoeLMModule(tiny_config())
        module._trainer = SimpleNamespace(
            gradient_clip_val=clip, precision_plugin=precision_plugin, estimated_stepping_batches=10
        )
        return module.configure_optimizers()["optimizer"]

    scaler = SimpleNamespace(scaler=object())
    assert not any(g["fused"] for g in optimiser(scaler, 1.0).param_groups)  # fp16 + clipping
    assert all(g["fused"] for g in optimiser(scaler, None).param_groups)  # fp16 without clipping
    assert all(g["fused"] for g in optimiser(SimpleNamespace(scaler=None), 1.0).param_groups)  # bf16 / fp32


def test_the_peak_flops_table_knows_the_cards_users_train_on():
    names = {
        "NVIDIA H100 80GB HBM3": 989e12,
        "NVIDIA H100 PCIe": 756e12,
        "NVIDIA H100 NVL": 835e12,
        "NVIDIA H200": 989e12,
        "NVIDIA H200 NVL": 835e12,
        "NVIDIA GH200 480GB": 989e12,
        "NVIDIA B200": 2.25e15,
        "NVIDIA A100-SXM4-80GB": 312e12,
        "NVIDIA A100 80GB PCIe": 312e12,
        "NVIDIA L4": 121e12,
        "NVIDIA L40S": 362e12,
        "NVIDIA L40": 181e12,
        "NVIDIA GB200": 2.5e15,
    }
    assert {name: peak_bf16_flops(name) for name in names} == names
    assert peak_bf16_flops("NVIDIA GeForce RTX 4090") is None
    assert len({key for key, _ in PEAK_BF16_FLOPS}) == len(PEAK_BF16_FLOPS)


def test_mfu_on_a_card_of_the_table_and_a_note_for_one_that_is_not(monkeypatch):
    """The callback's arithmetic, on a CPU module that pretends to be on a GPU."""
    from types import SimpleNamespace

    from rmoe.training import callbacks

    logged = {}
    module = SimpleNamespace(device=torch.device("cuda"), model=None, log=lambda name, v, **k: logged.update({name: v}))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(callbacks, "training_flops_per_token", lambda model, seq_len: 1e9)
    monkeypatch.setattr(callbacks, "logs_this_step", lambda trainer: True)
    monkeypatch.setattr(callbacks.time, "perf_counter", iter([0.0, 1.0, 2.0]).__next__)
    throughput = callbacks.TokenThroughput(window=5)
    trainer = SimpleNamespace(world_size=2)
    throughput.on_train_start(trainer, module)
    batch = torch.zeros(4, 101, dtype=torch.long)  # 400 tokens per process, 800 per step
    for _ in range(3):
        throughput.on_train_batch_end(trainer, module, None, batch, 0)
    assert float(logged["train/tokens_per_sec"]) == 800.0
    assert float(logged["train/mfu"]) == pytest.approx(800 * 1e9 / (989e12 * 2))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    with pytest.warns(UserWarning, match="no peak FLOP/s known for 'Some Future GPU': train/mfu is not logged"):
        throughput.on_train_start(trainer, module)
