"""Loading a trained model for use: from an ``rmoe fit`` checkpoint or an ``rmoe export`` directory.

:func:`load_model` returns the model (eval mode), its tokenizer and its trained context length, or an
:class:`~rmoe.errors.RmoeError` for everything a user can get wrong (no such file, not an rmoe checkpoint,
another architecture, an unknown tokenizer, a directory that is not an rmoe export).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rmoe.data.tokenizer import META_FILE, Tokenizer, build_tokenizer
from rmoe.errors import RmoeError
from rmoe.model.config import ModelConfig
from rmoe.model.decoder import MoeLM

EXPORT_KEY = "rmoe"
"""The key of ``config.json`` under which ``rmoe export`` writes :func:`export_metadata`."""
EXPORT_FORMAT = 1


@dataclass
class LoadedModel:
    """A model ready to generate with.

    Attributes:
        tokenizer: None when loaded ``with_tokenizer=False``.
        context_length: The trained sequence length (``data.block_size``); None if unknown.
        source: The checkpoint file or export directory.
        hparams: The checkpoint's ``model`` and ``data`` sections and global step, for the model card; {}
            for an export.
        checkpoint: The checkpoint's contents as read (once); None for an export.
        run_folder: The ``rmoe fit`` run folder (``version_<k>``) of the checkpoint, else None.
    """

    model: MoeLM
    tokenizer: Tokenizer | None
    context_length: int | None
    source: Path
    hparams: dict[str, Any] = field(default_factory=dict)
    checkpoint: dict[str, Any] | None = None
    run_folder: Path | None = None

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def non_causal_reason(config: ModelConfig) -> str | None:
    """Why ``config``'s router cannot decode token by token (None: it can).

    Decoding routes each new token alone (KV cache) or with the tokens before it, so it reproduces the
    evaluation forward only if the router is causal in evaluation (:meth:`rmoe.routers.Router.causality`):
    expert choice, Sinkhorn routing, Soft MoE and capacity drops are not, unless ``eval_routing: topk``.
    """
    causality = config.causality()
    if causality.evaluation:
        return f"router {config.router!r} is not causal in evaluation: {causality.evaluation}"
    if causality.decoding:
        return f"router {config.router!r} cannot decode token by token as it evaluates: {causality.decoding}"
    return None


def load_model(
    path: str | os.PathLike[str],
    tokenizer: str | None = None,
    device: str = "cpu",
    *,
    key: str = "--ckpt",
    with_tokenizer: bool = True,
) -> LoadedModel:
    """Load a checkpoint of ``rmoe fit`` (``*.ckpt``) or an ``rmoe export`` directory, reading the file once:
    how every command (and ``model.init_from``) reads a trained model.

    Args:
        tokenizer: Override the tokenizer (``byte``, a tokenizer directory, a transformers name). Default:
            the run's ``tokenizer/`` folder, else the checkpoint's ``data.tokenizer``; for an export, its own.
        key: The option or config key the path came from, for messages.
        with_tokenizer: False: do not build the tokenizer.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        loaded = _load_export(path, tokenizer, key, with_tokenizer)
    elif path.is_file():
        loaded = _load_checkpoint(path, tokenizer, key, with_tokenizer)
    else:
        raise RmoeError(
            f"{key} {path}: no such file or folder; expected a checkpoint (<run>/checkpoints/*.ckpt) or a folder "
            "written by `rmoe export`."
        )
    if loaded.tokenizer is not None and loaded.tokenizer.vocab_size > loaded.model.config.vocab_size:
        raise RmoeError(
            f"the tokenizer has {loaded.tokenizer.vocab_size} ids but the model in {path} only "
            f"{loaded.model.config.vocab_size}: it is not the tokenizer the model was trained with."
        )
    loaded.model.to(device).eval()
    return loaded


def _load_checkpoint(path: Path, tokenizer: str | None, key: str, with_tokenizer: bool) -> LoadedModel:
    from rmoe.checkpoints import read_checkpoint
    from rmoe.runs import run_dir_of_checkpoint, run_folder_of_checkpoint

    checkpoint = read_checkpoint(path, key)
    if "hyper_parameters" not in checkpoint or "arch" not in (checkpoint.get("hyper_parameters") or {}):
        raise RmoeError(f"{key} {path} is not a checkpoint of `rmoe fit`: it has no model hyperparameters.")
    hparams = checkpoint["hyper_parameters"]
    config = _model_config(hparams["arch"], str(path))
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    model = _build(config, state, str(path))
    data = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    data.pop("_instantiator", None)
    if with_tokenizer and tokenizer is None:
        saved = run_dir_of_checkpoint(path) / "tokenizer"
        tokenizer = str(saved) if (saved / META_FILE).is_file() else data.get("tokenizer", "byte")
        if tokenizer == "bpe":  # trained per run and saved in <run>/tokenizer, which is not there
            raise RmoeError(
                f"{path} was trained with a BPE tokenizer, saved in its run's tokenizer/ folder, but {saved} "
                "does not exist; pass the tokenizer directory with --tokenizer."
            )
    block_size = data.get("block_size")
    card = {
        "model": {k: v for k, v in hparams.items() if not k.startswith("_")},
        "data": data,
        "global_step": checkpoint.get("global_step"),
    }
    built = _tokenizer(tokenizer) if with_tokenizer else None
    context = int(block_size) if block_size else None
    return LoadedModel(model, built, context, path, card, checkpoint, run_folder_of_checkpoint(path))


