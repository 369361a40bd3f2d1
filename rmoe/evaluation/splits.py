"""A checkpoint's data split, rebuilt as its run built it (from the run's ``config.yaml``, other config files
or the data settings saved in the checkpoint). Used by ``rmoe analyze`` and ``rmoe inspect``."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from rmoe.data.corpus import SPLITS
from rmoe.errors import RmoeError
from rmoe.runs import run_dir_of_checkpoint


def split_datamodule(
    ckpt: Path,
    checkpoint: Mapping[str, Any],
    split: str,
    vocab_size: int,
    config: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    data_overrides: Mapping[str, Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """The checkpoint's :class:`~rmoe.data.TextDataModule`, set up for ``split``, and its arguments.
    ``vocab_size`` is the model's, which the data's must equal; ``config`` and ``data_overrides`` as
    :func:`rmoe.analyze.analyze_checkpoint`'s."""
    from rmoe.data import TextDataModule

    if split not in SPLITS:
        raise RmoeError(f"--split={split!r} is not a split; expected one of: {', '.join(SPLITS)}.")
    data = _data_settings(ckpt, checkpoint, config, data_overrides or {})
    try:
        datamodule = TextDataModule(**data)
    except TypeError as err:
        raise RmoeError(f"the data settings do not fit TextDataModule: {err}") from None
    if datamodule.vocab_size != vocab_size:
        raise RmoeError(
            f"the data's vocabulary ({datamodule.vocab_size} ids) differs from the checkpoint's model "
            f"({vocab_size}); pass the run's own config with --config."
        )
    datamodule.setup({"train": "fit", "val": "validate", "test": "test"}[split])
    return datamodule, data


def _data_settings(
    ckpt: Path,
    checkpoint: Mapping[str, Any],
    config: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None,
    overrides: Mapping[str, Any],
) -> dict[str, Any]:
    """The ``TextDataModule`` arguments: config files' ``data:`` sections, else the run's
    ``config.yaml``, else the checkpoint's ``datamodule_hyper_parameters``; then ``overrides``."""
    if isinstance(config, (str, os.PathLike)):
        config = [config]
    data: dict[str, Any] = {}
    if not config:
        default = run_dir_of_checkpoint(ckpt) / "config.yaml"
        if default.is_file():
            config = [default]
        elif checkpoint.get("datamodule_hyper_parameters"):
            data = dict(checkpoint["datamodule_hyper_parameters"])
        else:
            raise RmoeError(f"no {default} and no data settings in {ckpt}; pass the run's config with --config.")
    for path in config or []:
        path = Path(path)
        if not path.is_file():
            raise RmoeError(f"--config {path}: no such file.")
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise RmoeError(f"--config {path} is not valid YAML: {err}") from None
        section = doc.get("data") if isinstance(doc, dict) else None
        if section is None:
            continue
        if not isinstance(section, dict):
            raise RmoeError(f"--config {path}: `data:` must be a mapping of TextDataModule arguments.")
        data.update(section.get("init_args", section))
    if not data:
        raise RmoeError(f"no `data:` section in {', '.join(str(c) for c in config or [])}.")
    data = {k: v for k, v in data.items() if not k.startswith("_") and k != "class_path"}
    data.update(overrides)
    return data
