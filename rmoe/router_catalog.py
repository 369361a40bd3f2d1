"""``rmoe routers [NAME]``: the registered routers, and one router's options with their docs.

Everything printed is read from the router classes, so a new router is listed without a line here.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import textwrap
import typing
from collections.abc import Sequence

from rmoe.errors import ToolArgumentParser
from rmoe.routers import ALIASES, ROUTERS, Router, get_router_class

_ENTRY = re.compile(r"^(\s*)(\w+): (.*)$")


def option_docs(options_class: type) -> dict[str, str]:
    """Each option's text from the ``Args:`` sections of ``options_class`` and its bases (most derived wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(options_class.__mro__):
        docs.update(_args_section(klass.__dict__.get("__doc__") or ""))
    return docs


def _args_section(docstring: str) -> dict[str, str]:
    """``name -> text`` of a Google-style ``Args:`` section (continuation lines indented deeper)."""
    lines = inspect.cleandoc(docstring).splitlines()
    start = next((i + 1 for i, line in enumerate(lines) if line.strip() == "Args:"), len(lines))
    out: dict[str, str] = {}
    indent, name = None, None
    for line in lines[start:]:
        entry = _ENTRY.match(line)
        depth = len(line) - len(line.lstrip())
        if entry and indent in (None, depth):
            indent, name = depth, entry.group(2)
            out[name] = entry.group(3)
        elif name is not None and line.strip() and depth > indent:
            out[name] += " " + line.strip()
        elif line.strip():
            name = None
    return out


def _summary(router: type[Router]) -> str:
    """The first sentence of the router's docstring, on one line."""
    text = " ".join((inspect.getdoc(router) or "").split("\n\n")[0].split())
    return text.split(". ")[0].rstrip(".")


def _type_name(hint: object) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return " | ".join(str(v) for v in typing.get_args(hint))
    name = getattr(hint, "__name__", None) or str(hint)
    return name.replace("NoneType", "None").replace("typing.", "")


def describe(name: str) -> str:
    """The page ``rmoe routers NAME`` prints: what the router is, its options, causality and costs."""
    router = get_router_class(name)
    lines = [f"{router.name}  ({router.__module__}.{router.__qualname__})"]
    aliases = sorted(alias for alias, target in ALIASES.items() if target == router.name)
    if aliases:
        lines.append(f"also answers to: {', '.join(aliases)} (an alias kept for existing configs)")
    lines += ["", inspect.getdoc(router) or "", ""]
    fields = dataclasses.fields(router.Options)
    if not fields:
        lines.append("Options: none.")
    else:
        lines.append("Options (model.arch.router_options.<name>):")
        hints, docs = typing.get_type_hints(router.Options), option_docs(router.Options)
        for field in fields:
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            lines.append(f"  {field.name}: {_type_name(hints[field.name])} = {default!r}")
            lines.append(
                textwrap.fill(
                    docs.get(field.name, "(undocumented)"), 100, initial_indent=" " * 6, subsequent_indent=" " * 6
                )
            )
    if router.causal_evaluation is not None:
        offer = ", ".join(f"{k}: {v}" for k, v in router.causal_evaluation.items())
        lines += ["", f"Causal evaluation (rmoe sweep tests both ways): {offer}."]
    if router.compile_problem is not None:
        lines += ["", f"model.compile=true: refused ({router.compile_problem})."]
    return "\n".join(lines)


def listing() -> str:
    """The table ``rmoe routers`` prints: every registered router and its one-line summary."""
    width = max(len(n) for n in ROUTERS)
    lines = ["Routers (model.arch.router); `rmoe routers NAME` shows one router's options.", ""]
    lines += [f"  {name:<{width}}  {_summary(cls)}" for name, cls in sorted(ROUTERS.items())]
    lines += [f"  {alias:<{width}}  alias of {target}" for alias, target in sorted(ALIASES.items())]
    return "\n".join(lines)


def build_parser() -> ToolArgumentParser:
    parser = ToolArgumentParser(prog="rmoe routers", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", nargs="?", help="a router (or alias): print its options with their docs")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(describe(args.name) if args.name else listing())
    return 0
