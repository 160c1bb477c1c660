"""/v1/files and /v1/vector_stores through the live server with the official openai SDK: upload, attach, poll,
search the labelled set (recall@3 per language), ownership between API keys, hostile uploads, uploads that
fail midway, and a restart on the same --data-dir."""

from __future__ import annotations

import socket
import time

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import LiveServer
from tests.knowledge_docs import (labelled_documents, labelled_questions, make_docx, make_pdf, normalized,
                                  zip_bomb_docx)

KEYS = {"alice": "key-alice", "bob": "key-bob", "mallory": "key-mallory", "limits": "key-limits"}
MAX_FILE_SIZE = 256 * 1024
MAX_FILES = 12


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("knowledge-data")


@pytest.fixture(scope="module")
def live(data_dir):
    server = LiveServer("--no-ui", "--test-hooks", "--api-key", ",".join(KEYS.values()), "--data-dir", str(data_dir),
                        "--max-file-size", str(MAX_FILE_SIZE), "--max-files", str(MAX_FILES),
                        "--max-unpacked-size", "8MiB")
    yield server
    server.stop()


def sdk(live, who: str) -> OpenAI:
    return OpenAI(base_url=live.base_url, api_key=KEYS[who], max_retries=0)


def stored_files(data_dir) -> tuple[set[str], set[str]]:
    root = data_dir / "knowledge"
    return {p.name for p in (root / "files").iterdir()}, {p.name for p in (root / "tmp").iterdir()}


def upload_labelled_set(client: OpenAI) -> tuple[str, dict[str, str]]:
    files = {path.name: client.files.create(file=path.open("rb"), purpose="assistants").id
             for path in labelled_documents()}
    store = client.vector_stores.create(name="labelled set", file_ids=list(files.values()))
    for file_id in files.values():
        attached = client.vector_stores.files.poll(file_id, vector_store_id=store.id, poll_interval_ms=100,
                                                   max_wait_seconds=60)
        assert attached.status == "completed" and attached.last_error is None, attached
    return store.id, files


def test_labelled_questions_find_their_passage_in_the_top_3(live):
    client = sdk(live, "alice")
    store_id, files = upload_labelled_set(client)
    store = client.vector_stores.retrieve(store_id)
    assert store.status == "completed" and store.file_counts.completed == len(files) == 6
    hits: dict[str, list[bool]] = {"zh": [], "en": []}
    for question in labelled_questions():
        results = client.vector_stores.search(store_id, query=question["question"], max_num_results=3).data
        assert len(results) <= 3
        assert all(r.file_id == files[r.filename] for r in results)
        assert [r.score for r in results] == sorted((r.score for r in results), reverse=True)
        hits[question["lang"]].append(any(
            r.filename == question["document"] and normalized(question["answer"]) in normalized(r.content[0].text)
            for r in results))
    recall = {lang: sum(values) / len(values) for lang, values in hits.items()}
    assert len(hits["zh"]) >= 10 and len(hits["en"]) >= 10
    assert recall["zh"] >= 0.9 and recall["en"] >= 0.9, recall


