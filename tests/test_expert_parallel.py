"""Expert parallelism: the token exchange against one process, then `rmoe fit` under EP against one process.

Part 1 (fast, 2-4 forked gloo processes, no Trainer): every process builds the same full experts, keeps its
E / ep of them and runs its own rows through :meth:`GroupedExperts.run`; the outputs, the input and
combine-weight gradients of its rows, and the expert gradients (summed over the EP group's losses, as the
all-to-all's backward brings them) must equal one process running every row with all E experts.

Part 2 (slow: real processes through the real command): see ``ep_runs``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_distributed import (
    ATOL,
    GLOBAL_BATCH,
    NUM_STEPS,
    assert_same_curve,
    rmoe_command,
    run_args,
    start,
    wait_ok,
)
from tiny import ROOT, scalars

from rmoe.cli import build_cli, main
from rmoe.errors import RmoeError
from rmoe.model.expert_parallel import gather_expert_state, shard_experts
from rmoe.model.moe import GroupedExperts

E, D, F_, T, K = 8, 16, 8, 12, 2


def _experts() -> GroupedExperts:
    torch.manual_seed(0)
    experts = GroupedExperts(E, D, F_, backend="sliced")
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return experts


def _routing(case: str, rank: int, world: int):
    """Rows, global expert ids, combine weights and keep mask of rank ``rank`` (or all ranks' at ``rank=None``)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(world * T, D, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(world * T)])
    weights = torch.rand(world * T, K, generator=g)
    keep = torch.rand(world * T, K, generator=g) > 0.3 if case == "drops" else None
    if case == "first_process_only":  # every pair goes to the experts of EP index 0: the others compute nothing
        ids = ids % (E // world)
    if case == "nothing_kept":
        keep = torch.zeros(world * T, K, dtype=torch.bool)
    rows = slice(None) if rank is None else slice(rank * T, (rank + 1) * T)
    return x[rows], ids[rows], weights[rows], None if keep is None else keep[rows]


def _forward_backward(experts: GroupedExperts, x, ids, weights, keep, rows=slice(None)):
    """Output and gradients of ``sum(out * G)``, G a fixed (rows, D) tensor: the same loss per row everywhere."""
    x, weights = x.clone().requires_grad_(), weights.clone().requires_grad_()
    out = experts.run(x, ids, weights, keep)
    upstream = torch.linspace(-1, 1, 64 * T * D).view(-1, D)[rows]
    (out * upstream[: out.shape[0]]).sum().backward()
    return out.detach(), x.grad, weights.grad


def _worker(rank: int, world: int, ep: int, init_file: str, backend: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world // ep, ep), mesh_dim_names=("expert_data_parallel", "expert_parallel"))
        group = mesh["expert_parallel"]
        for case in ("random", "drops", "first_process_only", "nothing_kept"):
            reference = _experts()
            reference.backend = backend
            ref_out, ref_dx, ref_dw = _forward_backward(reference, *_routing(case, None, world))
            sharded = _experts()
            sharded.backend = backend
            shard_experts(sharded, group.get_group(), group.size(), group.get_local_rank())
            assert sharded.gate_up_proj.shape[0] == E // ep
            rows = slice(rank * T, (rank + 1) * T)
            out, dx, dw = _forward_backward(sharded, *_routing(case, rank, world), rows=rows)
            torch.testing.assert_close(out, ref_out[rows], atol=1e-5, rtol=1e-5, msg=case)
            torch.testing.assert_close(dx, ref_dx[rows], atol=1e-5, rtol=1e-5, msg=case)
            torch.testing.assert_close(dw, ref_dw[rows], atol=1e-5, rtol=1e-5, msg=case)
            # The reference's expert gradient is the sum over all rows; this EP group's processes brought the
            # gradient of their own rows: the sum over the expert-data-parallel replicas completes it.
            grads = {name: getattr(sharded, name).grad for name in ("gate_up_proj", "down_proj")}
            for name, grad in grads.items():
                assert grad is not None, (case, name)  # idle experts: a zero gradient, not a missing one
                torch.distributed.all_reduce(grad, group=mesh["expert_data_parallel"].get_group())
            for name, full in gather_expert_state(sharded, grads).items():
                torch.testing.assert_close(full, getattr(reference, name).grad, atol=1e-5, rtol=1e-5, msg=case)
            stats = sharded.expert_parallel.stats.take()
            if case == "nothing_kept":
                assert stats["computed"] == stats["sent"] == 0
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize(("world", "ep", "backend"), [(2, 2, "sliced"), (4, 2, "tiled"), (4, 4, "grouped_mm")])
def test_the_token_exchange_equals_one_process_with_every_expert(world, ep, backend, tmp_path):
    # fork, not spawn: the children start in a second instead of re-importing torch and Lightning
    torch.multiprocessing.start_processes(
        _worker, args=(world, ep, str(tmp_path / "init"), backend), nprocs=world, join=True, start_method="fork"
    )


def _every_router_worker(rank: int, init_file: str) -> None:
    """Each process: one MoeLM per router case with its experts split over 2 processes, against the same model
    with every expert on this process's own rows (a router only ever sees its process's tokens)."""
    import warnings

    from test_backends import ROUTER_CASES
    from test_routers import VOCAB, tiny_config

    from rmoe import MoeLM

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    group = torch.distributed.new_group([0, 1])
    try:
        tokens = torch.randint(0, VOCAB, (2, 2, 8), generator=torch.Generator().manual_seed(3))[rank]
        for router, options in ROUTER_CASES:
            models = []
            for _ in range(2):
                torch.manual_seed(0)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the non-causal routers' start-up warning
                    models.append(MoeLM(tiny_config(router, options)))
            full, sharded = models
            shard_experts(sharded, group, 2, rank)
            grads = {}
            for name, model in (("full", full), ("sharded", sharded)):
                logits = model(tokens).logits
                (logits * torch.linspace(-1, 1, logits.numel()).view_as(logits)).sum().backward()
                grads[name] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
                grads[name]["logits"] = logits.detach()
            what = f"{router} {options}"
            assert grads["full"].keys() == grads["sharded"].keys(), what
            for key, expected in grads["full"].items():
                actual = grads["sharded"][key]
                if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
                    # the experts here brought the gradient of both processes' rows: compare with the sum
                    torch.distributed.all_reduce(expected, group=group)
                    expected = expected[rank * 2 : (rank + 1) * 2]
                torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4, msg=f"{what}: {key}")
    finally:
        torch.distributed.destroy_process_group()


def test_every_router_runs_under_expert_parallelism_as_with_every_expert_at_hand(tmp_path):
    torch.multiprocessing.start_processes(
        _every_router_worker, args=(str(tmp_path / "init"),), nprocs=2, join=True, start_method="fork"
    )


# ----------------------------------------------------------------------------------------------
# Bad input: refused before any process starts, one paragraph naming the keys


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["trainer.strategy.init_args.expert_parallel_size=3"], "must divide the number of processes"),
        (
            ["trainer.devices=4", "trainer.strategy.init_args.expert_parallel_size=4", "model.arch.num_experts=6"],
            "must divide model.arch.num_experts=6",
        ),
        (["model.compile=true"], "model.compile=true is not supported under expert parallelism"),
        (["trainer.strategy.init_args.expert_parallel_size=0"], "expected an integer >= 1"),
    ],
)
def test_an_expert_parallel_size_the_run_cannot_use_is_one_clear_message(extra, fragment, tmp_path, capsys):
    args = run_args(tmp_path, "bad", 4, "--config", str(ROOT / "configs/strategy/ep.yaml"), "trainer.devices=2", *extra)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args])
    assert exit_info.value.code != 0
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "runs/bad").exists() or not any((tmp_path / "runs/bad").iterdir())


