"""/v1/vector_stores: stores, their files (indexed in the background, polled to `completed`), and search.

Shapes follow OpenAI's vector stores API so the openai SDK's helpers work unchanged (`create_and_poll`,
`upload_and_poll`, `search`). An `in_progress` file answers with `openai-poll-after-ms`, which the SDK's poll
helpers honour. Scores are BM25 mapped into [0, 1] (glm4.knowledge.index.normalize_score).
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from fastapi import APIRouter, Body, Depends, Query, Response

from glm4.api.files import ERROR_RESPONSES
from glm4.api.knowledge import POLL_AFTER_MS, Owner, Store, translate_errors
from glm4.api.knowledge_protocol import (
    ExpiresAfterObject, FileBatchCreateRequest, VectorStoreFileBatchObject, FileCounts, LastError, SearchResult, SearchResultsPage, StaticChunkingStrategy,
    StaticChunkingStrategyObject, TextContent, VectorStoreCreateRequest, VectorStoreDeleted,
    VectorStoreFileContentPage, VectorStoreFileCreateRequest, VectorStoreFileDeleted, VectorStoreFileList,
    VectorStoreFileObject, VectorStoreFileUpdateRequest, VectorStoreList, VectorStoreObject,
    VectorStoreSearchRequest, VectorStoreUpdateRequest, chunking_of,
)
from glm4.api.routes import require_api_key
from glm4.knowledge.store import FileBatchRecord, StoreFileRecord, VectorStoreRecord

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES,
                   tags=["vector stores"])

Cursor = Annotated[Optional[str], Query(max_length=128)]
Order = Annotated[Literal["asc", "desc"], Query()]
PageSize = Annotated[int, Query(ge=1, le=100)]
StatusFilter = Annotated[Optional[Literal["in_progress", "completed", "failed", "cancelled"]], Query()]


def to_vector_store_object(record: VectorStoreRecord) -> VectorStoreObject:
    return VectorStoreObject(
        id=record.id, created_at=record.created_at, file_counts=FileCounts(**record.file_counts),
        last_active_at=record.last_active_at, metadata=record.metadata, name=record.name, status=record.status,
        usage_bytes=record.usage_bytes, expires_at=record.expires_at,
        expires_after=None if record.expires_after_days is None else ExpiresAfterObject(days=record.expires_after_days))


def to_store_file_object(record: StoreFileRecord) -> VectorStoreFileObject:
    error = None if record.last_error is None else LastError(code=record.last_error[0], message=record.last_error[1])
    chunking = StaticChunkingStrategyObject(static=StaticChunkingStrategy(
        max_chunk_size_tokens=record.max_tokens, chunk_overlap_tokens=record.overlap_tokens))
    return VectorStoreFileObject(id=record.file_id, created_at=record.created_at, last_error=error,
                                 status=record.status, usage_bytes=record.usage_bytes,
                                 vector_store_id=record.vector_store_id, attributes=record.attributes,
                                 chunking_strategy=chunking)


def poll_hint(response: Response, status: str) -> None:
    if status == "in_progress":
        response.headers["openai-poll-after-ms"] = POLL_AFTER_MS


# ---------- vector stores ----------

@router.post("/vector_stores", response_model=VectorStoreObject)
@translate_errors
def create_vector_store(store: Store, owner: Owner,
                        body: Annotated[Optional[VectorStoreCreateRequest], Body()] = None) -> VectorStoreObject:
    body = body or VectorStoreCreateRequest()
    record = store.create_vector_store(
        owner, name=body.name, description=body.description, metadata=body.metadata, file_ids=body.file_ids,
        chunking=chunking_of(body.chunking_strategy),
        expires_after_days=body.expires_after.days if body.expires_after else None)
    return to_vector_store_object(record)


@router.get("/vector_stores", response_model=VectorStoreList)
@translate_errors
def list_vector_stores(store: Store, owner: Owner, after: Cursor = None, before: Cursor = None,
                       limit: PageSize = 20, order: Order = "desc") -> VectorStoreList:
    page = store.list_vector_stores(owner, after=after, before=before, limit=limit, order=order)
    data = [to_vector_store_object(record) for record in page.items]
    return VectorStoreList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None,
                           has_more=page.has_more)


@router.get("/vector_stores/{vector_store_id}", response_model=VectorStoreObject)
@translate_errors
def retrieve_vector_store(vector_store_id: str, store: Store, owner: Owner) -> VectorStoreObject:
    return to_vector_store_object(store.get_vector_store(owner, vector_store_id))


@router.post("/vector_stores/{vector_store_id}", response_model=VectorStoreObject)
@translate_errors
def update_vector_store(vector_store_id: str, store: Store, owner: Owner,
                        body: Annotated[VectorStoreUpdateRequest, Body()]) -> VectorStoreObject:
    clear = "expires_after" in body.model_fields_set and body.expires_after is None
    record = store.update_vector_store(owner, vector_store_id, name=body.name, metadata=body.metadata,
                                       expires_after_days=body.expires_after.days if body.expires_after else None,
                                       clear_expiry=clear)
    return to_vector_store_object(record)


@router.delete("/vector_stores/{vector_store_id}", response_model=VectorStoreDeleted)
@translate_errors
def delete_vector_store(vector_store_id: str, store: Store, owner: Owner) -> VectorStoreDeleted:
    store.delete_vector_store(owner, vector_store_id)
    return VectorStoreDeleted(id=vector_store_id)


# ---------- files in a vector store ----------

@router.post("/vector_stores/{vector_store_id}/files", response_model=VectorStoreFileObject,
             response_model_exclude_none=True)
@translate_errors
def create_vector_store_file(vector_store_id: str, store: Store, owner: Owner, response: Response,
                             body: Annotated[VectorStoreFileCreateRequest, Body()]) -> VectorStoreFileObject:
    record = store.attach_file(owner, vector_store_id, body.file_id, attributes=body.attributes,
                               chunking=chunking_of(body.chunking_strategy))
    poll_hint(response, record.status)
    return to_store_file_object(record)


@router.get("/vector_stores/{vector_store_id}/files", response_model=VectorStoreFileList,
            response_model_exclude_none=True)
@translate_errors
def list_vector_store_files(vector_store_id: str, store: Store, owner: Owner, after: Cursor = None,
                            before: Cursor = None,
                            filter: StatusFilter = None,
                            limit: PageSize = 20, order: Order = "desc") -> VectorStoreFileList:
    page = store.list_store_files(owner, vector_store_id, status=filter, after=after, before=before, limit=limit,
                                  order=order)
    data = [to_store_file_object(record) for record in page.items]
    return VectorStoreFileList(data=data, first_id=data[0].id if data else None,
                               last_id=data[-1].id if data else None, has_more=page.has_more)


@router.get("/vector_stores/{vector_store_id}/files/{file_id}", response_model=VectorStoreFileObject,
            response_model_exclude_none=True)
@translate_errors
def retrieve_vector_store_file(vector_store_id: str, file_id: str, store: Store, owner: Owner,
                               response: Response) -> VectorStoreFileObject:
    record = store.get_store_file(owner, vector_store_id, file_id)
    poll_hint(response, record.status)
    return to_store_file_object(record)


@router.post("/vector_stores/{vector_store_id}/files/{file_id}", response_model=VectorStoreFileObject,
             response_model_exclude_none=True)
@translate_errors
def update_vector_store_file(vector_store_id: str, file_id: str, store: Store, owner: Owner,
                             body: Annotated[VectorStoreFileUpdateRequest, Body()]) -> VectorStoreFileObject:
    return to_store_file_object(store.update_store_file(owner, vector_store_id, file_id, body.attributes))


@router.delete("/vector_stores/{vector_store_id}/files/{file_id}", response_model=VectorStoreFileDeleted)
@translate_errors
def delete_vector_store_file(vector_store_id: str, file_id: str, store: Store,
                             owner: Owner) -> VectorStoreFileDeleted:
    store.detach_file(owner, vector_store_id, file_id)
    return VectorStoreFileDeleted(id=file_id)


@router.get("/vector_stores/{vector_store_id}/files/{file_id}/content", response_model=VectorStoreFileContentPage)
@translate_errors
def retrieve_vector_store_file_content(vector_store_id: str, file_id: str, store: Store,
                                       owner: Owner) -> VectorStoreFileContentPage:
    passages = store.store_file_passages(owner, vector_store_id, file_id)
    return VectorStoreFileContentPage(data=[TextContent(text=text) for text in passages])


# ---------- file batches ----------

def to_batch_object(record: FileBatchRecord) -> VectorStoreFileBatchObject:
    return VectorStoreFileBatchObject(id=record.id, created_at=record.created_at,
                                      file_counts=FileCounts(**record.file_counts), status=record.status,
                                      vector_store_id=record.vector_store_id)


@router.post("/vector_stores/{vector_store_id}/file_batches", response_model=VectorStoreFileBatchObject)
@translate_errors
def create_file_batch(vector_store_id: str, store: Store, owner: Owner, response: Response,
                      body: Annotated[FileBatchCreateRequest, Body()]) -> VectorStoreFileBatchObject:
    entries = [(entry.file_id, entry.attributes, chunking_of(entry.chunking_strategy)) for entry in body.entries()]
    record = store.create_file_batch(owner, vector_store_id, entries)
    poll_hint(response, record.status)
    return to_batch_object(record)


@router.get("/vector_stores/{vector_store_id}/file_batches/{batch_id}", response_model=VectorStoreFileBatchObject)
@translate_errors
def retrieve_file_batch(vector_store_id: str, batch_id: str, store: Store, owner: Owner,
                        response: Response) -> VectorStoreFileBatchObject:
    record = store.get_file_batch(owner, vector_store_id, batch_id)
    poll_hint(response, record.status)
    return to_batch_object(record)


@router.post("/vector_stores/{vector_store_id}/file_batches/{batch_id}/cancel",
             response_model=VectorStoreFileBatchObject)
@translate_errors
def cancel_file_batch(vector_store_id: str, batch_id: str, store: Store,
                      owner: Owner) -> VectorStoreFileBatchObject:
    return to_batch_object(store.cancel_file_batch(owner, vector_store_id, batch_id))


@router.get("/vector_stores/{vector_store_id}/file_batches/{batch_id}/files", response_model=VectorStoreFileList,
            response_model_exclude_none=True)
@translate_errors
def list_file_batch_files(vector_store_id: str, batch_id: str, store: Store, owner: Owner, after: Cursor = None,
                          before: Cursor = None, filter: StatusFilter = None, limit: PageSize = 20,
                          order: Order = "desc") -> VectorStoreFileList:
    page = store.list_file_batch_files(owner, vector_store_id, batch_id, status=filter, after=after, before=before,
                                       limit=limit, order=order)
    data = [to_store_file_object(record) for record in page.items]
    return VectorStoreFileList(data=data, first_id=data[0].id if data else None,
                               last_id=data[-1].id if data else None, has_more=page.has_more)


# ---------- search ----------

@router.post("/vector_stores/{vector_store_id}/search", response_model=SearchResultsPage,
             response_model_exclude_none=True)
@translate_errors
def search_vector_store(vector_store_id: str, store: Store, owner: Owner,
                        body: Annotated[VectorStoreSearchRequest, Body()]) -> SearchResultsPage:
    threshold = (body.ranking_options.score_threshold if body.ranking_options else None) or 0.0
    hits = store.search(owner, [vector_store_id], " ".join(body.queries), max_results=body.max_num_results,
                        attribute_filter=body.filters.matches if body.filters else None, score_threshold=threshold)
    return SearchResultsPage(search_query=body.queries, data=[
        SearchResult(attributes=hit.attributes, content=[TextContent(text=hit.text)], file_id=hit.file_id,
                     filename=hit.filename, score=round(hit.score, 6)) for hit in hits])
