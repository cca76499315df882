"""Incremental detokenization with stop strings: what may be streamed now, and where the answer ends.

Decoding all of a request's tokens at every step costs time in proportion to the answer so far (0.4 ms per
request per step at 1000 tokens with SmolLM2's tokenizer: 29 ms of a batch-64 decode step whose kernels take
about 1.3 ms on an H200). A stream decodes a short window instead: the tokens since the last complete text
(``_read``) plus the window before them (``_prefix``), whose text is subtracted, so a tokenizer that drops a
word's leading space at the start of a decode still gives the right text. Emitted text is never rewritten
(``clean_up_tokenization_spaces`` stays off), so the chunks join to exactly the decode of every token.

Three things keep a token's cost bounded whatever the output: text that ends in an incomplete character waits for
at most ``MAX_PENDING_TOKENS`` tokens (then the text before a cut that splits no character is final, bytes that are
no UTF-8 included); a special token that adds no text is left out of the window (every decode skips it, so a run of
them would otherwise be decoded again at each step); and the hold-back for stop strings follows each stop string's
longest matched prefix character by character (Knuth-Morris-Pratt), instead of comparing every prefix of every stop
string.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

from transformers import PreTrainedTokenizerBase

REPLACEMENT = "\ufffd"  # what a decoder yields for an incomplete UTF-8 sequence
# An incomplete character is at most 3 bytes and a token at least one: behind more tokens than this, output still
# ending in an incomplete character has text before it that no later token can change.
MAX_PENDING_TOKENS = 4


class StopPrefix:
    """The longest tail of a growing text that is a prefix of ``stop``, updated per appended character
    (Knuth-Morris-Pratt: amortized constant time per character, whatever the stop string's length)."""

    def __init__(self, stop: str) -> None:
        self.stop = stop
        self.fallback = _prefix_function(stop)
        self.length = 0

    def feed(self, text: str) -> None:
        stop, fallback, length = self.stop, self.fallback, self.length
        for char in text:
            if length == len(stop):  # a whole match (the stream ends there): continue from its longest border
                length = fallback[length - 1]
            while length and stop[length] != char:
                length = fallback[length - 1]
            if stop[length] == char:
                length += 1
        self.length = length


def _prefix_function(pattern: str) -> list[int]:
    """``result[i]``: length of the longest proper prefix of ``pattern[: i + 1]`` that is also its suffix."""
    result = [0] * len(pattern)
    for i in range(1, len(pattern)):
        length = result[i - 1]
        while length and pattern[i] != pattern[length]:
            length = result[length - 1]
        result[i] = length + (pattern[i] == pattern[length])
    return result


class TextStream:
    """Decodes a request's generated tokens; holds back text that could still become a stop string or a
    multi-byte character, so streamed chunks concatenate to exactly the final text."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self._stop_prefixes = [StopPrefix(s) for s in self.stop]
        self.ids: list[int] = []  # special tokens that add no text left out
        self.text = ""  # the decode of ids[:_read]: every token whose characters are complete
        self.emitted = 0
        self._prefix = self._read = 0  # ids[_prefix:_read] decode to _prefix_text, the tail of self.text
        self._prefix_text = ""
        self.stopped = False  # a stop string ended the answer: later tokens add nothing

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one token; returns (text safe to stream now, whether a stop string ended the answer). A window
        ending in an incomplete character waits for the next token, for at most ``MAX_PENDING_TOKENS`` tokens."""
        self.ids.append(token_id)
        readable = self._readable()
        if readable is None:
            if token_id in self._special_ids:  # skipped by every decode: kept, it would lengthen every window
                self.ids.pop()
            return "", False  # a character still incomplete, or a token with no text: nothing new yet
        end, window = readable
        added = window[len(self._prefix_text) :]
        self._prefix, self._read = self._read, end
        self._prefix_text = self._decode(self.ids[self._prefix : self._read])
        if self._append(added):
            return self._take(len(self.text)), True
        return self._take(len(self.text) - max((p.length for p in self._stop_prefixes), default=0)), False

    @cached_property
    def _special_ids(self) -> frozenset[int]:
        """The tokens ``skip_special_tokens`` drops before decoding, so leaving them out changes no decode (read
        only once a token adds no text)."""
        added = self.tokenizer.added_tokens_decoder.items()
        return frozenset(self.tokenizer.all_special_ids) | {i for i, token in added if token.special}

    def _readable(self) -> tuple[int, str] | None:
        """``(end, decode of ids[_prefix:end])`` where ``ids[:end]`` have final text, or None while no new text is.

        Text ending in an incomplete character is not final; once more than ``MAX_PENDING_TOKENS`` tokens wait
        (output that is no UTF-8, say), the text before the latest cut among the last tokens that splits no
        character is: the decode in two parts equals the decode in one, so no byte after the cut continues one
        before it.
        """
        window = self._decode(self.ids[self._prefix :])
        if not window.endswith(REPLACEMENT):
            return (len(self.ids), window) if len(window) > len(self._prefix_text) else None
        if len(self.ids) - self._read <= MAX_PENDING_TOKENS:
            return None
        for end in range(len(self.ids) - 1, len(self.ids) - 1 - MAX_PENDING_TOKENS, -1):
            head = self._decode(self.ids[self._prefix : end])
            if len(head) > len(self._prefix_text) and head + self._decode(self.ids[end:]) == window:
                return end, head
        return None

    def flush(self) -> str:
        """Everything not yet streamed (the answer is over: held-back text is final, and an incomplete last
        character is decoded as the whole answer's decode would), cut at a stop string it completes."""
        if not self.stopped:
            self._append(self._decode(self.ids[self._prefix :])[len(self._prefix_text) :])
            self._prefix = self._read = len(self.ids)
            self._prefix_text = ""
        return self._take(len(self.text))

    def _append(self, added: str) -> bool:
        """Add final text and cut the answer at the first stop string in it (True then). Earlier calls searched
        the text before ``searched_from``: only a match ending in ``added`` is new."""
        searched_from = max(0, len(self.text) - max(map(len, self.stop), default=0) + 1)
        self.text += added
        cut = min((i for i in (self.text.find(s, searched_from) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
            return True
        for prefix in self._stop_prefixes:
            prefix.feed(added)
        return False

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))

    def _take(self, end: int) -> str:
        chunk = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return chunk
