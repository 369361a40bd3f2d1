"""``rmoe import``: a local transformers Qwen2-MoE / Qwen3-MoE directory to an rmoe run directory.

``rmoe import path/to/Qwen1.5-MoE-A2.7B --out imported/qwen [--tokenizer DIR] [--context-length N]``

writes ``OUT/checkpoints/imported.ckpt`` (a step-0 Lightning checkpoint of ``MoeLMModule``, as ``rmoe fit``
writes), ``OUT/tokenizer/`` and ``OUT/config.yaml`` (model and data sections), which ``rmoe analyze``,
``rmoe generate`` and fine-tuning read like any run. The weights are read by transformers and mapped by
:mod:`rmoe.interop.qwen2_moe`; both models' logits on a few tokens are compared before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from rmoe.checkpoints import AtomicCheckpointIO, check_can_create, describe_os_error
from rmoe.data.tokenizer import HfTokenizer, build_tokenizer
from rmoe.errors import RmoeError, ToolArgumentParser
from rmoe.interop.qwen2_moe import from_hf_config, load_hf_weights, read_hf_checkpoint
from rmoe.model.decoder import MoeLM

CHECKPOINT_NAME = "imported.ckpt"


def import_model(
    hf_dir: str | Path, out: str | Path, *, tokenizer: str | None = None, context_length: int | None = None
) -> Path:
    """Convert ``hf_dir`` (written by ``save_pretrained``) into a new or empty run directory ``out``; returns the
    checkpoint path. ``tokenizer`` defaults to the one in ``hf_dir``; ``context_length`` (recorded as
    ``data.block_size``) to the config's ``max_position_embeddings``.

    Raises:
        RmoeError: Unsupported architecture or features, unreadable weights, no tokenizer, the
            converted model disagreeing with transformers', a non-empty ``out``.
    """
    hf_dir, out = Path(hf_dir).expanduser(), Path(out)
    if out.exists() and not out.is_dir():
        raise RmoeError(f"--out {out} is an existing file; expected a new or empty directory.")
    if out.exists() and any(out.iterdir()):
        raise RmoeError(f"--out {out} exists and is not empty; choose a new directory.")
    check_can_create(out, "--out")
    hf = read_hf_checkpoint(hf_dir)
    config = from_hf_config(hf.config)
    model = MoeLM(config).eval()
    load_hf_weights(model, hf.state_dict(), str(hf_dir))
    _check_same_logits(model, hf, str(hf_dir))

    try:
        tok = build_tokenizer(tokenizer) if tokenizer else HfTokenizer.load(str(hf_dir))
    except RmoeError as err:
        raise RmoeError(f"no usable tokenizer for {hf_dir} (pass --tokenizer DIR): {err}") from None
    if tok.vocab_size > config.vocab_size:
        raise RmoeError(f"the tokenizer has {tok.vocab_size} ids, more than the model's {config.vocab_size}.")
    context = context_length or getattr(hf.config, "max_position_embeddings", None) or 2048

    created = not out.exists()
    try:
        return _write_run(out, hf_dir, hf, model, config, tok, int(context))
    except BaseException as err:  # no half-written run folder: a folder this call created goes again
        if created:
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(err, OSError):
            raise RmoeError(f"--out: {describe_os_error(err, out, 'write the imported run to')}") from None
        raise


def _write_run(out: Path, hf_dir: Path, hf: Any, model: MoeLM, config: Any, tok: Any, context: int) -> Path:
    """Write the tokenizer, the checkpoint (atomically) and config.yaml."""
    import lightning

    from rmoe.training.module import OptimConfig

    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    tok.save(out / "tokenizer")
    arch = dataclasses.asdict(config)
    data = {"tokenizer": str((out / "tokenizer").resolve()), "block_size": int(context)}
    hparams = {
        "arch": arch,
        "optim": dataclasses.asdict(OptimConfig()),
        "aux_loss_coef": 0.01,
        "z_loss_coef": 0.001,
        "compile": False,
        "_instantiator": "lightning.pytorch.cli.instantiate_module",
    }
    checkpoint = {
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": lightning.__version__,
        "state_dict": {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()},
        "hparams_name": "kwargs",
        "hyper_parameters": hparams,
        "datamodule_hparams_name": "kwargs",
        "datamodule_hyper_parameters": {**data, "_instantiator": "lightning.pytorch.cli.instantiate_module"},
        "imported_from": str(hf_dir.resolve()),
    }
    path = out / "checkpoints" / CHECKPOINT_NAME
    AtomicCheckpointIO().save_checkpoint(checkpoint, path)
    header = (
        f"# rmoe import of {hf_dir.resolve()} ({hf.config.model_type}); add a data source to analyse or fine-tune.\n"
    )
    (out / "config.yaml").write_text(header + yaml.safe_dump({"model": {"arch": arch}, "data": data}, sort_keys=False))
    return path


@torch.no_grad()
def _check_same_logits(model: MoeLM, hf: torch.nn.Module, source: str) -> None:
    """Both models on a few token ids: any difference means the mapping is wrong for this checkpoint."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=generator)
    ours, theirs = model(ids).logits, hf(ids).logits.float()
    error = (ours - theirs).abs().max().item()
    scale = theirs.abs().max().item()
    if not error <= 1e-4 * max(1.0, scale):
        raise RmoeError(f"the converted model disagrees with transformers' on {source} (max |logit diff| {error:.3g}).")


def build_parser() -> argparse.ArgumentParser:
    p = ToolArgumentParser(
        prog="rmoe import",
        description="Convert a local transformers Qwen2-MoE / Qwen3-MoE directory into an rmoe checkpoint.",
    )
    p.add_argument("hf_dir", help="directory written by save_pretrained (config.json + safetensors).")
    p.add_argument("--out", required=True, help="output run directory (new or empty).")
    p.add_argument("--tokenizer", help="tokenizer directory or name (default: the one in hf_dir).")
    p.add_argument("--context-length", type=int, help="context to record (default: max_position_embeddings).")
    return p


def main(argv: list[str]) -> None:
    """``rmoe import HF_DIR --out DIR``; RmoeError for bad input (exit 2 in ``rmoe``)."""
    args = build_parser().parse_args(argv)
    path = import_model(args.hf_dir, args.out, tokenizer=args.tokenizer, context_length=args.context_length)
    print(f"rmoe import: wrote {path} (analyse: rmoe analyze --ckpt {path}; generate: rmoe generate --ckpt {path} ...)")
