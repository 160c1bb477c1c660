"""The UI's documents (glm4/ui_documents.py) on a real KnowledgeStore and the real tiny engine: upload, list,
delete, retrieval fitted to the context window, citations and references; and the interface text table."""

from __future__ import annotations

import dataclasses

import pytest

from glm4 import ui
from glm4.knowledge.store import KnowledgeError, KnowledgeStore
from glm4.ui_documents import REFERENCES_RULE, UserDocuments, human_size, ui_owner, without_references
from glm4.ui_text import TEXT, language_of

MANUAL = ("# Router manual\n\n## Reset\n\nTo reset the Zephyr router, hold the red button on its back for twelve "
          "seconds until the light blinks blue.\n\n## Wi-Fi\n\nThe Zephyr router broadcasts on 2.4 GHz and 5 GHz.\n")
CITED = ui.TEST_FORCE_PREFIX + " Hold the red button for twelve seconds [1]."


@pytest.fixture
def documents(tmp_path):
    store = KnowledgeStore(tmp_path / "data")
    store.start()
    yield UserDocuments(store)
    store.close()


def add(documents, tmp_path, name="manual.md", body=MANUAL, owner="ui"):
    path = tmp_path / name
    path.write_text(body, encoding="utf-8")
    added = documents.upload(owner, [str(path)])
    assert documents.store.wait_idle(30)
    return added


def test_upload_lists_with_size_and_status_and_delete_removes(documents, tmp_path):
    assert documents.rows("ui", "en") == []
    assert add(documents, tmp_path) == ["manual.md"]
    [[name, size, status, file_id]] = documents.rows("ui", "en")
    assert (name, size, status) == ("manual.md", human_size(len(MANUAL.encode())), "ready")
    assert documents.rows("ui", "zh")[0][2] == "就绪"
    assert documents.rows(ui_owner("alice"), "en") == []  # another UI user sees none of it
    assert documents.store.list_files("local").items == []  # nor does the API's anonymous owner
    assert documents.delete("ui", file_id) == "manual.md"
    assert documents.rows("ui", "en") == [] and documents.store.list_files("ui").items == []


def test_a_bad_upload_is_refused_and_leaves_nothing(documents, tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(b"\x89PNG\r\n")
    with pytest.raises(KnowledgeError, match="not supported"):
        documents.upload("ui", [str(path)])
    assert documents.rows("ui", "en") == [] and documents.store.list_files("ui").items == []


async def test_answer_from_documents_cites_the_file(engine, documents, tmp_path):
    add(documents, tmp_path)
    chat = ui.ChatSession(engine, test_hooks=True, documents=documents)
    yields = [list(y) async for y in chat.respond("How do I reset the Zephyr router?", [], CITED, 0.0, 1.0, 64,
                                                   True, "English")]
    answer = yields[-1][-1]
    assert answer.startswith("Hold the red button for twelve seconds [1].")
    references = answer.split(REFERENCES_RULE, 1)[1]
    assert "**References**" in references and "1. **manual.md**" in references and "twelve seconds" in references
    assert without_references(answer) == "Hold the red button for twelve seconds [1]."
    # The references never go back to the model.
    assert ui.to_messages("", [{"role": "assistant", "content": answer}], "ok")[0]["content"] == \
        "Hold the red button for twelve seconds [1]."


@pytest.fixture
async def small_engine(tiny):
    """The tiny model served with a 1024-token window (as --max-model-len 1024 would)."""
    from glm4.engine.local import LocalEngine

    local = LocalEngine(tiny.models[0], tiny.tokenizer, dataclasses.replace(tiny.info, max_model_len=1024),
                        max_num_seqs=2, max_queue=2, test_hooks=True)
    await local.start()
    yield local
    await local.shutdown()


async def test_passages_are_fitted_to_the_window_and_the_user_is_told(small_engine, documents, tmp_path):
    engine = small_engine
    # Many long passages: more than the window holds.
    body = "\n\n".join(f"## Part {n}\n\n" + f"Zephyr router detail {n}: " + "reset button light blue. " * 60
                       for n in range(12))
    add(documents, tmp_path, "long.md", body)
    chat = ui.ChatSession(engine, test_hooks=True, documents=documents)
    captured = []
    build = chat.build
    chat.build = lambda messages: captured.append(build(messages)) or captured[-1]
    yields = [list(y) async for y in chat.respond("Zephyr router reset button", [], CITED, 0.0, 1.0, 64, True,
                                                   "English")]
    titles = [item.metadata["title"] for item in yields[-1] if not isinstance(item, str)]
    assert any("passages left out to fit" in title for title in titles), titles
    window = engine.info.max_model_len
    assert len(captured[-1].token_ids) + 16 <= window  # the prompt fits, with room for a reply


async def test_the_switch_without_documents_says_so(engine, documents):
    chat = ui.ChatSession(engine, test_hooks=True, documents=documents)
    yields = [list(y) async for y in chat.respond("hi", [], CITED, 0.0, 1.0, 64, True, "中文")]
    titles = [item.metadata["title"] for item in yields[-1] if not isinstance(item, str)]
    assert titles == [TEXT["zh"]["no_documents"]]


@pytest.mark.parametrize("tag, language", [("zh-CN", "zh"), ("zh-Hant-TW,en;q=0.8", "zh"), ("en-US,zh;q=0.9", "en"),
                                           ("fr", "en"), ("", "en"), (None, "en")])
def test_language_of_browser_tags(tag, language):
    assert language_of(tag) == language


def test_both_languages_have_every_text():
    assert TEXT["en"].keys() == TEXT["zh"].keys()
