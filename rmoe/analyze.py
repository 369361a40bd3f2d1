"""``rmoe analyze``: the routing analysis of a trained checkpoint, offline.

``rmoe analyze --ckpt runs/base/version_0/checkpoints/last.ckpt --split val --out analysis/base`` runs the
model over (part of) a data split and writes ``metrics.json`` and the PNG figures of :mod:`rmoe.figures` (the
analyses of RMoE, arXiv 2408.06793, Sec. 5 and App. A.4; OLMoE, arXiv 2409.02060; "A Closer Look", arXiv
2406.18219). The computation is :func:`rmoe.evaluation.routing_eval.evaluate_routing`; this module loads the
checkpoint, rebuilds its data, adds the language-model metrics and writes the results.
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from rmoe.checkpoints import check_can_create, describe_os_error, read_checkpoint
from rmoe.data.corpus import SPLITS
from rmoe.errors import RmoeError, ToolArgumentParser
from rmoe.evaluation.expert_analyses import routed_expert_ids, router_saturation_between
from rmoe.evaluation.routing_eval import DEFAULT_MAX_BATCHES, evaluate_routing
from rmoe.evaluation.splits import split_datamodule
from rmoe.figures import EXPERT_FIGURES, FIGURES, as_array, expert_figure, figure
from rmoe.inference import load_model
from rmoe.inspection import token_pieces
from rmoe.metrics.catalog import metrics
from rmoe.metrics.language import language_metrics
from rmoe.model.config import arch_differences
from rmoe.runs import flatten_hparams, run_dir_of_checkpoint, write_json


def analyze_checkpoint(
    ckpt: str | os.PathLike[str],
    *,
    config: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    split: str = "val",
    max_batches: int | None = DEFAULT_MAX_BATCHES,
    device: str = "cpu",
    data_overrides: Mapping[str, Any] | None = None,
    expert_analyses: bool = True,
    saturation: bool | Sequence[str | os.PathLike[str]] = True,
) -> dict[str, Any]:
    """Load a checkpoint written by ``rmoe fit``, rebuild its data and analyse its routing on a split.

    Args:
        config: YAML config file(s) whose ``data:`` sections (merged in order) build the
            :class:`~rmoe.data.TextDataModule`. Default: ``<run>/config.yaml`` for
            ``<run>/checkpoints/x.ckpt``, else the data settings saved in the checkpoint.
        split: ``train`` (shuffled blocks, as in training), ``val`` or ``test``.
        data_overrides: ``TextDataModule`` arguments replacing the config's (e.g. ``cache_dir``).
        expert_analyses: See :func:`evaluate_routing`; also labels the most specialised token ids.
        saturation: OLMoE's router saturation of other checkpoints against this one, on the first
            :data:`SATURATION_BATCHES` batches: True = the run's other ``*.ckpt`` (one per global
            step, this one's step excluded), or a list of checkpoint files; False: none.

    Returns:
        :func:`evaluate_routing`'s metrics plus ``ppl``, ``bpb``, ``split``, ``checkpoint``,
        ``global_step``, ``router``, ``hparams`` (flattened, scalar, of the model and data) and, with
        another checkpoint, ``router_saturation``: ``{"steps": [C], "final_step", "checkpoints",
        "saturation": (C, L)}`` in step order. RmoeError for a bad checkpoint, config, split or data settings.
    """
    if split not in SPLITS:
        raise RmoeError(f"--split={split!r} is not a split; expected one of: {', '.join(SPLITS)}.")
    if max_batches is not None and max_batches < 1:
        raise RmoeError(f"--max-batches={max_batches} must be a positive integer.")
    ckpt = Path(ckpt)
    if ckpt.is_dir():
        raise RmoeError(
            f"--ckpt {ckpt} is a directory; rmoe analyze reads a training checkpoint (*.ckpt), and its data."
        )
    loaded = load_model(ckpt, with_tokenizer=False)
    model, checkpoint = loaded.model, loaded.checkpoint
    datamodule, data = split_datamodule(ckpt, checkpoint, split, model.config.vocab_size, config, data_overrides)
    loader = getattr(datamodule, f"{split}_dataloader")()
    metrics = evaluate_routing(model, loader, max_batches=max_batches, device=device, expert_analyses=expert_analyses)
    if expert_analyses and "top_specialized" in metrics:
        for pairs in metrics["top_specialized"]:
            for pair in pairs:
                pair["label"] = token_pieces(datamodule.tokenizer, [pair["token_id"]])[0].label
    global_step = int(checkpoint.get("global_step", -1))
    others = _saturation_checkpoints(ckpt, global_step, saturation)
    if others and model.config.moe_layers:
        limit = SATURATION_BATCHES if max_batches is None else min(max_batches, SATURATION_BATCHES)
        batches = [b for _, b in zip(range(limit), getattr(datamodule, f"{split}_dataloader")())]
        metrics["router_saturation"] = _saturation(model, others, batches, device)
        metrics["router_saturation"]["final_step"] = global_step
    metrics.update(language_metrics(metrics["loss"], datamodule.bytes_per_token(split)))
    hparams = flatten_hparams(checkpoint.get("hyper_parameters") or {}, prefix="model")
    hparams.update(flatten_hparams(data, prefix="data"))
    return {
        "checkpoint": str(ckpt.resolve()),
        "split": split,
        "global_step": global_step,
        "router": model.config.router,
        "hparams": hparams,
        **metrics,
    }


SATURATION_BATCHES = 4
"""Batches of the split on which router saturation compares checkpoints (at most)."""


def _saturation_checkpoints(
    ckpt: Path, global_step: int, saturation: bool | Sequence[str | os.PathLike[str]]
) -> list[tuple[int, Path]]:
    """``[(global_step, path)]`` of the checkpoints to compare with ``ckpt``, in step order."""
    if saturation is False:
        return []
    paths = sorted(ckpt.parent.glob("*.ckpt")) if saturation is True else [Path(p) for p in saturation]
    by_step: dict[int, Path] = {}
    for path in paths:
        if path.is_file() and path.resolve() == ckpt.resolve():
            continue
        step = int(read_checkpoint(path, "--saturation-ckpt").get("global_step", -1))
        if step != global_step:
            by_step.setdefault(step, path)
    return sorted(by_step.items())


def _saturation(model: Any, others: list[tuple[int, Path]], batches: list[torch.Tensor], device: str) -> dict[str, Any]:
    """Router saturation of each other checkpoint against ``model`` on the same batches."""
    final_ids = routed_expert_ids(model, batches, device)
    rows, steps, names = [], [], []
    for step, path in others:
        other = load_model(path, with_tokenizer=False, key="--saturation-ckpt")
        differences = arch_differences(model.config, other.config, "in --ckpt", f"in {path.name}")
        if differences:
            raise RmoeError(
                f"--saturation-ckpt {path} is not a checkpoint of the analysed model (router saturation compares "
                f"one run's checkpoints): {'; '.join(differences)}."
            )
        rows.append(router_saturation_between(routed_expert_ids(other.model, batches, device), final_ids))
        steps.append(step)
        names.append(path.name)
    return {"steps": steps, "checkpoints": names, "saturation": torch.stack(rows)}


SUMMARY_COLUMNS = (
    "loss",
    "bpb",
    *(f"{m.name}_offdiag" if m.kind == "matrix" else m.name for m in metrics(flag="summary")),
)
"""Columns of :func:`summary_rows`: the language-model metrics, then the metrics declared with ``summary=True``
(a matrix metric gives the mean of its off-diagonal entries, ``<name>_offdiag``)."""


def summary_rows(metrics_by_run: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per run for a comparison table: ``run``, ``router``, ``step`` and :data:`SUMMARY_COLUMNS`,
    averaged over everything but the run (layers, pairs, expert matrices)."""
    rows = []
    for label, m in metrics_by_run.items():
        row: dict[str, Any] = {"run": label, "router": m.get("router"), "step": m.get("global_step")}
        for key in SUMMARY_COLUMNS:
            if key.endswith("_offdiag") and key.removesuffix("_offdiag") in m:
                mi = as_array(m[key.removesuffix("_offdiag")])
                off = mi[~np.eye(len(mi), dtype=bool)]
                row[key] = float(np.nanmean(off)) if off.size else float("nan")
            elif key in m:
                values = (
                    as_array(m[key]) if isinstance(m[key], (list, tuple, torch.Tensor)) else np.array(m[key], float)
                )
                row[key] = float(np.nanmean(values)) if values.size else float("nan")
        rows.append(row)
    return rows