def test_sdk_helpers_docx_pdf_content_and_attributes(live):
    client = sdk(live, "alice")
    store = client.vector_stores.create(name="helpers", metadata={"team": "docs"})
    docx = make_docx("Leave policy", [("Annual leave", ["Staff get 27 days of paid annual leave."]),
                                       ("年假", ["员工每年享有二十七天带薪年假。"])])
    uploaded = client.vector_stores.files.upload_and_poll(vector_store_id=store.id, file=("leave.docx", docx),
                                                          poll_interval_ms=100)
    assert uploaded.status == "completed" and uploaded.usage_bytes > 0
    pdf_file = client.files.create(file=("report.pdf", make_pdf([["The warehouse moved to Leeds in May."]])),
                                   purpose="user_data")
    assert (pdf_file.filename, pdf_file.purpose, pdf_file.object) == ("report.pdf", "user_data", "file")
    attached = client.vector_stores.files.create_and_poll(pdf_file.id, vector_store_id=store.id,
                                                          attributes={"year": 2025, "kind": "report"},
                                                          poll_interval_ms=100)
    assert attached.status == "completed" and attached.attributes == {"year": 2025, "kind": "report"}
    assert attached.chunking_strategy.type == "static"

    [top] = client.vector_stores.search(store.id, query="Where did the warehouse move?", max_num_results=1).data
    assert (top.file_id, top.filename, top.attributes["kind"]) == (pdf_file.id, "report.pdf", "report")
    assert "Leeds" in top.content[0].text and 0 < top.score <= 1
    assert client.vector_stores.search(store.id, query="年假有几天").data[0].filename == "leave.docx"
    filtered = client.vector_stores.search(store.id, query="leave warehouse",
                                           filters={"type": "eq", "key": "kind", "value": "report"}).data
    assert {r.file_id for r in filtered} == {pdf_file.id}

    assert client.files.content(pdf_file.id).content.startswith(b"%PDF")
    assert client.files.content(uploaded.id).content == docx  # the original bytes come back
    passages = client.vector_stores.files.content(pdf_file.id, vector_store_id=store.id)
    assert any("Leeds" in part.text for part in passages)
    assert client.vector_stores.retrieve(store.id).metadata == {"team": "docs"}
    assert client.vector_stores.update(store.id, name="renamed").name == "renamed"

    assert client.vector_stores.files.delete(pdf_file.id, vector_store_id=store.id).deleted
    assert all(r.file_id != pdf_file.id for r in client.vector_stores.search(store.id, query="warehouse Leeds").data)
    assert client.files.retrieve(pdf_file.id).id == pdf_file.id  # detaching keeps the file
    assert client.vector_stores.delete(store.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.retrieve(store.id)


def test_file_batches_upload_and_poll(live):
    client = sdk(live, "alice")
    store = client.vector_stores.create(name="batches")
    documents = [("wifi.md", b"# Wi-Fi\n\nThe guest network switches off after 8 hours."),
                 ("咖啡.md", "# 咖啡\n\n每天早上九点供应免费咖啡。".encode())]
    batch = client.vector_stores.file_batches.upload_and_poll(store.id, files=documents, poll_interval_ms=100)
    assert batch.status == "completed" and batch.file_counts.completed == batch.file_counts.total == 2
    listed = client.vector_stores.file_batches.list_files(batch.id, vector_store_id=store.id)
    assert {f.status for f in listed} == {"completed"} and len(listed.data) == 2
    extra = client.files.create(file=("extra.txt", b"Parking is free on Sundays."), purpose="assistants")
    again = client.vector_stores.file_batches.create_and_poll(store.id, file_ids=[extra.id],
                                                              attributes={"source": "batch"}, poll_interval_ms=100)
    assert again.status == "completed" and again.file_counts.total == 1
    [top] = client.vector_stores.search(store.id, query="免费咖啡几点", max_num_results=1).data
    assert top.filename == "咖啡.md"
    [top] = client.vector_stores.search(store.id, query="when is parking free", max_num_results=1).data
    assert top.file_id == extra.id and top.attributes == {"source": "batch"}
    assert client.vector_stores.retrieve(store.id).file_counts.completed == 3
    with pytest.raises(openai.BadRequestError):
        client.vector_stores.file_batches.create(store.id, file_ids=[extra.id], files=[{"file_id": extra.id}])


def test_a_second_key_cannot_see_or_touch_the_first_keys_files_and_stores(live, data_dir):
    alice, bob = sdk(live, "alice"), sdk(live, "bob")
    file = alice.files.create(file=("secret.md", b"# Secret\n\nThe vault code is 4711."), purpose="assistants")
    store = alice.vector_stores.create(name="alice's", file_ids=[file.id])
    alice.vector_stores.files.poll(file.id, vector_store_id=store.id, poll_interval_ms=100)
    bobs_store = bob.vector_stores.create(name="bob's")
    attempts = {
        "retrieve file": lambda: bob.files.retrieve(file.id),
        "file content": lambda: bob.files.content(file.id),
        "delete file": lambda: bob.files.delete(file.id),
        "retrieve store": lambda: bob.vector_stores.retrieve(store.id),
        "search store": lambda: bob.vector_stores.search(store.id, query="vault code"),
        "list store files": lambda: bob.vector_stores.files.list(store.id),
        "retrieve store file": lambda: bob.vector_stores.files.retrieve(file.id, vector_store_id=store.id),
        "detach": lambda: bob.vector_stores.files.delete(file.id, vector_store_id=store.id),
        "delete store": lambda: bob.vector_stores.delete(store.id),
        "attach alice's file": lambda: bob.vector_stores.files.create(vector_store_id=bobs_store.id, file_id=file.id),
        "store from alice's file": lambda: bob.vector_stores.create(file_ids=[file.id]),
        "batch with alice's file": lambda: bob.vector_stores.file_batches.create(bobs_store.id, file_ids=[file.id]),
    }
    for name, attempt in attempts.items():
        with pytest.raises(openai.NotFoundError) as caught:
            attempt()
        assert "4711" not in str(caught.value.body), name
    assert file.id not in {f.id for f in bob.files.list()}
    assert store.id not in {s.id for s in bob.vector_stores.list()}
    # alice still has everything, and the database holds a hash of her key, not the key
    assert "4711" in alice.vector_stores.search(store.id, query="vault code").data[0].content[0].text
    assert alice.files.content(file.id).content.endswith(b"4711.")
    raw = b"".join(p.read_bytes() for p in (data_dir / "knowledge").glob("knowledge.sqlite3*"))
    assert KEYS["alice"].encode() not in raw
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=live.base_url, api_key="wrong", max_retries=0).files.list()


