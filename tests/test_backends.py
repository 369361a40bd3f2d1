"""Every expert backend gives the same numbers for every router, in fp32 and in bf16 autocast.

The GPU path (``grouped_mm``) is run through torch's CPU implementation of ``F.grouped_mm``,
which, like the CUDA kernel, leaves the rows past the last group uninitialised in its output and
in its input gradient: the dropped pairs of a capacity router sort there. The reference is the
fp32 ``sliced`` backend (itself proven against a per-token loop in ``tests/test_model.py``); every
output, input gradient and weight gradient must equal it within the dtype's tolerance, and be
finite, on a second call too (garbage memory is reused).

Shape legend: T tokens, D model width, F expert width, E experts, K top-k.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from test_router_study import STUDY_CASES
from test_routers import CASES, VOCAB

from rmoe import MoeLM, RmoeError
from rmoe.model.moe import GroupedExperts, SparseMoeBlock, grouped_mm_unavailable, resolve_expert_backend
from rmoe.routers import ROUTERS, RoutingOutput

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

BACKENDS = ("sliced", "tiled", "grouped_mm")
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
# (atol, rtol) against the fp32 sliced reference, relative to the reference's largest magnitude
TOLERANCE = {"fp32": (1e-5, 1e-5), "bf16": (3e-2, 3e-2)}
# every registered router once with its defaults, plus the options that change what reaches the experts
ROUTER_CASES = [(r, o) for r, o in CASES + STUDY_CASES] + [
    ("locmoe", {"capacity_factor": 0.5}),
    ("expert_choice", {"capacity_factor": 0.5}),
]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: str, what: str) -> None:
    assert torch.isfinite(actual).all(), f"{what}: {int((~torch.isfinite(actual)).sum())} non-finite values"
    atol, rtol = TOLERANCE[dtype]
    scale = float(expected.abs().max()) or 1.0
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol * scale, rtol=rtol, msg=what)


def autocast(dtype: str):
    return torch.autocast("cpu", dtype=DTYPES[dtype], enabled=DTYPES[dtype] is not None)


# ------------------------------------------------------------------------------------------------
# The experts alone, with the routings that broke the GPU path


@contextlib.contextmanager
def nan_filled_empty_tensors():
    """``torch.empty`` (and every kernel's uninitialised output) filled with NaN while inside."""
    import torch.utils.deterministic

    previous = (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.utils.deterministic.fill_uninitialized_memory = previous[1]


def routing_case(case: str, T: int, E: int, K: int, gen: torch.Generator):
    """(expert_ids_TK, weights_TK, keep_TK) for: plain top-k, 30% of pairs dropped, experts that get
    no token, every pair of one expert dropped, everything dropped."""
    logits_TE = torch.randn(T, E, generator=gen)
    if case in ("idle_experts", "idle_and_drops"):
        logits_TE[:, E // 2 :] = -1e9  # half the experts get no token
    weights_TK, ids_TK = logits_TE.softmax(-1).topk(K, dim=-1)
    keep_TK = None
    if case in ("drops", "idle_and_drops"):
        keep_TK = torch.rand(T, K, generator=gen) > 0.3
    elif case == "expert_dropped":
        keep_TK = ids_TK != ids_TK[0, 0]
    elif case == "all_dropped":
        keep_TK = torch.zeros(T, K, dtype=torch.bool)
    return ids_TK, weights_TK, keep_TK


def experts_pass(backend: str, dtype: str, x_TD, ids_TK, weights_TK, keep_TK, grad_TD, state):
    experts = GroupedExperts(state["gate_up_proj"].shape[0], x_TD.shape[1], state["down_proj"].shape[-1], backend)
    experts.load_state_dict(state)
    x_TD = x_TD.clone().requires_grad_()
    weights_TK = weights_TK.clone().requires_grad_()
    outputs = []
    for _ in range(2):  # a second call reuses the memory the first left uninitialised
        with autocast(dtype):
            out_TD = experts.run(x_TD, ids_TK, weights_TK, keep_TK)
        grads = torch.autograd.grad(out_TD, [x_TD, weights_TK, experts.gate_up_proj, experts.down_proj], grad_TD)
        outputs.append((out_TD.detach(), *grads))
    return outputs


@pytest.mark.parametrize("case", ["top_k", "drops", "idle_experts", "idle_and_drops", "expert_dropped", "all_dropped"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_equals_fp32_sliced_with_drops_and_idle_experts(backend, dtype, case):
    gen = torch.Generator().manual_seed(3)
    T, D, F_, E, K = 37, 32, 16, 6, 2
    state = {
        "gate_up_proj": 0.3 * torch.randn(E, 2 * F_, D, generator=gen),
        "down_proj": 0.3 * torch.randn(E, D, F_, generator=gen),
    }
    x_TD = torch.randn(T, D, generator=gen)
    ids_TK, weights_TK, keep_TK = routing_case(case, T, E, K, gen)
    grad_TD = torch.randn(T, D, generator=gen)
    reference = experts_pass("sliced", "fp32", x_TD, ids_TK, weights_TK, keep_TK, grad_TD, state)[0]
    names = ("output", "input gradient", "routing-weight gradient", "gate_up_proj gradient", "down_proj gradient")
    with nan_filled_empty_tensors():  # what a kernel leaves uninitialised is NaN, not whatever memory held
        outputs = experts_pass(backend, dtype, x_TD, ids_TK, weights_TK, keep_TK, grad_TD, state)
    for call, got in enumerate(outputs):
        for name, a, b in zip(names, got, reference, strict=True):
            assert_close(a, b, dtype, f"{backend} {dtype} {case}, call {call + 1}: {name}")
    if keep_TK is not None:  # a dropped pair passes nothing: its weight has no gradient
        assert (got[2][~keep_TK] == 0).all()


# ------------------------------------------------------------------------------------------------
# Every router through every backend


def two_moe_blocks(router: str, options: dict, backend: str) -> tuple[MoeLM, SparseMoeBlock, SparseMoeBlock]:
    from test_routers import build

    model = build(router, options, seed=0, num_experts=8, top_k=2, hidden_size=32, moe_intermediate_size=16,
                  expert_backend=backend)  # fmt: skip
    blocks = [layer.mlp for layer in model.layers if isinstance(layer.mlp, SparseMoeBlock)]
    return model.train(), blocks[0], blocks[1]


def router_pass(router: str, options: dict, backend: str, dtype: str, inputs):
    """Two consecutive MoE blocks (the router state passes from the first to the second), each fed its
    own fp32 input, so the routing is the same in every dtype: (outputs, input grads, weight grads), routing."""
    model, first, second = two_moe_blocks(router, options, backend)
    x0, x1, g0, g1 = (t.clone().requires_grad_(i < 2) for i, t in enumerate(inputs))
    ids_BS = torch.randint(0, VOCAB, x0.shape[:2], generator=torch.Generator().manual_seed(7))  # hash routing
    with autocast(dtype):
        out0, routing0, state = first(x0, None, ids_BS)
        out1, routing1, _ = second(x1, state, ids_BS)
    loss = (out0.float() * g0).sum() + (out1.float() * g1).sum()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [x0, x1, *params], allow_unused=True)
    names = ["input of block 0", "input of block 1"] + [n for n, p in model.named_parameters() if p.requires_grad]
    values = {"output of block 0": out0.detach(), "output of block 1": out1.detach()}
    values.update({f"gradient of {n}": g for n, g in zip(names, grads, strict=True) if g is not None})
    return values, (routing0, routing1)


def routing_key(routing: RoutingOutput) -> tuple[torch.Tensor, ...]:
    keep = routing.keep_TK if routing.keep_TK is not None else torch.ones_like(routing.expert_ids_TK, dtype=torch.bool)
    return routing.expert_ids_TK, keep


def test_the_router_cases_cover_every_registered_router():
    assert {r for r, _ in ROUTER_CASES} == set(ROUTERS)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("router", "options"), ROUTER_CASES, ids=[f"{r}-{o}" for r, o in ROUTER_CASES])
def test_every_router_gives_the_same_numbers_on_every_backend(router, options, backend, dtype):
    gen = torch.Generator().manual_seed(5)
    B, S, D = 2, 6, 32
    inputs = [torch.randn(B, S, D, generator=gen) for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the non-causal routers' start-up warning
        reference, ref_routing = router_pass(router, options, "sliced", "fp32", inputs)
        got, routing = router_pass(router, options, backend, dtype, inputs)
    for mine, theirs in zip(routing, ref_routing, strict=True):  # the router runs in fp32 whatever the dtype
        for a, b in zip(routing_key(mine), routing_key(theirs), strict=True):
            assert torch.equal(a, b)
    assert got.keys() == reference.keys()
    for name, expected in reference.items():
        assert_close(got[name], expected, dtype, f"{router} {options} on {backend} in {dtype}: {name}")


def test_the_router_cases_drop_pairs_and_leave_experts_idle():
    """What the matrix above must exercise: capacity routers that drop pairs, and experts with no token."""
    gen = torch.Generator().manual_seed(5)
    inputs = [torch.randn(2, 6, 32, generator=gen) for _ in range(4)]
    drops, idle = set(), set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for router, options in ROUTER_CASES:
            for r in router_pass(router, options, "sliced", "fp32", inputs)[1]:
                counts = torch.bincount(r.expert_ids_TK[routing_key(r)[1]].flatten(), minlength=8)
                if r.keep_TK is not None and not r.keep_TK.all():
                    drops.add(router)
                if (counts == 0).any():
                    idle.add(router)
    assert {"locmoe", "expert_choice", "sinkhorn_expert_choice", "sparse_expert_choice"} <= drops
    assert len(idle) >= 3


# ------------------------------------------------------------------------------------------------
# Which backend runs


def test_auto_takes_grouped_mm_only_where_its_fused_kernel_is_proven(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, expected in (((9, 0), None), ((10, 0), "not yet proven"), ((8, 0), "no fused kernel")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        reason = grouped_mm_unavailable(cuda, torch.bfloat16, 512, 256)
        assert reason is None if expected is None else expected in reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert "bf16 only" in grouped_mm_unavailable(cuda, torch.float32, 512, 256)
    assert "multiples of 8" in grouped_mm_unavailable(cuda, torch.bfloat16, 500, 256)
    assert "CUDA-only" in grouped_mm_unavailable(torch.device("cpu"), torch.bfloat16, 512, 256)
    assert resolve_expert_backend("auto", cuda, torch.bfloat16, 512, 256, 1000) == "grouped_mm"
    with pytest.warns(UserWarning, match="auto runs 'sliced', not 'grouped_mm': the compute dtype is float16"):
        assert resolve_expert_backend("auto", cuda, torch.float16, 512, 256, 1000) == "sliced"
    assert resolve_expert_backend("auto", cuda, torch.bfloat16, 500, 256, 10**9) == "sliced"  # not tiled on GPUs


def test_a_forced_grouped_mm_at_widths_it_cannot_take_is_a_config_error():
    cpu = torch.device("cpu")
    assert resolve_expert_backend("grouped_mm", cpu, torch.float32, 36, 20, 10) == "grouped_mm"  # 16 bytes in fp32
    with pytest.raises(RmoeError, match=r"model.arch.expert_backend='grouped_mm' cannot run this model: "
                       r"model.arch.hidden_size=36 and model.arch.moe_intermediate_size=20 must both be multiples "
                       r"of 8 in bfloat16"):  # fmt: skip
        resolve_expert_backend("grouped_mm", cpu, torch.bfloat16, 36, 20, 10)


# ------------------------------------------------------------------------------------------------
# Through the real command


@pytest.mark.parametrize("router", ["locmoe", "expert_choice"])
def test_capacity_routers_train_in_bf16_on_grouped_mm_as_on_sliced(router, tmp_path):
    """The audit's reproduction, shrunk: a capacity router, bf16-mixed, ``grouped_mm``, validation and
    routing analytics on. It stopped at step 0 with a non-finite gradient norm; now its training curve
    is the ``sliced`` backend's (bf16 matmuls in another order: the same to 1e-2)."""
    from tiny import BASE_CONFIGS, ROOT, scalars, tiny_overrides

    from rmoe.cli import main

    curves = {}
    for backend in ("sliced", "grouped_mm"):
        (tmp_path / backend).mkdir()
        router_config = ["--config", str(ROOT / f"configs/router/{router}.yaml")]
        main(["fit", *BASE_CONFIGS, *router_config, *tiny_overrides(tmp_path / backend),
              f"trainer.logger.init_args.save_dir={tmp_path / backend}", "trainer.logger.init_args.name=t",
              "trainer.precision=bf16-mixed", f"model.arch.expert_backend={backend}", "trainer.max_steps=4",
              "trainer.val_check_interval=2", "trainer.limit_val_batches=2"])  # fmt: skip
        run = tmp_path / backend / "t/version_0"
        curves[backend] = [scalars(run, "train/loss")[s] for s in range(4)]
        assert scalars(run, "val/loss") and scalars(run, "moe/val/drop_ratio/mean")
    assert all(torch.isfinite(torch.tensor(curves["grouped_mm"])))
    torch.testing.assert_close(torch.tensor(curves["grouped_mm"]), torch.tensor(curves["sliced"]), atol=1e-2, rtol=0)


def test_a_backend_or_precision_the_machine_cannot_run_is_refused_before_anything_is_written(tmp_path, capsys):
    from tiny import BASE_CONFIGS, tiny_overrides

    from rmoe.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *BASE_CONFIGS, *tiny_overrides(tmp_path), f"trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
              "trainer.precision=bf16-mixed", "model.arch.expert_backend=grouped_mm",
              "model.arch.moe_intermediate_size=20"])  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "model.arch.expert_backend='grouped_mm' cannot run this model" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_bf16_on_a_gpu_without_it_names_trainer_precision(monkeypatch):
    from tiny import tiny_config

    from rmoe.training.precision import check_device_and_precision, compute_dtype

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100-SXM2-32GB")
    with pytest.raises(RmoeError, match=r"trainer.precision=bf16-mixed needs bf16, which Tesla V100-SXM2-32GB"):
        check_device_and_precision(tiny_config(), torch.device("cuda"), "bf16-mixed")
    assert check_device_and_precision(tiny_config(), torch.device("cpu"), "bf16-mixed") == "sliced"
    expected = {"32-true": torch.float32, "32": torch.float32, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16,
                "bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}  # fmt: skip
    assert {p: compute_dtype(p) for p in expected} == expected


def test_fp16_on_a_cpu_is_refused_rather_than_run_in_bf16(tmp_path, capsys):
    """Lightning turns 16-mixed into bf16-mixed on a CPU, with a warning: a different numerical path."""
    from tiny import BASE_CONFIGS, tiny_overrides

    from rmoe.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *BASE_CONFIGS, *tiny_overrides(tmp_path), f"trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
              "trainer.precision=16-mixed"])  # fmt: skip
    assert exit_info.value.code == 2
    assert (
        "trainer.precision=16-mixed does not run on cpu: Lightning would train in bf16-mixed" in capsys.readouterr().err
    )
    assert not (tmp_path / "runs").exists()
