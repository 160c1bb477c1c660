"""Files, vector stores and their attachments, owned per caller, persisted under --data-dir.

On disk (<data-dir>/knowledge/):
  knowledge.sqlite3   metadata, parsed documents, passages and one FTS5 table per vector store (WAL mode)
  files/<file-id>     each upload's bytes, named by the generated id (a client's file name is never a path)
  tmp/                uploads being written; anything left here by a crash is deleted at the next start

Atomicity: an upload is written to tmp/, fsynced, renamed into files/ and committed in one SQLite transaction;
a failure before the commit removes the file, a crash between the rename and the commit leaves an orphan that
the next start deletes. A file's passages, its index entries and its `completed` status are written in one
transaction, so a search never sees half a document, and a file still `in_progress` after a crash is indexed
again at the next start.

Every read and write names the owner; an id that belongs to someone else is "not found", exactly like one that
does not exist.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sqlite3
import threading
import time
import unicodedata
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from glm4.knowledge import index
from glm4.knowledge.ingest import Document, DocumentError, Section, check_supported, parse, split

log = logging.getLogger(__name__)

COPY_CHUNK = 1 << 20
DEFAULT_CHUNKING = (400, 100)  # (max tokens, overlap tokens) per passage: see docs/KNOWLEDGE.md
PURPOSES = ("assistants", "user_data")

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    filename TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    purpose TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS files_owner ON files(owner, seq);
CREATE TABLE IF NOT EXISTS documents (
    file_id TEXT PRIMARY KEY REFERENCES files(id) ON DELETE CASCADE,
    title TEXT NOT NULL,
    sections TEXT NOT NULL  -- JSON [[headings...], [paragraphs...]]
);
CREATE TABLE IF NOT EXISTS vector_stores (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    description TEXT,
    metadata TEXT,  -- JSON object or NULL
    created_at INTEGER NOT NULL,
    last_active_at INTEGER NOT NULL,
    expires_after_days INTEGER
);
CREATE INDEX IF NOT EXISTS vector_stores_owner ON vector_stores(owner, seq);
CREATE TABLE IF NOT EXISTS store_files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    store_id TEXT NOT NULL REFERENCES vector_stores(id) ON DELETE CASCADE,
    file_id TEXT NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    status TEXT NOT NULL,  -- in_progress | completed | failed | cancelled
    error_code TEXT,
    error_message TEXT,
    created_at INTEGER NOT NULL,
    usage_bytes INTEGER NOT NULL DEFAULT 0,
    attributes TEXT,  -- JSON object or NULL
    max_tokens INTEGER NOT NULL,
    overlap_tokens INTEGER NOT NULL,
    UNIQUE (store_id, file_id)
);
CREATE INDEX IF NOT EXISTS store_files_file ON store_files(file_id);
CREATE INDEX IF NOT EXISTS store_files_status ON store_files(status);
CREATE TABLE IF NOT EXISTS file_batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    store_id TEXT NOT NULL REFERENCES vector_stores(id) ON DELETE CASCADE,
    created_at INTEGER NOT NULL,
    cancelled INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS batch_files (
    batch_id TEXT NOT NULL REFERENCES file_batches(id) ON DELETE CASCADE,
    file_id TEXT NOT NULL,
    PRIMARY KEY (batch_id, file_id)
);
CREATE TABLE IF NOT EXISTS passages (
    id INTEGER PRIMARY KEY,
    store_id TEXT NOT NULL,
    file_id TEXT NOT NULL,
    ordinal INTEGER NOT NULL,
    heading TEXT NOT NULL,
    text TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS passages_store_file ON passages(store_id, file_id);
"""


# ---------- errors the API maps to 4xx ----------

class KnowledgeError(Exception):
    status = 400
    code = "invalid_request"
    param: str | None = None

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class NotFound(KnowledgeError):
    status = 404
    code = "not_found"

    def __init__(self, kind: str, object_id: str, *, param: str | None = None):
        shown = object_id if len(object_id) <= 80 else object_id[:80] + "…"
        super().__init__(f"No {kind} found with id {shown!r}", param=param)


class LimitExceeded(KnowledgeError):
    status = 400
    code = "limit_exceeded"


class FileTooLarge(KnowledgeError):
    status = 413
    code = "file_too_large"


