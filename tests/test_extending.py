"""docs/extending.md's router walk-through, run as written: the page's router file is registered from
a temporary module, passes the generic router tests (which read its declarations, not its name), its
own test from the page, its config trains through the ``rmoe`` command, and ``rmoe routers`` shows it."""

from __future__ import annotations

import sys
import textwrap

import pytest
import test_router_costs
import test_routers
import torch
import yaml
from test_docs import ROOT, fenced_blocks
from tiny import BASE_CONFIGS, scalars, tiny_overrides

from rmoe.cli import main
from rmoe.router_catalog import describe, option_docs
from rmoe.routers import ROUTERS

GUIDE = ROOT / "docs/extending.md"


def block(info: str) -> str:
    (found,) = [b.text for b in fenced_blocks(GUIDE) if b.info == info]
    return found


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    """The page's router, registered as a user's file in ``rmoe/routers/`` would be."""
    folder = tmp_path_factory.mktemp("user_router")
    (folder / "noisy_top_k_router_from_the_docs.py").write_text(block("python router"))
    sys.path.insert(0, str(folder))
    try:
        module = __import__("noisy_top_k_router_from_the_docs")
        yield module.NoisyTopKRouter
    finally:
        ROUTERS.pop("noisy_top_k", None)
        sys.path.remove(str(folder))
        sys.modules.pop("noisy_top_k_router_from_the_docs", None)


def test_the_router_of_the_guide_passes_the_generic_tests(noisy, monkeypatch):
    assert ROUTERS["noisy_top_k"] is noisy
    test_routers.test_model_forward_backward_shapes_and_gradients("noisy_top_k", {})
    test_routers.test_token_choice_weights_sum_to_one_and_causal("noisy_top_k", {})
    test_router_costs.test_routed_pairs_is_what_the_experts_compute("noisy_top_k", {}, monkeypatch)
    assert "noise_scale" in set(option_docs(noisy.Options)) and "capacity_factor" in set(option_docs(noisy.Options))
    assert "noise_scale: float = 1.0" in describe("noisy_top_k")


def test_the_defining_property_test_of_the_guide_passes(noisy):
    namespace = {"build": test_routers.build, "routers_of": test_routers.routers_of, "torch": torch}
    exec(textwrap.dedent(block("python router-test")), namespace)
    torch.manual_seed(0)
    namespace["test_noisy_top_k_explores_in_training_only"]()


def test_the_config_of_the_guide_trains_through_the_command(noisy, tmp_path):
    config = tmp_path / "noisy_top_k.yaml"
    config.write_text(block("yaml router-config"))
    assert yaml.safe_load(config.read_text())["model"]["arch"]["top_k"] == 2  # a model key the router sets
    args = [*BASE_CONFIGS, "--config", str(config), *tiny_overrides(tmp_path)]
    logger = [f"trainer.logger.init_args.save_dir={tmp_path / 'runs'}", "trainer.logger.init_args.name=noisy"]
    main(["fit", *args, *logger, "trainer.max_steps=3", "trainer.enable_progress_bar=false"])
    run = tmp_path / "runs" / "noisy" / "version_0"
    assert len(scalars(run, "train/loss")) == 3
    saved = yaml.safe_load((run / "config.yaml").read_text())["model"]["arch"]
    assert saved["router"] == "noisy_top_k" and saved["top_k"] == 2
    active = scalars(run, "moe/train/active_experts_mean/layer_0")
    assert active and next(iter(active.values())) == 2  # top-2, nothing dropped


def test_a_bad_option_of_the_new_router_is_refused_naming_it(noisy, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *BASE_CONFIGS, *tiny_overrides(tmp_path), "model.arch.router=noisy_top_k",
              "model.arch.router_options.noise_scale=-1"])  # fmt: skip
    assert exit_info.value.code == 2
    assert "noise_scale=-1" in capsys.readouterr().err
