"""End to end through the real `rmoe` CLI with the real YAML files."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from tiny import BASE_CONFIGS, scalars, tiny_overrides

from rmoe.cli import main
from rmoe.errors import RmoeError

ROOT = Path(__file__).resolve().parents[1]
# experiment configs only; sweep files (a `grid:` of overrides, `rmoe sweep`) are tested in test_sweep.py
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml")
                 if "grid" not in (yaml.safe_load(p.read_text()) or {}) and "eval/tasks" not in str(p))  # fmt: skip
"""Every rmoe config file (not sweep files, not lm-eval task files)."""


def tiny_args(tmp_path: Path, *extra: str) -> list[str]:
    """base.yaml + quick.yaml shrunk to seconds: a tiny model on a small local text file."""
    return [
        *BASE_CONFIGS,
        *tiny_overrides(tmp_path),
        f"trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        "trainer.logger.init_args.name=t",
        *extra,
    ]


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT / "configs")) for p in CONFIGS])
def test_every_config_parses_and_instantiates(path, tmp_path):
    """Each YAML, merged over base.yaml, parses, type-checks and builds the model and data module."""
    from rmoe.cli import build_cli

    args = ["--config", str(ROOT / "configs/base.yaml")]
    if path.name != "base.yaml":
        args += ["--config", str(path)]
    doc = yaml.safe_load(path.read_text())
    if doc.get("data", {}).get("source", "stdlib") not in ("stdlib", "files"):
        args += ["data.source=stdlib"]  # hub presets: parse them, but build on local data (no network)
    if "shared/data" in path.read_text() and not (ROOT.parent / "shared/data").exists():
        pytest.skip("../shared/data is absent")
    args += [f"data.cache_dir={tmp_path}", "trainer.accelerator=cpu", "model.compile=false"]
    cli = build_cli(args, run=False)
    assert cli.model.model.config.vocab_size == cli.datamodule.vocab_size
    assert cli.model.model.num_parameters() > 0


def test_fit_writes_events_config_and_checkpoints_then_validate_and_test(tmp_path, capsys):
    main(["fit", *tiny_args(tmp_path, "trainer.max_steps=6", "trainer.val_check_interval=3")])
    run = tmp_path / "runs/t/version_0"
    assert (run / "config.yaml").exists()
    assert (run / "checkpoints/last.ckpt").exists()
    assert list((run / "checkpoints").glob("best-*.ckpt"))
    assert (run / "tokenizer").exists()
    losses = scalars(run, "train/loss")
    assert len(losses) == 6
    for tag in (
        "train/aux_loss",
        "train/z_loss",
        "val/loss",
        "val/ppl",
        "val/bpb",
        "train/tokens_seen",
        "train/tokens_per_sec",
        "train/lr",
    ):
        assert scalars(run, tag), f"{tag} was not logged"
    val_bpb = list(scalars(run, "val/bpb").values())[-1]
    assert 0 < val_bpb < 9  # bits per byte of a byte-level model that learned something

    # the saved config re-runs as is (here: validate and test the last checkpoint with it)
    ckpt = str(run / "checkpoints/last.ckpt")
    main(["validate", "--config", str(run / "config.yaml"), f"--ckpt={ckpt}"])
    main(["test", "--config", str(run / "config.yaml"), f"--ckpt={ckpt}"])
    # ... inside the run (not new version_<n> folders next to it)
    assert scalars(run / "validate/version_0", "val/bpb") and scalars(run / "test/version_0", "test/bpb")
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]


def test_resume_continues_at_the_right_step_with_the_same_losses(tmp_path):
    every_3 = (
        "trainer.callbacks=[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: "
        "{every_n_train_steps: 3, save_top_k: -1, filename: 'step{step}', auto_insert_metric_name: false}}]"
    )
    common = [
        "trainer.max_steps=7",
        "trainer.val_check_interval=100",
        "trainer.limit_val_batches=0",
        "trainer.log_every_n_steps=1",
        every_3,
    ]
    main(["fit", *tiny_args(tmp_path, *common)])
    straight = scalars(tmp_path / "runs/t/version_0", "train/loss")
    ckpt = tmp_path / "runs/t/version_0/checkpoints/step3.ckpt"
    assert torch.load(ckpt, weights_only=False)["global_step"] == 3

    elsewhere = tmp_path / "elsewhere/step3.ckpt"  # not the run's own checkpoint: a new version_1
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(ckpt.read_bytes())
    main(["fit", *tiny_args(tmp_path, *common), f"--ckpt={elsewhere}"])
    resumed = scalars(tmp_path / "runs/t/version_1", "train/loss")
    assert min(resumed) == 3  # the first step after the checkpoint, not 0
    assert sorted(resumed) == [s for s in sorted(straight) if s >= 3]
    for step, loss in resumed.items():
        assert loss == pytest.approx(straight[step], abs=1e-6), step


def test_resuming_a_run_continues_in_its_own_directory_with_its_data_position(tmp_path, capsys):
    """The README's resume command: same version_<n> folder (one run in TensorBoard), the loader's
    position saved in the checkpoint and checked, no "not resumable" warning, the first config kept."""
    main(["fit", *tiny_args(tmp_path, "trainer.max_steps=4", "trainer.val_check_interval=2")])
    run = tmp_path / "runs/t/version_0"
    first_config = (run / "config.yaml").read_text()
    checkpoint = torch.load(run / "checkpoints/last.ckpt", weights_only=False)
    (position,) = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert position["epoch"] == 0 and position["batches_done"] == 4  # mid-epoch: Lightning used to warn here
    resume = ["fit", "--config", str(run / "config.yaml"), f"--ckpt={run / 'checkpoints/last.ckpt'}"]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main([*resume, "trainer.max_steps=6"])
    assert not any("not resumable" in str(w.message) for w in caught)
    assert not (tmp_path / "runs/t/version_1").exists()
    assert (run / "config.yaml").read_text() == first_config
    assert "max_steps: 6" in (run / "config.resume-1.yaml").read_text()
    assert sorted(scalars(run, "train/loss")) == list(range(6))  # one run: steps 0-3, then 4-5
    bar = capsys.readouterr().out
    assert "step: 100%|██████████| 6/6" in bar and "Epoch 0" not in bar  # optimiser steps out of max_steps

    with pytest.raises(SystemExit) as exit_info:
        main([*resume, "trainer.max_steps=8", "data.batch_size=2"])
    assert exit_info.value.code == 2
    assert "the checkpoint's data position" in capsys.readouterr().err


def test_model_summary_shows_active_params_and_flops_per_token_not_lightnings_zero(tmp_path, caplog):
    with caplog.at_level("INFO", logger="lightning.pytorch.callbacks.model_summary"):
        main(["fit", *tiny_args(tmp_path, "trainer.max_steps=1", "trainer.enable_model_summary=true")])
    summary = caplog.text
    assert "Active params" in summary and "Training FLOPs per token" in summary
    assert "Total Flops" not in summary


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rmoe", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("model.arch.router=nope", "model.arch.router='nope' is not a known choice; expected one of:"),
        ("model.arch.top_k=9", "model.arch.top_k=9 must be between 1 and model.arch.num_experts=4"),
        ("model.arch.num_attention_heads=5", "not divisible by model.arch.num_attention_heads=5"),
        ("model.arch.hiden_size=8", "unknown key 'model.arch.hiden_size'. Did you mean 'model.arch.hidden_size'"),
        ("data.source=nope", "data.source"),
        ("data.train_files=[/no/such/file.txt]", "/no/such/file.txt"),
        # every numeric option's range, at config time
        ("model.aux_loss_coef=-1", "model.aux_loss_coef=-1.0 is invalid; expected a finite number >= 0"),
        ("model.z_loss_coef=-1", "model.z_loss_coef=-1.0 is invalid"),
        ("model.aux_loss_coef=nan", "model.aux_loss_coef=nan is invalid; expected a finite number"),
        ("model.optim.lr=inf", "model.optim.lr=inf is invalid; expected a finite number"),
        ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val=-1 is invalid; expected a finite number >= 0"),
        ("trainer.val_check_interval=0", "trainer.val_check_interval=0 is invalid"),
        ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0 is invalid; expected an integer >= 1"),
        ("trainer.log_every_n_steps=-1", "trainer.log_every_n_steps=-1 is invalid"),
        ("model.arch.rope_theta=-1", "model.arch.rope_theta=-1.0 is invalid; expected a finite number > 0"),
        ("model.arch.rms_norm_eps=0", "model.arch.rms_norm_eps=0.0 is invalid"),
        ("model.arch.initializer_range=-0.1", "model.arch.initializer_range=-0.1 is invalid"),
        ("model.arch.num_layers=1.5", "model.arch.num_layers=1.5 is invalid; expected an integer"),
        ("model.arch.router_options={bias_update_rate: true}", "bias_update_rate=True is invalid for router 'linear'"),
        ("seed_everything=-1", "seed_everything=-1 is invalid; expected an integer in [0, 4294967295]"),
        ("checkpoint_every_minutes=-1", "checkpoint_every_minutes=-1 must be >= 0"),
        ("model.optim.warmup_steps=null", "model.optim.warmup_steps=None is invalid; expected an integer"),  # fuzzer
        ("model.arch.hidden_size=2147483648", "model.arch: tensors whose byte sizes overflow 64 bits do not fit"),
        ("model.arch.num_experts=1000000000000", "do not fit in this machine's"),
    ],
)
def test_bad_input_is_one_clear_message_and_nothing_is_written(override, fragment, tmp_path, capsys):
    """In process (``rmoe.cli.main``, what the console script calls); the exit status and the absence
    of a traceback through a real process are checked once, below."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *tiny_args(tmp_path, "trainer.max_steps=1", override)])
    assert exit_info.value.code == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_bad_input_through_the_real_command_exits_2_without_a_traceback(tmp_path):
    result = run_cli("fit", *tiny_args(tmp_path, "trainer.max_steps=1", "model.arch.top_k=9"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "model.arch.top_k=9 must be between 1" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("kind", ["empty", "latin1"])
def test_bad_data_files_are_named(kind, tmp_path, capsys):
    bad = tmp_path / f"{kind}.txt"
    bad.write_bytes(b"" if kind == "empty" else "caf\xe9 na\xefve".encode("latin-1"))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *tiny_args(tmp_path, "trainer.max_steps=1", f"data.train_files=[{bad}]")])
    assert exit_info.value.code == 2
    assert str(bad) in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_deep_cpu_config_trains_with_the_paper_gru_router_and_logs_the_logit_scale(tmp_path):
    """configs/size/deep_cpu.yaml (12 layers) with configs/router/gru.yaml, 3 steps through the CLI."""
    args = [
        *BASE_CONFIGS,
        *(
            "--config",
            str(ROOT / "configs/size/deep_cpu.yaml"),
            "--config",
            str(ROOT / "configs/router/gru.yaml"),
        ),
        *tiny_overrides(tmp_path, num_layers=12),  # the tiny width and data, after deep_cpu.yaml's
        f"trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        "trainer.logger.init_args.name=t",
        "model.arch.router_options.state_dim=8",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "trainer.limit_val_batches=1",
    ]
    main(["fit", *args])
    run = tmp_path / "runs/t/version_0"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["arch"]["num_layers"] == 12
    assert config["model"]["arch"]["router_options"] == {"state_dim": 8, "cell": "gru", "init": "torch", "bias": True}
    assert len(scalars(run, "train/loss")) == 3
    for layer in (0, 11):
        assert scalars(run, f"moe/train/router_logit_std/layer_{layer}")[0] > 0
        assert scalars(run, f"moe/val/router_logit_std/layer_{layer}")


