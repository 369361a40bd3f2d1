"""Routing analytics: the TensorBoard callback through the real CLI, ``rmoe analyze``, the notebook.

Three tiny runs are trained once for the module (seconds each): a linear router with the
callback, the same without it, and a GRU router with it. Known answers: the callback's
validation metrics equal what ``rmoe analyze`` computes independently from the final checkpoint,
its gradient norms equal a plain ``autograd.grad``, and training is bit-identical with and
without it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny import BASE_CONFIGS, tiny_overrides

from rmoe.analyze import analyze_checkpoint, summary_rows
from rmoe.analyze import main as analyze_main
from rmoe.cli import main
from rmoe.errors import RmoeError
from rmoe.evaluation.routing_eval import RoutingHistograms
from rmoe.figures import compare
from rmoe.metrics import gate_entropy, router_parameters
from rmoe.metrics.stats import PER_LAYER_KEYS, PER_PAIR_KEYS
from rmoe.model.config import ModelConfig
from rmoe.runs import find_runs, flatten_hparams, layer_series, read_scalars, to_jsonable
from rmoe.training.analytics import RoutingAnalytics
from rmoe.training.module import MoeLMModule
from rmoe.training.tensorboard import custom_scalars_layout

ROOT = Path(__file__).resolve().parents[1]
NUM_LAYERS = 2
# The callbacks are set in full (not appended to base.yaml's), so the runs differ only in RoutingAnalytics.
CHECKPOINT = (
    "{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {monitor: val/loss, save_last: true, "
    "save_top_k: 1, filename: 'best-{step}', auto_insert_metric_name: false}}"
)
ANALYTICS = "{class_path: rmoe.training.analytics.RoutingAnalytics, init_args: {every_n_steps: 2}}"
WITH_ANALYTICS = f"trainer.callbacks=[{CHECKPOINT}, {ANALYTICS}]"
WITHOUT_ANALYTICS = f"trainer.callbacks=[{CHECKPOINT}]"


def tiny_args(tmp_path: Path, name: str, *extra: str) -> list[str]:
    """base.yaml + quick.yaml shrunk to seconds (tests/tiny.py): 6 steps, validation at 3 and 6."""
    return [
        *BASE_CONFIGS,
        *tiny_overrides(tmp_path, num_layers=NUM_LAYERS),
        f"trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        f"trainer.logger.init_args.name={name}",
        "trainer.enable_progress_bar=false",
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
        "trainer.limit_val_batches=5",
        *extra,
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("analytics")
    main(["fit", *tiny_args(tmp, "linear", WITH_ANALYTICS)])
    main(["fit", *tiny_args(tmp, "plain", WITHOUT_ANALYTICS)])
    gru = ("model.arch.router=gru", "model.arch.router_options={state_dim: 16}")
    main(["fit", *tiny_args(tmp, "gru", WITH_ANALYTICS, *gru)])
    return {name: tmp / "runs" / name / "version_0" for name in ("linear", "plain", "gru")}


def event_values(run: Path) -> list:
    """Every summary value of a run's event files as written (no read-time conversion), as (step, value)."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    out = []
    for events in sorted(run.glob("events.out.tfevents.*")):
        for event in LegacyEventFileLoader(str(events)).Load():
            out.extend((event.step, value) for value in event.summary.value)
    return out


# ----------------------------------------------------------------------------------------------
# The callback in a real fit


def test_training_steps_log_every_layer_on_every_nth_step(runs):
    scalars = read_scalars(runs["linear"], r"^moe/train/")
    layers = [f"layer_{l}" for l in range(NUM_LAYERS)]
    for key in (*PER_LAYER_KEYS, "expert_similarity"):
        for suffix in (*layers, "mean"):
            tag = f"moe/train/{key}/{suffix}"
            assert [s for s, _ in scalars.get(tag, [])] == [0, 2, 4], tag  # only global_step % 2 == 0
    for key in PER_PAIR_KEYS:
        assert f"moe/train/{key}/layer_0_1" in scalars
    for loss in ("lm", "balance"):
        for suffix in (*layers, "shared", "total"):
            assert f"moe/train/router_grad_norm_{loss}/{suffix}" in scalars
    # known answers: one training batch is 4 blocks of 32 tokens; top-2 of 4 experts
    assert {v for _, v in scalars["moe/train/num_tokens"]} == {128.0}
    for _, v in scalars["moe/train/load_entropy/layer_0"]:
        assert 0.0 < v <= 1.0
    norms = dict(scalars["moe/train/router_grad_norm_lm/total"])
    per_layer = [dict(scalars[f"moe/train/router_grad_norm_lm/layer_{l}"]) for l in range(NUM_LAYERS)]
    for step, total in norms.items():
        assert total == pytest.approx(math.sqrt(sum(p[step] ** 2 for p in per_layer)), rel=1e-5)


