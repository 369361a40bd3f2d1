"""The LightningDataModule: a corpus, a tokenizer and cached packed blocks for train / val / test.

``__init__`` only checks the arguments and builds the tokenizer (bad input fails before any work; ``vocab_size``
is known at once). ``prepare_data`` (one process per node) downloads, trains the BPE and tokenises; ``setup``
(every process) loads the cached blocks. Cache layout under ``cache_dir``::

    hf-datasets/                      datasets.load_dataset's cache (hub presets, text files)
    tokenizers/bpe-<key>/             trained BPE tokenizers
    splits/<split>-<key>/tokens.arrow           one row per document: ids + <eos>
    splits/<split>-<key>/blocks-<B>.arrow       one row per block of B + 1 ids
    splits/<split>-<key>/blocks-<B>.json        SplitStats, written last: marks the entry complete
    splits/<split>-<key>/sha256.json            the sha256 of each Arrow file, checked before it is used
    locks/<kind>-<entry>.lock                   held while an entry is checked or built

``<key>`` hashes everything that changes the split's token stream: the corpus identity, the split, its byte cap
and the tokenizer's fingerprint. The block size is in the file name, so changing it only re-packs the tokens.

Every entry is checked and built under its own lock (``locks/splits-<split>-<key>.lock``; the OS drops it when
its holder dies): processes that share a cache (a sweep with ``--jobs``, two runs started
together) build each entry once and never read, hash or delete the files another is still writing.

A damaged entry (truncated or bit-flipped Arrow file, stats that are not JSON, a missing file) is found before
it is read, warned about, deleted and rebuilt: the cache holds only what can be derived again. The same holds
for a trained BPE tokenizer's folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import filelock
import lightning as L
import torch
from torch.utils.data import DataLoader

from rmoe.data.blocks import BlockDataset, SplitStats, pack_tokens, token_stats, tokenize_documents
from rmoe.data.corpus import SPLITS, Corpus, build_corpus, take_prefix
from rmoe.data.sampler import ResumableDataLoader, ResumableShuffleSampler
from rmoe.data.tokenizer import META_FILE, MIN_BPE_VOCAB_SIZE, BpeTokenizer, Tokenizer, build_tokenizer
from rmoe.errors import RmoeError

CACHE_FORMAT = 2  # bump when the cached format or the meaning of a cache key changes
# The model's vocabulary is the tokenizer's rounded up to a multiple of this (258 -> 320): aligned matmuls are
# faster on GPUs; the extra ids never occur.
VOCAB_MULTIPLE = 64
DEFAULT_BPE_VOCAB_SIZE = 4096
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ()}


def default_cache_dir() -> Path:
    """``$RMOE_CACHE`` if set, else ``~/.cache/rmoe``."""
    return Path(os.environ.get("RMOE_CACHE") or Path.home() / ".cache" / "rmoe").expanduser()


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode("utf-8")).hexdigest()[:20]


DIGESTS_FILE = "sha256.json"  # in every split entry: {file name: sha256} of its Arrow files


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _record_digest(directory: Path, path: Path) -> None:
    """Add ``path``'s sha256 to the entry's :data:`DIGESTS_FILE` (atomically)."""
    digests_path = directory / DIGESTS_FILE
    digests = json.loads(digests_path.read_text(encoding="utf-8")) if digests_path.is_file() else {}
    digests[path.name] = _file_sha256(path)
    temporary = digests_path.with_name(f"{DIGESTS_FILE}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(digests, indent=1) + "\n", encoding="utf-8")
    os.replace(temporary, digests_path)


def _damage(directory: Path, stats_path: Path, blocks_path: Path, tokens_path: Path) -> str | None:
    """What is wrong with a split entry of the cache (None: the files it holds are intact)."""
    digests_path = directory / DIGESTS_FILE
    try:
        digests = json.loads(digests_path.read_text(encoding="utf-8")) if digests_path.is_file() else {}
        if stats_path.is_file():
            SplitStats.load(stats_path)
    except (ValueError, TypeError, UnicodeDecodeError) as err:
        return f"unreadable: {type(err).__name__}"
    complete = stats_path.is_file()
    for path in (tokens_path, blocks_path) if complete else (tokens_path,):
        if not path.is_file():
            if complete:
                return f"{path.name} is missing"
            continue
        if path.name not in digests:
            return f"{path.name} has no recorded sha256"
        if _file_sha256(path) != digests[path.name]:
            return f"{path.name} does not match its sha256"
    return None


@contextmanager
def _entry_lock(directory: Path) -> Iterator[None]:
    """Hold the lock of the cache entry ``directory`` (``<cache>/locks/<kind>-<entry>.lock``, apart from the entry,
    which may be deleted and rebuilt under it); says once on stderr when another process holds it for more than a
    moment (ranks checking one entry in turn wait less), so a long wait is never silent."""
    locks = directory.parent.parent / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(locks / f"{directory.parent.name}-{directory.name}.lock")
    try:
        lock.acquire(timeout=2)
    except filelock.Timeout:
        print(f"rmoe: waiting for another process to finish the data cache entry {directory}", file=sys.stderr)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _check_positive(key: str, value: int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise RmoeError(f"{key}={value!r} is invalid; expected a positive integer{' or None' if allow_none else ''}.")


class TextDataModule(L.LightningDataModule):
    """Language-modelling data: documents -> tokens -> packed blocks of ``block_size + 1`` ids.

    Batches are ``LongTensor`` ``(batch_size, block_size + 1)``: inputs ``[:, :-1]``, targets ``[:, 1:]``.
    Training batches are shuffled (seeded by ``seed``), the last partial one dropped; eval batches are in order,
    the last partial one kept.

    Attributes:
        vocab_size: The model's vocabulary: the tokenizer's (``bpe``: ``bpe_vocab_size``) rounded up to a
            multiple of 64; known right after ``__init__``.
    """

    def __init__(
        self,
        source: str = "stdlib",
        train_files: list[str] | None = None,
        val_files: list[str] | None = None,
        test_files: list[str] | None = None,
        tokenizer: str = "byte",
        bpe_vocab_size: int = DEFAULT_BPE_VOCAB_SIZE,
        block_size: int = 256,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        max_train_bytes: int | None = None,
        max_eval_bytes: int | None = None,
        cache_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        """Check the arguments and build the tokenizer; nothing is read from the corpus or written yet.

        Args:
            source: ``"stdlib"``, ``"files"`` or a hub preset (``"wikitext-103"``, ``"enwik8"``,
                ``"tinystories"``; network needed the first time); see :mod:`rmoe.data.corpus`.
            train_files, val_files, test_files: For ``source="files"``: UTF-8 text files or globs, one document
                per file; a missing eval split is carved out of the end of the training text.
            tokenizer: ``"byte"``, ``"bpe"`` (trained on the train split), or a transformers tokenizer name or
                local directory (also one written by ``save_tokenizer``).
            block_size: Tokens of context per training example.
            eval_batch_size: Validation/test batch size (default: ``batch_size``).
            max_train_bytes, max_eval_bytes: Use only the first this many UTF-8 bytes of the train / eval splits.
            cache_dir: Cache directory (default: ``$RMOE_CACHE`` or ``~/.cache/rmoe``).
            seed: Seed of the training shuffle.
        """
        super().__init__()
        self.save_hyperparameters()
        for key, value in (("data.block_size", block_size), ("data.batch_size", batch_size)):
            _check_positive(key, value)
        for key, value in (
            ("data.eval_batch_size", eval_batch_size),
            ("data.max_train_bytes", max_train_bytes),
            ("data.max_eval_bytes", max_eval_bytes),
        ):
            _check_positive(key, value, allow_none=True)
        if not isinstance(num_workers, int) or num_workers < 0:
            raise RmoeError(f"data.num_workers={num_workers!r} is invalid; expected an integer >= 0.")
        self.source = source
        self.block_size = block_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.max_bytes = {"train": max_train_bytes, "val": max_eval_bytes, "test": max_eval_bytes}
        self.seed = seed
        self.cache_root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.corpus: Corpus = build_corpus(source, train_files, val_files, test_files)

        self._tokenizer: Tokenizer | None = None
        self.bpe_vocab_size = bpe_vocab_size
        if tokenizer == "bpe":
            if bpe_vocab_size < MIN_BPE_VOCAB_SIZE:
                raise RmoeError(
                    f"bpe_vocab_size={bpe_vocab_size} is too small; a byte-level BPE needs at least "
                    f"{MIN_BPE_VOCAB_SIZE} (256 bytes + <eos> + <pad>)."
                )
            tokenizer_vocab_size = bpe_vocab_size
        else:
            if bpe_vocab_size != DEFAULT_BPE_VOCAB_SIZE:
                warnings.warn(
                    f"bpe_vocab_size={bpe_vocab_size} is ignored with tokenizer={tokenizer!r}.",
                    UserWarning,
                    stacklevel=2,
                )
            self._tokenizer = build_tokenizer(tokenizer)
            tokenizer_vocab_size = self._tokenizer.vocab_size
        self.vocab_size = -(-tokenizer_vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE

        self._documents: dict[str, Any] | None = None  # loaded corpus, only while preparing
        self._blocks: dict[str, Any] = {}
        self._stats: dict[str, SplitStats] = {}

    # ----------------------------------------------------------------------------------------
    # tokenizer

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer; for ``bpe`` it is loaded from the cache or trained on first access."""
        if self._tokenizer is None:
            self._tokenizer = self._load_or_train_bpe()
        return self._tokenizer

    def _load_or_train_bpe(self) -> Tokenizer:
        import tokenizers

        key = _digest(
            {
                "format": CACHE_FORMAT,
                "corpus": self.corpus.identity("train"),
                "max_bytes": self.max_bytes["train"],
                "vocab_size": self.bpe_vocab_size,
                "tokenizers": tokenizers.__version__,
            }
        )
        directory = self.cache_root / "tokenizers" / f"bpe-{key}"
        with _entry_lock(directory):
            return self._load_or_train_bpe_locked(directory)

    def _load_or_train_bpe_locked(self, directory: Path) -> Tokenizer:
        if (directory / META_FILE).is_file():
            try:
                return BpeTokenizer.load(directory)
            except Exception as err:
                warnings.warn(f"data cache entry {directory} was damaged ({err}); deleted, training it again.",
                              stacklevel=1)  # fmt: skip
                shutil.rmtree(directory, ignore_errors=True)
        if not (directory / META_FILE).is_file():
            trained = BpeTokenizer.train(_iter_texts(self._load_documents()["train"]), self.bpe_vocab_size)
            temporary = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
            trained.save(temporary)
            shutil.rmtree(directory, ignore_errors=True)  # an incomplete folder a killed process left
            temporary.rename(directory)
        return BpeTokenizer.load(directory)

    def save_tokenizer(self, directory: str) -> None:
        """Write the tokenizer into ``directory`` (``tokenizer=directory`` loads it back)."""
        self.tokenizer.save(directory)

    # ----------------------------------------------------------------------------------------
    # preparing and loading the splits

    def _load_documents(self) -> dict[str, Any]:
        if self._documents is None:
            loaded = self.corpus.load(self.cache_root / "hf-datasets")
            self._documents = {split: take_prefix(loaded[split], self.max_bytes[split]) for split in SPLITS}
        return self._documents

    def _split_dir(self, split: str) -> Path:
        key = _digest(
            {
                "format": CACHE_FORMAT,
                "corpus": self.corpus.identity(split),
                "split": split,
                "max_bytes": self.max_bytes[split],
                "tokenizer": self.tokenizer.fingerprint,
            }
        )
        return self.cache_root / "splits" / f"{split}-{key}"

    def _prepare_split(self, split: str) -> Path:
        """Build the split's cached blocks unless they exist and are intact; return the blocks' Arrow file."""
        directory = self._split_dir(split)
        with _entry_lock(directory):
            return self._prepare_split_locked(split, directory)

    def _prepare_split_locked(self, split: str, directory: Path) -> Path:
        from datasets import Dataset

        blocks_path = directory / f"blocks-{self.block_size}.arrow"
        stats_path = blocks_path.with_suffix(".json")
        tokens_path = directory / "tokens.arrow"
        if directory.is_dir() and (problem := _damage(directory, stats_path, blocks_path, tokens_path)):
            warnings.warn(
                f"data cache entry {directory} was damaged ({problem}); deleted, rebuilding it.", stacklevel=2
            )
            shutil.rmtree(directory, ignore_errors=True)
        if stats_path.is_file():
            return blocks_path
        if tokens_path.is_file():
            tokens = Dataset.from_file(str(tokens_path))
        else:
            tokens = tokenize_documents(self._load_documents()[split], self.tokenizer, tokens_path)
            _record_digest(directory, tokens_path)
        num_documents, num_bytes, num_tokens = token_stats(tokens)
        blocks = pack_tokens(tokens, self.block_size, blocks_path)
        if len(blocks) == 0:
            raise RmoeError(
                f"The {split} split of source={self.source!r} has {num_tokens} tokens, fewer than "
                f"block_size + 1 = {self.block_size + 1}; lower block_size, raise max_*_bytes or give more text."
            )
        _record_digest(directory, blocks_path)
        SplitStats(num_documents, num_bytes, num_tokens, len(blocks)).save(stats_path)
        return blocks_path

    def prepare_data(self) -> None:
        """Download, train the BPE and tokenise + pack every split into the cache (one process per node)."""
        try:
            for split in SPLITS:
                self._prepare_split(split)
        except OSError as err:
            if (error := self._cache_error(err)) is err:
                raise
            raise error from None
        finally:
            self._documents = None

    def _cache_error(self, err: OSError) -> BaseException:
        """A full or unwritable cache as one paragraph naming ``data.cache_dir``; other OS errors as they are."""
        from rmoe.checkpoints import WRITE_ERRNOS, describe_os_error

        if err.errno not in WRITE_ERRNOS:
            return err
        where = err.filename or self.cache_root
        return RmoeError(f"data.cache_dir={str(self.cache_root)!r}: {describe_os_error(err, where, 'write')}")

    def setup(self, stage: str | None = None) -> None:
        """Load the cached blocks of the splits ``stage`` needs (building any that are missing)."""
        from datasets import Dataset

        splits = STAGE_SPLITS.get(stage, SPLITS) if stage else SPLITS
        try:
            for split in splits:
                if split in self._blocks:
                    continue
                blocks_path = self._prepare_split(split)
                self._blocks[split] = Dataset.from_file(str(blocks_path))
                self._stats[split] = SplitStats.load(blocks_path.with_suffix(".json"))
        except OSError as err:
            if (error := self._cache_error(err)) is err:
                raise
            raise error from None
        finally:
            self._documents = None
        if "train" in splits and len(self._blocks["train"]) < self.batch_size:
            raise RmoeError(
                f"The train split has {len(self._blocks['train'])} blocks of block_size={self.block_size}, fewer "
                f"than batch_size={self.batch_size}, so an epoch would have no batch; lower batch_size or block_size."
            )

    def split_stats(self, split: str) -> SplitStats:
        """Documents, bytes, tokens and blocks of ``split`` (``"train"``, ``"val"``, ``"test"``), after ``setup``."""
        if split not in SPLITS:
            raise RmoeError(f"split={split!r} is not a known split; expected one of: {', '.join(SPLITS)}.")
        if split not in self._stats:
            raise RuntimeError(f"The {split} split is not loaded; call setup() first.")
        return self._stats[split]

    def bytes_per_token(self, split: str) -> float:
        """UTF-8 bytes per token (``<eos>`` included) of ``split``, after ``setup``; bits/byte = nats/token /
        (ln 2 * this)."""
        return self.split_stats(split).bytes_per_token

    # ----------------------------------------------------------------------------------------
    # dataloaders

    def _dataloader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        if split not in self._blocks:
            raise RuntimeError(f"The {split} split is not loaded; call setup() first.")
        dataset = BlockDataset(self._blocks[split])
        sampler = (
            ResumableShuffleSampler(len(dataset), batch_size, self.seed, batches_done=self._train_batches_done)
            if shuffle
            else None
        )
        return (ResumableDataLoader if shuffle else DataLoader)(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def _train_batches_done(self, epoch: int) -> int:
        """Batches of ``epoch`` this process already trained on, from the restored optimiser step (non-zero only
        right after resuming mid-epoch, so the run continues with the very next batch)."""
        trainer = self.trainer
        if trainer is None:
            return 0
        per_epoch = len(self._blocks["train"]) // (self.batch_size * trainer.world_size)
        return trainer.global_step * trainer.accumulate_grad_batches - epoch * per_epoch

    def train_dataloader(self) -> DataLoader:
        return self._dataloader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._dataloader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._dataloader("test", self.eval_batch_size, shuffle=False)


def _iter_texts(documents: Any) -> Any:
    for batch in documents.iter(batch_size=1000):
        yield from batch["text"]
