"""Grounded self-study tasks: every fact of the text is asked about, in questions and blanks answered by the text."""

from __future__ import annotations

import random

import pytest

from cartridges_trainer.grounded import cloze, fact_spans, grounded_tasks, question, sentences, wh_phrase

TEXT = (
    "The isles are governed by the Tarrow Moot, a council of nineteen members that meets in Corrastow. "
    "Its highest point is Ben Carrick, which rises to 884 metres. "
    "The Treaty of Quillhaven was signed on 3 May 1791 after a long revolt. "
    "The town museum opened in 1966 in an old smokehouse. "
    "It is windy and wet for most of the long year."
)


def spans_of(sentence: str) -> list[str]:
    return [sentence[a:b] for a, b in fact_spans(sentence)]


def test_fact_spans_take_names_with_their_article_numbers_with_units_and_whole_dates() -> None:
    first, second, third, _, _ = sentences(TEXT, cut_head=False, cut_tail=False)
    assert {"the Tarrow Moot", "Corrastow"} <= set(spans_of(first))
    assert {"Ben Carrick", "884 metres"} <= set(spans_of(second))
    assert "3 May 1791" in spans_of(third) and not {"3", "May", "1791"} & set(spans_of(third))


@pytest.mark.parametrize(
    ("sentence", "span", "phrase"),
    [
        ("Its highest point is Ben Carrick, which rises to 884 metres.", "884 metres", "how many metres"),
        ("The Treaty of Quillhaven was signed on 3 May 1791 after a long revolt.", "3 May 1791", "what date"),
        ("The town museum opened in 1966 in an old smokehouse.", "1966", "what year"),
        ("The council has 19 members and meets in Corrastow.", "19 members", "how many members"),
        ("The isles are governed by the Tarrow Moot in Corrastow.", "the Tarrow Moot", "what"),
    ],
)
def test_questions_put_a_wh_phrase_where_the_fact_was(sentence: str, span: str, phrase: str) -> None:
    start = sentence.index(span)
    assert wh_phrase(sentence, start, start + len(span)) == phrase
    task = question(random.Random(0), sentence, start, start + len(span))
    assert task.answer == span and task.user.endswith("?") and phrase in task.user and span not in task.user


def test_cloze_blanks_exactly_the_answer() -> None:
    sentence = "Its highest point is Ben Carrick, which rises to 884 metres."
    start = sentence.index("Ben Carrick")
    task = cloze(sentence, start, start + len("Ben Carrick"))
    assert task.answer == "Ben Carrick" and "_____, which rises to 884 metres." in task.user


def test_every_fact_is_asked_about_before_any_repeats() -> None:
    found = sentences(TEXT, cut_head=False, cut_tail=False)
    facts = sum(max(len(fact_spans(s)), 1) for s in found)
    tasks = grounded_tasks(random.Random(3), TEXT, facts, cut_head=False, cut_tail=False)
    assert len({(t.answer, t.user.split("\n")[-1]) for t in tasks}) == facts
    assert all(t.answer in TEXT for t in tasks)
    assert "the long year" in {t.answer for t in tasks}  # a sentence without a fact: its closing words
    kinds = {
        t.user.startswith("Fill in the blank")
        for t in grounded_tasks(random.Random(0), TEXT, 60, cut_head=False, cut_tail=False)
    }
    assert kinds == {True, False}


def test_cut_off_ends_of_a_chunk_are_not_asked_about() -> None:
    tasks = grounded_tasks(random.Random(0), TEXT, 40, cut_head=True, cut_tail=True)
    assert not {t.answer for t in tasks} & {"Corrastow", "the Tarrow Moot", "the long year"}


RUN_ON = " and ".join(f"in {1800 + i} the keeper of Varnholm logged {i + 3} metres of ice" for i in range(30))


@pytest.mark.parametrize("bound", [90, 40])
def test_tasks_quote_the_words_around_their_fact_that_fit_the_bound(bound: int) -> None:
    """Text without sentence breaks is one sentence: each task quotes the words around its fact within the bound,
    blanks becoming questions when their instruction alone is longer; the answer stays the whole fact."""
    tasks = grounded_tasks(
        random.Random(0), RUN_ON, 30, cut_head=False, cut_tail=False, fits=lambda t: len(t.user) <= bound
    )
    assert all(len(t.user) <= bound and len(t.user.split()) >= 4 for t in tasks)
    blanks = [t for t in tasks if t.user.startswith("Fill in the blank")]
    assert bool(blanks) == (bound == 90)
    assert all(f" {t.user.split(chr(10))[1].replace('_____', t.answer)} " in f" {RUN_ON} " for t in blanks)
    unbounded = grounded_tasks(random.Random(0), RUN_ON, 30, cut_head=False, cut_tail=False)
    assert [t.answer for t in tasks] == [t.answer for t in unbounded]


def test_tasks_within_the_bound_are_those_made_without_one() -> None:
    """Cutting draws nothing from the seeded generator: the tasks within the bound are those made without one."""
    unbounded = grounded_tasks(random.Random(5), TEXT, 30, cut_head=False, cut_tail=False)
    longest = max(len(t.user) for t in unbounded)
    cut = grounded_tasks(
        random.Random(5), TEXT, 30, cut_head=False, cut_tail=False, fits=lambda t: len(t.user) < longest
    )
    assert [a == b for a, b in zip(cut, unbounded, strict=True)] == [len(t.user) < longest for t in unbounded]
