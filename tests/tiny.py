"""What several test modules share: a tiny run of the real configs on a small local text file."""

from __future__ import annotations

from pathlib import Path

from rmoe.model.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
TEXT = (
    "The quick brown fox jumps over the lazy dog. Sphinx of black quartz, judge my vow! "
    "Pack my box with five dozen liquor jugs. How vexingly quick daft zebras jump.\n"
)
TINY_ARCH = dict(
    vocab_size=97,
    hidden_size=32,
    num_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=48,
    num_experts=4,
    top_k=2,
    moe_intermediate_size=16,
    initializer_range=0.2,
)
"""The model of the unit tests: 3 layers of width 32, 4 experts of 16, top-2 (large init: decisive routing)."""


def tiny_config(**overrides) -> ModelConfig:
    """``TINY_ARCH`` with any ``ModelConfig`` field overridden."""
    return ModelConfig(**{**TINY_ARCH, **overrides})


BASE_CONFIGS = ["--config", str(ROOT / "configs/base.yaml"), "--config", str(ROOT / "configs/quick.yaml")]
"""base.yaml + quick.yaml, the configs every tiny run starts from."""


def tiny_overrides(tmp_path: Path, num_layers: int = 2) -> list[str]:
    """Dot-list overrides that shrink base.yaml + quick.yaml to seconds: a 4-expert model of width 32
    with ``num_layers`` layers on a small text file written under ``tmp_path`` (cache there too)."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "train.txt").write_text(TEXT * 40)
    (data / "val.txt").write_text(TEXT[::-1] * 8)
    return [
        "data.source=files",
        f"data.train_files=[{data / 'train.txt'}]",
        f"data.val_files=[{data / 'val.txt'}]",
        f"data.test_files=[{data / 'val.txt'}]",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.block_size=32",
        "data.batch_size=4",
        "data.eval_batch_size=4",
        "model.arch.hidden_size=32",
        f"model.arch.num_layers={num_layers}",
        "model.arch.num_attention_heads=4",
        "model.arch.num_key_value_heads=2",
        "model.arch.intermediate_size=64",
        "model.arch.num_experts=4",
        "model.arch.moe_intermediate_size=32",
        "model.optim.warmup_steps=2",
        "trainer.enable_model_summary=false",
        "trainer.log_every_n_steps=1",
    ]


def scalars(log_dir: Path, tag: str) -> dict[int, float]:
    """``step -> value`` of a TensorBoard scalar tag, read from the run's event files (later files win)."""
    from rmoe.runs import read_scalars

    return dict(read_scalars(log_dir).get(tag, []))


def load_script(folder: str, name: str):
    """Import ``<repo>/<folder>/<name>.py`` (a benchmark or experiment script, not a package module)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
