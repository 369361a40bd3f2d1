"""Tokenizers: raw UTF-8 bytes, a byte-level BPE trained on the corpus, or any transformers tokenizer.

A saved tokenizer directory holds ``rmoe_tokenizer.json`` (its kind) next to the tokenizer's own files, so
:func:`build_tokenizer` loads it back; saved BPE and transformers tokenizers also load with
``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rmoe.errors import RmoeError

META_FILE = "rmoe_tokenizer.json"
EOS_TOKEN = "<eos>"
PAD_TOKEN = "<pad>"
# 256 byte values + <eos> + <pad>: the smallest vocabulary a byte-level BPE can have.
MIN_BPE_VOCAB_SIZE = 258


class Tokenizer(ABC):
    """Text <-> token ids, with an end-of-document id ``eos_id`` placed after every document.

    Attributes:
        kind: ``"byte"``, ``"bpe"`` or ``"hf"``.
        vocab_size: Every id is ``< vocab_size``.
        pad_id: Id for padding (never produced by ``encode``).
    """

    kind: str
    vocab_size: int
    eos_id: int
    pad_id: int

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of ``text``, without any special token."""

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Ids of each text as 1-D integer arrays, without special tokens (the fast path)."""
        return [np.asarray(self.encode(text), dtype=np.int64) for text in texts]

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special ids are skipped."""

    def unencodable(self, text: str) -> list[str]:
        """The distinct characters of ``text`` mapped to an unknown token, in order of appearance (``[]`` for
        the byte-level tokenizers)."""
        return []

    @abstractmethod
    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write the tokenizer to ``directory`` (created if needed) so it can be loaded back."""

    @property
    @abstractmethod
    def fingerprint(self) -> str:
        """A string that changes whenever ``encode`` could give different ids."""

    def _write_meta(self, directory: Path, **extra: Any) -> None:
        meta = {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id, "pad_id": self.pad_id}
        (directory / META_FILE).write_text(json.dumps({**meta, **extra}, indent=2) + "\n", encoding="utf-8")


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: ids 0..255 are the bytes, 256 is ``<eos>``, 257 is ``<pad>`` (vocab 258)."""

    kind = "byte"
    vocab_size = 258
    eos_id = 256
    pad_id = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike[str]) -> None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self._write_meta(path)

    @property
    def fingerprint(self) -> str:
        return "byte-v1"