# ----------------------------------------------------------------------------------------------
# One convention for every subcommand


def tool_parsers() -> dict:
    """``name -> argparse parser`` of every subcommand that is not Lightning's (cli._TOOLS)."""
    import importlib

    from rmoe.cli import _TOOLS

    return {name: importlib.import_module(module).build_parser() for name, module in _TOOLS.items()}


def long_options(parser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--") and a.help != "==SUPPRESS=="}


READS_A_MODEL = ("analyze", "eval", "inspect", "generate", "export")


def test_every_subcommand_spells_the_shared_options_the_same():
    parsers = tool_parsers()
    assert set(parsers) == {"analyze", "eval", "inspect", "generate", "export", "import", "sweep", "report", "routers"}
    for name, parser in parsers.items():
        assert parser.allow_abbrev is False, name
        options = long_options(parser)
        assert not [o for o in options if "_" in o], f"rmoe {name}: options are spelled with hyphens"
        if name in READS_A_MODEL:
            assert "--ckpt" in options, f"rmoe {name} reads the model from --ckpt"
            assert not [a for a in parser._actions if a.dest in ("model",) and not a.option_strings], name
    for name in ("analyze", "eval", "inspect", "export", "import", "report"):
        assert "--out" in long_options(parsers[name]), f"rmoe {name} writes to --out"
    for name in ("analyze", "eval", "inspect", "generate"):
        assert "--device" in long_options(parsers[name]), name
    for name in ("inspect", "generate", "export", "import"):
        assert "--tokenizer" in long_options(parsers[name]), name
    # no option is spelled two ways across subcommands (e.g. --max-tokens here, --max_tokens there)
    every = {o for p in parsers.values() for o in long_options(p)}
    assert not {o for o in every if o.replace("-", "_") != o and o.replace("-", "_") in every}


def test_abbreviations_are_refused_and_underscore_spellings_accepted(capsys):
    parsers = tool_parsers()
    with pytest.raises(RmoeError, match="unrecognized arguments: --prompt"):  # not read as --prompt-file
        parsers["generate"].parse_intermixed_args(["--ckpt", "m.ckpt", "--prompt", "def "])
    args = parsers["inspect"].parse_args(["--ckpt", "m.ckpt", "--text", "x", "--max_tokens", "7"])
    assert args.max_tokens == 7
    with pytest.raises(RmoeError, match="unrecognized arguments: --html"):  # the old name of --out is gone
        parsers["inspect"].parse_args(["--ckpt", "m.ckpt", "--text", "x", "--html", "p.html"])


def test_lightning_subcommands_take_ckpt_and_hyphenated_options(capsys):
    from rmoe.cli import normalize_args

    assert normalize_args(["--ckpt", "a.ckpt", "--print-config", "model.arch.router=gru"]) == [
        "--ckpt_path",
        "a.ckpt",
        "--print_config",
        "--model.arch.router=gru",
    ]
    assert normalize_args(["--ckpt=a.ckpt"]) == ["--ckpt_path=a.ckpt"]
    with pytest.raises(RmoeError, match="--ckpt_path: rmoe spells it --ckpt"):
        normalize_args(["--ckpt_path=a.ckpt"])


def test_model_and_output_are_options_of_every_tool():
    from rmoe.generate import build_parser as generate_parser
    from rmoe.interop.export import build_parser as export_parser
    from rmoe.interop.importer import build_parser as import_parser

    with pytest.raises(RmoeError, match="unrecognized arguments: out"):  # `rmoe export CKPT DIR` is gone
        export_parser().parse_args(["--ckpt", "run.ckpt", "--out", "o", "out"])
    with pytest.raises(RmoeError, match="the following arguments are required: --out"):
        export_parser().parse_args(["--ckpt", "run.ckpt"])
    with pytest.raises(RmoeError, match="required: --out"):
        import_parser().parse_args(["hf_dir"])
    with pytest.raises(RmoeError, match="required: --ckpt"):
        generate_parser().parse_intermixed_args(["run.ckpt", "a prompt"])


def test_no_lightning_chatter_before_a_config_error(tmp_path, capfd):
    with pytest.raises(SystemExit):
        main(["fit", *BASE_CONFIGS, "model.optim.lr=-1", f"trainer.logger.init_args.save_dir={tmp_path}"])
    err = capfd.readouterr().err
    assert "rmoe: error: model.optim.lr" in err
    assert "Seed set to" not in err and "litlogger" not in err and "Tip:" not in err


def test_the_training_curve_does_not_depend_on_how_often_it_validates(tmp_path):
    """Same seed, validation after every step or only at the end: bit-equal train losses (validation, its
    routing analytics and checkpointing draw no random numbers the training uses). Sweeps with other
    validation intervals, such as the budgets of docs/results.md section 6, rely on it."""
    curves = []
    for name, interval in (("often", 1), ("once", 4)):
        args = tiny_args(tmp_path, f"trainer.logger.init_args.name={name}", "trainer.max_steps=4")
        main(["fit", *args, f"trainer.val_check_interval={interval}", "trainer.limit_val_batches=1",
              "--config", str(ROOT / "configs/router/gru.yaml"), "model.arch.router_options.state_dim=8"])  # fmt: skip
        curves.append(scalars(tmp_path / f"runs/{name}/version_0", "train/loss"))
    assert sorted(curves[0]) == list(range(4))
    assert curves[0] == curves[1]


def test_validate_takes_the_data_of_the_checkpoint_and_says_how_much_it_evaluated(tmp_path, capsys):
    """A config with another block size or data than the checkpoint's: the checkpoint's are used, and said;
    a key given on the command line is used as given, with a note; no --ckpt is an error; no predict."""
    main(["fit", *tiny_args(tmp_path, "trainer.max_steps=2", "trainer.limit_val_batches=1")])
    ckpt = str(tmp_path / "runs/t/version_0/checkpoints/last.ckpt")
    capsys.readouterr()
    base = ["--config", str(ROOT / "configs/base.yaml"), "--config", str(ROOT / "configs/quick.yaml")]
    main(["validate", *base, f"--ckpt={ckpt}", "trainer.limit_val_batches=2", "data.eval_batch_size=2"])
    err = capsys.readouterr().err
    assert "data.block_size=32 from the checkpoint (the config says 128)" in err
    assert "data.source='files' from the checkpoint (the config says 'stdlib')" in err
    assert "evaluated 128 tokens of the val split in 2 batches (trainer.limit_val_batches=2)" in err  # 2 x 2 x 32
    main(["validate", *base, f"--ckpt={ckpt}", "data.block_size=16", "trainer.limit_val_batches=1"])
    assert "data.block_size=16 as given (the model was trained with 32)" in capsys.readouterr().err
    for argv, fragment in ((["validate", *base], "rmoe validate needs --ckpt"),
                           (["predict", "--help"], "invalid choice: 'predict'")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and fragment in capsys.readouterr().err


def test_router_options_of_the_wrong_type_are_refused_naming_the_option():
    from rmoe.routers import get_router_class

    gru = get_router_class("gru")
    with pytest.raises(
        RmoeError, match=r"router_options.state_dim=12.5 is invalid for router 'recurrent'; expected an integer"
    ):
        gru.parse_options({"state_dim": 12.5})
    with pytest.raises(RmoeError, match=r"router_options.pass_state='no' is invalid .* expected true or false"):
        gru.parse_options({"pass_state": "no"})
    assert gru.parse_options({"state_dim": 16}).state_dim == 16


def test_a_config_section_set_to_null_is_refused(tmp_path, capsys):
    (tmp_path / "null.yaml").write_text("model: null\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *tiny_args(tmp_path), "--config", str(tmp_path / "null.yaml")])
    assert exit_info.value.code == 2
    assert "null.yaml: model: is None, not a mapping" in capsys.readouterr().err


def test_fit_ends_with_a_summary_and_a_failed_start_leaves_no_run_folder(tmp_path, capsys):
    main(
        [
            "fit",
            *tiny_args(tmp_path, "trainer.max_steps=2", "trainer.val_check_interval=1", "trainer.limit_val_batches=1"),
        ]
    )
    err = capsys.readouterr().err
    run = tmp_path / "runs/t/version_0"
    assert "rmoe fit: 2 steps in " in err and f"run folder {run}" in err
    assert "last validation: val/loss " in err and "best val/loss " in err and f"{run}/checkpoints/best-" in err
    assert f"last checkpoint: {run}/checkpoints/last.ckpt" in err
    # top-2 of E without drops: the realised expert FLOPs equal the bound
    line = next(line for line in err.splitlines() if "routed-expert training FLOPs per token" in line)
    realised, bound = line.split(": ")[1].split(" (")[0], line.split("MFU count ")[1].split(",")[0]
    assert realised == bound, line
    # a start that fails after the run folder was claimed (the data has too few tokens for a block) gives it back
    (tmp_path / "short.txt").write_text("hi")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *tiny_args(tmp_path, f"data.train_files=[{tmp_path / 'short.txt'}]", "trainer.max_steps=2")])
    assert exit_info.value.code == 2
    assert f"removed {tmp_path / 'runs/t/version_1'}: the fit failed before it did anything" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "runs/t").iterdir()) == ["version_0"]  # the next run is version_1 again