def export_metadata(config: ModelConfig, context_length: int | None, tokenizer: Tokenizer) -> dict[str, Any]:
    """What ``rmoe export`` stores under ``config.json["rmoe"]``: enough to rebuild the model here."""
    return {
        "format": EXPORT_FORMAT,
        "arch": dataclasses.asdict(config),
        "context_length": context_length,
        "tokenizer_kind": tokenizer.kind,
    }


def check_model_path(path: str | os.PathLike[str], key: str = "--ckpt") -> None:
    """The checks :func:`load_model` makes before it builds a model, for a command that must fail before it
    writes."""
    from rmoe.checkpoints import read_checkpoint

    path = Path(path).expanduser()
    if path.is_dir():
        _export_meta(path, key)
    elif path.is_file():
        read_checkpoint(path, key)
    else:
        raise RmoeError(
            f"{key} {path}: no such file or folder; expected a checkpoint (<run>/checkpoints/*.ckpt) or a folder "
            "written by `rmoe export`."
        )


def _export_meta(path: Path, key: str) -> tuple[dict[str, Any], str | None]:
    """An export folder's ``config.json["rmoe"]`` and model type, its weights checked against their sha256."""
    config_file = path / "config.json"
    meta, model_type = None, None
    if config_file.is_file():
        try:
            hf_config = json.loads(config_file.read_text())
            meta, model_type = hf_config.get(EXPORT_KEY), hf_config.get("model_type")
        except (json.JSONDecodeError, AttributeError):
            meta = None
    if not isinstance(meta, dict) or "arch" not in meta:
        hint = " (a transformers checkpoint: convert it with `rmoe import`)" if config_file.is_file() else ""
        raise RmoeError(
            f"{key} {path} is not an rmoe export directory: no config.json with an {EXPORT_KEY!r} section{hint}. "
            "Pass a checkpoint (<run>/checkpoints/*.ckpt) or a directory written by `rmoe export`."
        )
    weights_file = path / "model.safetensors"
    if not weights_file.is_file():
        raise RmoeError(f"{key} {path} is an rmoe export without its weights file model.safetensors.")
    from rmoe.checkpoints import verify_weights_files

    verify_weights_files(path, meta.get("weights_sha256"), key)
    return meta, model_type


def _load_export(path: Path, tokenizer: str | None, key: str, with_tokenizer: bool) -> LoadedModel:
    from rmoe.interop.qwen2_moe import SUPPORTED_MODEL_TYPES, load_hf_weights, read_hf_checkpoint

    meta, model_type = _export_meta(path, key)
    config_file, weights_file = path / "config.json", path / "model.safetensors"
    config = _model_config(meta["arch"], str(config_file))
    if model_type in SUPPORTED_MODEL_TYPES:  # a native transformers export: read by transformers itself
        model = MoeLM(config)
        load_hf_weights(model, read_hf_checkpoint(path).state_dict(), str(path))
    else:  # remote code: our names under the wrapper's `model.` prefix
        from safetensors.torch import load_file

        weights = load_file(str(weights_file))
        model = _build(config, {k.removeprefix("model."): v for k, v in weights.items()}, str(weights_file))
    context = meta.get("context_length")
    built = _tokenizer(tokenizer or str(path)) if with_tokenizer else None
    return LoadedModel(model, built, int(context) if context else None, path)


def _model_config(arch: dict[str, Any], source: str) -> ModelConfig:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(arch) - fields)
    if unknown:
        raise RmoeError(
            f"{source} holds a model of another architecture: its config has {', '.join(unknown)}, which "
            f"rmoe's ModelConfig does not know (made by a newer or different version of rmoe?)."
        )
    return ModelConfig(**arch)


def _build(config: ModelConfig, state: dict[str, torch.Tensor], source: str) -> MoeLM:
    model = MoeLM(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state) - ({"lm_head.weight"} if config.tie_word_embeddings else set()))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise RmoeError(
            f"the weights in {source} do not match its model config (router {config.router!r}): "
            f"missing {missing[:4]}, unexpected {unexpected[:4]}, wrong shape {wrong[:4]}."
        )
    model.load_state_dict(state, strict=False)
    return model


def _tokenizer(name: str) -> Tokenizer:
    try:
        return build_tokenizer(name)
    except RmoeError as err:
        raise RmoeError(f"unknown tokenizer {name!r}: {err}") from None
