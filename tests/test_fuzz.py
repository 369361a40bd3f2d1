"""Property-based fuzzing of every input surface through the real commands (Hypothesis, seeded).

Generated: overrides of ``rmoe fit`` (any key of the config, values valid and not: zero, negative,
fractions for integers, nan, inf, strings, huge), training text files (any unicode, NUL bytes, no
newline, invalid UTF-8, empty), prompts of ``rmoe generate``, bytes of a checkpoint damaged at random
places (read by ``validate`` and ``generate``), and a damaged data cache. One invariant for all:

* exit 0 with a complete result (a finished run folder with its last checkpoint; the generated text),
* or exit 2 with one ``rmoe: error:`` paragraph and no run folder that looks complete,
* never a traceback, never another exit code, never an existing file lost or changed.

Bounded and seeded (``derandomize``): a few examples per surface in the inner loop, and a longer
budget per surface marked ``slow``, which the whole suite runs (``python3 -m pytest -q -m slow
tests/test_fuzz.py`` runs only those).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from tiny import BASE_CONFIGS, TEXT, tiny_overrides

from rmoe.cli import main

FAST, SLOW = 8, 40  # examples per surface: the inner loop, the slow marker (the whole suite)

# ----------------------------------------------------------------------------------------------
# The invariant


def run_rmoe(argv: list[str]) -> tuple[int, str]:
    """``rmoe argv`` in this process: (exit code, what it wrote to stderr). Any exception other than the
    command's own exit is a traceback a user would have seen, and fails the test."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            main(argv)
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return code, err.getvalue()


def check_outcome(code: int, err: str, runs: Path, complete: Callable[[], bool]) -> None:
    assert "Traceback" not in err, err[-3000:]
    assert code in (0, 2), f"exit {code}: {err[-3000:]}"
    if code == 0:
        assert complete(), f"exit 0 without a complete result: {err[-2000:]}"
        return
    errors = [line for line in err.splitlines() if line.startswith("rmoe: error:")]
    assert len(errors) == 1, err[-3000:]
    for status in runs.rglob("status.json") if runs.is_dir() else []:  # nothing that looks finished
        assert json.loads(status.read_text()).get("state") != "finished", status


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def fuzz(examples: int):
    """Seeded and bounded; no shrinking (each example runs a command: a failure is reported as found)."""
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                    phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))  # fmt: skip


# ----------------------------------------------------------------------------------------------
# rmoe fit: overrides and data files

NUMBERS = st.one_of(
    st.integers(-3, 3), st.sampled_from([0, -1, 10**12, 2**31]),
    st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from(["nan", "inf", "-inf", "1e999"]),
)  # fmt: skip
VALUES = st.one_of(NUMBERS, st.booleans(), st.text(max_size=8), st.just("null"), st.just("[1, 2]"))
KEYS = [
    "model.aux_loss_coef", "model.z_loss_coef", "model.optim.lr", "model.optim.warmup_steps", "model.optim.beta1",
    "model.optim.weight_decay", "model.optim.min_lr_ratio", "model.arch.hidden_size", "model.arch.num_layers",
    "model.arch.num_experts", "model.arch.top_k", "model.arch.rope_theta", "model.arch.rms_norm_eps",
    "model.arch.initializer_range", "model.arch.head_dim", "model.arch.moe_intermediate_size",
    "model.arch.router", "model.arch.expert_backend", "model.arch.router_options.bias_update_rate",
    "data.block_size", "data.batch_size", "data.eval_batch_size", "data.max_train_bytes", "data.tokenizer",
    "trainer.gradient_clip_val", "trainer.val_check_interval", "trainer.accumulate_grad_batches",
    "trainer.log_every_n_steps", "trainer.limit_val_batches", "trainer.precision", "seed_everything",
    "checkpoint_every_minutes",
]  # fmt: skip
OVERRIDES = st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=3)


CHECKPOINT = "{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {save_last: true}}"


def fit_args(root: Path, *extra: str) -> list[str]:
    return ["fit", *BASE_CONFIGS, *tiny_overrides(root), f"trainer.logger.init_args.save_dir={root / 'runs'}",
            "trainer.logger.init_args.name=f", "trainer.max_steps=1", "trainer.limit_val_batches=1",
            "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
            f"trainer.callbacks=[{CHECKPOINT}]", *extra]  # fmt: skip


def finished_run(runs: Path) -> Callable[[], bool]:
    def complete() -> bool:
        statuses = list(runs.rglob("status.json"))
        return (
            bool(statuses)
            and all(json.loads(s.read_text())["state"] == "finished" for s in statuses)
            and any(runs.rglob("checkpoints/last.ckpt"))
        )

    return complete


def fit_and_check(root: Path, extra: list[str]) -> None:
    (root / "keep").mkdir(exist_ok=True)
    (root / "keep/notes.txt").write_text("an existing file that no command may touch")
    argv = fit_args(root, *extra)  # writes the data files
    before, data_before = snapshot(root / "keep"), snapshot(root / "data")
    code, err = run_rmoe(argv)
    check_outcome(code, err, root / "runs", finished_run(root / "runs"))
    assert snapshot(root / "keep") == before and snapshot(root / "data") == data_before


def render(value: object) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return json.dumps(value) if isinstance(value, bool) else str(value)


