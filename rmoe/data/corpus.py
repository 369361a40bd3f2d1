"""Corpora: where the documents of the train / val / test splits come from.

Constructing a corpus only lists and checks its inputs (bad input fails early); :meth:`Corpus.load` reads the
text: per split, a ``datasets.Dataset`` with one ``text`` column, one row per document. ``identity(split)`` keys
the caches per split, so editing a validation file does not invalidate the training split's cache.

Sources: ``stdlib`` (the interpreter's standard library ``.py`` files, no network), ``files`` (local UTF-8
text files, one document per file) and the hub presets of :data:`PRESETS` (network needed once).
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import os
import re
import sysconfig
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rmoe.errors import RmoeError, check_choice

SPLITS = ("train", "val", "test")
HF_SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}
# Share of the text carved out of the training text for each eval split that has no files of its own.
CARVED_FRACTION = 0.05


class Corpus(ABC):
    """The documents of the three splits."""

    @abstractmethod
    def identity(self, split: str) -> dict[str, Any]:
        """A JSON-able description of ``split``; it changes whenever the split's text could change."""

    @abstractmethod
    def load(self, hub_cache: Path) -> dict[str, Any]:
        """A ``datasets.Dataset`` with a ``text`` column for each of :data:`SPLITS`; ``hub_cache`` is
        ``datasets.load_dataset``'s cache directory."""


# --------------------------------------------------------------------------------------------
# stdlib


# Directory names never read: test suites, installed packages, build artefacts.
STDLIB_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib-dynload"}
)


def stdlib_split(relative_path: str) -> str:
    """The split of a stdlib file, 90% / 5% / 5% by sha256 of its relative POSIX path (``hash()`` is randomised)."""
    bucket = int.from_bytes(hashlib.sha256(relative_path.encode("utf-8")).digest()[:8], "big") % 100
    if bucket < 90:
        return "train"
    return "val" if bucket < 95 else "test"


def list_stdlib_files(root: Path) -> list[str]:
    """Sorted relative POSIX paths of the ``.py`` files under ``root``, skipping :data:`STDLIB_EXCLUDED_DIRS`
    and ``config-*`` (build configuration) directories."""
    found = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(
            name for name in subdirectories if name not in STDLIB_EXCLUDED_DIRS and not name.startswith("config-")
        )
        relative = Path(directory).relative_to(root)
        found.extend((relative / name).as_posix() for name in files if name.endswith(".py"))
    return sorted(found)


