"""Incremental detokenization with stop strings: what may be streamed now, and where the answer ends."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

REPLACEMENT = "\ufffd"  # what a decoder yields for an incomplete UTF-8 sequence


class TextStream:
    """Decodes a request's generated tokens; holds back text that could still become a stop string or a
    multi-byte character, so streamed chunks concatenate to exactly the final text."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one token; returns (text safe to stream now, whether a stop string ended the answer)."""
        self.ids.append(token_id)
        decoded = str(self.tokenizer.decode(self.ids, skip_special_tokens=True))
        cut = min((i for i in (decoded.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = decoded[:cut]
            return self._take(len(self.text)), True
        self.text = decoded
        if decoded.endswith(REPLACEMENT):
            return "", False
        return self._take(len(decoded) - self._stop_prefix_len(decoded)), False

    def flush(self) -> str:
        """Everything not yet streamed (the answer is over, held-back text is final)."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        chunk = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return chunk

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
