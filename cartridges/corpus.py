"""Normalized corpora: UTF-8 documents as ``corpus.jsonl`` under their digest (DESIGN.md §4).

Normalization makes the digest a function of the text alone: UTF-8 (a BOM dropped), NFC, ``\\n`` line ends,
no trailing whitespace. The same text from any source (the operator's Corpus sources, the CLI's files) gives the
same digest, so an unchanged corpus triggers nothing downstream.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass

from cartridges import layout
from cartridges.hashing import sha256_bytes
from cartridges.store import IntegrityError, ObjectNotFound, Store


class SourceError(ValueError):
    """A source cannot be read; the message names the source and says what to fix."""


def decode_utf8(raw: bytes, where: str) -> str:
    """``raw`` as UTF-8 text (a byte-order mark dropped); anything else is a :class:`SourceError` naming ``where``."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise SourceError(f"{where}: not UTF-8 text (byte {err.start}); convert it to UTF-8") from err


def normalize_text(raw: bytes | str, where: str) -> str:
    if isinstance(raw, bytes):
        raw = decode_utf8(raw, where)
    text = unicodedata.normalize("NFC", raw.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n"))
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n") + "\n"


@dataclass(frozen=True)
class NormalizedCorpus:
    documents: list[layout.Document]
    jsonl: bytes

    @classmethod
    def of(cls, documents: list[layout.Document]) -> NormalizedCorpus:
        """The corpus of ``documents``; refuses one that is only whitespace."""
        if not any(doc.text.strip() for doc in documents):
            raise SourceError("the corpus is empty: every source produced only whitespace")
        jsonl = "".join(json.dumps(doc.model_dump(), ensure_ascii=False, sort_keys=True) + "\n" for doc in documents)
        return cls(documents, jsonl.encode())

    @property
    def digest(self) -> str:
        return sha256_bytes(self.jsonl)


def count_tokens(corpus: NormalizedCorpus, where: str, tokenizer_json: bytes) -> int:
    """Tokens of the whole corpus under a ``tokenizer.json`` read from ``where`` (fast tokenizers only; no model
    weights needed)."""
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_buffer(tokenizer_json)
    except ValueError as err:
        raise SourceError(f"spec.tokenizer: {where} is not a tokenizers JSON file ({_without_content(err)})") from err
    return sum(
        len(tokenizer.encode(piece, add_special_tokens=index == 0).ids)  # a document's special tokens once
        for document in corpus.documents
        for index, piece in enumerate(pieces_at_newlines(document.text, TOKEN_COUNT_PIECE_CHARS))
    )


TOKEN_COUNT_PIECE_CHARS = 256 * 1024
"""Characters encoded at a time when counting: an encoding holds ~100 bytes per token, so encoding a whole 32 MiB
corpus at once peaks near 1 GB; pieces keep the count's memory to a few tens of MiB whatever the corpus size."""


def pieces_at_newlines(text: str, size: int) -> Iterator[str]:
    """``text`` in pieces of at most ``size`` characters, each cut just after a newline where the piece has one:
    pre-tokenizers split there, so a cut shifts the count by a token at most (SmolLM2: 2 tokens over 5 cuts of a
    1,431-token text), and the status's count is a size, not an input to anything."""
    start = 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text) and (newline := text.rfind("\n", start, end)) >= start:
            end = newline + 1
        yield text[start:end]
        start = end


def _without_content(err: Exception) -> str:
    """The parser's complaint without the file's content, which it quotes (``invalid type: string "..."``): the
    message reaches the Corpus's status and Events, and a file that is no tokenizer may hold anything (credentials
    named by mistake). Keeps the words before the first quote, and the position."""
    message = str(err).removeprefix("Cannot instantiate Tokenizer from buffer: ")
    position = re.search(r" at line \d+ column \d+$", message)
    head = message[: position.start()] if position else message
    return re.split("[\"'`]", head, maxsplit=1)[0].strip()[:80] + (position.group() if position else "")


def publish(
    corpus: NormalizedCorpus,
    description: str,
    store: Store,
    prefix: str,
    tokens: int | None = None,
    tokenizer: str | None = None,
) -> layout.CorpusManifest:
    """Upload corpus.jsonl then manifest.json under the digest prefix; a no-op when that digest is stored intact.
    A version whose corpus.jsonl was lost or altered, or whose manifest is unreadable, is stored again from the
    text in hand: every Cartridge trained on it would fail on it, and nothing else repairs it."""
    try:
        return layout.verified_corpus(store, prefix)
    except (ObjectNotFound, IntegrityError, ValueError):  # ValueError: layout.CorpusUnusable
        pass
    manifest = layout.CorpusManifest(
        digest=corpus.digest,
        documents=len(corpus.documents),
        bytes=len(corpus.jsonl),
        description=description,
        tokens=tokens,
        tokenizer=tokenizer,
    )
    store.put_bytes(f"{prefix}/{layout.CORPUS_FILE}", corpus.jsonl)
    store.put_json(f"{prefix}/{layout.MANIFEST_FILE}", manifest.model_dump())
    return manifest
