"""Grounded self-study tasks: questions about one fact of a sentence of the chunk, answered with its own words.

Why: a small model (SmolLM2-135M) asked to write questions about a chunk writes generic or wrong ones ("What is the
answer to this question?"), so the paper's teacher signal carries few facts and the cartridge learns almost nothing
(bench/quality/EXPERIMENTS.md). Here every task is built from a fact of the text (a name, a number, a date) and the
sentence around it: a question with the fact replaced by a wh-phrase ("... rises to how many metres?") or a
fill-in-the-blank, answered with the fact itself. The teacher (the model with the corpus in context) still gives the
distillation target at every token, and since the user turn quotes the corpus, distilling it too teaches the
cartridge the text the questions are about. A share of the facts is asked about only in the held-out evaluation
(:func:`reserved_facts`), so that it scores what the cartridge knows of the corpus, not the tasks it was trained on.
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass

_BLOCK_START = re.compile(r"\s*(?:#|[-*+]\s|\d+[.)]\s)")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_ABBREVIATION = re.compile(r"(?<![\w.])(?:Dr|Mr|Mrs|Ms|St|No|e\.g|i\.e|vs|etc|[A-Z])\.$")
_NUMBER = re.compile(r"\d[\d,.]*\d|\d")
_NAME = re.compile(r"(?:(?:Dr|Mr|Mrs|Ms|St|[A-Z])\.\s+)*[A-Z][\w'-]*(?:\s+(?:of\s+|the\s+|and\s+)?[A-Z][\w'-]*)*")
_MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
_DATE = re.compile(rf"\d{{1,2}} (?:{_MONTHS}) \d{{4}}")
_YEAR = re.compile(r"1\d{3}|20\d{2}")
_AFTER_YEAR_WORD = re.compile(r"\b(?:year|in|since|from|until)\s+$")
_ARTICLE = re.compile(r"\b(?:the|a|an|The|A|An)\s+$")
_UNIT = re.compile(r"\s([a-z]+)")
_WORD = re.compile(r"\S+")
_SPACE = re.compile(r"\s")
_WORD_CHARACTER = re.compile(r"\w")
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
MIN_QUESTION_WORDS = 4
CLOZE_SHARE = 1 / 3
"""The share of fill-in-the-blank tasks; the rest are questions, the form users ask in."""
HELD_OUT_SHARE = 1 / 8
"""The share of facts reserved for the held-out evaluation: training never asks for them (their sentences are still
quoted by the tasks about the other facts they hold), so the score measures what the cartridge carries of the
corpus, not its recall of the very tasks it was trained on."""


Fact = tuple[str, tuple[int, int]]
"""A sentence and the span of it asked for."""


@dataclass(frozen=True)
class Task:
    user: str
    answer: str


def _split_sentences(paragraph: str) -> list[str]:
    """A paragraph's sentences: not ended after a title, a common abbreviation or an initial ("Dr. Amara", "J. R.")."""
    parts, start = [], 0
    for end in _SENTENCE_END.finditer(paragraph):
        if not _ABBREVIATION.search(paragraph, start, end.start()):
            parts.append(paragraph[start : end.start()])
            start = end.end()
    return [*parts, paragraph[start:]]


def _paragraphs(text: str) -> list[str]:
    """The paragraphs of ``text``, each on one line: a hard-wrapped paragraph's lines joined by a space. One ends at
    a blank line, before a heading or list item, and after a heading (a line of its own)."""
    paragraphs: list[list[str]] = [[]]
    for line in text.split("\n"):
        heading = bool(paragraphs[-1]) and paragraphs[-1][0].startswith("#")
        if not line.strip() or _BLOCK_START.match(line) or heading:
            paragraphs.append([])
        paragraphs[-1].extend([line.strip()] if line.strip() else [])
    return [" ".join(lines) for lines in paragraphs if lines]


def sentences(text: str, *, cut_head: bool, cut_tail: bool) -> list[str]:
    """The sentences of ``text`` with at least ``MIN_SENTENCE_WORDS`` words; a chunk's cut-off ends are dropped.
    Hard-wrapped lines are joined: paragraphs end at a blank line or before a heading or list item, not at every
    line break, so a sentence wrapped over two lines stays whole (its facts, such as a name split by the wrap,
    too)."""
    parts = [p.strip() for paragraph in _paragraphs(text) for p in _split_sentences(paragraph)]
    parts = parts[1 if cut_head else 0 : len(parts) - 1 if cut_tail else len(parts)]
    return [p for p in parts if len(p.split()) >= MIN_SENTENCE_WORDS]


