"""What ``rmoe fit --ckpt`` may change (docs/configs-and-cli.md, resuming): the rule, through the real command.

What the run is (architecture, router, tokenizer, block size) is refused with every differing key
and both values, before anything is written; the learning rate follows :class:`rmoe.training.resume.LRSchedule`
(unchanged: exact; a new peak: the same shape scaled; a longer run: a smooth decay from where it
was); the optimiser's other settings apply from the resume step.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from tiny import BASE_CONFIGS, ROOT, scalars, tiny_overrides

from rmoe.cli import build_cli, main
from rmoe.training.resume import LRSchedule

STEPS = 10
EVERY_3 = (
    "trainer.callbacks=[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: "
    "{every_n_train_steps: 3, save_top_k: -1, filename: 'step{step}', auto_insert_metric_name: false}}]"
)


def args(root, name, *extra):
    return [*BASE_CONFIGS, *tiny_overrides(root), f"trainer.logger.init_args.save_dir={root / 'runs'}",
            f"trainer.logger.init_args.name={name}", "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false",
            "model.optim.warmup_steps=2", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def first_part(tmp_path_factory):
    """A 10-step run with a checkpoint every 3 steps; ``step3.ckpt`` is where the resumes start."""
    root = tmp_path_factory.mktemp("resume")
    main(["fit", *args(root, "ref", f"trainer.max_steps={STEPS}", EVERY_3)])
    run = root / "runs/ref/version_0"
    return root, run / "checkpoints/step3.ckpt", scalars(run, "train/lr")


@pytest.mark.parametrize(
    ("change", "differences"),
    [
        (["model.arch.router=gru"], ["model.arch.router: 'linear' in the checkpoint, 'gru' given"]),
        (["--config", str(ROOT / "configs/router/gru.yaml")],
         ["model.arch.router: 'linear' in the checkpoint, 'recurrent' given",
          "model.arch.router_options: {} in the checkpoint, {'state_dim': 128"]),
        (["model.arch.hidden_size=64"], ["model.arch.hidden_size: 32 in the checkpoint, 64 given"]),
        (["data.block_size=16"], ["data.block_size: 32 in the checkpoint, 16 given"]),
        (["data.tokenizer=bpe"], ["data.tokenizer: 'byte' in the checkpoint, 'bpe' given"]),
    ],
    ids=["router", "router config file", "hidden_size", "block_size", "tokenizer"],
)  # fmt: skip
def test_a_resume_that_changes_what_the_run_is_is_refused_naming_every_key(change, differences, first_part, capsys):
    root, ckpt, _ = first_part
    before = sorted(p.name for p in (root / "runs/ref/version_0").iterdir())
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args(root, "ref", f"trainer.max_steps={STEPS}", f"--ckpt={ckpt}"), *change])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "a resumed run cannot change what it is" in err and "Traceback" not in err
    for difference in differences:
        assert difference in err, err
    assert sorted(p.name for p in (root / "runs/ref/version_0").iterdir()) == before  # nothing written


def resumed_lr(root, ckpt, name, *change) -> tuple[dict[int, float], object]:
    cli = build_cli([*args(root, name, "trainer.callbacks=[]", *change)], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(ckpt))
    return scalars(next((root / "runs" / name).glob("version_*")), "train/lr"), cli.trainer


def test_an_unchanged_resume_continues_the_schedule_exactly(first_part):
    root, ckpt, reference = first_part
    lr, _ = resumed_lr(root, ckpt, "same", f"trainer.max_steps={STEPS}")
    assert lr == {s: v for s, v in reference.items() if s >= 3}


def test_a_longer_run_decays_smoothly_from_where_it_was(first_part):
    root, ckpt, reference = first_part
    lr, _ = resumed_lr(root, ckpt, "longer", "trainer.max_steps=20")
    assert lr[3] == pytest.approx(reference[3], rel=1e-6)  # no jump at the resume step
    values = [lr[s] for s in range(3, 20)]
    assert all(a > b for a, b in itertools.pairwise(values))  # decaying all the way
    assert lr[19] == pytest.approx(0.1 * 3e-3 + (reference[3] - 0.1 * 3e-3) * 0.5 * (1 + math.cos(math.pi * 16 / 17)))


def test_a_new_peak_lr_scales_the_rest_and_other_optimiser_settings_apply(first_part):
    root, ckpt, reference = first_part
    lr, trainer = resumed_lr(root, ckpt, "lower", f"trainer.max_steps={STEPS}", "model.optim.lr=1e-3",
                             "model.optim.weight_decay=0.5", "model.optim.beta2=0.99")  # fmt: skip
    for step in range(3, STEPS):
        assert lr[step] == pytest.approx(reference[step] / 3, rel=1e-6), step
    decay, no_decay = trainer.optimizers[0].param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"], decay["betas"]) == (0.5, 0.0, (0.9, 0.99))


def test_the_schedule_rule_on_known_values():
    base = LRSchedule(peak_lr=1.0, warmup_steps=2, total_steps=10, min_lr_ratio=0.1)
    assert [round(base.multiplier(s), 6) for s in (0, 1, 2, 10)] == [0.5, 1.0, 1.0, 0.1]
    assert base.resumed(base, 5) == base and base.resumed(None, 5) == base
    longer = LRSchedule(1.0, 2, 20, 0.1).resumed(base, 5)
    assert (longer.restart_step, longer.restart_multiplier) == (5, base.multiplier(5))
    assert longer.multiplier(5) == pytest.approx(base.multiplier(5)) and longer.multiplier(20) == pytest.approx(0.1)
    rewarm = LRSchedule(1.0, 8, 20, 0.1).resumed(base, 5)  # a longer warmup not over yet: on to 1, then cosine
    assert rewarm.multiplier(5) == pytest.approx(base.multiplier(5)) and rewarm.multiplier(8) == pytest.approx(1.0)
    twice = LRSchedule(1.0, 2, 30, 0.1).resumed(longer, 12)  # a second change restarts from the restarted one
    assert twice.multiplier(12) == pytest.approx(longer.multiplier(12))
    assert LRSchedule(0.5, 2, 10, 0.1).resumed(base, 5) == LRSchedule(0.5, 2, 10, 0.1)
    assert torch.isfinite(torch.tensor([twice.multiplier(s) for s in range(40)])).all()