class InvalidDocument(KnowledgeError):
    """Upload refused because the bytes are not a usable document of their type (code: OpenAI's)."""

    def __init__(self, error: DocumentError):
        super().__init__(str(error), param="file")
        self.code = error.code


class Expired(KnowledgeError):
    code = "vector_store_expired"


# ---------- records ----------

@dataclass(frozen=True)
class Limits:
    max_file_size: int = 32 * 2**20  # bytes per upload
    max_files: int = 1000  # files per owner
    max_vector_stores: int = 100  # vector stores per owner
    max_unpacked_size: int = 128 * 2**20  # bytes a .docx may inflate to


@dataclass(frozen=True)
class FileRecord:
    id: str
    filename: str
    bytes: int
    purpose: str
    created_at: int


@dataclass(frozen=True)
class VectorStoreRecord:
    id: str
    name: str
    description: str | None
    metadata: dict[str, str] | None
    created_at: int
    last_active_at: int
    expires_after_days: int | None
    file_counts: dict[str, int]
    usage_bytes: int

    @property
    def expires_at(self) -> int | None:
        return None if self.expires_after_days is None else self.last_active_at + self.expires_after_days * 86400

    @property
    def status(self) -> str:
        if self.expires_at is not None and time.time() > self.expires_at:
            return "expired"
        return "in_progress" if self.file_counts["in_progress"] else "completed"


@dataclass(frozen=True)
class StoreFileRecord:
    file_id: str
    vector_store_id: str
    status: str
    last_error: tuple[str, str] | None  # (code, message)
    created_at: int
    usage_bytes: int
    attributes: dict[str, str | float | bool] | None
    max_tokens: int
    overlap_tokens: int


@dataclass(frozen=True)
class FileBatchRecord:
    id: str
    vector_store_id: str
    created_at: int
    cancelled: bool
    file_counts: dict[str, int]

    @property
    def status(self) -> str:
        counts = self.file_counts
        if counts["in_progress"]:
            return "in_progress"
        if self.cancelled:
            return "cancelled"
        return "failed" if counts["total"] and counts["failed"] == counts["total"] else "completed"


@dataclass(frozen=True)
class SearchHit:
    """One passage as a search result: what the API returns and what the prompt helpers render."""

    file_id: str
    filename: str
    score: float  # in [0, 1], higher is better (index.normalize_score)
    text: str
    heading: str
    vector_store_id: str
    attributes: dict[str, str | float | bool] | None = None


@dataclass
class Page:
    items: list
    has_more: bool


@dataclass(frozen=True)
class _Job:
    store_id: str
    file_id: str


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "glm4-chat"


def clean_filename(name: str | None) -> str:
    """What the client called the file, for display only: the last path component, no control characters,
    at most 255 characters. It is never used as a path."""
    name = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C").strip()
    if name in ("", ".", ".."):
        name = "upload"
    return name[:255]


def new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


def now() -> int:
    return int(time.time())


