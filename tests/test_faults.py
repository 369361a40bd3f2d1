"""Faults and bad input, through the real ``rmoe`` command: nothing lost, nothing silent.

Every case of the table in docs/reliability.md is here. Damaged model files x every subcommand
that reads a model (one parametrised test); bad input of each tool (one parametrised test); then
the faults that need more than one call: divergence, atomic checkpoint writes (a save that raises
part-way, a real process killed while saving), two ``rmoe fit`` started at once, a full disk and a
read-only folder (a tmpfs, skipped where one cannot be mounted), the memory a step needs, export
``--overwrite`` next to a run, validate/test without a config.

Commands run in-process (``rmoe.cli.main``: the same code path as the console script, so the suite
stays fast) except where real processes are the point (concurrent runs, a kill during a save).
Each failing case must exit 2 with one ``rmoe: error:`` paragraph naming the file or key, and no
traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from tiny import BASE_CONFIGS, ROOT, TINY_ARCH, tiny_overrides

from rmoe.cli import main
from rmoe.errors import RmoeError

pytestmark = pytest.mark.usefixtures("one_thread")


def rmoe(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``rmoe ARGS`` in this process: (exit code, stdout, stderr)."""
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_paragraph(code: int, err: str, *fragments: str) -> None:
    """Exit 2, no traceback, and one ``rmoe: error:`` line holding every fragment."""
    assert code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("rmoe: error:")]
    assert len(errors) == 1, err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def run_args(tmp_path: Path, *extra: str, name: str = "t") -> list[str]:
    """A tiny ``rmoe fit`` (tests/tiny.py) writing under ``tmp_path/runs/<name>``."""
    return [
        *BASE_CONFIGS,
        *tiny_overrides(tmp_path),
        f"trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        f"trainer.logger.init_args.name={name}",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "trainer.num_sanity_val_steps=0",
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished tiny run (4 steps, checkpoints at 2 and 4) and its export: (run dir, export dir)."""
    tmp_path = tmp_path_factory.mktemp("trained")
    main(["fit", *run_args(tmp_path, "trainer.max_steps=4", "trainer.val_check_interval=2")])
    run = tmp_path / "runs/t/version_0"
    assert (run / "checkpoints/last.ckpt").is_file()
    export = tmp_path / "exported"
    main(["export", "--ckpt", str(run / "checkpoints/last.ckpt"), "--out", str(export)])
    return run, export


# ----------------------------------------------------------------------------------------------
# Damaged model files x every subcommand that reads a model


def _largest_entry_offset(path: Path) -> int:
    """Where the data of the largest entry of a zip archive starts (a tensor's bytes)."""
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.compress_size)
    with open(path, "rb") as file:
        file.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(file.read(2), "little"), int.from_bytes(file.read(2), "little")
    return info.header_offset + 30 + name_len + extra_len + info.compress_size // 2


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def _damaged(kind: str, good: Path, directory: Path) -> Path:
    """A model file with one fault, made from the good checkpoint ``good``."""
    path = directory / f"{kind}.ckpt"
    if kind == "missing":
        return path
    if kind == "directory":
        path.mkdir()
        return path
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("not a checkpoint\n" * 3)
    elif kind == "six-bytes":
        path.write_text("hello\n")
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "bit-flip":
        shutil.copy(good, path)
        _flip_byte(path, _largest_entry_offset(path))
    elif kind == "other-program":
        torch.save({"weights": torch.ones(3)}, path)
    elif kind == "other-module":
        torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": {"lr": 0.1}}, path)
    else:
        raise AssertionError(kind)
    return path


CKPT_FAULTS: dict[str, str] = {
    "missing": "no such file",
    "directory": "is a directory",
    "empty": "it is empty (0 bytes)",
    "text": "it is a text file, not a torch zip archive",
    "six-bytes": "it is a text file, not a torch zip archive",
    "truncated": "is truncated or damaged",
    "bit-flip": "is corrupted: the CRC of its entry",
    "other-program": "is a torch file but not a Lightning checkpoint",
    "other-module": "is a Lightning checkpoint of another module",
}
"""Each fault of a ``.ckpt`` file and what the message says about it."""


def _fit_resume(run: Path, ckpt: Path, out: Path) -> list[str]:
    return ["fit", "--config", run / "config.yaml", "--ckpt", ckpt]


def _fit_init_from(run: Path, ckpt: Path, out: Path) -> list[str]:
    save_dir = f"trainer.logger.init_args.save_dir={out}"
    return ["fit", "--config", run / "config.yaml", f"model.init_from={ckpt}", save_dir]


READERS: dict[str, tuple[Callable[[Path, Path, Path], list], str]] = {
    "fit --ckpt": (_fit_resume, "--ckpt"),
    "fit model.init_from": (_fit_init_from, "model.init_from"),
    "validate --ckpt": (lambda run, c, out: ["validate", "--config", run / "config.yaml", "--ckpt", c], "--ckpt"),
    "validate (no --config)": (lambda run, c, out: ["validate", "--ckpt", c], "--ckpt"),
    "test --ckpt": (lambda run, c, out: ["test", "--config", run / "config.yaml", "--ckpt", c], "--ckpt"),
    "analyze": (lambda run, c, out: ["analyze", "--ckpt", c, "--out", out], "--ckpt"),
    "inspect": (lambda run, c, out: ["inspect", "--ckpt", c, "--text", "hello"], "--ckpt"),
    "generate": (lambda run, c, out: ["generate", "--ckpt", c, "hello", "--max-new-tokens", "2"], "--ckpt"),
    "export": (lambda run, c, out: ["export", "--ckpt", c, "--out", out], "--ckpt"),
}
"""Every subcommand that reads a checkpoint: (its arguments for a checkpoint, how its message names the file)."""


@pytest.mark.parametrize("fault", list(CKPT_FAULTS))
@pytest.mark.parametrize("reader", list(READERS))
def test_a_damaged_checkpoint_is_one_paragraph_naming_the_file(reader, fault, trained, tmp_path, capsys):
    run, _ = trained
    make_args, option = READERS[reader]
    bad = _damaged(fault, run / "checkpoints/last.ckpt", tmp_path)
    out = tmp_path / "out"
    code, _, err = rmoe(capsys, *make_args(run, bad, out))
    message = CKPT_FAULTS[fault]
    takes_exports = reader in EXPORT_READERS or reader == "fit model.init_from"  # these take an export folder too
    if takes_exports and fault in ("missing", "directory"):
        message = {"missing": "no such file or folder", "directory": "is not an rmoe export directory"}[fault]
    assert_one_paragraph(code, err, f"{option} {bad}", message)
    assert not out.exists()  # nothing written for a model that could not be read
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]  # no run folder for a failed fit