def test_validation_metrics_equal_rmoe_analyze_on_the_final_checkpoint(runs, tmp_path):
    run = runs["linear"]
    scalars = read_scalars(run, r"^(moe/val/|val/)")
    val_steps = [s for s, _ in scalars["val/loss"]]
    assert val_steps == [2, 5]  # Lightning's steps for validation at global steps 3 and 6
    for key in PER_LAYER_KEYS:
        for l in range(NUM_LAYERS):
            assert [s for s, _ in scalars[f"moe/val/{key}/layer_{l}"]] == val_steps, key

    out = tmp_path / "analysis"
    analyze_main(
        ["--ckpt", str(run / "checkpoints/last.ckpt"), "--split", "val", "--max-batches", "5", "--out", str(out)]
    )
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("binned_prob_mi", "load", "gate_entropy", "expert_similarity"):
        assert (out / f"{name}.png").stat().st_size > 1000
    assert metrics["global_step"] == 6 and metrics["split"] == "val" and metrics["router"] == "linear"
    assert metrics["num_eval_tokens"] == metrics["num_tokens"] == 5 * 4 * 32
    assert len(metrics["tokens_per_expert"]) == NUM_LAYERS and len(metrics["tokens_per_expert"][0]) == 4
    assert sum(map(sum, metrics["tokens_per_expert"])) == NUM_LAYERS * 2 * metrics["num_tokens"]
    assert len(metrics["binned_prob_mi"]) == NUM_LAYERS and len(metrics["binned_prob_mi"][0]) == NUM_LAYERS
    assert len(metrics["histograms"]["gate_entropy"]["counts"]) == NUM_LAYERS
    assert metrics["hparams"]["model.arch.router"] == "linear"

    last = {tag: points[-1][1] for tag, points in scalars.items()}
    assert metrics["loss"] == pytest.approx(last["val/loss"], rel=1e-5)
    assert metrics["bpb"] == pytest.approx(last["val/bpb"], rel=1e-5)
    assert last["moe/val/num_tokens"] == metrics["num_tokens"]
    for key in (*PER_LAYER_KEYS, *PER_PAIR_KEYS):
        for l, value in enumerate(metrics[key]):
            suffix = f"layer_{l}_{l + 1}" if key in PER_PAIR_KEYS else f"layer_{l}"
            assert last[f"moe/val/{key}/{suffix}"] == pytest.approx(value, rel=1e-4, abs=1e-6), (key, l)
    assert last["moe/val/path_entropy"] == pytest.approx(metrics["path_entropy"], rel=1e-5)


