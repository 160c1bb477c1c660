"""The analyzer and the FTS5 index (glm4/knowledge/index.py)."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from glm4.knowledge import index
from glm4.knowledge.index import Analyzer


def test_chinese_is_segmented_and_cut_into_bigrams():
    terms = Analyzer().terms("咖啡机的水箱")
    assert {"咖啡", "咖啡机", "水箱"} <= set(terms)  # jieba's words and the words inside them
    assert {"机的", "的水"} <= set(terms)  # bigrams: the fallback for words jieba does not know


def test_english_is_normalized_case_folded_and_stemmed():
    assert Analyzer().terms("Connecting ＷＩＦＩ Settings, E3 192.168.8.1") == [
        "connect", "wifi", "set", "e3", "192", "168", "8", "1"]
    assert Analyzer(stem=False).terms("Connecting") == ["connecting"]


def test_user_text_is_never_read_as_fts5_syntax():
    db = sqlite3.connect(":memory:")
    store = "vs_" + "ab" * 16
    index.create_table(db, store)
    index.add(db, store, [(1, index.prepare("Guide", "near the router, or the modem"))])
    for query in ['NEAR("a" b)', "router OR", "* AND", '"unterminated', "col:router", "^router", "-router"]:
        results = index.search(db, store, index.match_expression(query), 5)
        assert [rowid for rowid, _ in results] in ([], [1])
    assert index.match_expression("的 ，。 !!") == '"的"'
    assert index.match_expression(" ,;") is None


def test_a_query_is_capped_in_terms():
    expression = index.match_expression(" ".join(f"word{i}" for i in range(1000)))
    assert expression.count(" OR ") == index.MAX_QUERY_TERMS - 1


def test_table_names_accept_generated_ids_only():
    assert index.table_name("vs_" + "0f" * 16) == "terms_" + "0f" * 16
    for bad in ("vs_x; DROP TABLE files", "vs_", "files", "vs_" + "0" * 65):
        with pytest.raises(ValueError):
            index.table_name(bad)


def test_analysis_from_several_threads_gives_the_same_terms():
    text = "connecting watering restoring settings neglected allowed firmware updates 咖啡机除垢 " * 40
    expected = Analyzer().terms(text)
    results: list[bool] = []

    def analyze():
        results.extend(Analyzer().terms(text) == expected for _ in range(50))

    threads = [threading.Thread(target=analyze) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 200 and all(results)
