"""The package's structure: imports flow one way, and each concept is defined once.

The layers of ``rmoe/`` (a module may import from its own layer or a lower one, never a higher
one, and no import cycle, lazy imports inside functions included; ``if TYPE_CHECKING:`` imports
are annotations only and do not count):

    0 errors, tags (the TensorBoard tag schema)
    1 runs (reading run directories), checkpoints (reading and writing model files safely), data,
      syncs (moving device values to the host; counting host synchronisations)
    2 routers (the seam: RouterContext, RoutingOutput; nothing from model)
    3 model, interop.qwen2_moe (weight mapping), the package root
    4 metrics
    5 figures
    6 evaluation, inference (loading a model), generate
    7 training
    8 commands: cli, analyze, router_catalog, inspection, sweep, report, interop.export, interop.importer
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rmoe"

LAYERS: dict[str, int] = {
    "rmoe.errors": 0,
    "rmoe.tags": 0,
    "rmoe.runs": 1,
    "rmoe.checkpoints": 1,
    "rmoe.data": 1,
    "rmoe.syncs": 1,
    "rmoe.routers": 2,
    "rmoe": 3,
    "rmoe.model": 3,
    "rmoe.interop.qwen2_moe": 3,
    "rmoe.metrics": 4,
    "rmoe.figures": 5,
    "rmoe.evaluation": 6,
    "rmoe.inference": 6,
    "rmoe.generate": 6,
    "rmoe.training": 7,
    "rmoe.cli": 8,
    "rmoe.__main__": 8,
    "rmoe.analyze": 8,
    "rmoe.router_catalog": 8,
    "rmoe.inspection": 8,
    "rmoe.sweep": 8,
    "rmoe.report": 8,
    "rmoe.interop": 8,
}
SHIPPED = "rmoe.interop.remote_code"  # copied next to an exported model: imports its own copies, not rmoe


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(name: str) -> int:
    """The layer of the longest prefix of ``name`` in LAYERS."""
    if name == "rmoe":
        return LAYERS[name]
    parts = name.split(".")
    for i in range(len(parts), 1, -1):
        prefix = ".".join(parts[:i])
        if prefix in LAYERS:
            return LAYERS[prefix]
    raise AssertionError(
        f"{name} is in no layer: add it to LAYERS in tests/test_layout.py (and the layout in docs/tests-and-layout.md)"
    )


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The rmoe modules that ``name`` imports at run time (top-level or inside functions)."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        found.update(t for t in targets if t.split(".")[0] == "rmoe" and t in known)
    return found - {name}


def import_graph() -> dict[str, set[str]]:
    mods = {n: p for n, p in modules().items() if not n.startswith(SHIPPED)}
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a list of modules, first = last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_inside_rmoe():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_flow_down_the_layers():
    upward = [
        f"{src} (layer {layer(src)}) imports {dst} (layer {layer(dst)})"
        for src, dsts in import_graph().items()
        for dst in sorted(dsts)
        if layer(dst) > layer(src)
    ]
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_the_checks_catch_a_cycle_and_an_upward_import():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer("rmoe.model.decoder") == 3 and layer("rmoe.training.module") == 7
    with pytest.raises(AssertionError, match="in no layer"):
        layer("rmoe.somewhere_new")


def test_routers_see_a_context_not_the_model_config():
    for path in (PACKAGE / "routers").glob("*.py"):
        uses = re.findall(r"import ModelConfig|: ModelConfig|-> ModelConfig", path.read_text())
        assert not uses, f"{path.name} uses ModelConfig: routers get a RouterContext"


DEFINITIONS = {  # concept -> regex of its definition; it must match in exactly one file of rmoe/
    "tokens per expert": r"def tokens_per_expert\(",
    "expert capacity": r"def expert_capacity\(",
    "ln 2 / bits per byte": r"(LN2 = |def bits_per_byte\()",
    "perplexity": r"def perplexity\(",
    "TensorBoard event reading": r"EventAccumulator\(|summary_iterator\(",
}


@pytest.mark.parametrize("concept", sorted(DEFINITIONS))
def test_one_definition_per_concept(concept):
    pattern = re.compile(DEFINITIONS[concept])
    where = sorted({str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if pattern.search(p.read_text())})
    assert len(where) == 1, f"{concept} is defined in {where or 'no file'}"


def test_a_router_is_one_file_found_without_an_import_list(tmp_path, monkeypatch):
    """A file with a decorated class is all a router needs: the package imports every module."""
    import sys

    from rmoe.routers import ROUTERS, discover_routers

    package = tmp_path / "more_routers"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "doubled.py").write_text(
        "from rmoe.routers import register_router\nfrom rmoe.routers.linear import LinearRouter\n\n\n"
        "@register_router('doubled_linear_for_test')\n"
        "class DoubledLinear(LinearRouter):\n"
        "    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(ROUTERS, "doubled_linear_for_test", raising=False)
    try:
        assert discover_routers("more_routers", [str(package)]) == ["doubled"]
        assert ROUTERS["doubled_linear_for_test"].__name__ == "DoubledLinear"
    finally:
        ROUTERS.pop("doubled_linear_for_test", None)
        for name in ("more_routers", "more_routers.doubled"):
            sys.modules.pop(name, None)


def test_every_router_module_is_registered():
    from rmoe.routers import ROUTERS

    registering = {p.stem for p in (PACKAGE / "routers").glob("*.py") if "@register_router(" in p.read_text()}
    modules_of_routers = {cls.__module__.rpartition(".")[2] for cls in ROUTERS.values()}
    assert registering <= modules_of_routers, registering - modules_of_routers


def test_routing_tags_are_built_and_parsed_in_one_module():
    """``moe/{split}/{name}/layer_{l}`` is rmoe.tags' to build and to parse: no other module formats a
    layer tag or matches one with a regex of its own."""
    offenders = []
    for name, path in modules().items():
        if name == "rmoe.tags":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"""f["'][^"']*layer_\{""", code) or re.search(r"""["']/?layer_\\?\\d""", code):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert offenders == []


def test_no_two_modules_share_a_name():
    """A module's file name says what it is wherever it is read (a traceback, an editor tab)."""
    seen: dict[str, list[str]] = {}
    for name, path in modules().items():
        if path.name not in ("__init__.py", "__main__.py") and not name.startswith(SHIPPED):
            seen.setdefault(path.name, []).append(name)
    assert {file: names for file, names in seen.items() if len(names) > 1} == {}


def test_the_changelog_heads_with_the_package_version():
    """CHANGELOG.md's newest section is the version the package reports (written once, in rmoe/__init__.py)."""
    import rmoe

    heads = re.findall(r"^## (\S+)", (PACKAGE.parent / "CHANGELOG.md").read_text(), flags=re.M)
    assert heads and heads[0] == rmoe.__version__, f"CHANGELOG.md starts at {heads[:1]}, rmoe is {rmoe.__version__}"