def fact_spans(sentence: str) -> list[tuple[int, int]]:
    """Character spans worth asking for: whole dates, numbers (with a following unit word), and names not opening
    the sentence, a name with the article before it (answers read "the Tarrow Moot", as people write them)."""
    dates = [m.span() for m in _DATE.finditer(sentence)]
    spans = list(dates)
    for match in _NUMBER.finditer(sentence):
        end = match.end()
        unit = _UNIT.match(sentence, end)
        if unit and unit.group(1) not in _NOT_UNITS:
            end = unit.end()
        spans.append((match.start(), end))
    for match in _NAME.finditer(sentence):
        if match.start() > 0 or " " in match.group():
            article = _ARTICLE.search(sentence, 0, match.start())
            spans.append((article.start() if article else match.start(), match.end()))
    return [(a, b) for a, b in spans if (a, b) in dates or not any(x <= a and b <= y for x, y in dates)]


def closing_words(sentence: str) -> tuple[int, int]:
    """The span of a sentence's last three words: what to ask for when it names no fact. Found by position, as the
    words may be apart by runs of spaces or tabs (text extracted from a PDF). A "sentence" of punctuation only (a
    window of dot leaders) is asked for whole."""
    words = list(_WORD.finditer(sentence.rstrip(".!?")))[-3:]
    return (words[0].start(), words[-1].end()) if words else (0, len(sentence))


def _fact_key(fact: Fact) -> int:
    sentence, (start, end) = fact
    return zlib.crc32(f"{start}:{end}:{sentence}".encode())


def reserved_facts(facts: list[Fact]) -> set[Fact]:
    """The facts reserved for the held-out evaluation: chosen by their words, not their place, so alike in every
    window that holds them (windows overlap, and a corpus may repeat a sentence). A text of few facts may have none
    in ``HELD_OUT_SHARE``: then the one of lowest key, unless it is the only one (training needs it)."""
    chosen = {fact for fact in facts if _fact_key(fact) < HELD_OUT_SHARE * 2**32}
    return chosen or ({min(facts, key=_fact_key)} if len(set(facts)) > 1 else set())


def wh_phrase(sentence: str, start: int, end: int) -> str:
    """What a question puts in place of the span: "what date", "what year", "how many <unit>" or "what"."""
    span = sentence[start:end]
    if _DATE.fullmatch(span):
        return "what date"
    if _YEAR.fullmatch(span) or (span.isdigit() and _AFTER_YEAR_WORD.search(sentence, 0, start)):
        return "what year"
    if span[:1].isdigit():
        unit = span.split(maxsplit=1)[1:]
        return " ".join(["how many", *unit])
    return "what"


def _clause(rng: random.Random, sentence: str, start: int, end: int) -> tuple[int, int]:
    """The stretch of the sentence a question keeps: sometimes only the clause around the span, so questions vary in
    length and cue, like the short ones people ask; the whole sentence when the clause alone says too little."""
    text_end = len(sentence.rstrip(".!?"))
    left = max(sentence.rfind(", ", 0, start), sentence.rfind("; ", 0, start))
    right = [i for i in (sentence.find(", ", end), sentence.find("; ", end)) if i >= 0]
    lo = left + 2 if left >= 0 and rng.random() < 0.5 else 0
    hi = min(right) if right and rng.random() < 0.7 else text_end
    if len((sentence[lo:start] + sentence[end:hi]).split()) < MIN_QUESTION_WORDS:
        return 0, text_end
    return lo, hi


def _asked(sentence: str, lo: int, hi: int, start: int, end: int) -> Task:
    """The stretch ``[lo, hi)`` of the sentence asked about the span in place: "Its highest point is what?"."""
    body = f"{sentence[lo:start]}{wh_phrase(sentence, start, end)}{sentence[end:hi]}".strip().rstrip(".,;:")
    return Task(f"{body[0].upper()}{body[1:]}?", sentence[start:end])


