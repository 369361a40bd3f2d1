"""The documentation keeps its promises: README.md and docs/*.md.

- Every relative link and image resolves to a file, and every ``#anchor`` to a heading of it.
- Every fenced ``bash`` block with a command line that starts with ``rmoe `` is run here, or its
  info string says why not: ```` ```bash not-run: needs a GPU ```` (a reason is required). Blocks of
  ``docs/results.md`` regenerate measured results (sweeps of hours) and count as marked
  (``NOT_RUN_FILES``). The ``rmoe`` commands of every block, run or not, name a known subcommand
  and existing ``configs/`` files; a sweep that is not run is still expanded (``--dry-run``).
- The README's test command is the one ``.ci/run`` runs, its table of commands holds commands the
  guides run, and its router table lists every registered router.

How a block runs, cheaply (about a second per command): in one temporary working folder with
``configs/`` linked in, where a module fixture first trains the run the examples read,
``runs/quick/version_0/`` (``base.yaml + quick.yaml``, shrunk, 2 steps). Each command line is split
with ``shlex`` (backslash continuations joined, ``#`` comments dropped), gets the small overrides
of :func:`overrides` appended (later options win: a tiny model on a small text, one training step
without validation, one evaluation batch, a few tokens; ``rmoe sweep`` runs one run of its grid,
in a child process of its own) and runs in-process through ``rmoe.cli.main``. A command fails its
block's test when it exits non-zero (the message names the file, line and command, with the end of
stderr).

Blocks run in an order that puts what a command reads before it (fit, then the readers of a run,
export, import, sweep, report), whichever file they are in: run the whole file, not one block.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from tiny import TEXT, tiny_overrides

from rmoe.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is many times faster on 2 busy cores

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SUBCOMMANDS = (
    "fit",
    "validate",
    "test",
    "analyze",
    "eval",
    "inspect",
    "generate",
    "export",
    "import",
    "sweep",
    "report",
    "routers",
)
NOT_RUN_FILES = {"docs/results.md": "regenerates a measured result (sweeps of hours; the section says which)"}
"""Files whose unmarked blocks count as ``not-run`` with this reason (files this test does not own)."""
QUICK_RUN = "runs/quick/version_0"
"""The run the examples read: what ``rmoe fit --config configs/base.yaml --config configs/quick.yaml`` writes first."""
FILES = {"notes.txt": TEXT * 4}
"""Files the examples assume the user has, written into the working folder."""
RANK = {
    "fit": 0,
    "validate": 1,
    "test": 1,
    "analyze": 1,
    "eval": 1,
    "inspect": 1,
    "generate": 1,
    "export": 2,
    "import": 3,
}
RANK |= {"sweep": 4, "report": 5}
"""The order blocks run in: a command runs after the commands that write what it reads (see :func:`rank`)."""


# ---- reading the documents -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """A fenced code block: its file, the line of its opening fence, its info string and its text."""

    path: Path
    line: int
    info: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")


def fenced_blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence = match.group(1)
        j = i + 1
        while j < len(lines) and not re.fullmatch(rf" {{0,3}}{fence[0]}{{{len(fence)},}}\s*", lines[j]):
            j += 1
        blocks.append(Block(path, i + 1, match.group(2).strip(), "\n".join(lines[i + 1 : j])))
        i = j + 1
    return blocks


def command_lines(text: str) -> list[list[str]]:
    """The block's commands as words: backslash continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n", " ", text)
    return [words for line in joined.splitlines() if (words := shlex.split(line, comments=True))]


def not_run_reason(block: Block) -> str | None:
    """The reason of a ``bash not-run: <reason>`` info string (or of ``NOT_RUN_FILES``); None for ``bash``."""
    if block.info == "bash":
        return NOT_RUN_FILES.get(str(block.path.relative_to(ROOT)))
    match = re.fullmatch(r"bash\s+not-run:\s*(.*)", block.info)
    if match and match.group(1).strip():
        return match.group(1).strip()
    raise AssertionError(
        f"{block.where}: info string {block.info!r}: write `bash` (the block is run) or "
        "`bash not-run: <why it cannot run here>`"
    )


