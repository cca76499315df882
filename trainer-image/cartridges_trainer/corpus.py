"""The corpus as one token stream, and the chunks of it that synthesis puts in context."""

from __future__ import annotations

import random
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from cartridges.layout import MANIFEST_FILE, CorpusManifest, read_documents
from cartridges.store import IntegrityError, ObjectNotFound, Store
from cartridges_trainer.errors import InputError

DOCUMENT_SEPARATOR = "\n\n"
MIN_CORPUS_TOKENS = 16


@dataclass
class Corpus:
    description: str
    tokens: list[int]
    digest: str

    def chunk(self, rng: random.Random, min_tokens: int, max_tokens: int) -> tuple[int, int]:
        """A random ``[start, end)`` span whose length is uniform in the range, clipped to the corpus."""
        high = min(max_tokens, len(self.tokens))
        length = rng.randint(min(min_tokens, high), high)
        start = rng.randint(0, len(self.tokens) - length)
        return start, start + length

    def windows(self, length: int) -> int:
        """How many windows of ``length`` tokens :meth:`window` cycles through."""
        length = min(length, len(self.tokens))
        return -(-len(self.tokens) // length) + (1 if len(self.tokens) > length else 0)

    def window(self, index: int, length: int) -> tuple[int, int]:
        """The ``index``-th (cycling) of evenly spaced, overlapping spans of ``length`` tokens covering the corpus.

        Random chunks rarely include the corpus' first and last tokens; windows give every token the same coverage.
        """
        length = min(length, len(self.tokens))
        spare = len(self.tokens) - length
        count = self.windows(length)
        start = round((index % count) * spare / max(count - 1, 1))
        return start, start + length


def load_corpus(store: Store, prefixes: list[str], description: str, tokenizer: PreTrainedTokenizerBase) -> Corpus:
    """Read and tokenize every corpus version; unusable input raises :class:`InputError`."""
    texts: list[str] = []
    digests: list[str] = []
    for prefix in prefixes:
        try:
            manifest = CorpusManifest.model_validate(store.get_json(f"{prefix.rstrip('/')}/{MANIFEST_FILE}"))
            texts.extend(doc.text for doc in read_documents(store, prefix))
        except ObjectNotFound as err:
            raise InputError(f"corpus not found: {err}") from err
        except (ValueError, IntegrityError) as err:  # not UTF-8, not JSON lines, bad manifest, digest mismatch
            raise InputError(f"corpus at {prefix} is unreadable: {err}") from err
        digests.append(manifest.digest)
    text = DOCUMENT_SEPARATOR.join(t for t in texts if t.strip())
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    if len(tokens) < MIN_CORPUS_TOKENS:
        raise InputError(f"corpus {', '.join(prefixes)} has {len(tokens)} tokens; need at least {MIN_CORPUS_TOKENS}")
    return Corpus(description, tokens, "+".join(digests))