def _blanked(sentence: str, lo: int, hi: int, start: int, end: int) -> Task:
    """The stretch ``[lo, hi)`` of the sentence with the span blanked, to be filled in with the document's words."""
    blanked = f"{sentence[lo:start]}_____{sentence[end:hi]}".strip()
    return Task(f"Fill in the blank with the exact words from the document:\n{blanked}", sentence[start:end])


def _around(sentence: str, lo: int, hi: int, start: int, end: int, reach: int) -> tuple[int, int]:
    """At most ``reach`` characters of ``[lo, hi)`` on each side of the span, cut between words where whitespace (a
    space, a tab) allows (text without it, such as Chinese, is cut anywhere)."""
    a, b = max(lo, start - reach), min(hi, end + reach)
    if a > lo and not sentence[a - 1].isspace() and (space := _SPACE.search(sentence, a, start)):
        a = space.end()
    if b < hi and not sentence[b].isspace() and (spaces := list(_SPACE.finditer(sentence, end, b))):
        b = spaces[-1].start()
    return a, b


def _fitted(
    make: Callable[[str, int, int, int, int], Task],
    sentence: str,
    stretch: tuple[int, int],
    start: int,
    end: int,
    fits: Callable[[Task], bool],
) -> tuple[Task, str]:
    """``make``'s task over the widest part of ``stretch`` around the span that ``fits``, the context each side
    halved until it does (a long sentence, or a window without sentence breaks); no context when none does. Also
    the context kept, both sides."""
    lo, hi = stretch
    reach = max(start - lo, hi - end)
    while True:
        a, b = _around(sentence, lo, hi, start, end, reach)
        task = make(sentence, a, b, start, end)
        if fits(task) or not reach:
            return task, sentence[a:start] + sentence[end:b]
        reach //= 2


def _task(rng: random.Random, sentence: str, start: int, end: int, fits: Callable[[Task], bool]) -> Task:
    """A blank or a question about the span that ``fits``; a blank that fits only without a word around it ("_____"
    asks nothing) becomes a question about the whole sentence, cut alike. The bare question ("What year?") is kept
    even past the bound."""
    if rng.random() < CLOZE_SHARE:
        blank, context = _fitted(_blanked, sentence, (0, len(sentence)), start, end, fits)
        if fits(blank) and _WORD_CHARACTER.search(context):
            return blank
        stretch = 0, len(sentence.rstrip(".!?"))
    else:
        stretch = _clause(rng, sentence, start, end)
    return _fitted(_asked, sentence, stretch, start, end, fits)[0]


def grounded_tasks(
    rng: random.Random,
    text: str,
    count: int,
    *,
    cut_head: bool,
    cut_tail: bool,
    fits: Callable[[Task], bool] = lambda _: True,
    held_out: bool | None = None,
) -> list[Task]:
    """``count`` tasks over the facts of ``text``, visiting every fact (or fact-less sentence) before repeating one,
    each quoting as much of its sentence as ``fits`` (the trainer's question budget): a quote is otherwise as long as
    a sentence, or the whole window of text without sentence breaks. Cutting draws nothing from ``rng``: tasks that
    fit are those an unbounded call makes. A window of whitespace only (a PDF's blank pages) has nothing to ask
    about: no task, rather than ones whose answer is empty. ``held_out`` True asks only about the facts reserved for
    evaluation (no task when the text holds none), False about the others (all of them when every one is reserved:
    a text too small to spare one), None about every fact."""
    if not text.strip():
        return []
    found = sentences(text, cut_head=cut_head, cut_tail=cut_tail) or [text.strip()]
    facts = _reserved([(s, span) for s in found for span in (fact_spans(s) or [closing_words(s)])], held_out)
    if not facts:
        return []
    order: list[int] = []
    tasks = []
    for _ in range(count):
        if not order:
            order = rng.sample(range(len(facts)), len(facts))
        sentence, (start, end) = facts[order.pop()]
        tasks.append(_task(rng, sentence, start, end, fits))
    return tasks


def _reserved(facts: list[Fact], held_out: bool | None) -> list[Fact]:
    """The facts :func:`grounded_tasks` asks about for ``held_out``."""
    if held_out is None:
        return facts
    reserved = reserved_facts(facts)
    chosen = [fact for fact in facts if (fact in reserved) == held_out]
    return chosen or ([] if held_out else facts)