def write_analysis(metrics: Mapping[str, Any], out: str | os.PathLike[str], *, dpi: int = 110) -> list[Path]:
    """Write ``metrics.json`` and, for MoE models, one PNG per kind of :data:`FIGURES` and of
    :data:`~rmoe.figures.EXPERT_FIGURES` (those the metrics hold) into ``out``; returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [write_json(metrics, out / "metrics.json")]
    if "binned_prob_mi" not in metrics:
        return paths
    title = f"{metrics.get('router', '')} ({metrics.get('split', '')})".strip()
    for kind in FIGURES:
        fig = figure(kind, metrics, title=title if kind == "expert_similarity" else "")
        path = out / f"{kind}.png"
        fig.savefig(path, dpi=dpi)
        paths.append(path)
    for kind in EXPERT_FIGURES:  # those the metrics have (e.g. no saturation without other checkpoints)
        fig = expert_figure(kind, metrics, title=title)
        if fig is not None:
            path = out / f"{kind}.png"
            fig.savefig(path, dpi=dpi)
            paths.append(path)
    return paths


def build_parser() -> argparse.ArgumentParser:
    """The ``rmoe analyze`` argument parser (errors raise :class:`RmoeError`)."""
    parser = ToolArgumentParser(
        prog="rmoe analyze",
        description="Routing analysis of a checkpoint written by `rmoe fit`: metrics.json and PNG figures.",
    )
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint (<run>/checkpoints/*.ckpt).")
    parser.add_argument(
        "--config",
        action="append",
        help="YAML config(s) whose data: section rebuilds the data (default: <run>/config.yaml); repeatable.",
    )
    parser.add_argument("--split", default="val", help=f"one of {', '.join(SPLITS)} (default: val).")
    parser.add_argument(
        "--max-batches", type=int, default=DEFAULT_MAX_BATCHES, help=f"batches to use (default {DEFAULT_MAX_BATCHES})."
    )
    parser.add_argument("--all-batches", action="store_true", help="use the whole split (overrides --max-batches).")
    parser.add_argument("--out", help="output folder (default: <run>/analysis/<ckpt name>-<split>).")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu).")
    parser.add_argument(
        "--no-expert-analyses",
        action="store_true",
        help="skip OLMoE's specialisation/co-activation and the Closer-Look analyses (faster).",
    )
    parser.add_argument(
        "--saturation-ckpt",
        action="append",
        metavar="CKPT",
        help="checkpoint(s) whose router saturation against --ckpt to measure (default: the run's other *.ckpt).",
    )
    parser.add_argument("--no-saturation", action="store_true", help="skip router saturation.")
    parser.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a data setting, e.g. --data cache_dir=/tmp/cache (value parsed as YAML); repeatable.",
    )
    return parser


def main(argv: list[str]) -> None:
    """``rmoe analyze ...``; raises RmoeError for any bad input (the ``rmoe`` entry point prints it)."""
    args = build_parser().parse_args(argv)
    overrides: dict[str, Any] = {}
    for item in args.data:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RmoeError(f"--data {item!r}: expected KEY=VALUE.")
        overrides[key.strip()] = yaml.safe_load(value)
    out = Path(args.out) if args.out else None
    if out is None:
        out = run_dir_of_checkpoint(args.ckpt) / "analysis" / f"{Path(args.ckpt).stem}-{args.split}"
    check_can_create(out, "--out")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        metrics = analyze_checkpoint(
            args.ckpt,
            config=args.config,
            split=args.split,
            max_batches=None if args.all_batches else args.max_batches,
            device=args.device,
            data_overrides=overrides,
            expert_analyses=not args.no_expert_analyses,
            saturation=False if args.no_saturation else (args.saturation_ckpt or True),
        )
    try:
        paths = write_analysis(metrics, out)
    except OSError as err:
        raise RmoeError(f"--out: {describe_os_error(err, out, 'write the analysis to')}") from None
    limit = (
        "the whole split"
        if args.all_batches
        else f"--max-batches {args.max_batches}; --all-batches for the whole split"
    )
    summary = (f"loss {metrics['loss']:.4f}, bpb {metrics['bpb']:.4f} on {metrics['num_eval_tokens']} tokens "
               f"({metrics['num_batches']} batches: {limit})")  # fmt: skip
    print(f"rmoe analyze: {args.split} {summary}; wrote {', '.join(p.name for p in paths)} to {out}")
