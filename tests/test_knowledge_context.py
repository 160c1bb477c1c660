"""Passages → a prompt block that fits the budget, and [n] markers in an answer → citations
(glm4/knowledge/context.py), counted with the tiny GLM-4's real tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from glm4.knowledge.context import INSTRUCTION, Source, cite, fit_passages, render_context, strip_markers
from glm4.knowledge.store import SearchHit

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def count_tokens():
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(ROOT / "assets" / "tiny-glm4" / "tokenizer.json"))
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)


def hit(file_id: str, text: str, score: float = 0.5, heading: str = "Doc > Part") -> SearchHit:
    return SearchHit(file_id=file_id, filename=f"{file_id}.md", score=score, text=text, heading=heading,
                     vector_store_id="vs_1")


HITS = [hit("file-a", "The reset button must be held for 10 seconds. " * 3, 0.9),
        hit("file-b", "固件每天凌晨三点自动检查更新。" * 20, 0.8),  # long
        hit("file-c", "Guest networks hide your printers.", 0.7),
        hit("file-d", "Parental controls set bedtime hours.", 0.6)]


def test_everything_fits_in_order_with_numbered_sources(count_tokens):
    fitted = fit_passages(HITS, 10_000, count_tokens)
    assert [s.number for s in fitted.sources] == [1, 2, 3, 4]
    assert [s.passage.file_id for s in fitted.sources] == ["file-a", "file-b", "file-c", "file-d"]
    assert fitted.dropped == 0
    assert fitted.text.startswith(INSTRUCTION)
    assert "[1] file-a.md (Doc > Part)\nThe reset button" in fitted.text
    assert "[4] file-d.md (Doc > Part)\nParental controls" in fitted.text
    assert fitted.tokens == count_tokens(fitted.text)


@pytest.mark.parametrize("budget", [0, 40, 80, 120, 160, 200, 300, 400, 600])
def test_the_block_never_exceeds_the_budget_and_reports_what_was_dropped(count_tokens, budget):
    fitted = fit_passages(HITS, budget, count_tokens)
    assert count_tokens(fitted.text) <= budget
    assert fitted.dropped == len(HITS) - len(fitted.sources)
    if fitted.sources:
        assert fitted.sources[0].number == 1


def test_a_long_passage_that_does_not_fit_lets_shorter_later_ones_in(count_tokens):
    short_three = [Source(n, h) for n, h in enumerate((HITS[0], HITS[2], HITS[3]), start=1)]
    budget = count_tokens(render_context(short_three)) + 5  # room for the short ones, not for file-b
    assert count_tokens(HITS[1].text) > budget - count_tokens(render_context(short_three[:1]))
    fitted = fit_passages(HITS, budget, count_tokens)
    assert [s.passage.file_id for s in fitted.sources] == ["file-a", "file-c", "file-d"]
    assert [s.number for s in fitted.sources] == [1, 2, 3]  # renumbered: no gap where file-b was
    assert fitted.dropped == 1


def test_the_same_passage_from_two_stores_is_used_once(count_tokens):
    fitted = fit_passages([HITS[0], HITS[0], HITS[2]], 10_000, count_tokens)
    assert [s.passage.file_id for s in fitted.sources] == ["file-a", "file-c"]
    assert fitted.dropped == 1


def test_no_passages_no_block(count_tokens):
    fitted = fit_passages([], 1000, count_tokens)
    assert fitted.text == "" and fitted.sources == () and fitted.tokens == 0
    assert render_context([]) == ""


def test_markers_become_citations_with_their_positions(count_tokens):
    sources = fit_passages(HITS, 10_000, count_tokens).sources
    answer = "Hold it for 10 seconds [1]. 固件会自动更新【2】。Guests [3][4] and [2, 4]. Not a source: [9] [2023]."
    citations = cite(answer, sources)
    assert [(c.number, c.file_id) for c in citations] == [
        (1, "file-a"), (2, "file-b"), (3, "file-c"), (4, "file-d"), (2, "file-b"), (4, "file-d")]
    first = citations[0]
    assert answer[first.start_index:first.end_index] == "[1]" and first.index == first.end_index
    assert first.filename == "file-a.md" and first.quote.startswith("The reset button")
    assert answer[citations[1].start_index:citations[1].end_index] == "【2】"


def test_strip_markers_gives_openai_annotation_indexes(count_tokens):
    sources = fit_passages(HITS, 10_000, count_tokens).sources
    answer = "Hold it for 10 seconds [1]. Hide printers [3][4] and more."
    text, citations = strip_markers(answer, cite(answer, sources))
    assert text == "Hold it for 10 seconds. Hide printers and more."
    assert [(c.number, c.index) for c in citations] == [(1, len("Hold it for 10 seconds")),
                                                       (3, len("Hold it for 10 seconds. Hide printers")),
                                                       (4, len("Hold it for 10 seconds. Hide printers"))]


def test_an_answer_without_markers_has_no_citations(count_tokens):
    sources = fit_passages(HITS, 10_000, count_tokens).sources
    assert cite("I could not find that in the documents.", sources) == []
    assert strip_markers("plain", []) == ("plain", [])