class StdlibCorpus(Corpus):
    """The Python standard library's source, one document per ``.py`` file, split by :func:`stdlib_split`
    (the same on every machine with the same Python), in sorted path order; blank or non-UTF-8 files are skipped.
    """

    def __init__(self, root: str | None = None) -> None:
        """List the files under ``root`` (default: ``sysconfig.get_paths()["stdlib"]``)."""
        self.root = Path(root or sysconfig.get_paths()["stdlib"])
        if not self.root.is_dir():
            raise RmoeError(f"The standard library directory {str(self.root)!r} does not exist.")
        self.files = list_stdlib_files(self.root)
        self._file_stats = {split: hashlib.sha256() for split in SPLITS}
        for name in self.files:
            stat = (self.root / name).stat()
            self._file_stats[stdlib_split(name)].update(f"{name}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())

    def identity(self, split: str) -> dict[str, Any]:
        """The root, the split rule and the path, size and mtime of every file of the split."""
        files = self._file_stats[split].hexdigest()
        return {"kind": "stdlib", "root": str(self.root), "split": split, "split_rule": "sha256-90-5-5", "files": files}

    def split_files(self, split: str) -> list[str]:
        """Relative paths of the files of ``split`` (before skipping empty or non-UTF-8 files)."""
        return [name for name in self.files if stdlib_split(name) == split]

    def load(self, hub_cache: Path) -> dict[str, Any]:
        from datasets import Dataset

        documents: dict[str, list[str]] = {split: [] for split in SPLITS}
        for name in self.files:
            try:
                text = (self.root / name).read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if text.strip():
                documents[stdlib_split(name)].append(text)
        return {split: Dataset.from_dict({"text": texts}) for split, texts in documents.items()}


# --------------------------------------------------------------------------------------------
# files


def resolve_files(key: str, patterns: Sequence[str]) -> list[Path]:
    """Expand ``~`` and globs (``**`` allowed) into existing files, in order, without duplicates.

    Raises:
        RmoeError: A path that is not a file, or a glob that matches no file.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    resolved: list[Path] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if any(char in expanded for char in "*?["):
            matches = sorted(path for path in glob.glob(expanded, recursive=True) if os.path.isfile(path))
            if not matches:
                raise RmoeError(f"{key}: the pattern {pattern!r} matches no file.")
        elif not os.path.isfile(expanded):
            raise RmoeError(f"{key}: {pattern!r} is not an existing file (looked for {os.path.abspath(expanded)}).")
        else:
            matches = [expanded]
        for match in matches:
            path = Path(match).resolve()
            if path not in resolved:
                resolved.append(path)
    return resolved


def check_text_file(key: str, path: Path, chunk_size: int = 1 << 24) -> str:
    """The sha256 of ``path``'s bytes; RmoeError (naming the byte offset) if it is not valid UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    digest = hashlib.sha256()
    offset = 0
    with path.open("rb") as file:
        while True:
            chunk = file.read(chunk_size)
            final = not chunk
            pending = len(decoder.getstate()[0])  # bytes of an unfinished character carried over
            try:
                decoder.decode(chunk, final=final)
            except UnicodeDecodeError as error:
                raise RmoeError(
                    f"{key}: {str(path)!r} is not valid UTF-8: byte {offset - pending + error.start} "
                    f"({error.reason}). Expected UTF-8 text; convert it, e.g. with iconv."
                ) from error
            if final:
                break
            digest.update(chunk)
            offset += len(chunk)
    return digest.hexdigest()


def check_not_all_empty(key: str, paths: Sequence[Path]) -> None:
    """An empty file among others is one empty document; a split whose every file is empty has no text."""
    if paths and all(path.stat().st_size == 0 for path in paths):
        names = ", ".join(repr(str(path)) for path in paths[:3]) + (" ..." if len(paths) > 3 else "")
        what = "is empty" if len(paths) == 1 else "are all empty"
        raise RmoeError(f"{key}: {names} {what}; expected a file with text.")


def split_text(documents: Sequence[str], fractions: Sequence[float]) -> list[list[str]]:
    """Cut the concatenated ``documents`` into consecutive parts with the given shares (summing to 1) of characters.

    Each cut moves forward to just after the next newline (in one long line: the next whitespace, else it stays);
    a document that straddles a cut becomes two. The parts, concatenated, give back the input. Returns one list of
    documents per part (possibly empty for tiny inputs).
    """
    total = sum(len(document) for document in documents)
    bounds, cumulative = [], 0.0
    for fraction in fractions[:-1]:
        cumulative += fraction
        bounds.append(int(total * cumulative))
    parts: list[list[str]] = [[] for _ in fractions]
    part, document_start = 0, 0
    for document in documents:
        position = 0
        while part < len(bounds) and bounds[part] < document_start + len(document):
            cut = max(bounds[part] - document_start, position)
            if cut > 0 and document[cut - 1] != "\n":
                newline = document.find("\n", cut)
                if newline >= 0:
                    cut = newline + 1
                else:  # one long line: the next word boundary, else right here
                    space = next((i for i in range(cut, min(len(document), cut + 1000)) if document[i].isspace()), -1)
                    cut = space + 1 if space >= 0 else cut
            if cut > position:
                parts[part].append(document[position:cut])
            position = cut
            part += 1
        if position < len(document):
            parts[part].append(document[position:])
        document_start += len(document)
    return parts


class FilesCorpus(Corpus):
    """Local UTF-8 text files, one document per file (``load_dataset("text", sample_by="document")``), with
    line endings normalised to ``\\n``.

    A missing ``val_files`` / ``test_files`` split is carved out of the END of the training text (in file order):
    cuts at 90% / 95% of its characters (95% when only one is missing), moved forward to a line break. Caps
    (``max_*_bytes``) apply after carving, so they never change which text is held out.
    """

    def __init__(
        self, train_files: Sequence[str] | None, val_files: Sequence[str] | None, test_files: Sequence[str] | None
    ) -> None:
        """Resolve and check every file (exists, non-empty, valid UTF-8)."""
        if not train_files:
            raise RmoeError(
                "data.source='files' needs data.train_files: a list of text files or globs (val_files and test_files "
                "are optional; missing ones are carved out of the end of the training text)."
            )
        given = {"train": train_files, "val": val_files, "test": test_files}
        self.files: dict[str, list[Path] | None] = {
            split: resolve_files(f"data.{split}_files", patterns) if patterns else None
            for split, patterns in given.items()
        }
        self.digests = {
            split: [check_text_file(f"data.{split}_files", path) for path in paths] if paths is not None else None
            for split, paths in self.files.items()
        }
        for split, paths in self.files.items():
            if paths is not None:
                check_not_all_empty(f"data.{split}_files", paths)
        self.carved = [split for split in ("val", "test") if self.files[split] is None]

    def identity(self, split: str) -> dict[str, Any]:
        """The sha256 of the split's files; for train and carved splits, of the train files + what is carved."""
        if split == "train" or split in self.carved:
            rule = f"end-{CARVED_FRACTION}-newline-space"
            return {
                "kind": "files",
                "split": split,
                "sha256": self.digests["train"],
                "carved": self.carved,
                "rule": rule,
            }
        return {"kind": "files", "split": split, "sha256": self.digests[split]}

    def load(self, hub_cache: Path) -> dict[str, Any]:
        import datasets

        data_files = {HF_SPLIT_NAMES[split]: [str(p) for p in paths] for split, paths in self.files.items() if paths}
        # datasets keeps its own copy of the text, regenerated when a file's path or mtime changes.
        loaded = datasets.load_dataset("text", data_files=data_files, sample_by="document", cache_dir=str(hub_cache))
        splits = {split: loaded[name] for split, name in HF_SPLIT_NAMES.items() if name in loaded}
        if self.carved:
            fractions = [1 - CARVED_FRACTION * len(self.carved)] + [CARVED_FRACTION] * len(self.carved)
            parts = split_text(splits["train"]["text"], fractions)
            for split, documents in zip(["train", *self.carved], parts):
                if not any(documents):
                    raise RmoeError(
                        f"data.train_files: the training text is too short to carve a {split} split out of its end; "
                        f"give data.{split}_files, or more text."
                    )
                splits[split] = datasets.Dataset.from_dict({"text": documents})
        return splits


# --------------------------------------------------------------------------------------------
# hub presets


@dataclass(frozen=True)
class HubPreset:
    """A corpus on the Hugging Face hub.

    Attributes:
        to_splits: Turns the loaded ``DatasetDict`` into our three splits of documents.
        revision: Git revision to load (``None``: the default branch).
        fallback_revision: Tried when ``revision`` fails (script datasets that ``datasets>=4`` cannot run are
            often available as parquet on ``refs/convert/parquet``).
    """

    path: str
    config: str | None
    to_splits: Callable[[Any], dict[str, Any]]
    description: str
    revision: str | None = None
    fallback_revision: str | None = None


_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")


def _iter_texts(dataset: Any, batch_size: int = 10_000) -> Iterator[str]:
    for batch in dataset.iter(batch_size=batch_size):
        yield from batch["text"]


def wikitext_articles(lines: Any) -> Any:
    """Group WikiText lines into one document per article (an article starts at a `` = Title = `` line)."""
    from datasets import Dataset

    articles: list[str] = []
    current: list[str] = []
    has_text = False
    for line in _iter_texts(lines):
        line = line if line.endswith("\n") else line + "\n"
        if has_text and _WIKITEXT_TITLE.match(line.rstrip("\n")):
            articles.append("".join(current))
            current, has_text = [], False
        current.append(line)
        has_text = has_text or bool(line.strip())
    if has_text:
        articles.append("".join(current))
    return Dataset.from_dict({"text": articles})


def _wikitext_splits(loaded: Any) -> dict[str, Any]:
    return {split: wikitext_articles(loaded[name]) for split, name in HF_SPLIT_NAMES.items()}


# Bytes of the train and val splits of enwik8; test is the rest (5M of the 1e8 bytes).
ENWIK8_SPLIT_BYTES = (90_000_000, 5_000_000)


def _char_start(data: bytes, index: int) -> int:
    """Move ``index`` back to the first byte of a UTF-8 character."""
    while 0 < index < len(data) and data[index] & 0xC0 == 0x80:
        index -= 1
    return index


def _enwik8_splits(loaded: Any) -> dict[str, Any]:
    """The standard enwik8 split: first 90M bytes train, next 5M val, last 5M test (one document each)."""
    from datasets import Dataset

    data = "".join(_iter_texts(loaded["train"])).encode("utf-8")
    train_end, val_end = ENWIK8_SPLIT_BYTES[0], ENWIK8_SPLIT_BYTES[0] + ENWIK8_SPLIT_BYTES[1]
    cuts = [0, _char_start(data, train_end), _char_start(data, val_end), len(data)]
    return {
        split: Dataset.from_dict({"text": [data[start:end].decode("utf-8")]})
        for split, start, end in zip(SPLITS, cuts[:-1], cuts[1:])
    }


def _tinystories_splits(loaded: Any) -> dict[str, Any]:
    """TinyStories' train split; its validation split halved by row: first half val, second half test."""
    validation = loaded["validation"].select_columns(["text"])
    half = len(validation) // 2
    return {
        "train": loaded["train"].select_columns(["text"]),
        "val": validation.select(range(half)),
        "test": validation.select(range(half, len(validation))),
    }


PRESETS: dict[str, HubPreset] = {
    "wikitext-103": HubPreset(
        "Salesforce/wikitext", "wikitext-103-raw-v1", _wikitext_splits, "WikiText-103 (raw), one document per article"
    ),
    "enwik8": HubPreset(
        "LTCB/enwik8",
        "enwik8-raw",
        _enwik8_splits,
        "enwik8 (first 1e8 bytes of Wikipedia XML), standard 90M/5M/5M byte split",
        fallback_revision="refs/convert/parquet",
    ),
    "tinystories": HubPreset(
        "roneneldan/TinyStories",
        None,
        _tinystories_splits,
        "TinyStories, one story per document; test = 2nd half of val",
    ),
}


class HubCorpus(Corpus):
    """A preset from :data:`PRESETS`, downloaded with ``datasets.load_dataset`` on first use."""

    def __init__(self, name: str) -> None:
        """Look up preset ``name`` (nothing is downloaded here)."""
        check_choice("data.source", name, PRESETS)
        self.name = name
        self.preset = PRESETS[name]

    def identity(self, split: str) -> dict[str, Any]:
        """The preset's repository, configuration and revision (a changed hub dataset needs a new cache_dir)."""
        p = self.preset
        return {
            "kind": "hub",
            "split": split,
            "preset": self.name,
            "path": p.path,
            "config": p.config,
            "revision": p.revision,
        }

    def load(self, hub_cache: Path) -> dict[str, Any]:
        import datasets

        preset = self.preset
        revisions = [preset.revision] + ([preset.fallback_revision] if preset.fallback_revision else [])
        errors = []
        for revision in revisions:
            try:
                loaded = datasets.load_dataset(preset.path, preset.config, revision=revision, cache_dir=str(hub_cache))
            except Exception as error:  # network, missing script support, ...: report them all below
                errors.append(f"revision {revision or 'default'}: {error}")
                continue
            return preset.to_splits(loaded)
        raise RmoeError(
            f"data.source={self.name!r}: could not load the hub dataset {preset.path!r} (config {preset.config!r}). "
            f"It needs network access once (then it is cached under {hub_cache}). Errors: {'; '.join(errors)}"
        )


SOURCES = ("stdlib", "files", *PRESETS)


def build_corpus(
    source: str,
    train_files: Sequence[str] | None = None,
    val_files: Sequence[str] | None = None,
    test_files: Sequence[str] | None = None,
) -> Corpus:
    """The corpus named ``source``, its inputs checked; RmoeError for an unknown source, bad files, or files
    given to a source that does not read them."""
    check_choice("data.source", source, SOURCES)
    if source == "files":
        return FilesCorpus(train_files, val_files, test_files)
    files = {"data.train_files": train_files, "data.val_files": val_files, "data.test_files": test_files}
    given = [key for key, value in files.items() if value]
    if given:
        raise RmoeError(
            f"{', '.join(given)} only apply to data.source='files', but data.source={source!r}; "
            "remove them or set data.source='files'."
        )
    if source == "stdlib":
        return StdlibCorpus()
    return HubCorpus(source)


def take_prefix(documents: Any, max_bytes: int | None) -> Any:
    """The first ``max_bytes`` UTF-8 bytes (None: all) of a ``text`` dataset, cut at a character boundary."""
    if max_bytes is None:
        return documents
    from datasets import Dataset

    kept: list[str] = []
    remaining = max_bytes
    for text in _iter_texts(documents, batch_size=1000):
        data = text.encode("utf-8")
        if len(data) >= remaining:
            kept.append(data[:remaining].decode("utf-8", errors="ignore"))
            break
        kept.append(text)
        remaining -= len(data)
    return Dataset.from_dict({"text": [text for text in kept if text]})