def test_layout_images_histograms_and_hparams(runs):
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.plugins.hparams import plugin_data_pb2

    run = runs["linear"]
    values = event_values(run)
    tags = {v.tag for _, v in values}
    scalar_tags = set(read_scalars(run))

    (layout_value,) = [v for _, v in values if v.tag == "custom_scalars__config__"]
    layout = layout_pb2.Layout.FromString(layout_value.tensor.string_val[0])
    charts = {c.title: c for c in layout.category}
    assert set(charts) == {"moe (train)", "moe (val)"}
    for category in layout.category:
        for chart in category.chart:
            (regex,) = chart.multiline.tag
            matched = {t for t in scalar_tags if re.search(regex, t)}
            assert matched, (category.title, chart.title)  # every chart shows something
            if chart.title == "load_cv":  # one chart holds every layer
                split = category.title[5:-1]
                assert matched == {f"moe/{split}/load_cv/{s}" for s in ("layer_0", "layer_1", "mean")}

    for split in ("train", "val"):
        for l in range(NUM_LAYERS):
            assert f"moe/{split}/gate_entropy_hist/layer_{l}" in tags
            assert f"moe/{split}/router_probs_hist/layer_{l}" in tags
    images = [(s, v) for s, v in values if v.HasField("image")]
    assert {v.tag for _, v in images} == {
        "moe/val/load_heatmap",
        "moe/val/binned_prob_mi_heatmap",
        "moe/val/coactivation_heatmap",
    }
    assert {s for s, _ in images} == {2, 5}
    assert all(v.image.encoded_image_string[:4] == b"\x89PNG" for _, v in images)
    probs_hist = [v.histo for _, v in values if v.tag == "moe/val/router_probs_hist/layer_0"]
    assert probs_hist[-1].num == 5 * 4 * 32 * 4  # every token's 4 probabilities
    assert sum(probs_hist[-1].bucket) == probs_hist[-1].num

    plugin = {
        v.tag: plugin_data_pb2.HParamsPluginData.FromString(v.metadata.plugin_data.content)
        for _, v in values
        if v.metadata.plugin_data.plugin_name == "hparams"
    }
    metric_tags = {m.name.tag for m in plugin["_hparams_/experiment"].experiment.metric_infos}
    assert {"hp/val_loss", "hp/val_bpb", "hp/gate_entropy_mean", "hp/load_max_vio", "hp/top1_mi"} <= metric_tags
    hparams = plugin["_hparams_/session_start_info"].session_start_info.hparams
    assert hparams["model.arch.router"].string_value == "linear"
    assert hparams["data.block_size"].number_value == 32
    assert hparams["model.aux_loss_coef"].number_value == pytest.approx(0.01)
    assert hparams["model.optim.lr"].number_value == pytest.approx(3e-3)
    scalars = read_scalars(run, r"^(hp/|val/loss$|moe/val/top1_mi/mean$)")
    assert scalars["hp/val_loss"][-1] == scalars["val/loss"][-1]  # same step, same value
    assert scalars["hp/top1_mi"][-1] == scalars["moe/val/top1_mi/mean"][-1]


def test_analytics_never_change_training(runs):
    with_analytics = read_scalars(runs["linear"], r"^(train|val)/(loss|aux_loss)$")
    without = read_scalars(runs["plain"], r"^(train|val)/(loss|aux_loss)$")
    assert set(with_analytics) == set(without) and len(with_analytics["train/loss"]) == 6
    assert with_analytics == without  # bit-identical losses at every step
    assert not read_scalars(runs["plain"], r"^moe/")


def test_gru_router_logs_shared_router_gradients(runs):
    scalars = read_scalars(runs["gru"], r"^moe/train/router_grad_norm_lm/")
    assert all(v > 0 for _, v in scalars["moe/train/router_grad_norm_lm/shared"])  # the GRU cell
    assert layer_series(scalars, "moe/train/router_grad_norm_lm").keys() == {"0", "1"}


# ----------------------------------------------------------------------------------------------
# The callback's parts, without a fit


class RecordingLogger:
    def __init__(self) -> None:
        self.metrics: dict[int, dict[str, float]] = {}
        self.experiment = SimpleNamespace(add_histogram_raw=lambda *a, **k: None)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.setdefault(step, {}).update(metrics)


def tiny_module(**kwargs) -> MoeLMModule:
    arch = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        num_layers=3,
        num_attention_heads=4,
        mlp_only_layers=[1],  # MoE layers are decoder layers 0 and 2
        num_experts=4,
        moe_intermediate_size=16,
        intermediate_size=32,
    )
    torch.manual_seed(0)
    return MoeLMModule(arch, **kwargs)


def attach(module: MoeLMModule, step: int) -> SimpleNamespace:
    """A stand-in trainer at ``step`` for a module's and a callback's hooks called by hand."""
    trainer = SimpleNamespace(global_step=step, world_size=1, is_global_zero=True)
    module._trainer = trainer
    return trainer