def multipart(filename: bytes, data: bytes, purpose: bytes = b"assistants") -> tuple[bytes, str]:
    boundary = "glm4testboundary"
    body = (b"--" + boundary.encode() + b"\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n" + purpose +
            b"\r\n--" + boundary.encode() + b"\r\nContent-Disposition: form-data; name=\"file\"; filename=\"" +
            filename + b"\"\r\nContent-Type: application/octet-stream\r\n\r\n" + data + b"\r\n--" +
            boundary.encode() + b"--\r\n")
    return body, f"multipart/form-data; boundary={boundary}"


HOSTILE = {
    "oversized": ("big.txt", b"x" * (MAX_FILE_SIZE + 1), 413, "file_too_large"),
    "over --max-body-size too": ("huge.txt", b"x" * (8 * 2**20 + 1), 413, "request_too_large"),
    "empty": ("empty.txt", b"", 400, "invalid_file"),
    "binary named .txt": ("notes.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 16, 400,
                          "invalid_file"),
    "zip bomb .docx": ("bomb.docx", zip_bomb_docx(64 * 2**20), 400, "invalid_file"),
    "docx that is no zip": ("fake.docx", b"just text pretending", 400, "invalid_file"),
    "garbage PDF": ("broken.pdf", b"%PDF-1.7\n1 0 obj << /Type /Catalog /Pages 2 0 R >>\nendobj\ntrailer<<>>", 400,
                    "invalid_file"),
    "random bytes as PDF": ("noise.pdf", bytes((i * 131 + 17) % 256 for i in range(8192)), 400, "invalid_file"),
    "PDF cut in half": ("cut.pdf", None, 400, "invalid_file"),
    "unsupported extension": ("tool.exe", b"MZ\x90\x00", 400, "unsupported_file"),
    "no extension": ("Makefile", b"all:\n\techo hi\n", 400, "unsupported_file"),
    "name is only dots": ("..", b"hello", 400, "unsupported_file"),
}


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_hostile_uploads_are_refused_with_a_clear_4xx(live, data_dir, case):
    name, data, status, code = HOSTILE[case]
    if data is None:
        whole = make_pdf([["A paragraph that will be cut off."] * 3])
        data = whole[: len(whole) // 3]
    before = stored_files(data_dir)
    body, content_type = multipart(name.encode(), data)
    response = httpx.post(live.base_url + "/files", content=body, timeout=60,
                          headers={"Authorization": f"Bearer {KEYS['mallory']}", "Content-Type": content_type})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"], error
    assert stored_files(data_dir) == before
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}
    ok = sdk(live, "mallory").files.create(file=("fine.txt", b"The server still works."), purpose="user_data")
    sdk(live, "mallory").files.delete(ok.id)


