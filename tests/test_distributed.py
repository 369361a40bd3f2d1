"""More than one process, through the real `rmoe` command: DDP, FSDP2 and torchrun on 2 CPU processes (gloo).

The reference is one process with the global batch (8 rows); the distributed runs give each of 2
processes 4 rows. With ``model.aux_loss_scope=global_batch`` every part of the loss is a function of
the global batch, so the runs must agree step for step up to float rounding: the two halves' sums
are added in another order than one process adds them (fp32) and Adam carries that through the
steps. Measured on this machine, DDP, torchrun-resumed DDP and FSDP2 against one process over 8
steps: |difference| <= 9.5e-7 on ``train/loss`` (2 fp32 ulps at a loss of ~5), <= 1.2e-7 on the
balance losses, <= 4.8e-7 on ``val/loss``, 0 on the routing metrics. ``ATOL = 1e-5`` leaves 10x
headroom and is still 5,000x smaller than what one training step changes the loss by here
(0.06-0.17), so a wrong shard, a missed all-reduce or a mis-scaled gradient fails it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import BASE_CONFIGS, ROOT, scalars, tiny_config, tiny_overrides

from rmoe.cli import build_cli, main

pytestmark = pytest.mark.slow  # real multi-process runs

TESTS = Path(__file__).resolve().parent
ATOL = 1e-5
GLOBAL_BATCH = 8
NUM_STEPS = 8  # the reference's length; the first DDP run stops at NUM_STEPS // 2, the resumed one ends here


def run_args(root: Path, name: str, batch_size: int, *extra: str, base_callbacks: bool = True) -> list[str]:
    """base.yaml + quick.yaml (all their callbacks) shrunk to seconds, with ``batch_size`` rows per process.

    The learning rate is constant after the 2 warmup steps (``min_lr_ratio=1``), so a run of 4 steps is
    exactly the first half of a run of 8 and a resumed run can be compared with the reference.
    Validation every 4 steps on 2 batches per process: 2 x 4 rows on each of 2 processes (interleaved by
    Lightning's DistributedSampler) are the same 16 rows as 2 x 8 on one. A ``RankProbe`` joins the
    callbacks (or, without ``base_callbacks``, is the only one).
    """
    probe = f"{{class_path: rank_probe.RankProbe, init_args: {{out: {root / 'probe' / name}}}}}"
    probe = f"--trainer.callbacks+={probe}" if base_callbacks else f"trainer.callbacks=[{probe}]"
    return [
        *BASE_CONFIGS,
        *tiny_overrides(root),
        f"trainer.logger.init_args.save_dir={root / 'runs'}",
        f"trainer.logger.init_args.name={name}",
        "trainer.accelerator=cpu",
        f"data.batch_size={batch_size}",
        f"data.eval_batch_size={batch_size}",
        "trainer.val_check_interval=4",
        "trainer.limit_val_batches=2",
        "model.optim.min_lr_ratio=1.0",
        "model.aux_loss_scope=global_batch",
        "model.arch.router_options={bias_update_rate: 0.01}",
        probe,
        *extra,
    ]


def start(command: list[str], cwd: Path, name: str) -> tuple[subprocess.Popen, Path]:
    """Start a multi-process command (one thread per process), ``tests/`` importable; output to a log file."""
    pythonpath = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
    log = cwd / f"{name}.log"
    with log.open("w") as out:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT), log


def wait_ok(started: tuple[subprocess.Popen, Path]) -> None:
    process, log = started
    assert process.wait(timeout=400) == 0, log.read_text()[-4000:]


def rmoe_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "rmoe", *args]


def torchrun_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "rmoe", *args]


def probe(root: Path, name: str) -> list[dict]:
    """The RankProbe records of a run, one per process, in rank order."""
    return [json.loads(p.read_text()) for p in sorted((root / "probe" / name).glob("rank*.json"))]


def assert_same_curve(actual: dict[int, float], expected: dict[int, float], steps: range, atol: float = ATOL) -> None:
    assert sorted(actual) == list(steps), sorted(actual)
    for step in steps:
        assert actual[step] == pytest.approx(expected[step], abs=atol), (step, actual[step], expected[step])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process with the global batch (8 steps); DDP through `rmoe` for 4 steps; DDP through
    `torchrun` resumed from that run's last.ckpt up to 8; FSDP2 through `rmoe` for 4 steps.
    The runs that do not depend on each other overlap (2 cores: most of a run is start-up)."""
    root = tmp_path_factory.mktemp("distributed")
    half = NUM_STEPS // 2
    # write the data files and build their cache once, before three runs read them at the same time
    build_cli(run_args(root, "ref", GLOBAL_BATCH), run=False).datamodule.prepare_data()
    ddp = ["trainer.strategy=ddp", "trainer.devices=2"]
    ddp_run = start(rmoe_command("fit", *run_args(root, "ddp", 4, *ddp, f"trainer.max_steps={half}")), root, "ddp")
    fsdp = ["--config", str(ROOT / "configs/strategy/fsdp.yaml"), "trainer.devices=2", f"trainer.max_steps={half}"]
    fsdp_run = start(rmoe_command("fit", *run_args(root, "fsdp", 4, *fsdp)), root, "fsdp")
    main(["fit", *run_args(root, "ref", GLOBAL_BATCH, f"trainer.max_steps={NUM_STEPS}")])
    wait_ok(ddp_run)
    last = root / "runs/ddp/version_0/checkpoints/last.ckpt"
    resumed = run_args(root, "resumed", 4, *ddp, f"trainer.max_steps={NUM_STEPS}", f"--ckpt={last}")
    wait_ok(start(torchrun_command("fit", *resumed), root, "resumed"))
    wait_ok(fsdp_run)
    return root


def test_ddp_fit_with_the_base_callbacks_finishes_and_equals_one_process(runs):
    ref, ddp = runs / "runs/ref/version_0", runs / "runs/ddp/version_0"
    for tag in ("train/loss", "train/aux_loss", "train/z_loss", "train/total_loss"):
        assert_same_curve(scalars(ddp, tag), scalars(ref, tag), range(NUM_STEPS // 2))
    assert scalars(ddp, "train/tokens_seen") == {s: v for s, v in scalars(ref, "train/tokens_seen").items() if s < 4}
    assert scalars(ddp, "val/loss")[3] == pytest.approx(scalars(ref, "val/loss")[3], abs=ATOL)
    assert (ddp / "tokenizer").is_dir() and (ddp / "checkpoints/last.ckpt").is_file()  # SaveTokenizer, checkpoints
    assert scalars(ddp, "train/tokens_per_sec")  # TokenThroughput


def test_resume_under_ddp_from_last_ckpt_through_torchrun_continues_exactly(runs):
    ref, resumed = runs / "runs/ref/version_0", runs / "runs/resumed/version_0"
    assert_same_curve(scalars(resumed, "train/loss"), scalars(ref, "train/loss"), range(NUM_STEPS // 2, NUM_STEPS))
    assert scalars(resumed, "val/loss")[NUM_STEPS - 1] == pytest.approx(
        scalars(ref, "val/loss")[NUM_STEPS - 1], abs=ATOL
    )
    assert [r["world_size"] for r in probe(runs, "resumed")] == [2, 2]  # torchrun started both processes


def test_ranks_train_on_disjoint_shards_that_make_up_the_one_process_batch(runs):
    rank0, rank1 = probe(runs, "ddp")
    reference = probe(runs, "ref")[0]
    assert rank0["world_size"] == rank1["world_size"] == 2
    for (step0, rows0), (step1, rows1), (step, rows) in zip(
        rank0["rows"], rank1["rows"], reference["rows"], strict=False
    ):
        assert step0 == step1 == step
        assert not set(rows0) & set(rows1), step
        assert sorted(rows0 + rows1) == sorted(rows), step
    assert len(rank0["rows"]) == len(rank1["rows"]) == NUM_STEPS // 2


def test_bias_balancing_keeps_the_biases_identical_on_both_ranks(runs):
    for name in ("ddp", "resumed", "fsdp"):
        rank0, rank1 = probe(runs, name)
        assert rank0["biases"] and rank0["biases"] == rank1["biases"], name
    final = probe(runs, "resumed")[0]["biases"]
    expected = probe(runs, "ref")[0]["biases"]
    assert final.keys() == expected.keys()
    for key in final:  # every update is +-0.01 from the all-reduced counts: the same counts, the same biases
        torch.testing.assert_close(torch.tensor(final[key]), torch.tensor(expected[key]), atol=1e-6, rtol=0)
    assert any(v != 0 for values in final.values() for v in values)


def test_routing_analytics_of_a_ddp_fit_count_both_ranks(runs):
    ref, ddp = runs / "runs/ref/version_0", runs / "runs/ddp/version_0"
    # validation at step 4: 16 rows of 32 tokens; rank 0 alone would have counted half of them
    assert scalars(ddp, "moe/val/num_tokens")[3] == scalars(ref, "moe/val/num_tokens")[3] == 16 * 32
    for tag in ("moe/val/load_cv/mean", "moe/val/gate_entropy_mean/mean"):
        assert scalars(ddp, tag)[3] == pytest.approx(scalars(ref, tag)[3], abs=1e-6), tag


def test_fsdp_fit_equals_one_process_and_its_checkpoint_loads_on_one_process(runs):
    ref, fsdp = runs / "runs/ref/version_0", runs / "runs/fsdp/version_0"
    assert_same_curve(scalars(fsdp, "train/loss"), scalars(ref, "train/loss"), range(NUM_STEPS // 2))
    config, ckpt = fsdp / "config.yaml", fsdp / "checkpoints/last.ckpt"
    assert ckpt.is_file()  # one file (save_distributed_checkpoint: false), not a folder of shards
    single = ["trainer.strategy=auto", "trainer.devices=1", f"data.eval_batch_size={GLOBAL_BATCH}"]
    main(["validate", "--config", str(config), f"--ckpt={ckpt}", *single])
    reloaded = fsdp / "validate/version_0"  # inside the run
    [reloaded_loss] = scalars(reloaded, "val/loss").values()
    assert reloaded_loss == pytest.approx(scalars(fsdp, "val/loss")[3], abs=ATOL)


# ----------------------------------------------------------------------------------------------
# The recurrent router and a capacity router, under DDP and FSDP2


@pytest.fixture(scope="module")
def router_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """For ``gru`` and ``locmoe`` (capacity 1.0: it drops pairs): 2 processes of one sequence each, under
    DDP and FSDP2, and one process that accumulates the same two sequences per step.

    A capacity applies to the tokens of one forward call (per process, as GShard and Megatron-Core
    apply theirs): with one sequence per forward call the micro-batches are the same in all three runs
    (rank r takes every 2nd index of the permutation, the one process takes them in turn), so every
    router must give the one process's curve. The balance loss is the micro-batch's, averaged over the
    two micro-batches by DDP's gradient averaging and by Lightning's accumulation alike."""
    root = tmp_path_factory.mktemp("router_runs")
    common = ["data.batch_size=1", "data.eval_batch_size=1", "model.aux_loss_scope=micro_batch",
              f"trainer.max_steps={NUM_STEPS // 2}", "model.arch.router_options={}"]  # fmt: skip
    build_cli(run_args(root, "prepare", 1), run=False).datamodule.prepare_data()
    for router in ("gru", "locmoe"):
        options = ["model.arch.router_options={capacity_factor: 1.0}"] if router == "locmoe" else []
        args = ["--config", str(ROOT / f"configs/router/{router}.yaml"), *common, *options]
        ddp = start(rmoe_command("fit", *run_args(root, f"{router}_ddp", 1, *args, "trainer.strategy=ddp",
                                                  "trainer.devices=2")), root, f"{router}_ddp")  # fmt: skip
        fsdp = ["--config", str(ROOT / "configs/strategy/fsdp.yaml"), "trainer.devices=2"]
        fsdp_run = start(
            rmoe_command("fit", *run_args(root, f"{router}_fsdp", 1, *args, *fsdp)), root, f"{router}_fsdp"
        )
        one = ["trainer.accumulate_grad_batches=2", "trainer.limit_val_batches=4"]
        main(["fit", *run_args(root, f"{router}_one", 1, *args, *one)])
        wait_ok(ddp)
        wait_ok(fsdp_run)
    return root


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("router", ["gru", "locmoe"])
def test_the_recurrent_and_a_capacity_router_train_under_ddp_and_fsdp_as_on_one_process(router, strategy, router_runs):
    one, many = router_runs / f"runs/{router}_one/version_0", router_runs / f"runs/{router}_{strategy}/version_0"
    steps = range(NUM_STEPS // 2)
    for tag in ("train/loss", "train/aux_loss", "train/z_loss"):
        assert_same_curve(scalars(many, tag), scalars(one, tag), steps)
    last = NUM_STEPS // 2 - 1
    assert scalars(many, "val/loss")[last] == pytest.approx(scalars(one, "val/loss")[last], abs=ATOL)
    for tag in ("moe/val/num_tokens", "moe/val/load_cv/mean", "moe/val/drop_ratio/mean"):
        assert scalars(many, tag)[last] == pytest.approx(scalars(one, tag)[last], abs=1e-6), tag
    if router == "locmoe":
        assert scalars(one, "moe/val/drop_ratio/mean")[last] > 0  # the capacity was binding


def test_gradient_accumulation_gives_the_curve_of_the_larger_batch(tmp_path):
    """2 micro-batches of 4 per step against batches of 8. The balance loss is off here: ``E sum f P`` of a
    batch is not the mean of its halves' (see the global-batch tests for that part); the LM loss and the
    z-loss are token means, so accumulation must reproduce them, and the bias balancing counts, exactly."""
    steps = NUM_STEPS // 2
    common = [f"trainer.max_steps={steps}", "model.aux_loss_coef=0.0", "model.aux_loss_scope=micro_batch"]
    common += ["trainer.enable_checkpointing=false"]
    main(["fit", *run_args(tmp_path, "big", GLOBAL_BATCH, *common, base_callbacks=False)])
    accumulate = ["trainer.accumulate_grad_batches=2", f"data.eval_batch_size={GLOBAL_BATCH}"]
    main(["fit", *run_args(tmp_path, "accumulated", 4, *common, *accumulate, base_callbacks=False)])
    big, accumulated = tmp_path / "runs/big/version_0", tmp_path / "runs/accumulated/version_0"
    for tag in ("train/loss", "train/z_loss", "train/lr", "train/tokens_seen"):
        assert_same_curve(scalars(accumulated, tag), scalars(big, tag), range(steps))
    assert scalars(accumulated, "val/loss")[steps - 1] == pytest.approx(scalars(big, "val/loss")[steps - 1], abs=ATOL)
    assert probe(tmp_path, "accumulated")[0]["biases"] == probe(tmp_path, "big")[0]["biases"]


# ----------------------------------------------------------------------------------------------
# The global-batch balance loss, at the level of the loss (2 gloo processes, no Trainer)


def _module(scope: str):
    from rmoe.training.module import MoeLMModule

    torch.manual_seed(0)
    return MoeLMModule(tiny_config(), aux_loss_scope=scope)


def _batch() -> torch.Tensor:
    return torch.randint(0, 97, (GLOBAL_BATCH, 17), generator=torch.Generator().manual_seed(1))


def _sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    torch.distributed.all_reduce(tensor)
    return tensor


def _aux_and_grads(module, batch: torch.Tensor, sum_over_ranks) -> tuple[torch.Tensor, list[torch.Tensor]]:
    module.zero_grad()
    aux = module._losses(batch, sum_over_ranks)[0]["aux_loss"]
    aux.backward()
    return aux.detach(), [p.grad.clone() for p in module.parameters() if p.grad is not None]


def _two_rank_worker(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        half = _batch()[rank * 4 : (rank + 1) * 4]  # rank r holds rows 4r..4r+3 of the global batch
        for scope, sum_over_ranks in (("global_batch", _sum_over_ranks), ("micro_batch", None)):
            aux, grads = _aux_and_grads(_module(scope), half, sum_over_ranks)
            for t in (aux, *grads):  # what DDP does: the mean over the ranks
                torch.distributed.all_reduce(t)
                t /= 2
            single_aux, single_grads = _aux_and_grads(_module(scope), _batch(), None)  # one process, all 8 rows
            if scope == "global_batch":
                torch.testing.assert_close(aux, single_aux, atol=1e-6, rtol=1e-5)
                for grad, single in zip(grads, single_grads, strict=True):
                    torch.testing.assert_close(grad, single, atol=1e-7, rtol=1e-5)
            else:  # the usual micro-batch loss is a different objective: the mean of the halves' losses
                assert abs(aux - single_aux) > 1e-4, (aux, single_aux)
    finally:
        torch.distributed.destroy_process_group()


def test_global_batch_balance_loss_on_two_ranks_equals_one_process_on_the_concatenated_batch(tmp_path):
    # fork, not spawn: the children start in a second instead of re-importing torch and Lightning
    torch.multiprocessing.start_processes(
        _two_rank_worker, args=(str(tmp_path / "init"),), nprocs=2, join=True, start_method="fork"
    )


def test_global_batch_fractions_accumulate_over_the_micro_batches_of_a_step():
    from rmoe.model.losses import expert_counts

    module = _module("global_batch")
    batch = _batch()
    identity = lambda t: t  # noqa: E731 - one process: the sum over ranks is the tensor itself
    first = module._step_fractions(module.model(batch[:4, :-1]).routing, identity)
    second = module._step_fractions(module.model(batch[4:, :-1]).routing, identity)
    counts_LE = torch.stack([expert_counts(r, 4) for r in module.model(batch[:, :-1]).routing])
    torch.testing.assert_close(second, counts_LE / counts_LE.sum(-1, keepdim=True))  # the whole step's f_e
    assert not torch.allclose(first, second)


# ----------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("--ckpt=/no/such/last.ckpt", "--ckpt /no/such/last.ckpt: no such file"),
        ("model.optim.lr=0", "model.optim.lr=0.0 is invalid; expected a finite number > 0"),
        ("model.optim.lr=-1e-3", "model.optim.lr=-0.001 is invalid"),
        ("model.optim.beta1=1.0", "model.optim.beta1=1.0 is invalid; expected a number in [0, 1)"),
        ("model.optim.beta2=-0.5", "model.optim.beta2=-0.5 is invalid; expected a number in [0, 1)"),
    ],
)
def test_bad_checkpoint_or_optimiser_values_are_one_clear_message(override, fragment, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *run_args(tmp_path, "bad", 4, "trainer.max_steps=1", override)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"rmoe: error: {fragment}" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_gpu_check_script_runs_in_its_reduced_cpu_mode(tmp_path):
    """`python benchmarks/gpu_check.py --cpu`: its command (bf16-mixed, grouped_mm, DDP) on 2 CPU processes."""
    tiny = [*tiny_overrides(tmp_path), f"trainer.logger.init_args.save_dir={tmp_path / 'runs'}"]
    command = [sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "--cpu", "--steps", "4", *tiny]
    process, log = start(command, tmp_path, "gpu_check")
    assert process.wait(timeout=400) == 0, log.read_text()[-4000:]
    line = next(line for line in log.read_text().splitlines() if line.startswith("gpu_check:"))
    assert "2 x cpu, DDPStrategy, bf16-mixed, compile=False, grouped_mm, 4 steps: tokens/s " in line, line
    assert float(line.split("tokens/s ")[1].split(",")[0]) > 0
