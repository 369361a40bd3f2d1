"""Tests of rmoe.data: tokenizers, corpora and splits, packing, caching and the DataModule."""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import rmoe.data.datamodule as datamodule_module
from rmoe.data import BpeTokenizer, ByteTokenizer, HfTokenizer, TextDataModule, Tokenizer, build_tokenizer, pack
from rmoe.data.blocks import pack_tokens, tokenize_documents
from rmoe.data.corpus import (
    STDLIB_EXCLUDED_DIRS,
    StdlibCorpus,
    check_text_file,
    list_stdlib_files,
    split_text,
    stdlib_split,
)
from rmoe.errors import RmoeError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NON_ASCII = "Grüße aus Köln — naïve café, 日本語のテキスト, emoji 🙂, Ελληνικά.\n"


def make_text(num_lines: int, tag: str) -> str:
    """Deterministic multi-line text with some non-ASCII characters."""
    return "".join(f"{tag} line {i}: the quick fox {i * i % 97} jumps — über café {i % 7}\n" for i in range(num_lines))


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, list[str]]:
    """Two train files, one val and one test file."""
    return {
        "train_files": [
            write(tmp_path / "text" / "train_a.txt", make_text(300, "a")),
            write(tmp_path / "text" / "train_b.txt", make_text(200, "b") + NON_ASCII),
        ],
        "val_files": [write(tmp_path / "text" / "val.txt", make_text(80, "v"))],
        "test_files": [write(tmp_path / "text" / "test.txt", make_text(60, "t"))],
    }


def snapshot(root: Path) -> dict[str, int]:
    """Every file under ``root`` with its modification time."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def stream_of(tokenizer: Tokenizer, texts: list[str]) -> list[int]:
    """The expected token stream: every document followed by <eos>."""
    return [i for text in texts for i in [*tokenizer.encode(text), tokenizer.eos_id]]


# ---------------------------------------------------------------------------------------------
# tokenizers


def test_byte_tokenizer_round_trip(tmp_path: Path) -> None:
    tokenizer = ByteTokenizer()
    assert (tokenizer.vocab_size, tokenizer.eos_id, tokenizer.pad_id) == (258, 256, 257)
    ids = tokenizer.encode(NON_ASCII)
    assert ids == list(NON_ASCII.encode("utf-8"))
    assert len(ids) > len(NON_ASCII)  # multi-byte characters
    assert tokenizer.decode(ids) == NON_ASCII
    assert tokenizer.decode([*ids, tokenizer.eos_id, tokenizer.pad_id]) == NON_ASCII  # specials skipped
    assert [a.tolist() for a in tokenizer.encode_batch([NON_ASCII, "", "x"])] == [ids, [], [120]]
    tokenizer.save(tmp_path / "tok")
    assert isinstance(build_tokenizer(str(tmp_path / "tok")), ByteTokenizer)


def test_bpe_trains_deterministically_saves_and_reloads(tmp_path: Path) -> None:
    texts = [make_text(200, "a"), make_text(100, "b") + NON_ASCII]
    first = BpeTokenizer.train(texts, vocab_size=400)
    second = BpeTokenizer.train(texts, vocab_size=400)
    assert first.backend.to_str() == second.backend.to_str()
    assert 258 < first.vocab_size <= 400
    assert (first.eos_id, first.pad_id) == (0, 1)
    sample = "the quick brown fox — über café 🙂 unseen wörds\n"
    assert first.decode(first.encode(sample)) == sample
    assert len(first.encode(sample)) < len(sample.encode("utf-8"))

    first.save(tmp_path / "bpe")
    loaded = build_tokenizer(str(tmp_path / "bpe"))
    assert isinstance(loaded, BpeTokenizer)
    assert loaded.fingerprint == first.fingerprint
    assert loaded.encode(sample) == first.encode(sample)
    assert [a.tolist() for a in loaded.encode_batch([sample, NON_ASCII])] == [
        first.encode(sample),
        first.encode(NON_ASCII),
    ]
    from transformers import AutoTokenizer  # the saved directory is also a transformers tokenizer

    hf = AutoTokenizer.from_pretrained(str(tmp_path / "bpe"))
    assert hf.encode(sample, add_special_tokens=False) == first.encode(sample)
    assert hf.eos_token == "<eos>"


def test_build_tokenizer_bpe_needs_texts() -> None:
    with pytest.raises(RmoeError, match="train_texts"):
        build_tokenizer("bpe")


def save_hf_tokenizer(directory: Path, with_eos: bool) -> Path:
    """A local transformers tokenizer directory made from a tokenizers-trained BPE (with or without <eos>)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [make_text(300, "hf")]
    if with_eos:
        backend = BpeTokenizer.train(texts, vocab_size=320).backend
        specials = {"eos_token": "<eos>", "pad_token": "<pad>"}
    else:
        backend = Backend(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet))
        specials = {}
    PreTrainedTokenizerFast(tokenizer_object=backend, **specials).save_pretrained(str(directory))
    return directory


