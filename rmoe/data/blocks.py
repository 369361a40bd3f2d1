"""Tokenise documents and pack them into fixed-length blocks, cached as Arrow files by ``datasets``.

A split's token stream is every document's ids followed by one ``<eos>``. Block ``i`` is
``stream[i * block_size : (i + 1) * block_size + 1]`` (stride ``block_size``), so with input = ``block[:-1]``
and target = ``block[1:]`` every token after the first is a target exactly once. The tail that does not fill a
block is dropped in every split, so no padding or masking is needed.

Both steps are ``Dataset.map`` with an explicit ``cache_file_name`` (``tokens.arrow``, one row per document;
``blocks-{block_size}.arrow``, one row per block), written atomically and loaded back memory-mapped.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rmoe.data.tokenizer import Tokenizer


@dataclass(frozen=True)
class SplitStats:
    """Sizes of one split: documents, UTF-8 bytes, tokens (one ``<eos>`` per document included), blocks."""

    num_documents: int
    num_bytes: int
    num_tokens: int
    num_blocks: int

    @property
    def bytes_per_token(self) -> float:
        """``num_bytes / num_tokens``: multiply a loss in nats/token by ``1 / (ln 2 * this)`` for bits/byte."""
        return self.num_bytes / self.num_tokens

    def save(self, path: Path) -> None:
        """Write as JSON, atomically (the file's existence marks a finished cache entry)."""
        temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        temporary.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        os.replace(temporary, path)

    @classmethod
    def load(cls, path: Path) -> SplitStats:
        """Read a file written by :meth:`save`."""
        return cls(**json.loads(path.read_text(encoding="utf-8")))


def token_dtype(vocab_size: int) -> str:
    """Smallest Arrow/numpy integer type that holds every id."""
    return "uint16" if vocab_size <= 1 << 16 else "int32"


def pack(stream: np.ndarray, block_size: int) -> np.ndarray:
    """Blocks ``(N, block_size + 1)`` of ``stream`` with stride ``block_size``, tail dropped: a read-only view."""
    num_blocks = max((len(stream) - 1) // block_size, 0)
    if num_blocks == 0:
        return np.empty((0, block_size + 1), dtype=stream.dtype)
    used = stream[: num_blocks * block_size + 1]
    return np.lib.stride_tricks.sliding_window_view(used, block_size + 1)[::block_size]


def _list_feature(dtype: str, length: int = -1) -> Any:
    import datasets

    list_type = getattr(datasets, "List", None) or datasets.Sequence  # List is new in datasets 4
    return list_type(datasets.Value(dtype), length=length)


def tokenize_documents(documents: Any, tokenizer: Tokenizer, path: Path, batch_size: int = 256) -> Any:
    """Tokenise every document of a ``text`` dataset, cached at ``path`` (reused if it exists).

    Returns:
        A dataset with columns ``ids`` (the document's ids then ``<eos>``) and ``num_bytes``.
    """
    import datasets
    import pyarrow as pa

    dtype = np.dtype(token_dtype(tokenizer.vocab_size))
    eos = np.array([tokenizer.eos_id], dtype=dtype)

    def tokenize(batch: dict[str, list[str]]) -> pa.Table:
        texts = batch["text"]
        arrays = tokenizer.encode_batch(texts)
        lengths = np.array([len(ids) + 1 for ids in arrays], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        values = np.concatenate([part for ids in arrays for part in (ids.astype(dtype), eos)])
        return pa.table(
            {
                "ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
                "num_bytes": pa.array([len(text.encode("utf-8")) for text in texts], type=pa.int64()),
            }
        )

    features = datasets.Features({"ids": _list_feature(dtype.name), "num_bytes": datasets.Value("int64")})
    return documents.map(
        tokenize,
        batched=True,
        batch_size=batch_size,
        remove_columns=documents.column_names,
        features=features,
        cache_file_name=str(path),
        new_fingerprint=_fingerprint(path),
        desc=f"tokenize {path.parent.name}",
    )


class _Packer:
    """Stateful ``map`` function: packs the stream across batches, carrying the unfinished tail."""

    def __init__(self, block_size: int, dtype: np.dtype) -> None:
        self.block_size = block_size
        self.tail = np.empty(0, dtype=dtype)

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        ids = batch.column("ids").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        stream = np.concatenate([self.tail, ids.astype(self.tail.dtype, copy=False)])
        blocks = pack(stream, self.block_size)
        self.tail = stream[len(blocks) * self.block_size :].copy()
        values = pa.array(np.ascontiguousarray(blocks).reshape(-1))
        return pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(values, self.block_size + 1)})


def pack_tokens(tokens: Any, block_size: int, path: Path, batch_size: int = 1000) -> Any:
    """Pack a ``tokenize_documents`` result into an ``input_ids`` column of ``block_size + 1`` ids per row;
    cached at ``path`` (reused if it exists)."""
    import datasets

    dtype = tokens.features["ids"].feature.dtype
    features = datasets.Features({"input_ids": _list_feature(dtype, block_size + 1)})
    return (
        tokens.with_format("arrow")
        .map(
            _Packer(block_size, np.dtype(dtype)),
            batched=True,
            batch_size=batch_size,
            remove_columns=tokens.column_names,
            features=features,
            cache_file_name=str(path),
            new_fingerprint=_fingerprint(path),
            desc=f"pack {path.parent.name}",
        )
        .with_format(None)
    )


def token_stats(tokens: Any) -> tuple[int, int, int]:
    """``(num_documents, num_bytes, num_tokens)`` of a ``tokenize_documents`` result, read from Arrow."""
    import pyarrow.compute as pc

    table = tokens.data.table if hasattr(tokens.data, "table") else tokens.data
    num_tokens = pc.sum(pc.list_value_length(table.column("ids"))).as_py() or 0
    num_bytes = pc.sum(table.column("num_bytes")).as_py() or 0
    return len(tokens), int(num_bytes), int(num_tokens)


def _fingerprint(path: Path) -> str:
    """A ``datasets`` fingerprint from the cache path (which already encodes every setting)."""
    import hashlib

    return hashlib.sha256(str(path).encode("utf-8")).hexdigest()[:32]


class BlockDataset(torch.utils.data.Dataset):
    """Packed blocks as ``LongTensor``; ``__getitems__`` gathers a whole batch with one Arrow gather."""

    def __init__(self, blocks: Any) -> None:
        """Wrap a ``pack_tokens`` result (memory-mapped; pickles by file path for worker processes)."""
        self.blocks = blocks.with_format("arrow")

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        """The blocks at ``indices`` as ``(block_size + 1,)`` LongTensors (the default collate stacks them)."""
        table = self.blocks[list(indices)]
        ids = table.column("input_ids").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return list(torch.from_numpy(ids.astype(np.int64)).view(len(indices), -1).unbind(0))
