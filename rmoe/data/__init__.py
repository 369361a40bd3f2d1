"""Data: corpora, tokenizers, packed and cached token blocks, and the LightningDataModule."""

from rmoe.data.blocks import SplitStats, pack
from rmoe.data.corpus import PRESETS, SOURCES
from rmoe.data.datamodule import TextDataModule
from rmoe.data.tokenizer import BpeTokenizer, ByteTokenizer, HfTokenizer, Tokenizer, build_tokenizer

__all__ = [
    "PRESETS",
    "SOURCES",
    "BpeTokenizer",
    "ByteTokenizer",
    "HfTokenizer",
    "SplitStats",
    "TextDataModule",
    "Tokenizer",
    "build_tokenizer",
    "pack",
]