def bash_blocks() -> list[Block]:
    return [b for path in DOCS for b in fenced_blocks(path) if b.info.split(maxsplit=1)[:1] == ["bash"]]


def rmoe_blocks() -> list[Block]:
    """The bash blocks with at least one command line that starts with ``rmoe``."""
    return [b for b in bash_blocks() if any(words[0] == "rmoe" for words in command_lines(b.text))]


def option_values(words: list[str], option: str) -> list[str]:
    """The values of ``option`` (``--opt v`` or ``--opt=v``) in ``words``, in order."""
    values = []
    for i, word in enumerate(words):
        if word == option and i + 1 < len(words):
            values.append(words[i + 1])
        elif word.startswith(option + "="):
            values.append(word.partition("=")[2])
    return values


def option_value(words: list[str], option: str) -> str | None:
    values = option_values(words, option)
    return values[-1] if values else None


def rank(words: list[str]) -> int:
    """When a command runs: after the commands that write what it reads (exported/, imported/, sweeps)."""
    out = option_value(words, "--out")
    reads = [w.rpartition("=")[2] for w in words[2:] if w != out]
    order = RANK.get(words[1], 0)
    if any(w.startswith("exported/") for w in reads):
        order = max(order, RANK["import"])
    if any(w.startswith("imported/") for w in reads):
        order = max(order, RANK["import"] + 1)
    if any(w.startswith("runs/sweeps/") for w in reads):
        order = max(order, RANK["report"])
    return order


def runnable_blocks() -> list[Block]:
    blocks = [b for b in rmoe_blocks() if not_run_reason(b) is None]
    return sorted(blocks, key=lambda b: max(rank(w) for w in command_lines(b.text) if w[0] == "rmoe"))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but ``-`` and ``_`` dropped, spaces as ``-``."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings (outside code blocks), duplicates numbered as GitHub does."""
    in_code, seen, out = False, {}, set()
    for line in path.read_text().splitlines():
        if _FENCE.match(line):
            in_code = not in_code
        elif not in_code and (match := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)):
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            out.add(base if count == 0 else f"{base}-{count}")
    return out


def prose(path: Path) -> str:
    """The file without its fenced blocks and inline code (links there are not links)."""
    text = re.sub(r"^ {0,3}(`{3,}).*?^ {0,3}\1\s*$", "", path.read_text(), flags=re.M | re.S)
    return re.sub(r"(`+).+?\1", "", text)


# ---- links ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_every_relative_link_and_image_resolves(path):
    broken = []
    for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose(path)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            broken.append(f"{target} (no file {resolved.relative_to(ROOT) if ROOT in resolved.parents else resolved})")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target} (no heading #{anchor} in {resolved.relative_to(ROOT)})")
    assert not broken, f"{path.relative_to(ROOT)}: broken links: " + "; ".join(broken)


def test_the_guides_are_linked_from_the_readme():
    linked = set(re.findall(r"\]\(docs/([\w.-]+\.md)", (ROOT / "README.md").read_text()))
    guides = {p.name for p in DOCS[1:]}
    assert guides <= linked, f"guides the README does not link to: {sorted(guides - linked)}"


# ---- the commands, read without running them -----------------------------------------------------------------


def test_bash_blocks_with_rmoe_commands_are_runnable_or_say_why_not():
    problems, with_rmoe = [], rmoe_blocks()
    for block in bash_blocks():
        try:
            reason = not_run_reason(block)
        except AssertionError as err:
            problems.append(str(err))
            continue
        for words in command_lines(block.text):
            if words[0] != "rmoe":
                if reason is None and block in with_rmoe:
                    problems.append(
                        f"{block.where}: `{shlex.join(words)}` is not an rmoe command, so this block cannot be "
                        "run here: move it to a block of its own or mark the block `bash not-run: <reason>`"
                    )
                continue
            if len(words) < 2 or words[1] not in SUBCOMMANDS:
                problems.append(
                    f"{block.where}: `{shlex.join(words)}`: not an rmoe subcommand ({', '.join(SUBCOMMANDS)})"
                )
                continue
            for word in words:
                config = word.rpartition("=")[2]
                template = (reason or "").startswith("a template")  # names the files the reader writes
                if (
                    config.startswith("configs/")
                    and "<" not in config
                    and not template
                    and not (ROOT / config).exists()
                ):
                    problems.append(f"{block.where}: `{shlex.join(words)}`: {config} does not exist")
    assert not problems, "\n".join(problems)


def test_the_readme_test_command_is_what_ci_runs():
    ci = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines() if "pytest" in line]
    assert ci, ".ci/run runs no pytest command"
    quick_start = fenced_blocks(ROOT / "README.md")[0].text.splitlines()
    assert ci[-1] in [line.strip() for line in quick_start], (
        f"the README's quick start should run the tests as .ci/run does: {ci[-1]!r}"
    )