EXPORT_FAULTS: dict[str, str] = {
    "weights-missing": "without its weights file model.safetensors",
    "weights-bit-flip": "model.safetensors is corrupted: its SHA-256 differs",
    "weights-truncated": "model.safetensors is corrupted: its SHA-256 differs",
}


def _damaged_export(kind: str, export: Path, directory: Path) -> Path:
    copy = directory / f"export-{kind}"
    shutil.copytree(export, copy)
    weights = copy / "model.safetensors"
    if kind == "weights-missing":
        weights.unlink()
    elif kind == "weights-bit-flip":
        _flip_byte(weights, weights.stat().st_size - 100)
    elif kind == "weights-truncated":
        weights.write_bytes(weights.read_bytes()[:-1000])
    return copy


EXPORT_READERS: dict[str, Callable[[Path, Path], list]] = {
    "inspect": lambda d, out: ["inspect", "--ckpt", d, "--text", "hello"],
    "generate": lambda d, out: ["generate", "--ckpt", d, "hello", "--max-new-tokens", "2"],
    "export": lambda d, out: ["export", "--ckpt", d, "--out", out],
    "import": lambda d, out: ["import", d, "--out", out],
}


@pytest.mark.parametrize("fault", list(EXPORT_FAULTS))
@pytest.mark.parametrize("reader", list(EXPORT_READERS))
def test_a_damaged_export_folder_is_one_paragraph_naming_it(reader, fault, trained, tmp_path, capsys):
    _, export = trained
    damaged = _damaged_export(fault, export, tmp_path)
    out = tmp_path / "out"
    code, _, err = rmoe(capsys, *EXPORT_READERS[reader](damaged, out))
    message = EXPORT_FAULTS[fault]
    if reader == "import" and fault == "weights-missing":  # transformers' reader names what is missing
        message = "the weights file model.safetensors that rmoe export wrote is missing"
    assert_one_paragraph(code, err, str(damaged), message)
    assert not out.exists()


