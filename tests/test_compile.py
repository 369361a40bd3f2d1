"""``torch.compile(fullgraph=True)`` of the whole model on the ``grouped_mm`` path, for every router.

Traced on CPU with the ``aot_eager`` backend (dynamo and AOTAutograd as on a GPU, no code
generation, no C++ toolchain needed), in bf16 autocast: torch traces ``grouped_mm`` in bf16 only.
``fullgraph`` makes any graph break an error, so this proves that a training step of each router
has no host read and no Python branch on a tensor's value. The ``sliced`` and ``tiled`` backends
break once per layer by design (they read the group sizes on the host); ``model.compile=true``
compiles each layer whole on ``grouped_mm`` and refuses, before anything runs, what cannot be
compiled (a router that declares a ``compile_problem``, ``grouped_mm`` outside bf16).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from test_routers import build

from rmoe import RmoeError
from rmoe.routers import ROUTERS, get_router_class

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # tests/conftest.py


def train_step(model, ids):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), ids.roll(-1, 1).flatten())
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    return logits.detach(), grads


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_every_router_compiles_whole_with_fullgraph_on_grouped_mm(router):
    assert get_router_class(router).compile_problem is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the non-causal routers' start-up warning
        eager, compiled = (build(router, seed=0, expert_backend="grouped_mm").train() for _ in range(2))
    compiled.compile(fullgraph=True, backend="aot_eager", dynamic=False)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    (logits, grads), (ref_logits, ref_grads) = train_step(compiled, ids), train_step(eager, ids)
    torch.testing.assert_close(logits, ref_logits, atol=2e-2, rtol=2e-2)
    for got, expected in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)
    eager.eval(), compiled.eval()  # evaluation routing (another graph)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(compiled(ids).logits, eager(ids).logits, atol=2e-2, rtol=2e-2)


def test_model_compile_refuses_what_cannot_be_compiled(monkeypatch):
    from tiny import tiny_config

    from rmoe.routers.linear import LinearRouter
    from rmoe.training.precision import check_device_and_precision

    cpu = torch.device("cpu")
    assert check_device_and_precision(tiny_config(expert_backend="grouped_mm"), cpu, "bf16-mixed", compile=True)
    with pytest.raises(RmoeError, match=r"model.compile=true with model.arch.expert_backend=grouped_mm needs bf16"):
        check_device_and_precision(tiny_config(expert_backend="grouped_mm"), cpu, "32-true", compile=True)
    assert check_device_and_precision(tiny_config(expert_backend="sliced"), cpu, "32-true", compile=True) == "sliced"
    monkeypatch.setattr(LinearRouter, "compile_problem", "its top-p has a data-dependent number of experts")
    with pytest.raises(RmoeError, match=r"model.compile=true cannot compile router 'linear': its top-p has a data"):
        check_device_and_precision(tiny_config(), cpu, "32-true", compile=True)
    assert check_device_and_precision(tiny_config(), cpu, "32-true", compile=False) == "sliced"


def test_model_compile_traces_each_layer_whole_on_grouped_mm(tmp_path):
    """``rmoe fit`` with ``model.compile=true`` on ``grouped_mm`` in bf16: each decoder layer compiled
    with ``fullgraph=True``, and the training curve is the eager one (aot_eager: no code generation)."""
    from tiny import BASE_CONFIGS, scalars, tiny_overrides

    from rmoe.cli import build_cli

    curves, seen = {}, []
    original = torch.nn.Module.compile

    def compile_spy(module, **kwargs):
        seen.append(kwargs)
        return original(module, backend="aot_eager", **kwargs)

    for compile_ in (False, True):
        root = tmp_path / str(compile_)
        root.mkdir()
        cli = build_cli([*BASE_CONFIGS, *tiny_overrides(root), f"trainer.logger.init_args.save_dir={root}",
                         "trainer.max_steps=3", "trainer.limit_val_batches=0", "trainer.callbacks=[]",
                         "trainer.precision=bf16-mixed", "model.arch.expert_backend=grouped_mm",
                         f"model.compile={str(compile_).lower()}"], run=False)  # fmt: skip
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch.nn.Module, "compile", compile_spy)
            torch._dynamo.reset()
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        run = next(root.glob("*/version_0"))
        curves[compile_] = torch.tensor(list(scalars(run, "train/loss").values()))
    assert seen == [{"fullgraph": True}] * cli.model.arch.num_layers
    torch.testing.assert_close(curves[True], curves[False], atol=1e-2, rtol=0)