def test_the_readme_table_of_commands_holds_commands_the_guides_run():
    rows = re.findall(r"^\| `(\w+)` \|.*\| `(rmoe [^`]+)` \|$", (ROOT / "README.md").read_text(), flags=re.M)
    assert sorted(name for name, _ in rows) == sorted(SUBCOMMANDS), "one row per rmoe subcommand"
    run = {tuple(w) for b in runnable_blocks() for w in command_lines(b.text)}
    for name, example in rows:
        words = shlex.split(example)
        assert words[1] == name, f"the example of `{name}` runs `{words[1]}`"
        assert tuple(words) in run, f"README example `{example}` is in no bash block of the guides that this test runs"


def test_the_readme_lists_every_registered_router():
    from rmoe.routers import ROUTERS

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("\n## Routers") : readme.index("\n## ", readme.index("\n## Routers") + 1)]
    listed = re.findall(r"^\| `(\w+)` \|", section, flags=re.M)
    assert sorted(listed) == sorted(ROUTERS), "the README's router table should have one row per registered router"
    guide = (ROOT / "docs/routers.md").read_text()
    assert all(f"| `{name}` |" in guide for name in ROUTERS), "docs/routers.md should describe every router"


# ---- running them ----------------------------------------------------------------------------------------------


def tiny(workspace: Path) -> tuple[list[str], list[str], list[str]]:
    """``tests/tiny.py``'s overrides, as (data, model, trainer) dot-lists; the number of experts stays the
    config's (dense stays dense)."""
    everything = tiny_overrides(workspace)
    data = [o for o in everything if o.startswith("data.")]
    model = [o for o in everything if o.startswith("model.") and not o.startswith("model.arch.num_experts=")]
    trainer = [o for o in everything if o.startswith("trainer.")]
    return data, model, trainer