def test_hostile_fields_are_400s(live):
    headers = {"Authorization": f"Bearer {KEYS['mallory']}"}
    body, content_type = multipart(b"a.txt", b"text", purpose=b"fine-tune")
    response = httpx.post(live.base_url + "/files", content=body, headers={**headers, "Content-Type": content_type})
    assert response.status_code == 400 and response.json()["error"]["param"] == "purpose"
    response = httpx.post(live.base_url + "/files", data={"purpose": "assistants"}, headers=headers)  # no file
    assert response.status_code == 400 and response.json()["error"]["param"] == "file"
    client = sdk(live, "mallory")
    with pytest.raises(openai.BadRequestError):
        client.vector_stores.create(chunking_strategy={"type": "static", "static": {
            "max_chunk_size_tokens": 200, "chunk_overlap_tokens": 150}})
    store = client.vector_stores.create()
    with pytest.raises(openai.BadRequestError):
        client.vector_stores.search(store.id, query="", max_num_results=3)
    with pytest.raises(openai.BadRequestError):
        client.vector_stores.search(store.id, query="x", max_num_results=51)
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.files.create(vector_store_id=store.id, file_id="file-does-not-exist")
    # FTS5 syntax typed by a user is searched as words, never parsed as a query
    assert client.vector_stores.search(store.id, query='NEAR("a" b) OR * AND "unterminated').data == []


def test_file_names_never_become_paths(live, data_dir, tmp_path):
    target = tmp_path / "pwned.txt"
    names = {("../" * 16 + str(target)[1:]).encode(): "pwned.txt", b"/etc/cron.d/evil.md": "evil.md",
             b"..\\..\\windows\\win.ini.txt": "win.ini.txt", b"nul\x00byte.txt": "nulbyte.txt",
             "报告/../../年度.md".encode(): "年度.md"}
    client = sdk(live, "mallory")
    for raw, shown in names.items():
        body, content_type = multipart(raw, b"just some words")
        response = httpx.post(live.base_url + "/files", content=body,
                              headers={"Authorization": f"Bearer {KEYS['mallory']}", "Content-Type": content_type})
        assert response.status_code == 200, response.text
        record = response.json()
        assert record["filename"] == shown
        assert record["id"] in stored_files(data_dir)[0]
        client.files.delete(record["id"])
    assert not target.exists()
    assert all(name.startswith("file-") for name in stored_files(data_dir)[0])


def test_an_upload_that_fails_midway_leaves_nothing_behind(live, data_dir):
    client = sdk(live, "mallory")
    before_files, before_list = stored_files(data_dir), {f.id for f in client.files.list()}
    # the disk fails halfway through writing (test hook): 507, nothing kept
    with pytest.raises(openai.APIStatusError) as caught:
        client.files.create(file=("half.md", b"# Half\n\n" + b"words " * 20000), purpose="assistants",
                            extra_headers={"x-glm4-test-fault": "upload-io-error"})
    assert caught.value.status_code == 507
    assert stored_files(data_dir) == before_files and {f.id for f in client.files.list()} == before_list
    # the client goes away halfway through sending the body
    body, content_type = multipart(b"cut.txt", b"words " * 20000)
    with socket.create_connection(("127.0.0.1", live.port)) as connection:
        connection.sendall((f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEYS['mallory']}"
                            f"\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
                           + body[: len(body) // 2])
        time.sleep(0.5)
    time.sleep(0.5)
    assert stored_files(data_dir) == before_files and {f.id for f in client.files.list()} == before_list
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}


def test_too_many_files_and_stores_are_400_with_the_limit(live):
    client = sdk(live, "limits")
    for i in range(MAX_FILES):
        client.files.create(file=(f"n{i}.txt", f"note {i}".encode()), purpose="user_data")
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("one-more.txt", b"over the limit"), purpose="user_data")
    assert caught.value.body["code"] == "limit_exceeded" and "--max-files" in caught.value.body["message"]
    assert len(client.files.list(limit=5).data) == 5
    assert len(list(client.files.list(limit=5))) == MAX_FILES  # the SDK pages with `after`


def test_restart_keeps_everything(start_server, tmp_path):
    args = ("--no-ui", "--api-key", "restart-key", "--data-dir", str(tmp_path))
    first = start_server(*args)
    client = OpenAI(base_url=first.base_url, api_key="restart-key", max_retries=0)
    store_id, files = upload_labelled_set(client)
    question = "出差的伙食补助每天多少？"
    before = client.vector_stores.search(store_id, query=question).data
    content = client.files.content(files["travel-policy.txt"]).content
    first.stop()

    second = start_server(*args)
    client = OpenAI(base_url=second.base_url, api_key="restart-key", max_retries=0)
    assert {f.id for f in client.files.list()} == set(files.values())
    store = client.vector_stores.retrieve(store_id)
    assert store.status == "completed" and store.file_counts.completed == 6
    assert client.vector_stores.search(store_id, query=question).data == before
    assert client.files.content(files["travel-policy.txt"]).content == content