def test_a_foreign_safetensors_without_digests_is_checked_by_its_header(trained, tmp_path, capsys):
    """A transformers folder rmoe did not write (no recorded digests): a truncated file is still caught."""
    _, export = trained
    folder = tmp_path / "hf"
    shutil.copytree(export, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["rmoe"]["weights_sha256"]
    (folder / "config.json").write_text(json.dumps(config))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    code, _, err = rmoe(capsys, "import", folder, "--out", tmp_path / "out")
    assert_one_paragraph(code, err, str(weights), "is not a readable safetensors file")


# ----------------------------------------------------------------------------------------------
# Bad input of each tool


def _hf_wordlevel_tokenizer(directory: Path) -> Path:
    """A transformers tokenizer with an unknown token (word level, ASCII words only)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<eos>": 1, "<pad>": 2, **{w: i + 3 for i, w in enumerate("hello world the a".split())}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    wrapper = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="<eos>", pad_token="<pad>")
    wrapper.save_pretrained(str(directory))
    return directory


def _binary_config(d: Path) -> Path:
    (d / "bin.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x01\xff")
    return d / "bin.yaml"


def _scalar_config(d: Path) -> Path:
    (d / "scalar.yaml").write_text("42\n")
    return d / "scalar.yaml"


BAD_INPUT: dict[str, tuple[Callable[[Path, Path, Path], list], list[str]]] = {
    "config binary": (lambda run, ex, d: ["fit", "--config", _binary_config(d)], ["bin.yaml is not a text file"]),
    "config scalar": (lambda run, ex, d: ["fit", "--config", _scalar_config(d)], ["holds a YAML int ('42')"]),
    "config missing": (lambda run, ex, d: ["fit", "--config", d / "nope.yaml"], ["nope.yaml: no such file"]),
    "export --out is a file": (
        lambda run, ex, d: ["export", "--ckpt", run / "checkpoints/last.ckpt", "--out", run / "config.yaml"],
        ["config.yaml is an existing file; expected a directory"],
    ),
    "export --overwrite over its run": (
        lambda run, ex, d: ["export", "--ckpt", run / "checkpoints/last.ckpt", "--out", run, "--overwrite"],
        ["holds the model being exported"],
    ),
    "export --overwrite over a run folder": (
        lambda run, ex, d: ["export", "--ckpt", ex, "--out", run.parent, "--overwrite"],
        ["holds files that rmoe export did not write there", "version_0/"],
    ),
    "import --out is a file": (
        lambda run, ex, d: ["import", ex, "--out", run / "config.yaml"],
        ["config.yaml is an existing file"],
    ),
    "analyze --out under a file": (
        lambda run, ex, d: ["analyze", "--ckpt", run / "checkpoints/last.ckpt", "--out", run / "config.yaml/a"],
        ["--out", "config.yaml is a file"],
    ),
    "inspect --out is a folder": (
        lambda run, ex, d: ["inspect", "--ckpt", ex, "--text", "hi", "--out", d],
        ["is a directory; expected the HTML file"],
    ),
    "inspect --out under a file": (
        lambda run, ex, d: ["inspect", "--ckpt", ex, "--text", "hi", "--out", run / "config.yaml/p.html"],
        ["--out", "config.yaml is an existing file; expected a directory"],
    ),
    "inspect empty text": (lambda run, ex, d: ["inspect", "--ckpt", ex, "--text", "  "], ["(--text) is empty"]),
    "inspect unencodable text": (
        lambda run, ex, d: ["inspect", "--ckpt", ex, "--text", "hello ☃", "--tokenizer", _hf_wordlevel_tokenizer(d)],
        ["the text (--text) has characters", "'☃' (U+2603)"],
    ),
    "generate empty prompt": (lambda run, ex, d: ["generate", "--ckpt", ex, ""], ["prompt 0 is empty"]),
    "generate no prompt": (lambda run, ex, d: ["generate", "--ckpt", ex], ["no prompt"]),
    "generate unencodable prompt": (
        lambda run, ex, d: ["generate", "--ckpt", ex, "hello ☃ é", "--tokenizer", _hf_wordlevel_tokenizer(d)],
        ["prompt 0 has characters the model's tokenizer (hf) cannot encode", "'☃' (U+2603), 'é' (U+00E9)"],
    ),
    "generate --max-new-tokens 0": (
        lambda run, ex, d: ["generate", "--ckpt", ex, "hi", "--max-new-tokens", "0"],
        ["--max-new-tokens=0: must be at least 1"],
    ),
    "generate --max-new-tokens -3": (
        lambda run, ex, d: ["generate", "--ckpt", ex, "hi", "--max-new-tokens", "-3"],
        ["--max-new-tokens=-3: must be at least 1"],
    ),
    "generate --temperature -1": (
        lambda run, ex, d: ["generate", "--ckpt", ex, "hi", "--temperature", "-1"],
        ["--temperature=-1.0 must be a finite number >= 0"],
    ),
    "generate --top-p 0": (
        lambda run, ex, d: ["generate", "--ckpt", ex, "hi", "--top-p", "0"],
        ["--top-p=0.0 must be in (0, 1]"],
    ),
    "generate --temperature nan": (
        lambda run, ex, d: ["generate", "--ckpt", ex, "hi", "--temperature", "nan"],
        ["--temperature=nan must be a finite number >= 0"],
    ),
    "generate --temperature inf": (
        lambda run, ex, d: ["generate", "--ckpt", ex, "hi", "--temperature", "inf"],
        ["--temperature=inf must be a finite number >= 0"],
    ),
    "generate --top-p 1.5": (
        lambda run, ex, d: ["generate", "--ckpt", ex, "hi", "--top-p", "1.5"],
        ["--top-p=1.5 must be in (0, 1]"],
    ),
}
"""Bad input of each tool: (its arguments from the run, the export and a scratch folder; what the message says)."""


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_paragraph_and_exit_2(case, trained, tmp_path, capsys):
    run, export = trained
    before = sorted(str(p) for p in run.parent.rglob("*"))
    make_args, fragments = BAD_INPUT[case]
    code, _, err = rmoe(capsys, *make_args(run, export, tmp_path))
    assert_one_paragraph(code, err, *fragments)
    assert sorted(str(p) for p in run.parent.rglob("*")) == before  # the run is untouched


# ----------------------------------------------------------------------------------------------
# Faults of a training run


# the divergence guard reads a logged step's values at once, any other step's a step later (after the
# device has cancelled a non-finite update): both ways are tested
GUARD_TIMING = pytest.mark.parametrize("log_every", [1, 50], ids=["read-at-once", "read-a-step-later"])


@GUARD_TIMING
def test_a_diverging_run_stops_with_one_paragraph_and_no_non_finite_checkpoint(log_every, tmp_path, capsys):
    """lr = 1e30: the first update sends every weight to ~1e30 and the next forward overflows."""
    args = run_args(tmp_path, "model.optim.lr=1e30", "model.optim.warmup_steps=0", "trainer.max_steps=8",
                    f"trainer.log_every_n_steps={log_every}")  # fmt: skip
    code, _, err = rmoe(capsys, "fit", *args, "trainer.val_check_interval=1")
    assert_one_paragraph(code, err, "training diverged at optimiser step", "The last finite losses were step 0: ")
    assert "model.optim.lr (now 1e+30)" in err
    run = tmp_path / "runs/t/version_0"
    checkpoints = sorted((run / "checkpoints").glob("*.ckpt"))
    assert checkpoints  # the validations before the divergence saved theirs
    for path in checkpoints:
        state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), path.name
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and "training diverged" in status["error"]


class _PoisonGradient(L.Callback):
    """Makes the gradient of optimiser step ``step`` NaN and records the weights around that step."""

    def __init__(self, step: int) -> None:
        self.step, self.before, self.after = step, None, None

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == self.step:
            next(p for p in pl_module.parameters() if p.grad is not None).grad.fill_(float("nan"))
            self.before = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if trainer.global_step == self.step + 1:
            self.after = {k: v.clone() for k, v in pl_module.state_dict().items()}


@GUARD_TIMING
def test_skip_nonfinite_steps_skips_a_bad_step_without_touching_the_weights(log_every, tmp_path):
    """``model.optim.skip_nonfinite_steps=1``: a NaN gradient at step 2 is skipped (weights unchanged
    by that step), training goes on, ``train/skipped_steps`` says 1; a second bad step stops the run."""
    from rmoe.cli import build_cli
    from rmoe.errors import RmoeError

    every = f"trainer.log_every_n_steps={log_every}"
    args = run_args(tmp_path, "trainer.max_steps=5", "model.optim.skip_nonfinite_steps=1", every)
    cli = build_cli(args, run=False)
    poison = _PoisonGradient(step=2)
    cli.trainer.callbacks.append(poison)
    with pytest.warns(UserWarning, match=r"optimiser step 2 skipped .*1 of at most 1"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 5 and cli.model.skipped_steps == 1
    for key, value in poison.before.items():
        assert torch.equal(value, poison.after[key]), key
    assert all(torch.isfinite(v).all() for v in cli.model.state_dict().values() if v.is_floating_point())

    (tmp_path / "2").mkdir()
    args = run_args(tmp_path / "2", "trainer.max_steps=5", "model.optim.skip_nonfinite_steps=1", every)
    cli = build_cli(args, run=False)
    cli.trainer.callbacks += [_PoisonGradient(step=1), _PoisonGradient(step=3)]
    with pytest.warns(UserWarning), pytest.raises(RmoeError, match="diverged at optimiser step 3 after 1 skipped"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)


def test_the_checkpoint_writer_refuses_non_finite_weights(tmp_path):
    from rmoe.checkpoints import AtomicCheckpointIO
    from rmoe.errors import RmoeError

    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    good = path.read_bytes()
    with pytest.raises(RmoeError, match=r"refusing to write .*last.ckpt: the weights w hold NaN or inf"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.tensor([1.0, float("nan")])}}, path)
    assert path.read_bytes() == good


def test_a_save_that_fails_part_way_leaves_the_previous_checkpoint(trained, tmp_path, monkeypatch, capsys):
    """The writer raises after half a checkpoint: last.ckpt is the earlier one, whole, and no temporary is left."""
    from rmoe import checkpoints
    from rmoe.checkpoints import read_checkpoint

    code, _, err = rmoe(capsys, "fit", *run_args(tmp_path, "trainer.max_steps=2", "trainer.val_check_interval=2"))
    assert code == 0, err
    folder = tmp_path / "runs/t/version_0/checkpoints"
    before = (folder / "last.ckpt").read_bytes()
    real_save = torch.save

    def half_then_fail(obj, file, *args, **kwargs):
        real_save(obj, file, *args, **kwargs)
        file.truncate(file.tell() // 2)
        raise RuntimeError("the writer stopped half-way")  # not an error the writer knows: re-raised as it is

    monkeypatch.setattr(checkpoints.torch, "save", half_then_fail)
    ckpt = folder / "last.ckpt"
    with pytest.raises(RuntimeError, match="the writer stopped half-way"):
        main(
            [
                "fit",
                "--config",
                str(tmp_path / "runs/t/version_0/config.yaml"),
                "--ckpt",
                str(ckpt),
                "trainer.max_steps=4",
            ]
        )
    assert (folder / "last.ckpt").read_bytes() == before
    read_checkpoint(folder / "last.ckpt")
    assert not [p.name for p in folder.iterdir() if ".tmp-" in p.name]


_SAVER = """
import sys, torch
from rmoe.checkpoints import AtomicCheckpointIO
io, step = AtomicCheckpointIO(), 0
print("ready", flush=True)
while True:
    step += 1
    io.save_checkpoint({"state_dict": {"w": torch.full((4_000_000,), float(step))}, "step": step}, sys.argv[1])
"""


@pytest.mark.slow
def test_a_process_killed_while_saving_leaves_a_loadable_checkpoint(tmp_path):
    """A real process saves 16 MB checkpoints over the same name in a loop and is killed with SIGKILL:
    the file under the final name is always one whole checkpoint."""
    path = tmp_path / "last.ckpt"
    for delay in (0.5, 1.1):
        child = subprocess.Popen([sys.executable, "-c", _SAVER, str(path)], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        while not path.exists():
            time.sleep(0.01)
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        assert torch.equal(checkpoint["state_dict"]["w"], torch.full((4_000_000,), float(checkpoint["step"])))
        for leftover in tmp_path.glob("last.ckpt.tmp-*"):  # a killed writer cannot clean up; never under the name
            leftover.unlink()


@pytest.mark.slow
def test_two_fits_started_at_once_get_their_own_run_folders(tmp_path):
    """Two real ``rmoe fit`` with the same logger name and save_dir, started together."""
    args = run_args(tmp_path, "trainer.max_steps=2", "trainer.val_check_interval=2")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "rmoe", "fit", *args, f"seed_everything={seed}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for seed in (1, 2)
    ]
    for child in children:
        _, err = child.communicate(timeout=600)
        assert child.returncode == 0, err
    runs = sorted((tmp_path / "runs/t").iterdir())
    assert [r.name for r in runs] == ["version_0", "version_1"]
    seeds = set()
    for run in runs:
        seeds.add(yaml.safe_load((run / "config.yaml").read_text())["seed_everything"])
        names = sorted(p.name for p in (run / "checkpoints").iterdir())
        assert names == ["best-2.ckpt", "last.ckpt"], names  # no last-v1.ckpt: nobody wrote into the other's
        assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert seeds == {1, 2}


def test_validate_without_a_config_takes_the_runs_own(trained, capsys):
    run, _ = trained
    code, out, err = rmoe(capsys, "validate", "--ckpt", run / "checkpoints/last.ckpt")
    assert code == 0, err
    assert f"no --config given, using the run's {run / 'config.yaml'}" in err
    assert not Path("lightning_logs").exists()
    evaluation = sorted((run / "validate").glob("version_*"))
    assert evaluation and (evaluation[-1] / "config.yaml").is_file()
    config = yaml.safe_load((evaluation[-1] / "config.yaml").read_text())
    assert config["data"]["block_size"] == 32  # the run's, not the default 256


def test_validate_of_a_lone_checkpoint_takes_its_saved_data_settings(trained, tmp_path, capsys):
    run, _ = trained
    lone = tmp_path / "lone.ckpt"
    shutil.copy(run / "checkpoints/last.ckpt", lone)
    code, _, err = rmoe(capsys, "validate", "--ckpt", lone)
    assert code == 0, err
    assert f"using the data settings saved in {lone}" in err
    assert list((tmp_path / "validate").rglob("config.yaml"))  # written next to the checkpoint


def test_export_overwrite_replaces_only_its_own_files(trained, tmp_path, capsys):
    run, export = trained
    out = tmp_path / "again"
    assert rmoe(capsys, "export", "--ckpt", export, "--out", out)[0] == 0
    assert rmoe(capsys, "export", "--ckpt", run / "checkpoints/last.ckpt", "--out", out, "--overwrite")[0] == 0
    (out / "notes.txt").write_text("mine")
    code, _, err = rmoe(capsys, "export", "--ckpt", export, "--out", out, "--overwrite")
    assert_one_paragraph(code, err, "holds files that rmoe export did not write there (notes.txt)")
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").is_file()


def test_generate_truncate_prompt_keeps_room_for_new_tokens(trained, capsys):
    run, _ = trained
    prompt = "The quick brown fox jumps over the lazy dog. " * 7  # 315 bytes against a context of 32
    with pytest.warns(UserWarning, match="cut to their last 28 tokens"):
        code, out, err = rmoe(
            capsys, "generate", "--ckpt", run / "checkpoints/last.ckpt", prompt, "--truncate-prompt",
            "--max-new-tokens", "4", "--no-stop",
        )  # fmt: skip
    assert code == 0, err
    assert "rmoe generate: 4 tokens" in err


def test_a_step_that_does_not_fit_in_memory_is_refused_before_the_run_exists(tmp_path, monkeypatch, capsys):
    from rmoe.training import memory

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 4194304 kB\nMemAvailable: 1048576 kB\n")  # 1 GiB available
    monkeypatch.setattr(memory, "PROC_MEMINFO", meminfo)
    monkeypatch.setattr(memory, "CGROUP_ROOT", tmp_path / "no-cgroup")
    code, _, err = rmoe(capsys, "fit", *run_args(tmp_path, "data.block_size=2048", "data.batch_size=64"))
    assert_one_paragraph(code, err, "data.block_size=2048 with data.batch_size=64 needs at least", "1.0 GiB available")
    assert "data.block_size=" in err.split("would fit")[0]
    assert not (tmp_path / "runs").exists()


def test_a_step_that_may_not_fit_warns_and_one_that_fits_is_silent(monkeypatch):
    import warnings

    from rmoe.model.config import ModelConfig
    from rmoe.training import memory

    arch = ModelConfig(**{**TINY_ARCH, "vocab_size": 320})
    needed = memory.estimate_step_bytes(arch, 8, 512)
    monkeypatch.setattr(memory, "available_bytes", lambda device: int(needed * 1.2))  # within the margin
    with pytest.warns(UserWarning, match="it may run out of memory"):
        memory.check_step_memory(arch, 8, 512, "cpu")
    monkeypatch.setattr(memory, "available_bytes", lambda device: int(needed * memory.UNDERESTIMATE) + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        memory.check_step_memory(arch, 8, 512, "cpu")
    monkeypatch.setattr(memory, "available_bytes", lambda device: needed - 1)
    with pytest.raises(RmoeError, match="needs at least"):
        memory.check_step_memory(arch, 8, 512, "cpu")
    with pytest.raises(RmoeError, match="over its 2 processes"):  # CPU DDP: two steps share the machine
        memory.check_step_memory(arch, 8, 512, "cpu", processes=2)


# ----------------------------------------------------------------------------------------------
# A full disk, a read-only folder (a tmpfs of our own; skipped where mounting is not allowed)


@pytest.fixture
def tmpfs(tmp_path):
    """A function mounting a tmpfs (``size``, ``ro``) at a new folder; unmounted afterwards."""
    mounted: list[Path] = []

    def mount(name: str, options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def _fill(folder: Path, leave: int) -> None:
    stat = os.statvfs(folder)
    free = stat.f_bavail * stat.f_frsize
    with open(folder / "filler", "wb") as file:
        file.write(b"\0" * max(0, free - leave))


def test_a_disk_that_fills_up_during_fit(tmp_path, tmpfs, capsys):
    """Room for the first checkpoint and not the second: a message naming it, the first one whole."""
    disk = tmpfs("disk", "size=16m")
    _fill(disk, 1536 * 1024)  # a checkpoint is ~530 KB: best-2 and last fit, best-4 does not
    args = run_args(tmp_path, "trainer.max_steps=6", "trainer.val_check_interval=2", "trainer.log_every_n_steps=50")
    code, _, err = rmoe(capsys, "fit", *args, f"trainer.logger.init_args.save_dir={disk / 'runs'}")
    assert_one_paragraph(code, err, "cannot write the checkpoint", str(disk / "runs/t/version_0/checkpoints"))
    folder = disk / "runs/t/version_0/checkpoints"
    from rmoe.checkpoints import read_checkpoint

    for ckpt in folder.glob("*.ckpt"):  # what is under a checkpoint's name is whole
        read_checkpoint(ckpt)
    assert not list(folder.glob("*.tmp-*"))
    status = json.loads((disk / "runs/t/version_0/status.json").read_text())
    assert status["state"] == "failed"


def test_a_full_disk_is_refused_before_the_run_starts(tmp_path, tmpfs, capsys):
    disk = tmpfs("disk", "size=4m")
    _fill(disk, 0)
    code, _, err = rmoe(capsys, "fit", *run_args(tmp_path), f"trainer.logger.init_args.save_dir={disk / 'runs'}")
    assert_one_paragraph(code, err, "trainer.logger.init_args.save_dir", "is full")
    assert not (disk / "runs/t/version_0").exists()


@pytest.mark.parametrize("where", ["save_dir", "cache_dir", "export", "import", "analyze", "inspect", "report"])
def test_a_read_only_output_folder_is_named(where, trained, tmp_path, tmpfs, capsys):
    run, export = trained
    ro = tmpfs("ro", "size=1m,ro")
    ckpt = run / "checkpoints/last.ckpt"
    args, fragments = {
        "save_dir": (["fit", *run_args(tmp_path), f"trainer.logger.init_args.save_dir={ro}"], ["save_dir", str(ro)]),
        "cache_dir": (["fit", *run_args(tmp_path), f"data.cache_dir={ro / 'cache'}"], ["data.cache_dir", str(ro)]),
        "export": (["export", "--ckpt", ckpt, "--out", ro / "e"], ["--out", "read-only file system"]),
        "import": (["import", export, "--out", ro / "i"], ["--out", "read-only file system"]),
        "analyze": (["analyze", "--ckpt", ckpt, "--out", ro / "a"], ["--out", "read-only file system"]),
        "inspect": (["inspect", "--ckpt", ckpt, "--text", "hi", "--out", ro / "p.html"], ["--out", str(ro)]),
        "report": (["report", run.parent.parent, "--out", ro / "r"], ["--out", str(ro)]),
    }[where]
    code, _, err = rmoe(capsys, *args)
    assert_one_paragraph(code, err, *fragments)


def test_the_table_in_the_docs_lists_every_case():
    """docs/reliability.md has a row for each parametrised case of this file."""
    text = (ROOT / "docs/reliability.md").read_text()
    for name in [*CKPT_FAULTS, *EXPORT_FAULTS, *BAD_INPUT]:
        assert f"`{name}`" in text, name


def test_router_saturation_refuses_a_checkpoint_of_another_model(trained, tmp_path, capsys):
    """``--saturation-ckpt`` compares one run's checkpoints: another model's is refused, naming the difference."""
    run, _ = trained
    main(["fit", *run_args(tmp_path, "trainer.max_steps=1", "model.arch.router=mlp", name="other")])
    other = tmp_path / "runs/other/version_0/checkpoints/last.ckpt"
    code, _, err = rmoe(capsys, "analyze", "--ckpt", str(run / "checkpoints/last.ckpt"), "--saturation-ckpt",
                        str(other), "--out", str(tmp_path / "analysis"), "--max-batches", "1")  # fmt: skip
    assert_one_paragraph(
        code, err, "is not a checkpoint of the analysed model", "model.arch.router: 'linear' in --ckpt"
    )


def test_init_from_takes_an_export_folder_as_well(trained, tmp_path, capsys):
    """``model.init_from`` reads a model the way every command does (``rmoe.inference.load_model``): a
    checkpoint or an export folder; the fine-tuned run starts from the exported weights."""
    run, export = trained
    code, _, err = rmoe(capsys, "fit", "--config", str(run / "config.yaml"), f"model.init_from={export}",
                        f"trainer.logger.init_args.save_dir={tmp_path}", "trainer.max_steps=1")  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "t/version_0/checkpoints/last.ckpt").is_file()