EVAL = ["trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "trainer.num_sanity_val_steps=0"]


def fit_steps(steps: int) -> list[str]:
    return [f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", *EVAL]


def overrides(words: list[str], workspace: Path) -> list[str]:
    """What is appended to a documented command so that it runs in a second or two."""
    data, model, trainer = tiny(workspace)
    command, args = words[1], words[2:]
    if command == "fit":
        fresh = (
            all(c.startswith("configs/") for c in option_values(args, "--config"))
            and option_value(args, "--ckpt") is None
            and not any(a.startswith("model.init_from=") for a in args)
        )
        # one step (a resumed run: one more than the fixture's two), no validation: last.ckpt is written
        steps = [f"trainer.max_steps={3 if option_value(args, '--ckpt') else 1}", "trainer.limit_val_batches=0"]
        return [*data, *(model if fresh else []), *trainer, *steps]
    if command in ("validate", "test"):
        return [*data, *EVAL]
    if command == "analyze":
        return ["--max-batches", "1", *(a for o in data for a in ("--data", o.removeprefix("data.")))]
    if command == "inspect":
        return ["--max-tokens", "64"]
    if command == "generate":
        return ["--max-new-tokens", "4"]
    if command == "eval":
        return ["--limit", "2"]
    if command == "export":
        return ["--overwrite"] if "--push-to-hub" not in args else []
    if command == "sweep":  # one run of the grid (the first label of every key), shrunk
        shrink = [a for o in (*data, *model, *trainer, *fit_steps(2)) for a in ("--set", o)]
        return [*shrink, *(a for label in first_labels(ROOT / args[0]) for a in ("--only", label))]
    return []


def first_labels(sweep_file: Path) -> list[str]:
    """``key=<its first label>`` for every key of a sweep file's grid: ``--only`` them, and one run is left
    (``tests/test_sweep.py`` runs whole grids; here one run shows the documented command works)."""
    if not sweep_file.is_file():
        return []
    grid = yaml.safe_load(sweep_file.read_text()).get("grid") or {}
    return [f"{key}={next(iter(labels))}" for key, labels in grid.items() if labels]


def rmoe_main_exit_code(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as exit_info:
        return exit_info.code or 0
    return 0


def run_rmoe(words: list[str], workspace: Path, capsys, where: str) -> None:
    capsys.readouterr()
    code = rmoe_main_exit_code([*words[1:], *overrides(words, workspace)])
    err = capsys.readouterr().err
    if code:
        tail = "\n".join(err.strip().splitlines()[-15:])
        pytest.fail(f"{where}: `{shlex.join(words)}` exited {code}:\n{tail}", pytrace=False)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A working folder with ``configs/`` and the user's files, where the run the examples read is trained."""
    workspace = tmp_path_factory.mktemp("docs")
    (workspace / "configs").symlink_to(ROOT / "configs")
    for name, text in FILES.items():
        (workspace / name).write_text(text)
    data, model, trainer = tiny(workspace)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workspace)
        quick = ["fit", "--config", "configs/base.yaml", "--config", "configs/quick.yaml"]
        main([*quick, *data, *model, *trainer, *fit_steps(2)])
    assert (workspace / QUICK_RUN / "checkpoints/last.ckpt").exists()
    return workspace


def _with_marks(block):
    """A block that runs a sweep is slow (whole runs): the inner loop leaves it out."""
    slow = any(words[:2] == ["rmoe", "sweep"] for words in command_lines(block.text))
    return pytest.param(block, marks=pytest.mark.slow, id=block.where) if slow else pytest.param(block, id=block.where)


@pytest.mark.parametrize("block", [_with_marks(b) for b in runnable_blocks()])
def test_documented_commands_run(block, workspace, capsys, monkeypatch):
    monkeypatch.chdir(workspace)
    for words in command_lines(block.text):
        run_rmoe(words, workspace, capsys, block.where)


def not_run_sweeps() -> list[tuple[str, list[str]]]:
    return [
        (b.where, words)
        for b in rmoe_blocks()
        if not_run_reason(b) is not None
        for words in command_lines(b.text)
        if words[:2] == ["rmoe", "sweep"] and (ROOT / words[2]).exists()
    ]


@pytest.mark.parametrize("where, words", not_run_sweeps(), ids=[w for w, _ in not_run_sweeps()])
def test_a_sweep_that_is_not_run_still_expands(where, words, workspace, capsys, monkeypatch):
    """Its file, labels and options as documented, expanded with ``--dry-run`` (nothing is trained)."""
    monkeypatch.chdir(workspace)
    assert rmoe_main_exit_code([*words[1:], "--dry-run"]) == 0, f"{where}: `{shlex.join(words)} --dry-run` failed"
    assert "run(s) under" in capsys.readouterr().out, f"{where}: `{shlex.join(words)}` expands to no run"
