"""Grounded self-study tasks: every fact of the text is asked about, in questions and blanks answered by the text."""

from __future__ import annotations

import random
import re

import pytest

from cartridges_trainer.grounded import Task, fact_spans, grounded_tasks, reserved_facts, sentences, wh_phrase

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
    asked = [t for t in tasks_about(sentence, span) if not t.user.startswith("Fill in the blank")]
    assert asked and all(t.user.endswith("?") and phrase in t.user and span not in t.user for t in asked)


def test_blanks_blank_exactly_the_answer() -> None:
    sentence = "Its highest point is Ben Carrick, which rises to 884 metres."
    blanks = [t for t in tasks_about(sentence, "Ben Carrick") if t.user.startswith("Fill in the blank")]
    assert blanks and all(t.user.endswith("\nIts highest point is _____, which rises to 884 metres.") for t in blanks)


def tasks_about(sentence: str, span: str) -> list[Task]:
    """The tasks a run over ``sentence`` alone makes about ``span``: questions and blanks (with one in three a blank,
    40 tasks over a sentence's few facts make both for every fact)."""
    tasks = grounded_tasks(random.Random(0), sentence, 40, cut_head=False, cut_tail=False)
    return [t for t in tasks if t.answer == span]


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
    blanks becoming questions when their instruction leaves no room for a word; the answer stays the whole fact."""
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


@pytest.mark.parametrize("gap", ["  ", "\t", " \t "])
def test_a_sentence_without_a_fact_spaced_unevenly_is_asked_for_its_closing_words(gap: str) -> None:
    """Text extracted from a PDF keeps runs of spaces and tabs inside its lines."""
    text = f"Then the old keeper walked{gap}home{gap}slowly."
    tasks = grounded_tasks(random.Random(0), text, 6, cut_head=False, cut_tail=False)
    assert {t.answer for t in tasks} == {f"walked{gap}home{gap}slowly"}


def test_tasks_cut_tab_separated_text_between_words() -> None:
    """Words apart by tabs are cut between, as words apart by spaces: a quote never starts or ends inside a word."""
    words = RUN_ON.split(" ")
    tasks = grounded_tasks(
        random.Random(0), "\t".join(words), 30, cut_head=False, cut_tail=False, fits=lambda t: len(t.user) <= 90
    )
    quotes = [t.user.split("\n")[1].replace("_____", t.answer) for t in tasks if t.user.startswith("Fill in")]
    assert quotes and all(set(q.split("\t")) <= set(words) for q in quotes)


BLANK = "Fill in the blank with the exact words from the document:\n_____"


@pytest.mark.parametrize("room", [0, 5])
def test_a_blank_that_keeps_no_word_around_it_becomes_a_question(room: int) -> None:
    """A bound just above a blank's instruction leaves it no word of context, or one: a blank without one becomes a
    question (which keeps at least its wh-phrase)."""
    tasks = grounded_tasks(
        random.Random(0), RUN_ON, 30, cut_head=False, cut_tail=False, fits=lambda t: len(t.user) <= len(BLANK) + room
    )
    blanks = [t.user.split("\n")[1] for t in tasks if t.user.startswith("Fill in the blank")]
    assert bool(blanks) == (room == 5) and all(re.search(r"\w", b.replace("_____", "")) for b in blanks)
    assert all(len(t.user.split()) > len(t.answer.split()) for t in tasks)


@pytest.mark.parametrize("window", [".", "...", " ?! \t", "........ ........"])
def test_a_window_of_punctuation_only_is_asked_about_whole(window: str) -> None:
    """Dot leaders of a PDF's contents page can fill a window: its tasks ask for them rather than crash synthesis."""
    tasks = grounded_tasks(random.Random(0), window, 4, cut_head=False, cut_tail=False)
    assert len(tasks) == 4 and all(task.answer and task.answer in window for task in tasks)


@pytest.mark.parametrize("window", ["", " ", "\n\n\n", " \t\n\u00a0\u3000\f "])
def test_a_window_of_whitespace_only_has_nothing_to_ask_about(window: str) -> None:
    """Blank pages of a PDF can fill a window: no task asks "What?" for an empty answer (synthesis takes the next
    window with text instead)."""
    assert grounded_tasks(random.Random(0), window, 4, cut_head=True, cut_tail=True) == []