def test_local_hf_tokenizer_directory(tmp_path: Path, files: dict[str, list[str]]) -> None:
    directory = save_hf_tokenizer(tmp_path / "hf", with_eos=True)
    dm = TextDataModule(source="files", **files, tokenizer=str(directory), block_size=32, batch_size=4,
                        cache_dir=str(tmp_path / "cache"))  # fmt: skip
    tokenizer = dm.tokenizer
    assert isinstance(tokenizer, HfTokenizer)
    assert tokenizer.eos_id == 0 and tokenizer.vocab_size <= 320 and dm.vocab_size == 320
    assert tokenizer.decode(tokenizer.encode(NON_ASCII)) == NON_ASCII
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    val_text = Path(files["val_files"][0]).read_text(encoding="utf-8")
    assert batch[0].tolist() == stream_of(tokenizer, [val_text])[:33]
    dm.save_tokenizer(str(tmp_path / "saved"))
    reloaded = build_tokenizer(str(tmp_path / "saved"))
    assert isinstance(reloaded, HfTokenizer) and reloaded.fingerprint == tokenizer.fingerprint


def test_hf_tokenizer_without_eos_gets_one(tmp_path: Path) -> None:
    directory = save_hf_tokenizer(tmp_path / "hf", with_eos=False)
    tokenizer = build_tokenizer(str(directory))
    assert tokenizer.vocab_size == 301 and tokenizer.eos_id == 300  # "<eos>" appended as a new special token
    assert tokenizer.decode([*tokenizer.encode("abc"), tokenizer.eos_id]) == "abc"


# ---------------------------------------------------------------------------------------------
# packing


def test_pack_blocks_overlap_by_one_and_cover_the_stream() -> None:
    stream = np.arange(23)
    blocks = pack(stream, block_size=5)
    assert blocks.shape == (4, 6)  # (23 - 1) // 5 blocks; the tail (2 tokens) is dropped
    assert all(blocks[i, -1] == blocks[i + 1, 0] for i in range(len(blocks) - 1))
    recovered = np.concatenate([blocks[0], *[block[1:] for block in blocks[1:]]])
    np.testing.assert_array_equal(recovered, stream[:21])
    targets = np.concatenate([block[1:] for block in blocks])
    np.testing.assert_array_equal(targets, stream[1:21])  # every token is a target exactly once
    assert pack(np.arange(5), block_size=5).shape == (0, 6)


def test_packing_across_map_batches_equals_packing_the_whole_stream(tmp_path: Path) -> None:
    from datasets import Dataset

    texts = [make_text(n, str(n)) for n in (1, 7, 0, 3, 12, 2, 5)] + [NON_ASCII]
    tokenizer = ByteTokenizer()
    tokens = tokenize_documents(Dataset.from_dict({"text": texts}), tokenizer, tmp_path / "tokens.arrow", batch_size=3)
    blocks = pack_tokens(tokens, block_size=16, path=tmp_path / "blocks.arrow", batch_size=2)
    expected = pack(np.array(stream_of(tokenizer, texts)), 16)
    np.testing.assert_array_equal(np.array(blocks["input_ids"]), expected)


# ---------------------------------------------------------------------------------------------
# corpora and splits


