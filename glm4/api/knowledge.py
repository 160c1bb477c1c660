"""Glue shared by the /v1/files and /v1/vector_stores routers: who the caller is, the store, errors, limits."""

from __future__ import annotations

import functools
import hashlib
from typing import Annotated

from fastapi import Depends, Request

from glm4.api.errors import APIError
from glm4.api.knowledge_protocol import ChunkingError
from glm4.knowledge.store import KnowledgeError, KnowledgeStore, Limits
from glm4.settings import Settings

ANONYMOUS_OWNER = "local"  # without --api-key every caller shares one owner, as with the rest of the API
MULTIPART_OVERHEAD = 64 * 1024  # boundaries, part headers and the purpose field around an upload's bytes
POLL_AFTER_MS = "250"  # the openai SDK's poll helpers wait this long between retrievals (default: 1 s)


def caller_owner(request: Request) -> str:
    """The owner of what this request creates or may see: a hash of its API key (the key itself is never
    stored), or one shared owner when the server has no keys. Runs after require_api_key, so the key is valid."""
    if not request.app.state.settings.api_key:
        return ANONYMOUS_OWNER
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return "key:" + hashlib.sha256(token.strip().encode()).hexdigest()


def open_store(settings: Settings) -> KnowledgeStore:
    """The store for these settings (not started: app startup calls .start(), shutdown .close())."""
    return KnowledgeStore(settings.data_dir, Limits(max_file_size=settings.max_file_size, max_files=settings.max_files,
                                                    max_vector_stores=settings.max_vector_stores,
                                                    max_unpacked_size=settings.max_unpacked_size))


def upload_body_limit(settings: Settings) -> int:
    """The request-body limit for POST /v1/files: an upload may be as large as --max-file-size allows."""
    return max(settings.max_body_size, settings.max_file_size + MULTIPART_OVERHEAD)


def knowledge_store(request: Request) -> KnowledgeStore:
    store = getattr(request.app.state, "knowledge", None)
    if store is None or not store.is_open:
        raise APIError(503, "the knowledge store is not open yet; retry shortly", code="unavailable",
                       headers={"Retry-After": "1"})
    return store


Store = Annotated[KnowledgeStore, Depends(knowledge_store)]
Owner = Annotated[str, Depends(caller_owner)]


def translate_errors(route):
    """Store errors become OpenAI envelopes with their status (404 not found, 413 too large, 400 the rest)."""

    @functools.wraps(route)
    def wrapper(*args, **kwargs):
        try:
            return route(*args, **kwargs)
        except KnowledgeError as error:
            raise APIError(error.status, error.message, param=error.param, code=error.code) from None
        except ChunkingError as error:
            raise APIError(400, str(error), param="chunking_strategy", code="invalid_chunking_strategy") from None

    return wrapper
