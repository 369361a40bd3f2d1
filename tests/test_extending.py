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
def top_p(tmp_path_factory):
    """The page's router, registered as a user's file in ``rmoe/routers/`` would be."""
    folder = tmp_path_factory.mktemp("user_router")
    (folder / "top_p_router_from_the_docs.py").write_text(block("python router"))
    sys.path.insert(0, str(folder))
    try:
        module = __import__("top_p_router_from_the_docs")
        yield module.TopPRouter
    finally:
        ROUTERS.pop("top_p", None)
        sys.path.remove(str(folder))
        sys.modules.pop("top_p_router_from_the_docs", None)


def test_the_router_of_the_guide_passes_the_generic_tests(top_p, monkeypatch):
    assert ROUTERS["top_p"] is top_p
    test_routers.test_model_forward_backward_shapes_and_gradients("top_p", {"threshold": 0.5})
    test_routers.test_token_choice_weights_sum_to_one_and_causal("top_p", {"threshold": 0.5})
    test_router_costs.test_routed_pairs_is_what_the_experts_compute("top_p", {"threshold": 0.5}, monkeypatch)
    assert set(option_docs(top_p.Options)) == {"threshold"}
    assert "threshold: float = 0.5" in describe("top_p")


def test_the_defining_property_test_of_the_guide_passes(top_p):
    namespace = {"build": test_routers.build, "routers_of": test_routers.routers_of, "torch": torch}
    exec(textwrap.dedent(block("python router-test")), namespace)
    torch.manual_seed(0)
    namespace["test_top_p_takes_experts_until_the_threshold"]()


def test_the_config_of_the_guide_trains_through_the_command(top_p, tmp_path):
    config = tmp_path / "top_p.yaml"
    config.write_text(block("yaml router-config"))
    assert yaml.safe_load(config.read_text())["model"]["arch"]["top_k"] == 4  # a model key the router needs
    args = [*BASE_CONFIGS, "--config", str(config), *tiny_overrides(tmp_path)]
    logger = [f"trainer.logger.init_args.save_dir={tmp_path / 'runs'}", "trainer.logger.init_args.name=top_p"]
    main(["fit", *args, *logger, "trainer.max_steps=3", "trainer.enable_progress_bar=false"])
    run = tmp_path / "runs" / "top_p" / "version_0"
    assert len(scalars(run, "train/loss")) == 3
    saved = yaml.safe_load((run / "config.yaml").read_text())["model"]["arch"]
    assert saved["router"] == "top_p" and saved["top_k"] == 4
    drop = scalars(run, "moe/train/drop_ratio/layer_0")
    assert drop and 0 < next(iter(drop.values())) < 1  # the threshold leaves some of the 4 pairs out


def test_a_bad_option_of_the_new_router_is_refused_naming_it(top_p, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *BASE_CONFIGS, *tiny_overrides(tmp_path), "model.arch.router=top_p",
              "model.arch.router_options.threshold=2"])  # fmt: skip
    assert exit_info.value.code == 2
    assert "threshold=2" in capsys.readouterr().err