class KnowledgeStore:
    """The one object the API (and later the chat core) calls. Methods are blocking and thread-safe: call them
    from a worker thread (FastAPI runs plain `def` routes in one). Indexing runs on a background thread."""

    def __init__(self, data_dir: Path | str | None = None, limits: Limits = Limits()):
        self.root = Path(data_dir).expanduser() if data_dir else default_data_dir()
        self.root = self.root / "knowledge"
        self.limits = limits
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._idle = threading.Condition(self._lock)
        self._pending = 0

    # ---------- lifetime ----------

    def start(self) -> None:
        """Open (or create) the store, delete what a crash left half-written, resume interrupted indexing."""
        if self._db is not None:
            return
        for folder in (self.root, self.files_dir, self.tmp_dir):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        db = sqlite3.connect(self.root / "knowledge.sqlite3", check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        db.executescript(SCHEMA)
        self._db = db
        self._sweep()
        self._worker = threading.Thread(target=self._work, name="knowledge-indexer", daemon=True)
        self._worker.start()
        resumed = db.execute("SELECT store_id, file_id FROM store_files WHERE status = 'in_progress' "
                             "ORDER BY seq").fetchall()
        for store_id, file_id in resumed:
            self._enqueue(store_id, file_id)
        if resumed:
            log.info("knowledge: indexing %d file(s) again that a stop interrupted", len(resumed))
        index.warm_up()

    def close(self) -> None:
        if self._worker is not None:
            self._jobs.put(None)
            self._worker.join(timeout=30)
            self._worker = None
        if self._db is not None:
            with self._lock:
                self._db.close()
                self._db = None

    @property
    def is_open(self) -> bool:
        return self._db is not None

    @property
    def files_dir(self) -> Path:
        return self.root / "files"

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the knowledge store is not started")
        return self._db

    def _sweep(self) -> None:
        for leftover in self.tmp_dir.iterdir():
            leftover.unlink(missing_ok=True)
        known = {row[0] for row in self.db.execute("SELECT id FROM files")}
        for stored in self.files_dir.iterdir():
            if stored.name not in known:
                log.info("knowledge: removing %s, an upload that never committed", stored.name)
                stored.unlink(missing_ok=True)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            db = self.db
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _read(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock:
            return self.db.execute(sql, params).fetchall()

    # ---------- files ----------

    def create_file(self, owner: str, filename: str | None, purpose: str, source: BinaryIO) -> FileRecord:
        """Copy the upload to disk, check it parses, and commit it; on any failure nothing is left behind."""
        name = clean_filename(filename)
        if purpose not in PURPOSES:
            raise KnowledgeError(f"purpose must be one of {', '.join(PURPOSES)}", param="purpose")
        try:
            check_supported(name)
        except DocumentError as error:
            raise InvalidDocument(error) from None
        file_id = new_id("file-")
        temporary = self.tmp_dir / (file_id + ".part")
        final = self.files_dir / file_id
        try:
            data = self._copy(source, temporary)
            try:
                document = parse(name, data, max_unpacked_size=self.limits.max_unpacked_size)
            except DocumentError as error:
                raise InvalidDocument(error) from None
            record = FileRecord(file_id, name, len(data), purpose, now())
            with self._transaction() as db:
                (count,) = db.execute("SELECT COUNT(*) FROM files WHERE owner = ?", (owner,)).fetchone()
                if count >= self.limits.max_files:
                    raise LimitExceeded(f"you have {count} files, the limit is {self.limits.max_files} "
                                        "(--max-files): delete some first")
                db.execute("INSERT INTO files(id, owner, filename, bytes, purpose, created_at) "
                           "VALUES (?, ?, ?, ?, ?, ?)", (file_id, owner, name, record.bytes, purpose, record.created_at))
                db.execute("INSERT INTO documents(file_id, title, sections) VALUES (?, ?, ?)",
                           (file_id, document.title, encode_sections(document)))
                os.replace(temporary, final)  # inside the transaction: a failed commit removes it below
                fsync_directory(self.files_dir)
            return record
        except BaseException:
            temporary.unlink(missing_ok=True)
            if not self._read("SELECT 1 FROM files WHERE id = ?", (file_id,)):
                final.unlink(missing_ok=True)
            raise

    def _copy(self, source: BinaryIO, temporary: Path) -> bytes:
        limit = self.limits.max_file_size
        chunks: list[bytes] = []
        size = 0
        with open(temporary, "xb") as out:
            while chunk := source.read(COPY_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise FileTooLarge(f"the file is larger than the server's limit of {limit} bytes "
                                       "(--max-file-size)", param="file")
                out.write(chunk)
                chunks.append(chunk)
            out.flush()
            os.fsync(out.fileno())
        return b"".join(chunks)

    def list_files(self, owner: str, *, purpose: str | None = None, after: str | None = None, limit: int = 10000,
                   order: str = "desc") -> Page:
        where, params = "owner = ?", [owner]
        if purpose is not None:
            where += " AND purpose = ?"
            params.append(purpose)
        rows = self._page("files", where, params, after, None, limit, order,
                          "id, filename, bytes, purpose, created_at")
        return Page([FileRecord(*row) for row in rows[:limit]], len(rows) > limit)

    def get_file(self, owner: str, file_id: str) -> FileRecord:
        rows = self._read("SELECT id, filename, bytes, purpose, created_at FROM files WHERE id = ? AND owner = ?",
                          (file_id, owner))
        if not rows:
            raise NotFound("file", file_id, param="file_id")
        return FileRecord(*rows[0])

    def file_content(self, owner: str, file_id: str) -> bytes:
        record = self.get_file(owner, file_id)
        try:
            return (self.files_dir / record.id).read_bytes()
        except FileNotFoundError:  # deleted between the two reads
            raise NotFound("file", file_id, param="file_id") from None

    def delete_file(self, owner: str, file_id: str) -> None:
        """The file, and its passages in every vector store it was attached to (as OpenAI does)."""
        with self._transaction() as db:
            if not db.execute("SELECT 1 FROM files WHERE id = ? AND owner = ?", (file_id, owner)).fetchone():
                raise NotFound("file", file_id, param="file_id")
            for (store_id,) in db.execute("SELECT store_id FROM store_files WHERE file_id = ?", (file_id,)).fetchall():
                self._remove_passages(db, store_id, file_id)
            db.execute("DELETE FROM store_files WHERE file_id = ?", (file_id,))
            db.execute("DELETE FROM batch_files WHERE file_id = ?", (file_id,))
            db.execute("DELETE FROM documents WHERE file_id = ?", (file_id,))
            db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        (self.files_dir / file_id).unlink(missing_ok=True)

    def document(self, file_id: str) -> Document:
        rows = self._read("SELECT title, sections FROM documents WHERE file_id = ?", (file_id,))
        if not rows:
            raise NotFound("file", file_id)
        return decode_document(*rows[0])

    # ---------- vector stores ----------

    def create_vector_store(self, owner: str, *, name: str | None = None, description: str | None = None,
                            metadata: dict[str, str] | None = None, file_ids: list[str] = (),
                            chunking: tuple[int, int] | None = None,
                            expires_after_days: int | None = None) -> VectorStoreRecord:
        store_id = new_id("vs_")
        created = now()
        with self._transaction() as db:
            (count,) = db.execute("SELECT COUNT(*) FROM vector_stores WHERE owner = ?", (owner,)).fetchone()
            if count >= self.limits.max_vector_stores:
                raise LimitExceeded(f"you have {count} vector stores, the limit is {self.limits.max_vector_stores} "
                                    "(--max-vector-stores): delete some first")
            self._check_files_owned(db, owner, file_ids)
            db.execute("INSERT INTO vector_stores(id, owner, name, description, metadata, created_at, last_active_at, "
                       "expires_after_days) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (store_id, owner, name or "", description, dump_json(metadata), created, created,
                        expires_after_days))
            index.create_table(db, store_id)
            for file_id in dict.fromkeys(file_ids):
                self._insert_attachment(db, store_id, file_id, None, chunking or DEFAULT_CHUNKING)
        for file_id in dict.fromkeys(file_ids):
            self._enqueue(store_id, file_id)
        return self.get_vector_store(owner, store_id)

    def _check_files_owned(self, db: sqlite3.Connection, owner: str, file_ids) -> None:
        for file_id in file_ids:
            if not db.execute("SELECT 1 FROM files WHERE id = ? AND owner = ?", (file_id, owner)).fetchone():
                raise NotFound("file", file_id, param="file_ids")

    def list_vector_stores(self, owner: str, *, after: str | None = None, before: str | None = None,
                           limit: int = 20, order: str = "desc") -> Page:
        rows = self._page("vector_stores", "owner = ?", [owner], after, before, limit, order, "id")
        return Page([self.get_vector_store(owner, store_id) for (store_id,) in rows[:limit]], len(rows) > limit)

    def get_vector_store(self, owner: str, store_id: str) -> VectorStoreRecord:
        with self._lock:
            rows = self.db.execute("SELECT id, name, description, metadata, created_at, last_active_at, "
                                   "expires_after_days FROM vector_stores WHERE id = ? AND owner = ?",
                                   (store_id, owner)).fetchall()
            if not rows:
                raise NotFound("vector store", store_id, param="vector_store_id")
            counts = {"in_progress": 0, "completed": 0, "failed": 0, "cancelled": 0}
            usage = 0
            for status, number, used in self.db.execute(
                    "SELECT status, COUNT(*), SUM(usage_bytes) FROM store_files WHERE store_id = ? GROUP BY status",
                    (store_id,)):
                counts[status] = number
                usage += used or 0
        counts["total"] = sum(counts.values())
        row = rows[0]
        return VectorStoreRecord(row[0], row[1], row[2], load_json(row[3]), row[4], row[5], row[6], counts, usage)

    def update_vector_store(self, owner: str, store_id: str, *, name: str | None = None,
                            metadata: dict[str, str] | None = None, expires_after_days: int | None = None,
                            clear_expiry: bool = False) -> VectorStoreRecord:
        with self._transaction() as db:
            self._owned_store(db, owner, store_id)
            if name is not None:
                db.execute("UPDATE vector_stores SET name = ? WHERE id = ?", (name, store_id))
            if metadata is not None:
                db.execute("UPDATE vector_stores SET metadata = ? WHERE id = ?", (dump_json(metadata), store_id))
            if expires_after_days is not None or clear_expiry:
                db.execute("UPDATE vector_stores SET expires_after_days = ?, last_active_at = ? WHERE id = ?",
                           (expires_after_days, now(), store_id))
        return self.get_vector_store(owner, store_id)

    def delete_vector_store(self, owner: str, store_id: str) -> None:
        with self._transaction() as db:
            self._owned_store(db, owner, store_id)
            db.execute("DELETE FROM passages WHERE store_id = ?", (store_id,))
            db.execute("DELETE FROM file_batches WHERE store_id = ?", (store_id,))
            db.execute("DELETE FROM store_files WHERE store_id = ?", (store_id,))
            db.execute("DELETE FROM vector_stores WHERE id = ?", (store_id,))
            index.drop_table(db, store_id)

    def _owned_store(self, db: sqlite3.Connection, owner: str, store_id: str) -> None:
        if not db.execute("SELECT 1 FROM vector_stores WHERE id = ? AND owner = ?", (store_id, owner)).fetchone():
            raise NotFound("vector store", store_id, param="vector_store_id")

    # ---------- attachments ----------

    def attach_file(self, owner: str, store_id: str, file_id: str, *,
                    attributes: dict[str, str | float | bool] | None = None,
                    chunking: tuple[int, int] | None = None) -> StoreFileRecord:
        """Attach and queue for indexing. Attaching a file that is already attached returns its record, except
        that a `failed` or `cancelled` one is indexed again (with the new attributes and chunking)."""
        with self._transaction() as db:
            self._owned_store(db, owner, store_id)
            self._check_files_owned(db, owner, [file_id])
            existing = db.execute("SELECT status FROM store_files WHERE store_id = ? AND file_id = ?",
                                  (store_id, file_id)).fetchone()
            queue_it = existing is None or existing[0] in ("failed", "cancelled")
            if existing is not None and queue_it:
                db.execute("DELETE FROM store_files WHERE store_id = ? AND file_id = ?", (store_id, file_id))
            if queue_it:
                self._insert_attachment(db, store_id, file_id, attributes, chunking or DEFAULT_CHUNKING)
        if queue_it:
            self._enqueue(store_id, file_id)
        return self.get_store_file(owner, store_id, file_id)

    # ---------- file batches ----------

    def create_file_batch(self, owner: str, store_id: str,
                          files: list[tuple[str, dict | None, tuple[int, int] | None]]) -> FileBatchRecord:
        """Attach several files at once: (file id, attributes, chunking) each; files already attached join
        the batch as they are."""
        batch_id = new_id("vsfb_")
        queued = []
        with self._transaction() as db:
            self._owned_store(db, owner, store_id)
            self._check_files_owned(db, owner, [file_id for file_id, _, _ in files])
            db.execute("INSERT INTO file_batches(id, store_id, created_at) VALUES (?, ?, ?)",
                       (batch_id, store_id, now()))
            for file_id, attributes, chunking in {file_id: (file_id, a, c) for file_id, a, c in files}.values():
                if not db.execute("SELECT 1 FROM store_files WHERE store_id = ? AND file_id = ?",
                                  (store_id, file_id)).fetchone():
                    self._insert_attachment(db, store_id, file_id, attributes, chunking or DEFAULT_CHUNKING)
                    queued.append(file_id)
                db.execute("INSERT INTO batch_files(batch_id, file_id) VALUES (?, ?)", (batch_id, file_id))
        for file_id in queued:
            self._enqueue(store_id, file_id)
        return self.get_file_batch(owner, store_id, batch_id)

    def get_file_batch(self, owner: str, store_id: str, batch_id: str) -> FileBatchRecord:
        with self._lock:
            self._owned_store(self.db, owner, store_id)
            rows = self.db.execute("SELECT created_at, cancelled FROM file_batches WHERE id = ? AND store_id = ?",
                                   (batch_id, store_id)).fetchall()
            if not rows:
                raise NotFound("file batch", batch_id, param="batch_id")
            counts = {"in_progress": 0, "completed": 0, "failed": 0, "cancelled": 0}
            for status, number in self.db.execute(
                    "SELECT s.status, COUNT(*) FROM batch_files b JOIN store_files s ON s.file_id = b.file_id "
                    "AND s.store_id = ? WHERE b.batch_id = ? GROUP BY s.status", (store_id, batch_id)):
                counts[status] = number
        counts["total"] = sum(counts.values())
        return FileBatchRecord(batch_id, store_id, rows[0][0], bool(rows[0][1]), counts)

    def cancel_file_batch(self, owner: str, store_id: str, batch_id: str) -> FileBatchRecord:
        """Files of the batch not indexed yet stop (`cancelled`); those already done stay."""
        with self._transaction() as db:
            self.get_file_batch(owner, store_id, batch_id)
            db.execute("UPDATE file_batches SET cancelled = 1 WHERE id = ?", (batch_id,))
            db.execute("UPDATE store_files SET status = 'cancelled' WHERE store_id = ? AND status = 'in_progress' "
                       "AND file_id IN (SELECT file_id FROM batch_files WHERE batch_id = ?)", (store_id, batch_id))
        return self.get_file_batch(owner, store_id, batch_id)

    def list_file_batch_files(self, owner: str, store_id: str, batch_id: str, *, status: str | None = None,
                              after: str | None = None, before: str | None = None, limit: int = 20,
                              order: str = "desc") -> Page:
        with self._lock:
            self.get_file_batch(owner, store_id, batch_id)
            where = "store_id = ? AND file_id IN (SELECT file_id FROM batch_files WHERE batch_id = ?)"
            params: list = [store_id, batch_id]
            if status is not None:
                where += " AND status = ?"
                params.append(status)
            rows = self._page("store_files", where, params, after, before, limit, order, STORE_FILE_COLUMNS,
                              cursor_column="file_id")
        return Page([store_file_record(row) for row in rows[:limit]], len(rows) > limit)

    def _insert_attachment(self, db: sqlite3.Connection, store_id: str, file_id: str, attributes,
                           chunking: tuple[int, int]) -> None:
        db.execute("INSERT INTO store_files(store_id, file_id, status, created_at, attributes, max_tokens, "
                   "overlap_tokens) VALUES (?, ?, 'in_progress', ?, ?, ?, ?)",
                   (store_id, file_id, now(), dump_json(attributes), *chunking))

    def list_store_files(self, owner: str, store_id: str, *, status: str | None = None, after: str | None = None,
                         before: str | None = None, limit: int = 20, order: str = "desc") -> Page:
        with self._lock:
            self._owned_store(self.db, owner, store_id)
            where, params = "store_id = ?", [store_id]
            if status is not None:
                where += " AND status = ?"
                params.append(status)
            rows = self._page("store_files", where, params, after, before, limit, order, STORE_FILE_COLUMNS,
                              cursor_column="file_id")
        return Page([store_file_record(row) for row in rows[:limit]], len(rows) > limit)

    def get_store_file(self, owner: str, store_id: str, file_id: str) -> StoreFileRecord:
        with self._lock:
            self._owned_store(self.db, owner, store_id)
            rows = self.db.execute(f"SELECT {STORE_FILE_COLUMNS} FROM store_files WHERE store_id = ? AND file_id = ?",
                                   (store_id, file_id)).fetchall()
        if not rows:
            raise NotFound("file", file_id, param="file_id")
        return store_file_record(rows[0])

    def update_store_file(self, owner: str, store_id: str, file_id: str,
                          attributes: dict[str, str | float | bool] | None) -> StoreFileRecord:
        with self._transaction() as db:
            self.get_store_file(owner, store_id, file_id)
            db.execute("UPDATE store_files SET attributes = ? WHERE store_id = ? AND file_id = ?",
                       (dump_json(attributes), store_id, file_id))
        return self.get_store_file(owner, store_id, file_id)

    def detach_file(self, owner: str, store_id: str, file_id: str) -> None:
        """Remove the file from the store (its passages go; the file itself stays)."""
        with self._transaction() as db:
            self.get_store_file(owner, store_id, file_id)
            self._remove_passages(db, store_id, file_id)
            db.execute("DELETE FROM store_files WHERE store_id = ? AND file_id = ?", (store_id, file_id))
            db.execute("DELETE FROM batch_files WHERE file_id = ? AND batch_id IN "
                       "(SELECT id FROM file_batches WHERE store_id = ?)", (file_id, store_id))

    def store_file_passages(self, owner: str, store_id: str, file_id: str) -> list[str]:
        self.get_store_file(owner, store_id, file_id)
        return [text for (text,) in self._read("SELECT text FROM passages WHERE store_id = ? AND file_id = ? "
                                               "ORDER BY ordinal", (store_id, file_id))]

    def _remove_passages(self, db: sqlite3.Connection, store_id: str, file_id: str) -> None:
        ids = [rowid for (rowid,) in db.execute("SELECT id FROM passages WHERE store_id = ? AND file_id = ?",
                                                (store_id, file_id))]
        index.remove(db, store_id, ids)
        db.execute("DELETE FROM passages WHERE store_id = ? AND file_id = ?", (store_id, file_id))

    # ---------- search ----------

    def search(self, owner: str, store_ids: list[str], query: str, *, max_results: int = 10,
               attribute_filter: Any = None, score_threshold: float = 0.0) -> list[SearchHit]:
        """Passages best first across the given stores (each ranked by its own BM25 statistics).
        `attribute_filter` is a predicate over a file's attributes (None = every file)."""
        hits: list[SearchHit] = []
        expression = index.match_expression(query)
        with self._lock:
            db = self.db
            for store_id in dict.fromkeys(store_ids):
                record = self.get_vector_store(owner, store_id)
                if record.status == "expired":
                    raise Expired(f"vector store {store_id!r} has expired", param="vector_store_id")
                files = {file_id: (filename, load_json(attributes)) for file_id, filename, attributes in db.execute(
                    "SELECT s.file_id, f.filename, s.attributes FROM store_files s JOIN files f ON f.id = s.file_id "
                    "WHERE s.store_id = ? AND s.status = 'completed'", (store_id,))}
                allowed = {file_id for file_id, (_, attributes) in files.items()
                           if attribute_filter is None or attribute_filter(attributes or {})}
                if not allowed:
                    continue
                fetch = max_results if len(allowed) == len(files) else max_results * 20 + 100
                ranked = index.search(db, store_id, expression, fetch)
                if ranked:
                    marks = ",".join("?" * len(ranked))
                    passages = {row[0]: row[1:] for row in db.execute(
                        f"SELECT id, file_id, heading, text FROM passages WHERE id IN ({marks})",
                        [rowid for rowid, _ in ranked])}
                    for rowid, raw in ranked:
                        file_id, heading, text = passages[rowid]
                        score = index.normalize_score(raw)
                        if file_id in allowed and score >= score_threshold:
                            filename, attributes = files[file_id]
                            hits.append(SearchHit(file_id, filename, score, text, heading, store_id, attributes))
                db.execute("UPDATE vector_stores SET last_active_at = ? WHERE id = ?", (now(), store_id))
        hits.sort(key=lambda hit: hit.score, reverse=True)
        return hits[:max_results]

    # ---------- indexing ----------

    def _enqueue(self, store_id: str, file_id: str) -> None:
        with self._lock:
            self._pending += 1
        self._jobs.put(_Job(store_id, file_id))

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every queued file is indexed (tests, and callers that must search right after attach)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                self._index(job.store_id, job.file_id)
            except Exception:  # noqa: BLE001 - one file's failure is recorded on it; the worker goes on
                log.exception("knowledge: indexing %s into %s failed", job.file_id, job.store_id)
                self._mark_failed(job, "server_error", "the server failed while indexing this file")
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def _index(self, store_id: str, file_id: str) -> None:
        rows = self._read("SELECT max_tokens, overlap_tokens FROM store_files WHERE store_id = ? AND file_id = ? "
                          "AND status = 'in_progress'", (store_id, file_id))
        if not rows:
            return  # detached or deleted while queued
        max_tokens, overlap = rows[0]
        try:
            passages = split(self.document(file_id), max_tokens, overlap)
        except (DocumentError, ValueError, NotFound) as error:
            self._mark_failed(_Job(store_id, file_id), getattr(error, "code", "invalid_file"), str(error))
            return
        prepared = [index.prepare(passage.heading, passage.text) for passage in passages]  # outside the lock
        with self._transaction() as db:
            still_wanted = db.execute("SELECT 1 FROM store_files WHERE store_id = ? AND file_id = ? AND "
                                      "status = 'in_progress'", (store_id, file_id)).fetchone()
            if not still_wanted:
                return
            self._remove_passages(db, store_id, file_id)  # none, unless an earlier run was cut short
            rows = []
            for ordinal, (passage, terms) in enumerate(zip(passages, prepared)):
                cursor = db.execute("INSERT INTO passages(store_id, file_id, ordinal, heading, text) "
                                    "VALUES (?, ?, ?, ?, ?)", (store_id, file_id, ordinal, passage.heading, passage.text))
                rows.append((cursor.lastrowid, terms))
            index.add(db, store_id, rows)
            usage = sum(len(passage.text.encode()) for passage in passages)
            db.execute("UPDATE store_files SET status = 'completed', usage_bytes = ?, error_code = NULL, "
                       "error_message = NULL WHERE store_id = ? AND file_id = ?", (usage, store_id, file_id))

    def _mark_failed(self, job: _Job, code: str, message: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE store_files SET status = 'failed', error_code = ?, error_message = ? "
                       "WHERE store_id = ? AND file_id = ?", (code, message, job.store_id, job.file_id))

    # ---------- paging ----------

    def _page(self, table: str, where: str, params: list, after: str | None, before: str | None, limit: int,
              order: str, columns: str, cursor_column: str = "id") -> list[tuple]:
        """Rows in creation order (desc or asc), after/before an id of the same listing; one extra row tells
        whether there are more."""
        descending = order != "asc"
        for cursor, forward in ((after, True), (before, False)):
            if cursor is None:
                continue
            found = self._read(f"SELECT seq FROM {table} WHERE {where} AND {cursor_column} = ?", (*params, cursor))
            if not found:
                raise NotFound("object", cursor, param="after" if forward else "before")
            newer = forward != descending  # "after" in descending order means older
            where += " AND seq > ?" if newer else " AND seq < ?"
            params = [*params, found[0][0]]
        direction = "DESC" if descending else "ASC"
        if before is not None and after is None:
            # the page just before the cursor: read backwards from it, then restore the listing order
            rows = self._read(f"SELECT {columns} FROM {table} WHERE {where} ORDER BY seq "
                              f"{'ASC' if descending else 'DESC'} LIMIT ?", (*params, limit + 1))
            return list(reversed(rows[:limit])) + rows[limit:]
        return self._read(f"SELECT {columns} FROM {table} WHERE {where} ORDER BY seq {direction} LIMIT ?",
                          (*params, limit + 1))


STORE_FILE_COLUMNS = ("file_id, store_id, status, error_code, error_message, created_at, usage_bytes, attributes, "
                      "max_tokens, overlap_tokens")


def store_file_record(row: tuple) -> StoreFileRecord:
    file_id, store_id, status, code, message, created, usage, attributes, max_tokens, overlap = row
    return StoreFileRecord(file_id, store_id, status, (code, message) if code else None, created, usage,
                           load_json(attributes), max_tokens, overlap)


def encode_sections(document: Document) -> str:
    return json.dumps([[list(s.headings), list(s.paragraphs)] for s in document.sections], ensure_ascii=False)


def decode_document(title: str, sections: str) -> Document:
    return Document(title, tuple(Section(tuple(h), tuple(p)) for h, p in json.loads(sections)))


def dump_json(value) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False)


def load_json(text: str | None):
    return None if text is None else json.loads(text)


def fsync_directory(path: Path) -> None:
    """Make a rename durable (POSIX: the directory entry lives in the directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename still happened
    finally:
        os.close(fd)


__all__ = ["KnowledgeStore", "Limits", "FileRecord", "VectorStoreRecord", "StoreFileRecord", "SearchHit", "Page",
           "FileBatchRecord", "KnowledgeError", "NotFound", "LimitExceeded", "FileTooLarge", "InvalidDocument", "Expired",
           "default_data_dir", "clean_filename"]