def test_the_strategy_refuses_a_size_that_is_not_a_positive_integer():
    from tiny import tiny_config

    from rmoe.training.strategies import ExpertParallelStrategy

    for size in (0, -2, 1.5, True):
        with pytest.raises(RmoeError, match=f"expert_parallel_size={size!r} is invalid"):
            ExpertParallelStrategy(expert_parallel_size=size).check_model(tiny_config(), compile=False)


# ----------------------------------------------------------------------------------------------
# rmoe fit under EP against one process


def ep_args(root: Path, name: str, batch_size: int, devices: int, ep: int, *extra: str) -> list[str]:
    return run_args(
        root, name, batch_size, "--config", str(ROOT / "configs/strategy/ep.yaml"), f"trainer.devices={devices}",
        f"trainer.strategy.init_args.expert_parallel_size={ep}", "model.arch.num_experts=8", *extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def ep_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process with the global batch of 8 rows (8 steps) against, through the real command: ep=2 on 2
    processes (4 rows each), ep=4 and ep=2 x data parallel 2 on 4 processes (2 rows each), 4 steps each, and the
    ep=2 x 2 run resumed at ep=4 up to step 8 (the same 4 processes: the data order depends on their number).
    8 experts, linear router, global-batch balance loss."""
    root = tmp_path_factory.mktemp("expert_parallel")
    half = NUM_STEPS // 2
    build_cli(run_args(root, "ref", GLOBAL_BATCH, "model.arch.num_experts=8"), run=False).datamodule.prepare_data()
    ep2 = start(rmoe_command("fit", *ep_args(root, "ep2", 4, 2, 2, f"trainer.max_steps={half}")), root, "ep2")
    main(["fit", *run_args(root, "ref", GLOBAL_BATCH, "model.arch.num_experts=8", f"trainer.max_steps={NUM_STEPS}")])
    wait_ok(ep2)
    wait_ok(start(rmoe_command("fit", *ep_args(root, "ep2dp2", 2, 4, 2, f"trainer.max_steps={half}")), root, "x"))
    last = root / "runs/ep2dp2/version_0/checkpoints/last.ckpt"
    resumed = ep_args(root, "resumed", 2, 4, 4, f"trainer.max_steps={NUM_STEPS}", f"--ckpt={last}")
    wait_ok(start(rmoe_command("fit", *resumed), root, "resumed"))
    wait_ok(start(rmoe_command("fit", *ep_args(root, "ep4", 2, 4, 4, f"trainer.max_steps={half}")), root, "ep4"))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ep2", "ep4", "ep2dp2"])
def test_expert_parallel_fit_equals_one_process_step_by_step(name, ep_runs):
    ref, run = ep_runs / "runs/ref/version_0", ep_runs / f"runs/{name}/version_0"
    for tag in ("train/loss", "train/aux_loss", "train/z_loss", "train/grad_norm"):
        assert_same_curve(scalars(run, tag), scalars(ref, tag), range(NUM_STEPS // 2))
    assert scalars(run, "val/loss")[3] == pytest.approx(scalars(ref, "val/loss")[3], abs=ATOL)
    for tag in ("moe/val/num_tokens", "moe/val/load_cv/mean"):
        assert scalars(run, tag)[3] == pytest.approx(scalars(ref, tag)[3], abs=1e-6), tag
    # the traffic: rows go to the other processes, and the load imbalance is measured
    assert scalars(run, "ep/sent/rank1") and all(v > 0 for v in scalars(run, "ep/received/rank0").values())
    assert all(v >= 1.0 for v in scalars(run, "ep/load_imbalance").values())
    assert all(0 < v < 1 for v in scalars(run, "ep/all_to_all_share").values())


@pytest.mark.slow
def test_the_checkpoint_holds_every_expert_the_weights_equal_one_process_and_it_resumes_at_another_size(ep_runs):
    ref_ckpt = torch.load(ep_runs / "runs/ref/version_0/checkpoints/last.ckpt", weights_only=False)
    resumed = ep_runs / "runs/resumed/version_0"
    ckpt = torch.load(resumed / "checkpoints/last.ckpt", weights_only=False)
    assert ckpt["global_step"] == ref_ckpt["global_step"] == NUM_STEPS
    for key, value in ref_ckpt["state_dict"].items():  # every expert, the one-process weights after 8 steps
        torch.testing.assert_close(ckpt["state_dict"][key], value, atol=2e-5, rtol=1e-4, msg=key)
    for saved, expected in zip(ckpt["optimizer_states"][0]["state"].values(),
                               ref_ckpt["optimizer_states"][0]["state"].values(), strict=True):  # fmt: skip
        torch.testing.assert_close(saved["exp_avg_sq"], expected["exp_avg_sq"], atol=1e-7, rtol=1e-3)
    ref = ep_runs / "runs/ref/version_0"
    assert_same_curve(scalars(resumed, "train/loss"), scalars(ref, "train/loss"), range(NUM_STEPS // 2, NUM_STEPS))
    # loads on one process
    single = ["trainer.strategy=auto", "trainer.devices=1", f"data.eval_batch_size={GLOBAL_BATCH}"]
    main(["validate", "--config", str(resumed / "config.yaml"), f"--ckpt={resumed / 'checkpoints/last.ckpt'}",
          *single])  # fmt: skip
    [reloaded] = scalars(resumed / "validate/version_0", "val/loss").values()
    assert reloaded == pytest.approx(scalars(ref, "val/loss")[NUM_STEPS - 1], abs=ATOL)
    main(["export", "--ckpt", str(resumed / "checkpoints/last.ckpt"), "--out", str(ep_runs / "exported")])
    assert (ep_runs / "exported/config.json").is_file()  # a transformers folder with every expert


@pytest.fixture(scope="module")
def ep_router_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The recurrent router (gru) and a capacity router (linear, capacity 1.0: it drops pairs) under ep=2, one
    sequence per process, against one process accumulating the same two sequences per step (as in
    test_distributed's ``router_runs``: a capacity applies to one forward call's tokens)."""
    root = tmp_path_factory.mktemp("ep_routers")
    common = ["data.batch_size=1", "data.eval_batch_size=1", "model.aux_loss_scope=micro_batch",
              f"trainer.max_steps={NUM_STEPS // 2}", "model.arch.num_experts=8"]  # fmt: skip
    build_cli(run_args(root, "prepare", 1), run=False).datamodule.prepare_data()
    for router, options in (("gru", "{}"), ("linear", "{capacity_factor: 1.0, eval_capacity_factor: 1.0}")):
        args = ["--config", str(ROOT / f"configs/router/{router}.yaml"), *common,
                f"model.arch.router_options={options}"]  # fmt: skip
        ep = start(rmoe_command("fit", *ep_args(root, f"{router}_ep", 1, 2, 2, *args)), root, f"{router}_ep")
        one = ["trainer.accumulate_grad_batches=2", "trainer.limit_val_batches=4"]
        main(["fit", *run_args(root, f"{router}_one", 1, *args, *one)])
        wait_ok(ep)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("router", ["gru", "linear"])
def test_the_recurrent_and_a_capacity_router_train_under_expert_parallelism_as_on_one_process(router, ep_router_runs):
    one, ep = ep_router_runs / f"runs/{router}_one/version_0", ep_router_runs / f"runs/{router}_ep/version_0"
    for tag in ("train/loss", "train/aux_loss", "train/z_loss"):
        assert_same_curve(scalars(ep, tag), scalars(one, tag), range(NUM_STEPS // 2))
    last = NUM_STEPS // 2 - 1
    assert scalars(ep, "val/loss")[last] == pytest.approx(scalars(one, "val/loss")[last], abs=ATOL)
    for tag in ("moe/val/num_tokens", "moe/val/load_cv/mean", "moe/val/drop_ratio/mean"):
        assert scalars(ep, tag)[last] == pytest.approx(scalars(one, tag)[last], abs=1e-6), tag
    if router == "linear":
        assert scalars(one, "moe/val/drop_ratio/mean")[last] > 0  # the capacity was binding
    one_state = torch.load(one / "checkpoints/last.ckpt", weights_only=False)["state_dict"]
    ep_state = torch.load(ep / "checkpoints/last.ckpt", weights_only=False)["state_dict"]
    assert ep_state.keys() == one_state.keys()
    for key, value in one_state.items():  # the same weights after the steps, every expert
        torch.testing.assert_close(ep_state[key], value, atol=2e-5, rtol=1e-4, msg=key)