@pytest.mark.parametrize("aux_loss_coef", [0.01, 0.0])
def test_grad_norms_are_autograd_grad_per_layer_and_leave_training_alone(aux_loss_coef):
    """The step measures the norms when asked and returns them with its routing; the callback logs
    them from the outputs: equal to a plain autograd.grad, and the step's own gradients unchanged."""
    batch = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))
    module = tiny_module(aux_loss_coef=aux_loss_coef, z_loss_coef=0.0)
    module.router_grad_norms_every = 5
    callback = RoutingAnalytics(every_n_steps=5)
    callback._logger = RecordingLogger()
    trainer = attach(module, 10)

    reference = {n: p.clone() for n, p in module.named_parameters()}
    params = router_parameters(module.model)
    expected = torch.autograd.grad(module._losses(batch)[0]["lm_loss"], list(params.values()))
    callback.on_train_batch_start(trainer, module, batch, 0)
    outputs = module.training_step(batch, 0)
    assert all(p.grad is None for p in module.parameters())
    outputs["loss"].backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    assert not any(r.logits_TE.requires_grad for r in outputs["routing"])  # handed over detached
    if aux_loss_coef:
        callback.on_train_batch_end(trainer, module, outputs, batch, 0)
    else:
        with pytest.warns(UserWarning, match="balance loss has no gradient"):
            callback.on_train_batch_end(trainer, module, outputs, batch, 0)

    logged = callback._logger.metrics[10]
    for moe_index, decoder_layer in enumerate([0, 2]):  # layer 1 is dense: MoE layers are 0 and 2
        norm = math.sqrt(
            sum(float(g.pow(2).sum()) for n, g in zip(params, expected) if f"layers.{decoder_layer}." in n)
        )
        assert logged[f"moe/train/router_grad_norm_lm/layer_{moe_index}"] == pytest.approx(norm, rel=1e-5)
    assert ("moe/train/router_grad_norm_balance/total" in logged) == bool(aux_loss_coef)
    assert logged["moe/train/num_tokens"] == 2 * 16

    # the same step without the callback: identical gradients
    clean = tiny_module(aux_loss_coef=aux_loss_coef, z_loss_coef=0.0)
    assert all(torch.equal(p, reference[n]) for n, p in clean.named_parameters())
    attach(clean, 10)
    clean_outputs = clean.training_step(batch, 0)
    assert "router_grad_norms" not in clean_outputs  # not asked for
    clean_outputs["loss"].backward()
    for name, p in clean.named_parameters():
        if p.grad is not None:
            assert torch.equal(p.grad, grads[name]), name

    trainer = attach(module, 11)  # not a multiple of every_n_steps: nothing measured, nothing logged
    callback.on_train_batch_start(trainer, module, batch, 0)
    outputs = module.training_step(batch, 0)
    assert "router_grad_norms" not in outputs
    callback.on_train_batch_end(trainer, module, outputs, batch, 0)
    assert list(callback._logger.metrics) == [10]


def test_without_tensorboard_logger_it_warns_once_and_does_nothing():
    from lightning.pytorch.loggers import CSVLogger

    module = tiny_module()
    callback = RoutingAnalytics(every_n_steps=1)
    trainer = SimpleNamespace(loggers=[CSVLogger("unused")], is_global_zero=True, global_step=0, sanity_checking=False)
    with pytest.warns(UserWarning, match="no TensorBoardLogger"):
        callback.setup(trainer, module, "fit")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback.setup(trainer, module, "validate")
    assert not caught  # once per callback
    assert not callback.enabled
    batch = torch.randint(0, 64, (2, 9))
    routing = {"routing": module._losses(batch)[1]}
    callback.on_train_batch_start(trainer, module, batch, 0)
    callback.on_train_batch_end(trainer, module, routing, batch, 0)
    assert module.router_grad_norms_every == 0  # the module is not asked to measure anything
    callback.on_validation_epoch_start(trainer, module)
    callback.on_validation_batch_end(trainer, module, routing, batch, 0)
    callback.on_validation_epoch_end(trainer, module)
    assert callback.seconds_spent == 0.0


