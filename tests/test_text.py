"""Incremental detokenization: chunks join to exactly the decode of every token, stop strings end the text,
and each token costs a short decode however long the answer (the old full re-decode grew with it)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from cartridges.models import LoadedModel
from cartridges_serving.text import TextStream

TEXT = "Kestrel Rock — station «KR-7», est. 1987: 北极站 🐕‍🦺 naïve café, ünïcödé; ok!  Two  spaces.\nNew line."


def stream(tokenizer: Any, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], TextStream]:
    text = TextStream(tokenizer, stop)
    chunks = []
    for token in ids:
        chunk, stopped = text.push(token)
        chunks.append(chunk)
        if stopped:
            break
    chunks.append(text.flush())
    return chunks, text


def full_decode(tokenizer: Any, ids: list[int]) -> str:
    return str(tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))


@pytest.fixture(params=["smollm2", "tiny_model"])
def tokenizer(request: pytest.FixtureRequest) -> Any:
    loaded: LoadedModel = request.getfixturevalue(request.param)
    return loaded.tokenizer


def test_chunks_join_to_the_decode_of_every_token(tokenizer: Any) -> None:
    ids = list(tokenizer(TEXT * 3, add_special_tokens=False)["input_ids"])
    rng = random.Random(0)
    noise = [rng.randrange(tokenizer.vocab_size) for _ in range(300)]  # any bytes, invalid UTF-8 included
    for sequence in (ids, noise, ids[:7] + noise[:40] + ids[7:60]):
        chunks, text = stream(tokenizer, sequence)
        assert "".join(chunks) == text.text == full_decode(tokenizer, sequence)


def test_a_multibyte_character_is_held_back_until_complete(tokenizer: Any) -> None:
    ids = list(tokenizer("🐕‍🦺 北", add_special_tokens=False)["input_ids"])
    chunks, _ = stream(tokenizer, ids)
    assert all("\ufffd" not in chunk for chunk in chunks)
    assert "".join(chunks) == full_decode(tokenizer, ids)


@pytest.mark.parametrize("stop", ["1987", "«KR", "café, ü", "\nNew"])
def test_a_stop_string_ends_the_text_before_it(tokenizer: Any, stop: str) -> None:
    ids = list(tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    chunks, text = stream(tokenizer, ids, (stop, "never appears"))
    full = full_decode(tokenizer, ids)
    assert text.stopped and "".join(chunks) == text.text == full[: full.find(stop)]


def test_each_token_decodes_a_short_window(smollm2: LoadedModel) -> None:
    """The cost per token must not grow with the answer: every decode call sees a few tokens only."""
    tokenizer = smollm2.tokenizer
    seen: list[int] = []

    class Counting:
        def decode(self, ids: list[int], **kwargs: Any) -> str:
            seen.append(len(ids))
            return str(tokenizer.decode(ids, **kwargs))

    ids = list(tokenizer(TEXT * 20, add_special_tokens=False)["input_ids"])
    assert len(ids) > 500
    chunks, _ = stream(Counting(), ids)
    assert "".join(chunks) == full_decode(tokenizer, ids)
    assert max(seen[:-1]) <= 8  # the final flush aside
