"""The UI's Documents panel and "answer from my documents": the UI user's files in the knowledge store.

Each UI user owns one vector store in the server's KnowledgeStore (the same store /v1/files and
/v1/vector_stores use): the owner is `ui:<name>` behind --ui-auth, else one shared `ui` owner, never an API
key's owner, so API callers do not see UI documents and the other way round. Uploads are parsed and indexed
by the store; the panel lists them with status and size and deletes them.

With the switch on, the question is searched in that store, the passages are fitted to what the context
window leaves (glm4.knowledge.context.fit_passages; the rest are dropped and the user is told), and go into
the system message as numbered sources. The answer keeps its [n] markers and gets a references list (file
name and quoted passage per cited source) after REFERENCES_RULE; `without_references` removes it again
before the conversation goes back to the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from glm4.knowledge.context import FittedContext, Source, cite, fit_passages
from glm4.knowledge.ingest import PARSERS
from glm4.knowledge.store import KnowledgeError, KnowledgeStore, NotFound
from glm4.ui_text import text

log = logging.getLogger(__name__)

STORE_NAME = "UI documents"
UI_OWNER = "ui"
MAX_SEARCH_RESULTS = 8
QUOTE_CHARS = 300  # a quoted passage in the references list is cut here
REFERENCES_RULE = "\n\n---\n"  # the references list starts after this; the model never sees what follows


def ui_owner(username: str | None) -> str:
    return f"{UI_OWNER}:{username}" if username else UI_OWNER


def human_size(size: int) -> str:
    for unit in ("B", "KB", "MB"):
        if size < 1024 or unit == "MB":
            return f"{size} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


def without_references(reply: str) -> str:
    """A reply as the model wrote it: the references list the UI appended is cut off."""
    return reply.split(REFERENCES_RULE, 1)[0]


def quote(passage_text: str) -> str:
    flat = " ".join(passage_text.split())
    return flat if len(flat) <= QUOTE_CHARS else flat[:QUOTE_CHARS].rstrip() + "…"


def references_markdown(answer: str, sources: tuple[Source, ...], language: str) -> str:
    """The references list for an answer: the sources it cited, in number order (all given sources when it
    cited none, so the user still sees what the answer was based on)."""
    cited = sorted({citation.number for citation in cite(answer, sources)})
    shown = [source for source in sources if source.number in cited] if cited else list(sources)
    if not shown:
        return ""
    lines = [f"**{text(language, 'references')}**", ""]
    for source in shown:
        lines.append(f"{source.number}. **{source.passage.filename}** — “{quote(source.passage.text)}”")
    return REFERENCES_RULE + "\n".join(lines)


@dataclass
class Retrieval:
    """What the question found: the context block for the system message and the notice to show, if any."""

    fitted: FittedContext | None
    found: int
    notice: str | None

    @property
    def sources(self) -> tuple[Source, ...]:
        return self.fitted.sources if self.fitted else ()


class UserDocuments:
    """The Documents panel's operations for one UI owner, on the server's knowledge store (blocking calls:
    run them on a worker thread, as Gradio does for plain functions)."""

    def __init__(self, store: KnowledgeStore):
        self.store = store

    def store_id(self, owner: str, create: bool = True) -> str | None:
        """The owner's UI vector store, created on first use."""
        after = None
        while True:
            page = self.store.list_vector_stores(owner, after=after, limit=100, order="asc")
            for record in page.items:
                if record.name == STORE_NAME and (record.metadata or {}).get("glm4_ui") == "documents":
                    return record.id
            if not page.has_more or not page.items:
                break
            after = page.items[-1].id
        if not create:
            return None
        return self.store.create_vector_store(owner, name=STORE_NAME, metadata={"glm4_ui": "documents"}).id

    def upload(self, owner: str, paths: list[str]) -> list[str]:
        """Store and attach each file; returns the names added. Store errors (unsupported type, too large,
        not a document) are raised as KnowledgeError with a message for the user."""
        store_id = self.store_id(owner)
        added = []
        for path in paths:
            name = Path(path).name
            with open(path, "rb") as source:
                record = self.store.create_file(owner, name, "user_data", source)
            self.store.attach_file(owner, store_id, record.id)
            added.append(record.filename)
        return added

    def rows(self, owner: str, language: str) -> list[list[str]]:
        """[name, size, status] per document, newest first; a failed one says why."""
        if not self.store.is_open:  # the server is still starting: the next refresh lists them
            return []
        store_id = self.store_id(owner, create=False)
        if store_id is None:
            return []
        rows = []
        for attached in self.store.list_store_files(owner, store_id, limit=1000).items:
            try:
                record = self.store.get_file(owner, attached.file_id)
            except NotFound:  # deleted meanwhile
                continue
            status = text(language, f"status_{attached.status}")
            if attached.last_error:
                status += f": {attached.last_error[1]}"
            rows.append([record.filename, human_size(record.bytes), status, record.id])
        return rows

    def delete(self, owner: str, file_id: str) -> str:
        """Delete the file (and its passages); returns its name."""
        name = self.store.get_file(owner, file_id).filename
        self.store.delete_file(owner, file_id)
        return name

    def retrieve(self, owner: str, question: str, budget_tokens: int, count_tokens: Callable[[str], int],
                 window: int, language: str) -> Retrieval:
        store_id = self.store_id(owner, create=False) if self.store.is_open else None
        if store_id is None or not self.store.list_store_files(owner, store_id, limit=1).items:
            return Retrieval(None, 0, text(language, "no_documents"))
        hits = self.store.search(owner, [store_id], question, max_results=MAX_SEARCH_RESULTS)
        if not hits:
            return Retrieval(None, 0, text(language, "no_passages"))
        fitted = fit_passages(hits, max(0, budget_tokens), count_tokens)
        notice = None
        if fitted.dropped:
            notice = text(language, "dropped", dropped=fitted.dropped, found=len(hits), window=window)
        return Retrieval(fitted if fitted.sources else None, len(hits), notice)


def upload_error(error: Exception) -> str:
    return error.message if isinstance(error, KnowledgeError) else str(error)


ACCEPTED_TYPES = sorted(set(PARSERS))  # what gr.File lets the user pick
