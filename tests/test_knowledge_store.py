"""The store on its own (glm4/knowledge/store.py): atomic uploads, crash recovery at start, ownership,
cascading deletes, paging and search."""

from __future__ import annotations

import io
import sqlite3

import pytest

from glm4.knowledge.store import (FileTooLarge, InvalidDocument, KnowledgeStore, LimitExceeded, Limits, NotFound,
                                  clean_filename)
from tests.knowledge_docs import DATA

ALICE, BOB = "key:alice", "key:bob"


@pytest.fixture
def store(tmp_path):
    knowledge = KnowledgeStore(tmp_path, Limits(max_file_size=64 * 1024, max_files=5, max_vector_stores=3))
    knowledge.start()
    yield knowledge
    knowledge.close()


def upload(store, owner, name="router-guide.html", data=None):
    return store.create_file(owner, name, "assistants", io.BytesIO(data if data is not None else (DATA / name).read_bytes()))


def on_disk(store) -> tuple[set[str], set[str]]:
    return {p.name for p in store.files_dir.iterdir()}, {p.name for p in store.tmp_dir.iterdir()}


class BreaksHalfway(io.BytesIO):
    """A stream that fails partway, like a client or disk going away in the middle of an upload."""

    def read(self, n=-1):
        if self.tell() > len(self.getvalue()) // 2:
            raise OSError(5, "Input/output error")
        return super().read(min(n, 1024) if n and n > 0 else 1024)


def test_an_upload_that_fails_midway_leaves_nothing(store):
    kept = upload(store, ALICE)
    before = on_disk(store)
    with pytest.raises(OSError):
        store.create_file(ALICE, "garden.md", "assistants", BreaksHalfway((DATA / "garden-handbook.md").read_bytes()))
    assert on_disk(store) == before == ({kept.id}, set())
    assert [f.id for f in store.list_files(ALICE).items] == [kept.id]


@pytest.mark.parametrize("name, data, error", [
    ("big.txt", b"a" * (64 * 1024 + 1), FileTooLarge),
    ("empty.txt", b"", InvalidDocument),
    ("binary.txt", bytes(range(256)) * 8, InvalidDocument),
    ("photo.jpg", b"\xff\xd8\xff\xe0", InvalidDocument),
])
def test_refused_uploads_leave_nothing(store, name, data, error):
    with pytest.raises(error):
        upload(store, ALICE, name, data)
    assert on_disk(store) == (set(), set())
    assert store.list_files(ALICE).items == []


def test_file_names_are_shown_never_used_as_paths(store, tmp_path):
    target = tmp_path / "pwned.txt"
    record = upload(store, ALICE, "../" * 12 + str(target), b"hello there")
    assert record.filename == "pwned.txt" and not target.exists()
    assert on_disk(store) == ({record.id}, set())
    assert clean_filename("C:\\Windows\\win.ini.txt") == "win.ini.txt"
    assert clean_filename("a\x00b\x1f.txt") == "ab.txt"
    assert clean_filename("..") == "upload" and clean_filename("/") == "upload"


def test_count_limits(store):
    for _ in range(5):
        upload(store, ALICE, "notes.txt", b"some notes")
    with pytest.raises(LimitExceeded, match="limit is 5"):
        upload(store, ALICE, "notes.txt", b"one too many")
    upload(store, BOB, "notes.txt", b"bob has his own quota")
    for _ in range(3):
        store.create_vector_store(ALICE)
    with pytest.raises(LimitExceeded, match="limit is 3"):
        store.create_vector_store(ALICE)


def test_owners_see_only_their_own(store):
    file = upload(store, ALICE)
    vs = store.create_vector_store(ALICE, file_ids=[file.id])
    for call in (lambda: store.get_file(BOB, file.id), lambda: store.file_content(BOB, file.id),
                 lambda: store.delete_file(BOB, file.id), lambda: store.get_vector_store(BOB, vs.id),
                 lambda: store.search(BOB, [vs.id], "reset"), lambda: store.delete_vector_store(BOB, vs.id),
                 lambda: store.create_vector_store(BOB, file_ids=[file.id]),
                 lambda: store.attach_file(BOB, store.create_vector_store(BOB).id, file.id),
                 lambda: store.get_store_file(BOB, vs.id, file.id)):
        with pytest.raises(NotFound):
            call()
    assert store.list_files(BOB).items == []
    assert vs.id not in {record.id for record in store.list_vector_stores(BOB).items}
    assert store.wait_idle(30)
    assert store.search(ALICE, [vs.id], "factory reset")[0].file_id == file.id


def test_deleting_a_file_removes_its_passages_from_every_store(store):
    router, garden = upload(store, ALICE), upload(store, ALICE, "garden-handbook.md")
    one = store.create_vector_store(ALICE, file_ids=[router.id, garden.id])
    two = store.create_vector_store(ALICE, file_ids=[router.id])
    assert store.wait_idle(30)
    hits = store.search(ALICE, [one.id, two.id], "factory reset paper clip", max_results=50)
    assert {(hit.vector_store_id, hit.file_id) for hit in hits if hit.file_id == router.id} == {
        (one.id, router.id), (two.id, router.id)}
    store.delete_file(ALICE, router.id)
    hits = store.search(ALICE, [one.id, two.id], "factory reset paper clip", max_results=50)
    assert router.id not in {hit.file_id for hit in hits}
    assert store.get_vector_store(ALICE, one.id).file_counts["total"] == 1
    assert not (store.files_dir / router.id).exists()
    with sqlite3.connect(store.root / "knowledge.sqlite3") as db:
        assert db.execute("SELECT COUNT(*) FROM passages WHERE file_id = ?", (router.id,)).fetchone() == (0,)