def test_stdlib_listing_excludes_test_suites(tmp_path: Path) -> None:
    root = tmp_path / "lib"
    for name in ["os.py", "json/decoder.py", "test/test_os.py", "tests/x.py", "idlelib/idle_test/t.py",
                 "lib2to3/tests/data/bad.py", "site-packages/pkg/m.py", "unittest/test/t.py", "unittest/case.py",
                 "config-3.11-x86_64-linux-gnu/python-config.py", "notes.txt"]:  # fmt: skip
        write(root / name, "x = 1\n")
    assert list_stdlib_files(root) == ["json/decoder.py", "os.py", "unittest/case.py"]


def test_stdlib_split_is_deterministic_disjoint_and_by_file() -> None:
    corpus = StdlibCorpus()
    assert corpus.files == StdlibCorpus().files == sorted(corpus.files)
    assert len(corpus.files) > 200
    for name in corpus.files:
        assert not set(name.split("/")) & STDLIB_EXCLUDED_DIRS, name
        assert "site-packages" not in name
    splits = {split: corpus.split_files(split) for split in ("train", "val", "test")}
    assert sum(len(names) for names in splits.values()) == len(corpus.files)
    assert set(splits["train"]).isdisjoint(splits["val"]) and set(splits["val"]).isdisjoint(splits["test"])
    assert set(splits["train"]).isdisjoint(splits["test"])
    assert 0.8 < len(splits["train"]) / len(corpus.files) < 0.97
    assert len(splits["val"]) > 5 and len(splits["test"]) > 5
    # sha256 of the path, never Python's randomised hash(): the same on every machine and run.
    assert [stdlib_split(name) for name in ("os.py", "json/decoder.py", "asyncio/tasks.py", "a.py")] == [
        "val",
        "val",
        "train",
        "test",
    ]


def test_stdlib_datamodule_is_reproducible(tmp_path: Path) -> None:
    def first_blocks(cache: str) -> dict[str, torch.Tensor]:
        dm = TextDataModule(block_size=64, batch_size=8, max_train_bytes=60_000, max_eval_bytes=20_000, cache_dir=cache)
        dm.prepare_data()
        dm.setup()
        assert dm.split_stats("train").num_bytes == 60_000
        assert dm.split_stats("val").num_bytes == 20_000
        return {
            "train": next(iter(dm.train_dataloader())),
            "val": next(iter(dm.val_dataloader())),
            "test": next(iter(dm.test_dataloader())),
        }

    one, two = first_blocks(str(tmp_path / "one")), first_blocks(str(tmp_path / "two"))
    for split in one:
        assert one[split].shape == (8, 65) and one[split].dtype == torch.long
        assert torch.equal(one[split], two[split])
    assert not torch.equal(one["val"], one["test"])


def test_split_text_cuts_at_line_breaks_and_loses_nothing() -> None:
    documents = [make_text(50, "a"), "no newline at all", make_text(150, "b")]
    parts = split_text(documents, [0.9, 0.05, 0.05])
    assert "".join(doc for part in parts for doc in part) == "".join(documents)
    assert all(part for part in parts)
    for part in parts[:-1]:
        assert part[-1].endswith("\n")
    total = sum(len(d) for d in documents)
    assert abs(sum(len(d) for d in parts[1]) / total - 0.05) < 0.01
    assert split_text(["abc\n", "def\n"], [0.5, 0.5]) == [["abc\n"], ["def\n"]]  # a cut at a document boundary


def test_files_source_with_train_val_test(tmp_path: Path, files: dict[str, list[str]]) -> None:
    dm = TextDataModule(source="files", **files, block_size=32, batch_size=8, eval_batch_size=5,
                        cache_dir=str(tmp_path / "cache"), seed=3)  # fmt: skip
    assert dm.vocab_size == 320  # 258 rounded up to a multiple of 64
    dm.prepare_data()
    dm.setup()
    tokenizer = dm.tokenizer
    texts = {split: [Path(p).read_text(encoding="utf-8") for p in files[f"{split}_files"]] for split in ("val", "test")}
    texts["train"] = [Path(p).read_text(encoding="utf-8") for p in files["train_files"]]
    for split, split_texts in texts.items():
        stream = stream_of(tokenizer, split_texts)
        stats = dm.split_stats(split)
        assert stats.num_tokens == len(stream) and stats.num_documents == len(split_texts)
        assert stats.num_blocks == (len(stream) - 1) // 32
    # eval: in order, the last partial batch kept; the blocks rebuild the stream.
    val_batches = list(dm.val_dataloader())
    assert len(val_batches) == math.ceil(dm.split_stats("val").num_blocks / 5)
    assert val_batches[-1].shape[0] == (dm.split_stats("val").num_blocks % 5 or 5)
    val_blocks = torch.cat(val_batches)
    rebuilt = [val_blocks[0, 0].item(), *val_blocks[:, 1:].reshape(-1).tolist()]
    assert rebuilt == stream_of(tokenizer, texts["val"])[: len(rebuilt)]
    # train: shuffled with a seeded generator, partial batch dropped, same order on a new loader.
    train = list(dm.train_dataloader())
    assert len(train) == dm.split_stats("train").num_blocks // 8
    assert all(batch.shape == (8, 33) and batch.dtype == torch.long for batch in train)
    assert torch.equal(train[0], next(iter(dm.train_dataloader())))
    in_order = torch.cat([batch for batch in torch.utils.data.DataLoader(dm.train_dataloader().dataset, 8)])
    assert not torch.equal(torch.cat(train), in_order[: len(train) * 8])