def test_grad_norms_are_turned_off_with_a_warning_for_compiled_layers(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    from rmoe.training.analytics import is_compiled

    plain = tiny_module()
    assert not is_compiled(plain)
    plain.model.layers[0].compile()  # lazy: nothing is compiled until the first call
    assert is_compiled(plain)
    module = tiny_module(compile=True)  # MoeLMModule compiles its layers at fit start
    callback = RoutingAnalytics()
    trainer = SimpleNamespace(loggers=[TensorBoardLogger(tmp_path)], is_global_zero=True)
    with pytest.warns(UserWarning, match="gradient norms are off with compiled layers"):
        callback.setup(trainer, module, "fit")
    assert callback.enabled and not callback.grad_norms


def test_bad_options_are_clear_errors():
    with pytest.raises(RmoeError, match="every_n_steps=0"):
        RoutingAnalytics(every_n_steps=0)
    with pytest.raises(RmoeError, match="max_samples"):
        RoutingAnalytics(max_samples=0)


def test_custom_scalars_layout_has_one_chart_per_metric():
    layout = custom_scalars_layout(("train", "val"))
    assert set(layout) == {"moe (train)", "moe (val)"}
    for key in (*PER_LAYER_KEYS, *PER_PAIR_KEYS):
        chart_type, (regex,) = layout["moe (val)"][key]
        assert chart_type == "Multiline"
        assert re.search(regex, f"moe/val/{key}/layer_3") and not re.search(regex, f"moe/train/{key}/layer_3")
    assert "router_grad_norm_lm" in layout["moe (train)"] and "router_grad_norm_lm" not in layout["moe (val)"]


def test_flatten_hparams_keeps_scalars_only():
    arch = ModelConfig(vocab_size=64, router="gru", router_options={"state_dim": 16})
    flat = flatten_hparams({"arch": arch, "coef": 0.5, "_instantiator": "x", "none": None, "obj": object()}, "model")
    assert flat["model.arch.router"] == "gru" and flat["model.arch.router_options.state_dim"] == 16
    assert flat["model.arch.mlp_only_layers"] == "[]" and flat["model.coef"] == 0.5
    assert not any(k.startswith(("model._", "model.none", "model.obj")) for k in flat)


def test_hparam_metrics_fall_back_to_the_train_loss_without_validation():
    from rmoe.training.tensorboard import hparam_metrics

    val = {"moe/val/top1_mi/mean": 0.25, "moe/val/load_cv/layer_0": 9.0}
    assert hparam_metrics({"val/loss": torch.tensor(2.0), "val/bpb": 3.0, "train/loss": 1.0}, val) == {
        "hp/val_loss": 2.0,
        "hp/val_bpb": 3.0,
        "hp/top1_mi": 0.25,
    }
    assert hparam_metrics({"train/loss": torch.tensor(1.5)}, {}) == {"hp/train_loss": 1.5}


def test_routing_histograms_are_exact_counts():
    """Router probabilities counted over the stream; gate entropy binned from RoutingStats' token
    sample (its one accumulator), which holds every token below max_samples."""
    from rmoe.metrics import RoutingStats
    from rmoe.routers import topk_softmax

    g = torch.Generator().manual_seed(0)
    routing = [topk_softmax(torch.randn(50, 4, generator=g) * 3, 2, True) for _ in range(2)]
    hist = RoutingHistograms(num_experts=4, num_bins=10).update(routing).update(routing)
    summary = RoutingStats(4, top_k=2, max_samples=1000).update(routing).update(routing).compute()
    out = hist.compute(summary)
    probs = torch.cat([routing[0].probs_TE, routing[0].probs_TE])
    assert torch.equal(out["router_probs"]["counts"][0], torch.histc(probs, bins=10, min=0, max=1).long())
    entropy = gate_entropy(probs)
    expected = torch.histc(entropy, bins=10, min=0, max=math.log(4)).long()
    assert torch.equal(out["gate_entropy"]["counts"][0], expected)
    assert out["gate_entropy"]["num"].tolist() == [100, 100]
    assert out["gate_entropy"]["sum"][0] == pytest.approx(float(entropy.double().sum()))
    assert out["gate_entropy"]["max"][0] == pytest.approx(float(entropy.max()))
    assert float(out["gate_entropy"]["edges"][-1]) == pytest.approx(math.log(4))


DISTRIBUTED_WORKER = """
import sys

import torch
import torch.distributed as dist

from rmoe.evaluation.routing_eval import RoutingHistograms, all_reduce_stats
from rmoe.metrics import RoutingStats
from rmoe.routers import topk_softmax

rank, init_file, out_file = int(sys.argv[1]), sys.argv[2], sys.argv[3]


def layers(seed):
    g = torch.Generator().manual_seed(seed)
    return [topk_softmax(torch.randn(40, 4, generator=g) * 2, 2, True) for _ in range(3)]


dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
stats = all_reduce_stats(RoutingStats(4, top_k=2, max_samples=None).update(layers(rank)))
hist = RoutingHistograms(4, num_bins=10).update(layers(rank))
hist.all_reduce()
if rank == 0:
    summary = stats.compute()
    torch.save({"summary": summary, "hist": hist.compute(summary)}, out_file)
dist.destroy_process_group()
"""


def random_layers(seed: int) -> list:
    from rmoe.routers import topk_softmax

    g = torch.Generator().manual_seed(seed)
    return [topk_softmax(torch.randn(40, 4, generator=g) * 2, 2, True) for _ in range(3)]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_validation_stats_combine_across_processes(tmp_path):
    """Two gloo processes: rank 0's combined stats equal one process's stats over both ranks' batches."""
    from rmoe.metrics import RoutingStats

    script, out = tmp_path / "worker.py", tmp_path / "rank0.pt"
    script.write_text(DISTRIBUTED_WORKER)
    workers = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), str(tmp_path / "init"), str(out)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
        )
        for rank in range(2)
    ]
    try:
        assert [w.wait(timeout=120) for w in workers] == [0, 0]
    finally:
        for worker in workers:
            worker.kill()
    combined = torch.load(out, weights_only=False)
    reference = RoutingStats(4, top_k=2, max_samples=None).update(random_layers(0)).update(random_layers(1)).compute()
    hist = RoutingHistograms(4, num_bins=10).update(random_layers(0)).update(random_layers(1)).compute(reference)
    for key in ("tokens_per_expert", "load_cv", "top1_mi", "binned_prob_mi", "gate_entropy_median"):
        assert torch.allclose(combined["summary"][key].double(), reference[key].double(), atol=1e-6), key
    assert combined["summary"]["num_paths"] == reference["num_paths"]
    assert combined["summary"]["num_tokens"] == 80
    for name in ("router_probs", "gate_entropy"):
        for key in ("counts", "num", "min", "max"):
            assert torch.equal(combined["hist"][name][key], hist[name][key]), (name, key)


