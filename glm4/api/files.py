"""/v1/files: upload (multipart), list, retrieve, download and delete documents for the knowledge base.

An upload is parsed before it is accepted, so a file the server cannot read (unsupported type, empty, binary
named .txt, a zip bomb named .docx, a broken PDF) is refused here with a 400 that says why, not later.
Routes are plain `def`: FastAPI runs them in its thread pool, and the store's blocking work stays off the loop.
"""

from __future__ import annotations

from typing import Annotated, BinaryIO, Literal, Optional
from urllib.parse import quote

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import Response

from glm4.api.errors import APIError
from glm4.api.knowledge import Owner, Store, translate_errors
from glm4.api.knowledge_protocol import FileDeleted, FileList, FileObject
from glm4.api.protocol import ErrorResponse
from glm4.api.routes import require_api_key
from glm4.knowledge.store import FileRecord

ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 503)}
TEST_FAULT_HEADER = "x-glm4-test-fault"  # with --test-hooks: "upload-io-error" fails the write halfway

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES,
                   tags=["files"])


def to_file_object(record: FileRecord) -> FileObject:
    return FileObject(id=record.id, bytes=record.bytes, created_at=record.created_at, filename=record.filename,
                      purpose=record.purpose)


class FailingHalfway:
    """Test hook only: a source that breaks after half its bytes, like a disk that fills up mid-write."""

    def __init__(self, source: BinaryIO, size: int):
        self.source, self.left = source, max(1, size // 2)

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            raise OSError(28, "No space left on device (test hook)")
        chunk = self.source.read(min(n, self.left) if n > 0 else self.left)
        self.left -= len(chunk)
        return chunk


@router.post("/files", response_model=FileObject, response_model_exclude_none=True)
@translate_errors
def create_file(request: Request, store: Store, owner: Owner,
                file: Annotated[UploadFile, File(description="the document: .txt, .md, .pdf, .docx or .html")],
                purpose: Annotated[Literal["assistants", "user_data"], Form()]) -> FileObject:
    source: BinaryIO = file.file
    if request.app.state.settings.test_hooks and request.headers.get(TEST_FAULT_HEADER) == "upload-io-error":
        source = FailingHalfway(source, file.size or 0)
    try:
        record = store.create_file(owner, file.filename, purpose, source)
    except OSError:
        raise APIError(507, "the server could not store the file (out of disk space or an I/O error); "
                       "nothing was kept", code="storage_error", type="server_error") from None
    return to_file_object(record)


@router.get("/files", response_model=FileList, response_model_exclude_none=True)
@translate_errors
def list_files(store: Store, owner: Owner,
               after: Annotated[Optional[str], Query(max_length=128)] = None,
               limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
               order: Annotated[Literal["asc", "desc"], Query()] = "desc",
               purpose: Annotated[Optional[str], Query(max_length=64)] = None) -> FileList:
    page = store.list_files(owner, purpose=purpose, after=after, limit=limit, order=order)
    data = [to_file_object(record) for record in page.items]
    return FileList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None,
                    has_more=page.has_more)


@router.get("/files/{file_id}", response_model=FileObject, response_model_exclude_none=True)
@translate_errors
def retrieve_file(file_id: str, store: Store, owner: Owner) -> FileObject:
    return to_file_object(store.get_file(owner, file_id))


@router.delete("/files/{file_id}", response_model=FileDeleted)
@translate_errors
def delete_file(file_id: str, store: Store, owner: Owner) -> FileDeleted:
    store.delete_file(owner, file_id)
    return FileDeleted(id=file_id)


@router.get("/files/{file_id}/content", response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}}, "description": "the file's bytes"}})
@translate_errors
def retrieve_file_content(file_id: str, store: Store, owner: Owner) -> Response:
    record = store.get_file(owner, file_id)
    data = store.file_content(owner, file_id)
    disposition = f"attachment; filename*=UTF-8''{quote(record.filename, safe='')}"
    return Response(data, media_type="application/octet-stream", headers={"Content-Disposition": disposition})