def test_files_source_carves_val_and_test_from_the_end(tmp_path: Path) -> None:
    text = make_text(400, "x")
    train = write(tmp_path / "corpus.txt", text)
    dm = TextDataModule(source="files", train_files=[str(tmp_path / "*.txt")], block_size=16, batch_size=4,
                        cache_dir=str(tmp_path / "cache"))  # fmt: skip
    dm.prepare_data()
    dm.setup()
    stats = {split: dm.split_stats(split) for split in ("train", "val", "test")}
    assert sum(s.num_bytes for s in stats.values()) == len(text.encode("utf-8"))
    assert 0.03 < stats["val"].num_bytes / len(text.encode()) < 0.07
    first_test = next(iter(dm.test_dataloader()))[0]
    test_part = split_text([Path(train).read_text(encoding="utf-8")], [0.9, 0.05, 0.05])[2][0]
    assert dm.tokenizer.decode(first_test.tolist()) == test_part[:17]
    assert test_part.startswith("x line ") and text.endswith(test_part)


def test_bytes_per_token_on_a_known_example(tmp_path: Path) -> None:
    train = [write(tmp_path / f"t{i}.txt", "a" * 999 + "\n") for i in range(2)]
    val = write(tmp_path / "v.txt", "é" * 250)  # 500 bytes, one document
    dm = TextDataModule(source="files", train_files=train, val_files=[val], test_files=[val], block_size=10,
                        batch_size=2, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    with pytest.raises(RuntimeError, match="setup"):
        dm.bytes_per_token("train")
    dm.prepare_data()
    dm.setup()
    assert dm.bytes_per_token("train") == 2000 / 2002  # one <eos> per document
    assert dm.bytes_per_token("val") == 500 / 501


def test_cache_is_reused_without_tokenizing_again(
    tmp_path: Path, files: dict[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    settings = dict(source="files", **files, block_size=32, batch_size=4, cache_dir=str(cache))
    first = TextDataModule(**settings)
    first.prepare_data()
    first.setup()
    before = snapshot(cache)
    batch = next(iter(first.val_dataloader()))

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("tokenised again")

    monkeypatch.setattr(ByteTokenizer, "encode_batch", fail)
    second = TextDataModule(**settings)
    second.prepare_data()
    second.setup()
    assert snapshot(cache) == before  # nothing new written, nothing rewritten
    assert torch.equal(next(iter(second.val_dataloader())), batch)
    assert second.bytes_per_token("train") == first.bytes_per_token("train")

    # A new block size re-packs the cached tokens: still no tokenisation, one new blocks file per split.
    third = TextDataModule(**{**settings, "block_size": 16})
    third.prepare_data()
    new_files = set(snapshot(cache)) - set(before)
    assert len(new_files) == 6 and all("blocks-16" in name for name in new_files)

    # Changed text changes the key of its split only: the train split is tokenised again.
    monkeypatch.undo()
    write(Path(files["train_files"][0]), make_text(300, "changed"))
    fourth = TextDataModule(**settings)
    fourth.prepare_data()
    rebuilt = {name for name in set(snapshot(cache)) - set(before) - new_files if name.startswith("splits/")}
    assert len(rebuilt) == 4 and all(name.startswith("splits/train-") for name in rebuilt)  # + sha256.json


def test_bpe_datamodule_trains_once_on_train_split(
    tmp_path: Path, files: dict[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = dict(source="files", **files, tokenizer="bpe", bpe_vocab_size=300, block_size=16, batch_size=4,
                    cache_dir=str(tmp_path / "cache"))  # fmt: skip
    dm = TextDataModule(**settings)
    assert dm.vocab_size == 320
    dm.prepare_data()
    dm.setup()
    tokenizer = dm.tokenizer
    assert isinstance(tokenizer, BpeTokenizer) and tokenizer.vocab_size <= 300
    assert int(torch.cat(list(dm.train_dataloader())).max()) < tokenizer.vocab_size
    assert dm.bytes_per_token("val") > 1.5
    dm.save_tokenizer(str(tmp_path / "run" / "tokenizer"))

    monkeypatch.setattr(BpeTokenizer, "train", classmethod(lambda *a, **k: pytest.fail("trained again")))
    again = TextDataModule(**settings)
    again.setup()
    assert again.tokenizer.fingerprint == tokenizer.fingerprint
    # the saved run tokenizer is a drop-in replacement that shares the cache entries
    reused = TextDataModule(**{**settings, "tokenizer": str(tmp_path / "run" / "tokenizer"), "bpe_vocab_size": 4096})
    assert reused.tokenizer.fingerprint == tokenizer.fingerprint


def test_setup_without_prepare_data_builds_the_cache(tmp_path: Path, files: dict[str, list[str]]) -> None:
    dm = TextDataModule(source="files", **files, block_size=32, batch_size=4, cache_dir=str(tmp_path / "cache"))
    dm.setup("validate")
    assert next(iter(dm.val_dataloader())).shape == (4, 33)
    with pytest.raises(RuntimeError, match="setup"):
        dm.train_dataloader()


def test_a_split_shorter_than_a_block_is_an_error(tmp_path: Path, files: dict[str, list[str]]) -> None:
    files = {**files, "test_files": [write(tmp_path / "short.txt", "tiny\n")]}
    dm = TextDataModule(source="files", **files, block_size=32, batch_size=4, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(RmoeError, match="test split"):
        dm.prepare_data()


def test_worker_processes_give_the_same_batches(tmp_path: Path, files: dict[str, list[str]]) -> None:
    settings = dict(source="files", **files, block_size=32, batch_size=4, cache_dir=str(tmp_path / "cache"))
    single, workers = TextDataModule(**settings), TextDataModule(**settings, num_workers=2)
    for dm in (single, workers):
        dm.setup()
    assert torch.equal(torch.cat(list(single.val_dataloader())), torch.cat(list(workers.val_dataloader())))
    assert torch.equal(next(iter(single.train_dataloader())), next(iter(workers.train_dataloader())))


def test_hub_presets_turn_hub_splits_into_documents(monkeypatch: pytest.MonkeyPatch) -> None:
    """The preset converters on small stand-ins for the hub datasets (no network here)."""
    from datasets import Dataset, DatasetDict

    from rmoe.data import corpus

    lines = ["", " = Alpha = \n", "", " Alpha text .\n", " = = Section = = \n", " more .\n", " = Beta = \n", " b .\n"]
    wikitext = DatasetDict({name: Dataset.from_dict({"text": lines}) for name in ("train", "validation", "test")})
    splits = corpus.PRESETS["wikitext-103"].to_splits(wikitext)
    alpha = "\n = Alpha = \n\n Alpha text .\n = = Section = = \n more .\n"
    assert splits["val"]["text"] == [alpha, " = Beta = \n b .\n"]  # one document per article

    monkeypatch.setattr(corpus, "ENWIK8_SPLIT_BYTES", (9, 3))
    enwik8 = DatasetDict({"train": Dataset.from_dict({"text": ["abcdefgh€xyzw"]})})  # € is 3 bytes, at 8..10
    splits = corpus.PRESETS["enwik8"].to_splits(enwik8)
    assert [splits[s]["text"] for s in ("train", "val", "test")] == [["abcdefgh"], ["€x"], ["yzw"]]

    stories = DatasetDict({name: Dataset.from_dict({"text": [f"{name} {i}" for i in range(5)], "extra": [0] * 5})
                           for name in ("train", "validation")})  # fmt: skip
    splits = corpus.PRESETS["tinystories"].to_splits(stories)
    assert splits["val"]["text"] == ["validation 0", "validation 1"]
    assert splits["test"]["text"] == ["validation 2", "validation 3", "validation 4"]
    assert splits["train"].column_names == ["text"]


def test_hub_preset_loading_is_lazy_and_errors_are_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def offline(path: str, name: str | None = None, revision: str | None = None, **kwargs: object) -> None:
        calls.append((path, name, revision))
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    dm = TextDataModule(source="enwik8", cache_dir=str(tmp_path / "cache"))
    assert calls == []  # nothing is loaded in __init__
    with pytest.raises(RmoeError, match=r"LTCB/enwik8.*network"):
        dm.prepare_data()
    assert calls == [("LTCB/enwik8", "enwik8-raw", None), ("LTCB/enwik8", "enwik8-raw", "refs/convert/parquet")]


# ---------------------------------------------------------------------------------------------
# bad input


def test_check_text_file_reports_the_byte_offset_across_chunks(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes("añb€".encode() + b"\xff" + b"tail")  # a(1) ñ(2) b(1) €(3): the bad byte is at 7
    for chunk_size in (1, 2, 3, 5, 1 << 20):
        with pytest.raises(RmoeError, match="byte 7"):
            check_text_file("train_files", path, chunk_size=chunk_size)
    path.write_bytes("añ".encode()[:-1])  # truncated character at the end
    with pytest.raises(RmoeError, match="byte 1"):
        check_text_file("train_files", path, chunk_size=2)
    path.write_text(NON_ASCII, encoding="utf-8")
    assert len(check_text_file("train_files", path, chunk_size=3)) == 64


def bad_inputs(tmp_path: Path) -> list[tuple[dict[str, object], list[str]]]:
    good = write(tmp_path / "good.txt", make_text(50, "g"))
    empty = write(tmp_path / "empty.txt", "")
    invalid = tmp_path / "latin1.txt"
    invalid.write_bytes(b"hello caf\xe9 world")
    files = {"source": "files"}
    return [
        ({"source": "nope"}, ["source='nope'", "stdlib", "wikitext-103", "files"]),
        (files, ["train_files"]),
        ({**files, "train_files": [str(tmp_path / "missing.txt")]}, ["train_files", "missing.txt"]),
        ({**files, "train_files": [good], "val_files": [str(tmp_path / "nothing-*.txt")]}, ["val_files", "nothing-*"]),
        ({**files, "train_files": [empty]}, ["train_files", "empty.txt", "is empty"]),
        ({**files, "train_files": [good], "test_files": [str(invalid)]}, ["test_files", "latin1.txt", "byte 9"]),
        ({"train_files": [good]}, ["train_files", "source='files'"]),
        ({"block_size": 0}, ["block_size=0"]),
        ({"batch_size": -2}, ["batch_size=-2"]),
        ({"eval_batch_size": 0}, ["eval_batch_size=0"]),
        ({"max_train_bytes": 0}, ["max_train_bytes=0"]),
        ({"num_workers": -1}, ["num_workers=-1"]),
        ({"tokenizer": "bpe", "bpe_vocab_size": 100}, ["bpe_vocab_size=100"]),
        ({"tokenizer": "./no-such-tokenizer-dir"}, ["./no-such-tokenizer-dir", "local", "cache"]),
        ({"tokenizer": "no-such-tokenizer-xyz"}, ["no-such-tokenizer-xyz", "local tokenizer directory", "cache"]),
    ]


@pytest.mark.parametrize("case", range(15))
def test_bad_input_fails_in_init_and_writes_nothing(case: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # an unknown hub name must fail fast, without network
    kwargs, expected = bad_inputs(tmp_path)[case]
    cache = tmp_path / "cache"
    with pytest.raises(RmoeError) as error:
        TextDataModule(**kwargs, cache_dir=str(cache))
    for text in expected:
        assert text in str(error.value), (text, str(error.value))
    assert not cache.exists()


def test_bpe_vocab_size_without_bpe_warns(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="bpe_vocab_size=512 is ignored"):
        TextDataModule(bpe_vocab_size=512, cache_dir=str(tmp_path))


# ---------------------------------------------------------------------------------------------
# real text


@pytest.mark.skipif(not (SHARED_DATA / "wikitext-2").is_dir(), reason="../shared/data is not available")
def test_real_text_from_shared_data(tmp_path: Path) -> None:
    train = [str(SHARED_DATA / "wikitext-2" / "test.txt"), str(SHARED_DATA / "gutenberg" / "*.txt")]
    dm = TextDataModule(source="files", train_files=train, val_files=[str(SHARED_DATA / "wikitext-2" / "valid.txt")],
                        block_size=128, batch_size=8, max_train_bytes=400_000, max_eval_bytes=100_000,
                        cache_dir=str(tmp_path / "cache"))  # fmt: skip
    dm.prepare_data()
    dm.setup()
    assert dm.split_stats("train").num_bytes == 400_000 and dm.split_stats("val").num_bytes == 100_000
    assert dm.split_stats("test").num_bytes >= 100_000 - 3  # carved from the end of the train files, then capped
    assert 0.99 < dm.bytes_per_token("val") <= 1.0
    text = dm.tokenizer.decode(next(iter(dm.val_dataloader()))[0].tolist())
    assert text == (SHARED_DATA / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")[: len(text)]


# ----------------------------------------------------------------------------------------------
# Any text file trains; a damaged cache is rebuilt

ODD_TEXTS = {
    "one long line, no newline": " ".join(f"word{i % 97}" for i in range(6000)),
    "one long line without spaces": "".join(random.Random(0).choices("abcdefghijklmnopqrstuvwxyz", k=30000)),
    "NUL bytes": "abc\x00def ghi\x00 " * 2000,
    "CRLF line ends": "line one\r\nline two\r\n" * 1500,
    "empty documents and lines": "\n\n\n" + "hello world\n" * 2000 + "\n\n",
}


@pytest.mark.parametrize("kind", list(ODD_TEXTS))
@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_any_text_file_trains_with_the_eval_splits_carved_out_of_it(kind, tokenizer, tmp_path):
    train = write(tmp_path / "train.txt", ODD_TEXTS[kind])
    empty = write(tmp_path / "empty.txt", "")  # an empty file among others is one empty document
    module = TextDataModule(source="files", train_files=[train, empty], tokenizer=tokenizer, bpe_vocab_size=300,
                            block_size=32, batch_size=4, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    module.prepare_data()
    module.setup("fit")
    for split in ("train", "val"):
        assert module.split_stats(split).num_blocks > 0, split
    batch = next(iter(module.train_dataloader()))
    assert batch.shape == (4, 33) and int(batch.max()) < module.vocab_size


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip a byte":
        path.write_bytes(data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 0x01]) + data[len(data) // 2 + 1 :])
    elif how == "not JSON":
        path.write_text("{not json", encoding="utf-8")
    elif how == "delete":
        path.unlink()


@pytest.mark.parametrize(
    ("target", "how"),
    [("blocks-32.arrow", "truncate"), ("blocks-32.arrow", "flip a byte"), ("tokens.arrow", "flip a byte"),
     ("blocks-32.json", "not JSON"), ("sha256.json", "not JSON"), ("tokens.arrow", "delete")],
)  # fmt: skip
def test_a_damaged_cache_entry_is_found_deleted_and_rebuilt(target, how, files, tmp_path):
    settings = dict(source="files", **files, block_size=32, batch_size=4, cache_dir=str(tmp_path / "cache"))
    first = TextDataModule(**settings)
    first.prepare_data()
    first.setup("fit")
    expected = next(iter(first.val_dataloader()))
    entry = next((tmp_path / "cache/splits").glob("val-*"))
    damage(entry / target, how)
    second = TextDataModule(**settings)
    with pytest.warns(UserWarning, match=rf"data cache entry {entry} was damaged \(.*\); deleted, rebuilding it"):
        second.prepare_data()
    second.setup("fit")
    assert torch.equal(next(iter(second.val_dataloader())), expected)
    assert (entry / "sha256.json").is_file()


def test_a_damaged_bpe_tokenizer_in_the_cache_is_trained_again(files, tmp_path):
    settings = dict(source="files", **files, tokenizer="bpe", bpe_vocab_size=300, block_size=16, batch_size=4,
                    cache_dir=str(tmp_path / "cache"))  # fmt: skip
    first = TextDataModule(**settings)
    ids = first.tokenizer.encode_batch(["hello world"])[0].tolist()
    folder = next((tmp_path / "cache/tokenizers").glob("bpe-*"))
    for path in folder.iterdir():
        if path.suffix == ".json" and path.name != "rmoe_tokenizer.json":
            path.write_text("{not json", encoding="utf-8")
    with pytest.warns(UserWarning, match=rf"data cache entry {folder} was damaged"):
        again = TextDataModule(**settings).tokenizer
    assert again.encode_batch(["hello world"])[0].tolist() == ids


CONCURRENT_PREPARE = """
import sys, time, warnings
from pathlib import Path
from rmoe.data import TextDataModule
go = Path(sys.argv[1])
go.with_name(f"ready-{sys.argv[5]}").touch()
while not go.exists():
    time.sleep(0.001)
warnings.simplefilter("error")  # a 'damaged' warning means one process saw another's half-built entry
module = TextDataModule(source="files", train_files=[sys.argv[2]], val_files=[sys.argv[3]], test_files=[sys.argv[3]],
                        tokenizer="bpe", bpe_vocab_size=300, block_size=32, batch_size=4, cache_dir=sys.argv[4])
module.prepare_data()
module.setup("fit")
print(sum(int(batch.sum()) for batch in module.val_dataloader()))
"""


@pytest.mark.slow  # four real processes (~15 s); the interleaving itself is replayed by the next test
def test_processes_preparing_one_cache_at_once_all_succeed(tmp_path: Path) -> None:
    """Several ``rmoe fit`` sharing a cache (a sweep with --jobs, two users) train the BPE and build each entry
    once, and none reads, deletes or hashes the files another is still writing."""
    train = write(tmp_path / "train.txt", make_text(20000, "a"))
    val = write(tmp_path / "val.txt", make_text(3000, "v"))
    go = tmp_path / "go"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_PREPARE, str(go), train, val, str(tmp_path / "cache"), str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
        for i in range(4)
    ]
    while len(list(tmp_path.glob("ready-*"))) < len(children):  # every child imported rmoe and waits
        assert all(child.poll() is None for child in children), [child.communicate() for child in children]
        time.sleep(0.01)
    go.touch()
    results = [child.communicate(timeout=300) for child in children]
    for child, (_, err) in zip(children, results, strict=True):
        assert child.returncode == 0, err
    assert len({out for out, _ in results}) == 1  # the same validation data everywhere
    assert len(list((tmp_path / "cache/splits").glob("*/blocks-32.arrow"))) == 3


def test_an_entry_being_built_is_waited_for_not_judged_damaged(files, tmp_path, monkeypatch):
    """The interleaving that failed: one process has written a split's tokens.arrow but not yet its sha256 when a
    second one looks at the entry. The second must wait for the first, not delete the entry as damaged (the
    first then failed hashing a file that was gone)."""
    settings = dict(source="files", **files, block_size=32, batch_size=4, cache_dir=str(tmp_path / "cache"))
    written, resume, finished = threading.Event(), threading.Event(), threading.Event()
    record_digest = datamodule_module._record_digest

    def pausing_record_digest(directory: Path, path: Path) -> None:
        if threading.current_thread().name == "first" and path.name == "tokens.arrow" and not written.is_set():
            written.set()
            assert resume.wait(60)
        record_digest(directory, path)

    errors: list[BaseException] = []

    def prepare(done: threading.Event | None = None) -> None:
        try:
            module = TextDataModule(**settings)
            module.prepare_data()
            module.setup("fit")
        except BaseException as err:
            errors.append(err)
        if done is not None:
            done.set()

    monkeypatch.setattr(datamodule_module, "_record_digest", pausing_record_digest)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a 'damaged ... deleted' warning fails the thread that sees it
        first = threading.Thread(target=prepare, name="first")
        first.start()
        assert written.wait(60)  # train's tokens.arrow is on disk, its sha256 not yet
        second = threading.Thread(target=prepare, args=(finished,), name="second")
        second.start()
        assert not finished.wait(1.0)  # waits for the entry's lock
        resume.set()
        first.join(60)
        second.join(60)
    assert not errors, errors
    assert finished.is_set()
