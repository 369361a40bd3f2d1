"""Tokens as readable text: each token as the text it adds and a label of its own.

A byte of a multi-byte UTF-8 character (byte tokenizer) shows the character on its first byte (``é[1/2]``,
then ``é[2/2]`` with no text); a BPE piece that is not valid UTF-8 on its own shows its bytes
(``<0xE2 0x80>``); control characters are escaped (``\\n``, ``<0x07>``); specials are ``<eos>``, ``<pad>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rmoe.data.tokenizer import Tokenizer


@dataclass
class Piece:
    """One token for display: ``text`` is what it adds to the running text ("" for a continuation byte),
    ``label`` a readable name of the token alone (spaces as ``␣``, ``\\n``, ``é[2/2]``, ``<0xFF>``)."""

    text: str
    label: str


def escape(text: str) -> str:
    """Control characters as escapes (``\\n``, ``\\t``, ``<0x07>``); the rest unchanged."""
    out = []
    for ch in text:
        if ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 32 or 0x7F <= ord(ch) < 0xA0:
            out.append(f"<0x{ord(ch):02X}>")
        else:
            out.append(ch)
    return "".join(out)


def _label(text: str) -> str:
    return escape(text).replace(" ", "␣") if text else "∅"


def _hex(data: bytes) -> str:
    return "<" + " ".join(f"0x{b:02X}" for b in data) + ">"


def _utf8_length(lead: int) -> int:
    """Length of the UTF-8 sequence a lead byte starts (0: not a lead byte)."""
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


def byte_pieces(ids: Sequence[int], specials: dict[int, str]) -> list[Piece]:
    """Pieces of byte-tokenizer ids (see the module docstring); stray bytes as ``<0xHH>``."""
    pieces: list[Piece | None] = [None] * len(ids)
    i = 0
    while i < len(ids):
        b = ids[i]
        if b in specials or not 0 <= b < 256:
            name = specials.get(b, f"<id {b}>")
            pieces[i] = Piece(name, name)
            i += 1
            continue
        n = _utf8_length(b)
        chunk = bytes(ids[i : i + n]) if n and all(0 <= x < 256 for x in ids[i : i + n]) else b""
        try:
            char = chunk.decode("utf-8") if len(chunk) == n and n else None
        except UnicodeDecodeError:
            char = None
        if char is None:
            pieces[i] = Piece(_hex(bytes([b])), _hex(bytes([b])))
            i += 1
            continue
        if n == 1:
            text = char if char in "\n\t" or (ord(char) >= 32 and ord(char) != 0x7F) else _hex(chunk)
            pieces[i] = Piece(text, _label(char))
        else:
            for k in range(n):
                pieces[i + k] = Piece(char if k == 0 else "", f"{escape(char)}[{k + 1}/{n}]")
        i += n
    return [p for p in pieces if p is not None]


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (each byte as a printable character), inverted: char -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _raw_token(tokenizer: Tokenizer, token_id: int) -> str | None:
    backend = getattr(tokenizer, "backend", None)
    if backend is None:
        return None
    if hasattr(backend, "id_to_token"):  # tokenizers.Tokenizer (our BPE)
        return backend.id_to_token(token_id)
    if hasattr(backend, "convert_ids_to_tokens"):  # transformers
        return backend.convert_ids_to_tokens(token_id)
    return None


def token_pieces(tokenizer: Tokenizer, ids: Sequence[int]) -> list[Piece]:
    """Readable pieces of ``ids`` for any tokenizer (see the module docstring)."""
    specials = {tokenizer.eos_id: "<eos>", tokenizer.pad_id: "<pad>"}
    if tokenizer.kind == "byte":
        return byte_pieces(list(ids), specials)
    decoder = _byte_level_decoder()
    cache: dict[int, Piece] = {}
    out = []
    for token_id in ids:
        if token_id not in cache:
            if token_id in specials:
                cache[token_id] = Piece(specials[token_id], specials[token_id])
            else:
                text = tokenizer.decode([token_id])
                if "\ufffd" in text or not text:
                    raw = _raw_token(tokenizer, token_id) or ""
                    if raw and all(ch in decoder for ch in raw):  # byte-level BPE: its bytes
                        text = _hex(bytes(decoder[ch] for ch in raw))
                    else:
                        text = raw or f"<id {token_id}>"
                    cache[token_id] = Piece(text, escape(text))
                else:
                    cache[token_id] = Piece(text, _label(text))
        out.append(cache[token_id])
    return out
