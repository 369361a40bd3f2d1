"""The command line of ``rmoe inspect``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rmoe.errors import RmoeError, ToolArgumentParser
from rmoe.inspection.page import page_data, render_html
from rmoe.inspection.report import DEFAULT_TABLE_TOKENS, format_report
from rmoe.inspection.text_routing import DEFAULT_TOP, TextRouting, expert_summary, route_text

DEFAULT_MAX_TOKENS = 2048


def build_parser() -> argparse.ArgumentParser:
    """The ``rmoe inspect`` argument parser (errors raise :class:`RmoeError`)."""
    parser = ToolArgumentParser(
        prog="rmoe inspect",
        description="Which experts each token of a text gets and which tokens each expert gets, "
        "in the terminal and as a self-contained HTML page.",
    )
    parser.add_argument("--ckpt", required=True, help="checkpoint (<run>/checkpoints/*.ckpt) or `rmoe export` folder.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="the text to route.")
    source.add_argument("--file", help="a UTF-8 text file to route.")
    source.add_argument("--split", help="route the first tokens of this data split (train, val, test).")
    parser.add_argument(
        "--config", action="append", help="with --split: YAML config(s) whose data: section rebuilds the data."
    )
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="tokens to route at most.")
    parser.add_argument(
        "--out",
        metavar="FILE.html",
        help="also write the interactive page (one self-contained HTML file) to this file.",
    )
    parser.add_argument("--layer", type=int, default=0, help="MoE layer the page colours by at first (default 0).")
    parser.add_argument("--top", type=int, default=DEFAULT_TOP, help="top tokens per expert (default 6).")
    parser.add_argument(
        "--table-tokens", type=int, default=DEFAULT_TABLE_TOKENS, help="tokens in the per-token table (default 40)."
    )
    parser.add_argument("--tokenizer", help="override the tokenizer (default: the run's).")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu).")
    return parser


def _split_ids(loaded: Any, split: str, config: list[str] | None, max_tokens: int) -> list[int]:
    from rmoe.evaluation.splits import split_datamodule

    datamodule, _ = split_datamodule(loaded.source, loaded.checkpoint, split, loaded.config.vocab_size, config)
    ids: list[int] = []
    for batch in getattr(datamodule, f"{split}_dataloader")():
        for row in batch:
            ids.extend(row[:-1].tolist())  # consecutive blocks share their boundary token
            if len(ids) >= max_tokens:
                return ids[:max_tokens]
    return ids


def inspect(args: argparse.Namespace) -> tuple[TextRouting, list[Any], str]:
    """Load, tokenise, route; returns the routing, the expert summary and the report header."""
    from rmoe.generate import check_encodable
    from rmoe.inference import load_model

    for name in ("max_tokens", "top", "table_tokens"):
        if getattr(args, name) < 1:
            raise RmoeError(f"--{name.replace('_', '-')}={getattr(args, name)} must be a positive integer.")
    loaded = load_model(args.ckpt, tokenizer=args.tokenizer, device=args.device)
    tokenizer, config = loaded.tokenizer, loaded.model.config
    if args.split is not None:
        if Path(args.ckpt).is_dir():
            raise RmoeError("--split needs a training checkpoint (*.ckpt), not an export folder: use --text or --file.")
        ids = _split_ids(loaded, args.split, args.config, args.max_tokens)
        source = f"the first tokens of the {args.split} split"
    else:
        if args.file is not None:
            path = Path(args.file)
            if not path.is_file():
                raise RmoeError(f"--file {path}: no such file.")
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as err:
                raise RmoeError(f"--file {path} is not UTF-8 text (byte {err.start}).") from None
            source = str(path)
        else:
            text, source = args.text, "--text"
        if not text.strip():
            raise RmoeError(f"the text ({source}) is empty: nothing to inspect.")
        check_encodable(text, tokenizer, f"the text ({source})")
        ids = tokenizer.encode(text)[: args.max_tokens]
    if not 0 <= args.layer < len(config.moe_layers):
        raise RmoeError(f"--layer={args.layer}: the model has MoE layers 0..{len(config.moe_layers) - 1}.")
    routing = route_text(loaded.model, tokenizer, ids, loaded.context_length)
    summary = expert_summary(routing, top=args.top)
    header = (
        f"rmoe inspect: {args.ckpt} (router {config.router}, {routing.num_layers} MoE layers, "
        f"{config.num_experts} experts, top-{config.top_k}); {routing.token_ids.numel()} tokens of {source}"
    )
    return routing, summary, header


def main(argv: list[str]) -> None:
    """``rmoe inspect ...``: print the routing of a text and, with ``--out``, write the HTML page.
    RmoeError for bad input (exit 2 in ``rmoe``)."""
    from rmoe.checkpoints import check_can_create, describe_os_error

    args = build_parser().parse_args(argv)
    if args.out:  # before the model is loaded: a page that cannot be written fails at once
        if Path(args.out).is_dir():
            raise RmoeError(f"--out {args.out} is a directory; expected the HTML file to write (e.g. page.html).")
        check_can_create(Path(args.out).parent, "--out")
    routing, summary, header = inspect(args)
    print(format_report(routing, summary, table_tokens=args.table_tokens, header=header))
    if args.out:
        path = Path(args.out)
        title = f"rmoe inspect: {Path(args.ckpt).name}"
        data = page_data(routing, summary, title=title, meta=header.removeprefix("rmoe inspect: "), layer=args.layer)
        temporary = path.with_name(f".{path.name}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(render_html(data), encoding="utf-8")
            temporary.replace(path)
        except OSError as err:
            temporary.unlink(missing_ok=True)
            raise RmoeError(f"--out: {describe_os_error(err, path, 'write the page')}") from None
        print(f"\nrmoe inspect: wrote {path}")