def fit_overrides(overrides: list[tuple[str, object]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fit_and_check(Path(tmp), [f"{key}={render(value)}" for key, value in overrides])


@fuzz(FAST)
@given(OVERRIDES)
def test_fit_overrides(overrides):
    fit_overrides(overrides)


@pytest.mark.slow
@fuzz(SLOW)
@given(OVERRIDES)
def test_fit_overrides_long(overrides):
    fit_overrides(overrides)


TEXTS = st.one_of(
    st.text(min_size=0, max_size=3000),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=200, max_size=5000).map(lambda t: t.replace("\n", " ")),
    st.binary(min_size=0, max_size=2000).map(lambda b: b.decode("latin-1")),
    st.builds(lambda n, s: s * n, st.integers(1, 400), st.sampled_from(["a\x00b ", "\r\n", "é✓ ", " "])),
)


def fit_text(text: str, invalid_utf8: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train = root / "input/train.txt"
        train.parent.mkdir()
        train.write_bytes(text.encode("utf-8") + (b"\xff\xfe" if invalid_utf8 else b""))
        # the eval splits are carved out of this text (no files of their own)
        extra = [f"data.train_files=[{train}]", "data.val_files=null", "data.test_files=null"]
        fit_and_check(root, extra)


@fuzz(FAST)
@given(TEXTS, st.booleans())
def test_training_text(text, invalid_utf8):
    fit_text(text, invalid_utf8)


@pytest.mark.slow
@fuzz(SLOW)
@given(TEXTS, st.booleans())
def test_training_text_long(text, invalid_utf8):
    fit_text(text, invalid_utf8)


# ----------------------------------------------------------------------------------------------
# A trained model: prompts, damaged checkpoints, a damaged data cache


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz_trained")
    code, err = run_rmoe(fit_args(root, "trainer.max_steps=2"))
    assert code == 0, err[-3000:]
    return root


def generate(trained: Path, prompt: str, max_new: int) -> None:
    ckpt = trained / "runs/f/version_0/checkpoints/last.ckpt"
    before = ckpt.read_bytes()
    code, err = run_rmoe(["generate", "--ckpt", str(ckpt), prompt, "--max-new-tokens", str(max_new)])
    check_outcome(code, err, trained / "none", lambda: True)
    assert ckpt.read_bytes() == before


PROMPTS = st.one_of(st.text(max_size=60), st.sampled_from(["", " ", "\x00", "\n\n", "-x", "--help-me"]))


@fuzz(3 * FAST)
@given(PROMPTS, st.integers(-2, 5))
def test_generate_prompts(trained, prompt, max_new):
    generate(trained, prompt, max_new)


@pytest.mark.slow
@fuzz(SLOW)
@given(PROMPTS, st.integers(-2, 5))
def test_generate_prompts_long(trained, prompt, max_new):
    generate(trained, prompt, max_new)


def damaged_checkpoint(trained: Path, where: float, how: str, command: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "damaged.ckpt"
        data = bytearray((trained / "runs/f/version_0/checkpoints/last.ckpt").read_bytes())
        at = int(where * (len(data) - 1))
        if how == "truncate":
            data = data[:at]
        elif how == "flip":
            data[at] ^= 0x5A
        else:  # zero a run of bytes
            data[at : at + 64] = bytes(len(data[at : at + 64]))
        ckpt.write_bytes(bytes(data))
        config = trained / "runs/f/version_0/config.yaml"
        argv = {"validate": ["validate", "--config", str(config), "--ckpt", str(ckpt), "trainer.limit_val_batches=1"],
                "generate": ["generate", "--ckpt", str(ckpt), "hi", "--max-new-tokens", "2"]}[command]  # fmt: skip
        code, err = run_rmoe(argv)
        check_outcome(code, err, Path(tmp) / "none", lambda: True)


CHECKPOINT_DAMAGE = (st.floats(0, 1), st.sampled_from(["truncate", "flip", "zero"]),
                     st.sampled_from(["validate", "generate"]))  # fmt: skip


@fuzz(FAST)
@given(*CHECKPOINT_DAMAGE)
def test_damaged_checkpoints(trained, where, how, command):
    damaged_checkpoint(trained, where, how, command)


@pytest.mark.slow
@fuzz(SLOW)
@given(*CHECKPOINT_DAMAGE)
def test_damaged_checkpoints_long(trained, where, how, command):
    damaged_checkpoint(trained, where, how, command)


def damaged_cache(trained: Path, which: int, where: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shutil.copytree(trained / "cache", root / "cache")
        (root / "data").mkdir()
        (root / "data/train.txt").write_text(TEXT * 40)  # the same text: the copied cache applies
        (root / "data/val.txt").write_text(TEXT[::-1] * 8)
        files = sorted(p for p in (root / "cache").rglob("*") if p.is_file())
        victim = files[which % len(files)]
        data = bytearray(victim.read_bytes())
        if data:
            data[int(where * (len(data) - 1))] ^= 0x01
        victim.write_bytes(bytes(data[: max(1, len(data) // 2)]) if where > 0.5 else bytes(data))
        fit_and_check(root, [])


@fuzz(FAST)
@given(st.integers(0, 50), st.floats(0, 1))
def test_damaged_data_cache(trained, which, where):
    damaged_cache(trained, which, where)


@pytest.mark.slow
@fuzz(SLOW)
@given(st.integers(0, 50), st.floats(0, 1))
def test_damaged_data_cache_long(trained, which, where):
    damaged_cache(trained, which, where)
