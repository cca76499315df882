"""Incremental detokenization: chunks join to exactly the decode of every token, stop strings end the text,
and each token costs a short decode however long the answer (the old full re-decode grew with it)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from cartridges.models import LoadedModel
from cartridges_serving.sampling import MAX_STOP_STRINGS
from cartridges_serving.text import StopPrefix, TextStream

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


class CountingDecodes:
    """The tokenizer, recording how many tokens each decode call is given (the cost of a step)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.seen: list[int] = []

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        self.seen.append(len(ids))
        return str(self.tokenizer.decode(ids, **kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)


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
    ids = list(tokenizer(TEXT * 20, add_special_tokens=False)["input_ids"])
    assert len(ids) > 500
    counting = CountingDecodes(tokenizer)
    chunks, _ = stream(counting, ids)
    assert "".join(chunks) == full_decode(tokenizer, ids)
    assert max(counting.seen[:-1]) <= 8  # the final flush aside


def test_special_tokens_that_add_no_text_keep_windows_short(tokenizer: Any) -> None:
    """Tokens that decode to nothing (special ones, skipped) are left out of the window: it used to keep them, so
    every step of a run of them decoded all of the run so far. Left out, the text is still exactly the decode of
    every token, a word's leading space after one included."""
    special = next(t for t in tokenizer.all_special_ids if full_decode(tokenizer, [t]) == "")
    words = list(tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    interleaved = [t for word in words for t in (word, special)]
    for ids in (words[:5] + [special] * 300 + words[5:], interleaved, [special] * 300 + words):
        counting = CountingDecodes(tokenizer)
        chunks, _ = stream(counting, ids)
        assert "".join(chunks) == full_decode(tokenizer, ids)
        assert max(counting.seen[:-1]) <= 8  # the final flush aside


def lone_byte_token(tokenizer: Any) -> int:
    """A token that is one byte of no complete character: output repeating it is never valid UTF-8."""
    return next(t for t in range(tokenizer.vocab_size) if full_decode(tokenizer, [t, t, t]) == "\ufffd" * 3)


def test_output_that_is_not_utf8_streams_with_short_windows(tokenizer: Any) -> None:
    """Output ending in an incomplete character for long stretches waits a few tokens only, then streams its
    replacement characters, each decode still seeing a short window (it used to wait for the end, decoding a
    window as long as the answer on every token)."""
    text_ids = list(tokenizer("ok ünïcödé 🐕", add_special_tokens=False)["input_ids"])
    ids = [lone_byte_token(tokenizer)] * 300 + text_ids + [lone_byte_token(tokenizer)] * 300
    counting = CountingDecodes(tokenizer)
    chunks, _ = stream(counting, ids)
    assert "".join(chunks) == full_decode(tokenizer, ids)
    assert len("".join(chunks[:-1])) > len(chunks[-1])  # streamed along, not all at the end
    assert max(counting.seen[:-1]) <= 16  # the final flush aside


def longest_stop_prefix(text: str, stop: str) -> int:
    """The definition: the longest tail of ``text`` that is a proper prefix of ``stop``."""
    return max((n for n in range(len(stop)) if text.endswith(stop[:n])), default=0)


def test_stop_prefix_follows_the_text_character_by_character() -> None:
    rng = random.Random(0)
    for _ in range(300):
        stop = "".join(rng.choice("ab") for _ in range(rng.randint(1, 8)))
        text, tracked = "", StopPrefix(stop)
        while len(text) < 40:
            added = "".join(rng.choice("ab") for _ in range(rng.randint(1, 3)))
            if stop in text + added:
                break
            text += added
            tracked.feed(added)
            assert tracked.length == longest_stop_prefix(text, stop), (stop, text)


class CountingReads(str):
    """A stop string that counts how often its characters or slices are read."""

    reads = 0

    def __getitem__(self, key: Any) -> str:
        CountingReads.reads += 1
        return super().__getitem__(key)


def test_long_stop_strings_cost_a_few_reads_per_character(tokenizer: Any) -> None:
    """Holding back text that could start a stop string reads each stop string a few times per character of it
    and of the answer, however long the stop strings (comparing every prefix read one up to 255 times a token)."""
    ids = list(tokenizer(TEXT * 4, add_special_tokens=False)["input_ids"])
    stops = tuple(CountingReads("Z" * 255 + str(i)) for i in range(MAX_STOP_STRINGS))
    CountingReads.reads = 0
    chunks, text = stream(tokenizer, ids, stops)
    assert "".join(chunks) == text.text == full_decode(tokenizer, ids)
    assert CountingReads.reads <= 4 * len(stops) * (len(stops[0]) + len(text.text))


def test_a_stop_string_completed_in_the_held_back_end_still_ends_the_text(smollm2: LoadedModel) -> None:
    """A token that completes a stop string and starts an incomplete character: the text waits for the next
    token, the answer ends first, and the stop string is still cut at the flush."""
    tokenizer = smollm2.tokenizer
    space_then_byte = next(t for t in range(tokenizer.vocab_size) if full_decode(tokenizer, [t]) == " \ufffd")
    ids = [*tokenizer("Done", add_special_tokens=False)["input_ids"], space_then_byte]
    chunks, text = stream(tokenizer, ids, ("Done ",))
    assert text.stopped and "".join(chunks) == text.text == ""