# ----------------------------------------------------------------------------------------------
# rmoe analyze and the notebook


def test_analyze_bad_input_is_a_clear_error(runs, tmp_path):
    ckpt = str(runs["linear"] / "checkpoints/last.ckpt")
    with pytest.raises(RmoeError, match=r"missing\.ckpt: no such file"):
        analyze_main(["--ckpt", str(tmp_path / "missing.ckpt")])
    with pytest.raises(RmoeError, match="'dev' is not a split"):
        analyze_main(["--ckpt", ckpt, "--split", "dev"])
    with pytest.raises(RmoeError, match="--max-batches=0"):
        analyze_checkpoint(ckpt, max_batches=0)
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(RmoeError, match=r"junk\.ckpt is not a checkpoint: it is a text file"):
        analyze_main(["--ckpt", str(tmp_path / "junk.ckpt")])
    with pytest.raises(RmoeError, match="no such file"):
        analyze_main(["--ckpt", ckpt, "--config", str(tmp_path / "nope.yaml")])
    with pytest.raises(RmoeError, match="required"):
        analyze_main([])


def test_analysis_helpers_compare_runs(runs):
    found = find_runs(str(runs["linear"].parent.parent))  # a parent folder: every run below it
    assert [r.label for r in found] == ["gru", "linear (linear/version_0)", "linear (plain/version_0)"]
    found = find_runs([str(runs["linear"]), str(runs["gru"])])
    assert [r.label for r in found] == ["gru", "linear"]
    assert found[1].checkpoint().name == "last.ckpt"
    with pytest.raises(RmoeError, match="no run directory"):
        find_runs("/no/such/runs/*")
    metrics = {r.label: analyze_checkpoint(r.checkpoint(), max_batches=1) for r in found}
    rows = summary_rows(metrics)
    assert [r["router"] for r in rows] == ["gru", "linear"] and all(math.isfinite(r["top1_mi"]) for r in rows)
    json.dumps(to_jsonable(metrics), allow_nan=False)
    for kind in ("binned_prob_mi", "load", "gate_entropy", "expert_similarity"):
        assert len(compare(kind, metrics).axes) >= 1


@pytest.mark.skipif(
    importlib.util.find_spec("nbclient") is None or importlib.util.find_spec("ipykernel") is None,
    reason="nbclient/ipykernel are not installed",
)
@pytest.mark.slow
def test_notebook_runs_on_two_tiny_runs(runs, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("RMOE_RUNS", f"{runs['linear']},{runs['gru']}")
    monkeypatch.setenv("RMOE_MAX_BATCHES", "1")
    notebook = nbformat.read(ROOT / "notebooks/routing_analysis.ipynb", as_version=4)
    assert "parameters" in notebook.cells[1].metadata.get("tags", [])
    NotebookClient(notebook, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 7  # curves + the four comparisons
