"""Grounded self-study tasks: a user turn built from one sentence of the chunk, answered with the chunk's own words.

Why: a small model (SmolLM2-135M) asked to write questions about a chunk writes generic or wrong ones, so the paper's
teacher signal carries few facts and the cartridge learns almost nothing (bench/quality/EXPERIMENTS.md). Here the
tasks and answers come from the text itself; the teacher (the model with the chunk in context) is still scored on
each answer token and its top-k stays the distillation target, so the cartridge learns what the chunk makes the
model predict. The three tasks ask for facts from cues (cloze), the passage in order (next sentence), and the text
that goes with a name or number (quote).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_NUMBER = re.compile(r"\d[\d,.]*\d|\d")
_NAME = re.compile(r"[A-Z][\w'-]*(?:\s+(?:of\s+|the\s+|and\s+)?[A-Z][\w'-]*)*")
_UNIT = re.compile(r"\s([a-z]+)")
_NOT_UNITS = frozenset(
    [
        "a",
        "an",
        "and",
        "as",
        "at",
        "after",
        "before",
        "by",
        "during",
        "for",
        "from",
        "in",
        "into",
        "of",
        "on",
        "or",
        "since",
        "that",
        "the",
        "to",
        "until",
        "was",
        "were",
        "when",
        "which",
        "while",
        "who",
        "with",
    ]
)
MIN_SENTENCE_WORDS = 5


@dataclass(frozen=True)
class Task:
    user: str
    answer: str


def sentences(text: str, *, cut_head: bool, cut_tail: bool) -> list[str]:
    """The sentences of ``text`` with at least ``MIN_SENTENCE_WORDS`` words; a chunk's cut-off ends are dropped."""
    parts = [p.strip() for p in _SENTENCE_END.split(text)]
    parts = parts[1 if cut_head else 0 : len(parts) - 1 if cut_tail else len(parts)]
    return [p for p in parts if len(p.split()) >= MIN_SENTENCE_WORDS]


def fact_spans(sentence: str) -> list[tuple[int, int]]:
    """Character spans worth asking for: numbers (with a following unit word) and names not opening the sentence."""
    spans = []
    for match in _NUMBER.finditer(sentence):
        end = match.end()
        unit = _UNIT.match(sentence, end)
        if unit and unit.group(1) not in _NOT_UNITS:
            end = unit.end()
        spans.append((match.start(), end))
    for match in _NAME.finditer(sentence):
        if match.start() > 0 or " " in match.group():
            spans.append((match.start(), match.end()))
    return spans


def _cloze(rng: random.Random, sentence: str) -> Task:
    spans = fact_spans(sentence)
    if spans:
        start, end = rng.choice(spans)
    else:  # no name or number: ask for the closing words
        words = sentence.rstrip(".!?").split()
        tail = " ".join(words[-rng.randint(2, 4) :])
        start = sentence.rindex(tail)
        end = start + len(tail)
    blanked = f"{sentence[:start]}_____{sentence[end:]}"
    return Task(f"Fill in the blank with the exact words from the document:\n{blanked}", sentence[start:end])


def _next(sentence: str, following: str) -> Task:
    return Task(f"Which sentence comes right after this one in the document?\n{sentence}", following)


def _quote(rng: random.Random, sentence: str) -> Task:
    spans = fact_spans(sentence)
    if not spans:
        return Task(f"Quote the sentence of the document that begins with: {' '.join(sentence.split()[:4])}", sentence)
    start, end = rng.choice(spans)
    return Task(f"Quote the sentence of the document that mentions {sentence[start:end]}.", sentence)


def grounded_tasks(rng: random.Random, text: str, count: int, *, cut_head: bool, cut_tail: bool) -> list[Task]:
    """``count`` tasks over the sentences of ``text``, visiting every sentence before repeating one."""
    found = sentences(text, cut_head=cut_head, cut_tail=cut_tail) or [text.strip()]
    order: list[int] = []
    tasks = []
    for _ in range(count):
        if not order:
            order = rng.sample(range(len(found)), len(found))
        i = order.pop()
        kind = rng.choice(("cloze", "next", "quote") if i + 1 < len(found) else ("cloze", "quote"))
        if kind == "cloze":
            tasks.append(_cloze(rng, found[i]))
        elif kind == "next":
            tasks.append(_next(found[i], found[i + 1]))
        else:
            tasks.append(_quote(rng, found[i]))
    return tasks