def test_detaching_keeps_the_file_and_deleting_a_store_keeps_its_files(store):
    file = upload(store, ALICE)
    vs = store.create_vector_store(ALICE, file_ids=[file.id])
    assert store.wait_idle(30)
    store.detach_file(ALICE, vs.id, file.id)
    assert store.search(ALICE, [vs.id], "reset") == []
    store.attach_file(ALICE, vs.id, file.id)
    assert store.wait_idle(30)
    store.delete_vector_store(ALICE, vs.id)
    assert store.get_file(ALICE, file.id).id == file.id
    with sqlite3.connect(store.root / "knowledge.sqlite3") as db:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "terms_" + vs.id.removeprefix("vs_") not in tables


def test_start_removes_what_a_crash_left_and_indexes_interrupted_files_again(tmp_path):
    first = KnowledgeStore(tmp_path)
    first.start()
    file = upload(first, ALICE)
    vs = first.create_vector_store(ALICE, file_ids=[file.id])
    assert first.wait_idle(30)
    expected = first.search(ALICE, [vs.id], "factory reset")
    first.close()
    # the state a crash leaves: an upload half-written to tmp/, one renamed into files/ but never committed,
    # and a file attached whose index transaction never committed
    (first.tmp_dir / "file-deadbeef.part").write_bytes(b"half an upl")
    (first.files_dir / "file-0123456789abcdef").write_bytes(b"never committed")
    with sqlite3.connect(first.root / "knowledge.sqlite3") as db:
        db.execute("DELETE FROM terms_" + vs.id.removeprefix("vs_"))
        db.execute("DELETE FROM passages")
        db.execute("UPDATE store_files SET status = 'in_progress', usage_bytes = 0")
    second = KnowledgeStore(tmp_path)
    second.start()
    try:
        assert on_disk(second) == ({file.id}, set())
        assert second.wait_idle(30)
        assert second.get_store_file(ALICE, vs.id, file.id).status == "completed"
        assert second.search(ALICE, [vs.id], "factory reset") == expected
    finally:
        second.close()


def test_paging_in_both_orders_and_both_directions(store):
    ids = [store.create_vector_store(ALICE, name=str(i)).id for i in range(3)]
    newest_first = [vs.id for vs in store.list_vector_stores(ALICE).items]
    assert newest_first == ids[::-1]
    page = store.list_vector_stores(ALICE, limit=2)
    assert [vs.id for vs in page.items] == ids[:0:-1] and page.has_more
    rest = store.list_vector_stores(ALICE, limit=2, after=page.items[-1].id)
    assert [vs.id for vs in rest.items] == [ids[0]] and not rest.has_more
    assert [vs.id for vs in store.list_vector_stores(ALICE, order="asc", after=ids[0]).items] == ids[1:]
    assert [vs.id for vs in store.list_vector_stores(ALICE, before=ids[0], limit=1).items] == [ids[1]]
    with pytest.raises(NotFound):
        store.list_vector_stores(ALICE, after="vs_unknown")


def test_attribute_filters_and_score_threshold(store):
    router, thermostat = upload(store, ALICE), upload(store, ALICE, "thermostat-manual.md")
    vs = store.create_vector_store(ALICE)
    store.attach_file(ALICE, vs.id, router.id, attributes={"kind": "router", "year": 2024})
    store.attach_file(ALICE, vs.id, thermostat.id, attributes={"kind": "thermostat", "year": 2023})
    assert store.wait_idle(30)
    both = store.search(ALICE, [vs.id], "reset firmware update wifi", max_results=20)
    assert {hit.file_id for hit in both} == {router.id, thermostat.id}
    assert all(0 < hit.score < 1 for hit in both)
    assert [hit.score for hit in both] == sorted((hit.score for hit in both), reverse=True)
    only = store.search(ALICE, [vs.id], "reset firmware update wifi", max_results=20,
                        attribute_filter=lambda a: a.get("year") == 2023)
    assert only and {hit.file_id for hit in only} == {thermostat.id}
    best = both[0].score
    assert store.search(ALICE, [vs.id], "reset firmware update wifi", score_threshold=best + 1e-9) == []


def test_a_cancelled_batch_stops_what_is_not_indexed_and_reattaching_retries(store):
    big = KnowledgeStore(store.root.parent / "batch", Limits())
    big.start()
    try:
        files = [upload(big, ALICE, path.name) for path in sorted(DATA.iterdir()) if path.suffix != ".json"]
        vs = big.create_vector_store(ALICE)
        batch = big.create_file_batch(ALICE, vs.id, [(f.id, {"batch": True}, None) for f in files])
        assert batch.file_counts["total"] == len(files)
        cancelled = big.cancel_file_batch(ALICE, vs.id, batch.id)
        assert big.wait_idle(30)
        final = big.get_file_batch(ALICE, vs.id, batch.id)
        assert final.status == "cancelled" and final.file_counts == cancelled.file_counts | {"in_progress": 0}
        states = {r.file_id: r.status for r in big.list_file_batch_files(ALICE, vs.id, batch.id, limit=100).items}
        assert set(states) == {f.id for f in files} and set(states.values()) <= {"completed", "cancelled"}
        for file_id, status in states.items():
            found = {hit.file_id for hit in big.search(ALICE, [vs.id], big.document(file_id).title, max_results=50)}
            assert (file_id in found) == (status == "completed")
            if status == "cancelled":
                assert big.attach_file(ALICE, vs.id, file_id).status == "in_progress"
        assert big.wait_idle(30)
        assert big.get_file_batch(ALICE, vs.id, batch.id).file_counts["completed"] == len(files)
    finally:
        big.close()