class BpeTokenizer(Tokenizer):
    """A byte-level BPE (GPT-2 style pre-tokenisation) from ``tokenizers``: ``<eos>`` and ``<pad>`` are ids 0
    and 1, and the 256 byte symbols are always in the vocabulary, so any text can be encoded."""

    kind = "bpe"

    def __init__(self, backend: Any) -> None:
        """Wrap a trained ``tokenizers.Tokenizer`` that has ``<eos>`` and ``<pad>`` tokens."""
        self.backend = backend
        self.vocab_size = backend.get_vocab_size()
        self.eos_id = backend.token_to_id(EOS_TOKEN)
        self.pad_id = backend.token_to_id(PAD_TOKEN)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BpeTokenizer:
        """Train on ``texts`` (deterministic for the same texts in the same order). ``vocab_size`` includes the
        byte alphabet and the two specials; the result can be smaller when there are too few pairs to merge."""
        from tokenizers import Tokenizer as Backend
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if vocab_size < MIN_BPE_VOCAB_SIZE:
            raise RmoeError(
                f"bpe_vocab_size={vocab_size} is too small; a byte-level BPE needs at least "
                f"{MIN_BPE_VOCAB_SIZE} (256 bytes + <eos> + <pad>)."
            )
        backend = Backend(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=[EOS_TOKEN, PAD_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer)
        return cls(backend)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> BpeTokenizer:
        """Load a tokenizer written by :meth:`save`."""
        from tokenizers import Tokenizer as Backend

        return cls(Backend.from_file(str(Path(directory) / "tokenizer.json")))

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self.backend.encode_batch_fast(list(texts))
        return [np.asarray(encoding.ids, dtype=np.int64) for encoding in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write ``tokenizer.json`` as a ``transformers`` fast-tokenizer directory plus our meta file."""
        from tokenizers import Tokenizer as Backend
        from transformers import PreTrainedTokenizerFast

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        copy = Backend.from_str(self.backend.to_str())  # the wrapper may change padding/truncation settings
        wrapper = PreTrainedTokenizerFast(tokenizer_object=copy, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
        wrapper.save_pretrained(str(path))
        # save_pretrained may re-serialise; keep the exact backend we trained as the source of truth.
        self.backend.save(str(path / "tokenizer.json"))
        self._write_meta(path)

    @property
    def fingerprint(self) -> str:
        return "bpe-" + hashlib.sha256(self.backend.to_str().encode("utf-8")).hexdigest()[:24]


class HfTokenizer(Tokenizer):
    """A ``transformers`` tokenizer loaded with ``AutoTokenizer.from_pretrained``.

    A tokenizer without an ``eos_token`` (BERT, for example) gets ``<eos>`` added, so ``vocab_size``
    (``len(tokenizer)``) grows by one. ``pad_id`` is the pad token, else ``eos_id``.
    """

    kind = "hf"

    def __init__(self, name: str, backend: Any) -> None:
        self.name = name
        self.backend = backend
        if backend.eos_token_id is None:
            backend.add_special_tokens({"eos_token": EOS_TOKEN})
        self.eos_id = int(backend.eos_token_id)
        self.pad_id = int(backend.pad_token_id) if backend.pad_token_id is not None else self.eos_id
        self.vocab_size = len(backend)

    @classmethod
    def load(cls, name: str) -> HfTokenizer:
        """Load ``name``: a local directory, a hub name in the local hub cache, or (with network) any hub name."""
        from transformers import AutoTokenizer

        hint = (
            f"tokenizer={name!r} could not be loaded with transformers.AutoTokenizer. Expected 'byte', 'bpe', "
            "a local tokenizer directory (with tokenizer.json or the tokenizer's vocabulary files), or a hub "
            "name that is already in the local Hugging Face cache (or reachable over the network)."
        )
        if Path(name).expanduser().is_dir():
            try:
                return cls(name, AutoTokenizer.from_pretrained(str(Path(name).expanduser())))
            except Exception as error:
                raise RmoeError(f"{hint} Loading the directory failed: {error}") from error
        try:  # the local hub cache first: never touches the network.
            return cls(name, AutoTokenizer.from_pretrained(name, local_files_only=True))
        except Exception as error:
            offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
            if offline or _looks_like_path(name):
                raise RmoeError(f"{hint} No such local directory, and it is not in the hub cache.") from error
        try:
            return cls(name, AutoTokenizer.from_pretrained(name))
        except Exception as error:
            raise RmoeError(f"{hint} Error: {error}") from error

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False, verbose=False)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encoded = self.backend(list(texts), add_special_tokens=False, return_attention_mask=False, verbose=False)[
            "input_ids"
        ]
        return [np.asarray(ids, dtype=np.int64) for ids in encoded]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def unencodable(self, text: str) -> list[str]:
        """Encodes each distinct non-space character on its own (WordPiece, SentencePiece without byte fallback)."""
        unk = self.backend.unk_token_id
        if unk is None:
            return []
        chars = dict.fromkeys(c for c in text if not c.isspace())
        return [c for c in chars if unk in self.encode(c)]

    def save(self, directory: str | os.PathLike[str]) -> None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save_pretrained(str(path))
        self._write_meta(path, name=self.name)

    @property
    def fingerprint(self) -> str:
        if getattr(self.backend, "is_fast", False):
            content = self.backend.backend_tokenizer.to_str()
        else:
            content = json.dumps(sorted(self.backend.get_vocab().items()))
        content += json.dumps([type(self.backend).__name__, self.eos_id, self.vocab_size])
        return "hf-" + hashlib.sha256(content.encode("utf-8")).hexdigest()[:24]


def _looks_like_path(name: str) -> bool:
    """True for names that can only be local paths (absolute, ``./``, ``~``), not hub ids."""
    return name.startswith(("/", ".", "~", os.sep))


def build_tokenizer(name: str, train_texts: Iterable[str] | None = None, bpe_vocab_size: int = 4096) -> Tokenizer:
    """The tokenizer ``name``: ``"byte"``; ``"bpe"`` (trained on ``train_texts`` with ``bpe_vocab_size``); a
    directory written by :meth:`Tokenizer.save`; or a ``transformers`` tokenizer name or local path.

    Raises:
        RmoeError: ``"bpe"`` without texts, or a tokenizer that cannot be loaded.
    """
    if name == "byte":
        return ByteTokenizer()
    if name == "bpe":
        if train_texts is None:
            raise RmoeError("tokenizer='bpe' must be trained: pass train_texts (the DataModule does this for you).")
        return BpeTokenizer.train(train_texts, bpe_vocab_size)
    meta_path = Path(name).expanduser() / META_FILE
    if meta_path.is_file():
        kind = json.loads(meta_path.read_text(encoding="utf-8")).get("kind")
        if kind == "byte":
            return ByteTokenizer()
        if kind == "bpe":
            return BpeTokenizer.load(meta_path.parent)
        if kind != "hf":
            raise RmoeError(f"{meta_path} has kind={kind!r}; expected one of: bpe, byte, hf.")
    return HfTokenizer.load(name)