def test_a_sentence_hard_wrapped_after_a_title_stays_whole_with_the_name_as_one_fact() -> None:
    """The bundled handbook wraps its lines: split at every line break and after "Dr.", its founder's sentence ended
    in the fact "Dr" and the name wrapped onto the next line was never asked for."""
    found = sentences(
        "founded in 1987 by Dr. Amara\nLindqvist, who directed it for years.", cut_head=False, cut_tail=False
    )
    assert found == ["founded in 1987 by Dr. Amara Lindqvist, who directed it for years."]
    assert "Dr. Amara Lindqvist" in spans_of(found[0])


def test_abbreviations_and_initials_do_not_end_a_sentence() -> None:
    text = "The survey was led by J. R. Marrow of St. Kilda, e.g. on the ice. Dr. Marrow ran the next in 1901 alone."
    assert sentences(text, cut_head=False, cut_tail=False) == [
        "The survey was led by J. R. Marrow of St. Kilda, e.g. on the ice.",
        "Dr. Marrow ran the next in 1901 alone.",
    ]


def test_headings_list_items_and_blank_lines_still_end_a_sentence() -> None:
    text = (
        "## The keepers of the Varnholm light\n"
        "The first keeper was Ilse Marrow, who\nlit the lamp in 1873\n"
        "- the second keeper came from Ostrava\n"
        "* the third keeper logged the ice\n"
        "2. the fourth keeper closed the light\n"
        "\n"
        "A new paragraph about the fjord ice"
    )
    assert sentences(text, cut_head=False, cut_tail=False) == [
        "## The keepers of the Varnholm light",
        "The first keeper was Ilse Marrow, who lit the lamp in 1873",
        "- the second keeper came from Ostrava",
        "* the third keeper logged the ice",
        "the fourth keeper closed the light",
        "A new paragraph about the fjord ice",
    ]


LOG = " ".join(f"The keeper logged {i + 3} metres of ice in {1800 + i}." for i in range(40))


def test_held_out_tasks_ask_only_about_reserved_facts_and_training_tasks_never_do() -> None:
    """The held-out evaluation asked about the facts training asks about, mostly in the very same words: it scored
    recall of training examples. A share of the facts, chosen by their words, is now asked about only there."""
    facts = [(s, span) for s in sentences(LOG, cut_head=False, cut_tail=False) for span in fact_spans(s)]
    reserved = {s[a:b] for s, (a, b) in reserved_facts(facts)}
    assert 1 < len(reserved) < len(facts) / 4
    held_out = grounded_tasks(random.Random(0), LOG, 40, cut_head=False, cut_tail=False, held_out=True)
    trained = grounded_tasks(random.Random(0), LOG, 4 * len(facts), cut_head=False, cut_tail=False, held_out=False)
    assert {t.answer for t in held_out} == reserved
    assert {t.answer for t in trained} == {s[a:b] for s, (a, b) in facts} - reserved


@pytest.mark.parametrize("repeats", [1, 3])
def test_a_text_of_few_facts_holds_one_out_unless_it_has_only_one(repeats: int) -> None:
    """A small corpus may have no fact in the held-out share: one is held out all the same, the same in every repeat
    of its sentence, while the only fact of a text is trained on (the pipeline drops the held-out conversations that
    then equal training ones)."""
    text = " ".join(["The lighthouse of Varnholm was lit in 1873 by keeper Ilse Marrow."] * repeats)
    (fact,) = reserved_facts(
        [(s, span) for s in sentences(text, cut_head=False, cut_tail=False) for span in fact_spans(s)]
    )
    held_out = grounded_tasks(random.Random(0), text, 8, cut_head=False, cut_tail=False, held_out=True)
    trained = grounded_tasks(random.Random(0), text, 8, cut_head=False, cut_tail=False, held_out=False)
    assert {t.answer for t in held_out} == {fact[0][slice(*fact[1])]}
    assert {t.answer for t in trained} == {"Varnholm", "1873", "Ilse Marrow"} - {t.answer for t in held_out}
    single = "The keeper logged the ice on the fjord in 1901."
    assert grounded_tasks(random.Random(0), single, 4, cut_head=False, cut_tail=False, held_out=True) == []
    assert {
        t.answer for t in grounded_tasks(random.Random(0), single, 4, cut_head=False, cut_tail=False, held_out=False)
    } == {"1901"}
