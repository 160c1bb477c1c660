"""OpenAI wire models for /v1/files and /v1/vector_stores (pydantic only).

Responses mirror the openai SDK's types (openai/types/file_object.py, vector_store.py, vector_stores/*.py,
vector_store_search_response.py), field for field; requests accept what the SDK sends and are validated
strictly (JSON types as the spec says), with OpenAI's documented bounds written into the schema.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, model_validator


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


def integral_float_to_int(value):
    """JSON Schema's integer includes 4.0, which Python's json reads as a float (requests are validated strictly)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Integer = Annotated[int, BeforeValidator(integral_float_to_int)]
Number = Annotated[float, Field(allow_inf_nan=False)]  # NaN would come back as invalid JSON
Key = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Metadata = Annotated[dict[Key, Annotated[str, StringConstraints(max_length=512)]], Field(max_length=16)]
AttributeValue = Union[Annotated[str, StringConstraints(max_length=512)], bool, Number]
Attributes = Annotated[dict[Key, AttributeValue], Field(max_length=16)]
ObjectId = Annotated[str, StringConstraints(min_length=1, max_length=128)]


# ---------- chunking ----------

class StaticChunking(RequestModel):
    max_chunk_size_tokens: Integer = Field(ge=100, le=4096)
    chunk_overlap_tokens: Integer = Field(ge=0, description="at most half of max_chunk_size_tokens")


class StaticChunkingStrategyParam(RequestModel):
    type: Literal["static"]
    static: StaticChunking


class AutoChunkingStrategyParam(RequestModel):
    type: Literal["auto"]


ChunkingStrategyParam = Annotated[Union[AutoChunkingStrategyParam, StaticChunkingStrategyParam],
                                  Field(discriminator="type")]


class ChunkingError(ValueError):
    """A static strategy whose overlap exceeds half its size (a rule across two fields, checked here)."""


def chunking_of(strategy: AutoChunkingStrategyParam | StaticChunkingStrategyParam | None) -> tuple[int, int] | None:
    if isinstance(strategy, StaticChunkingStrategyParam):
        size, overlap = strategy.static.max_chunk_size_tokens, strategy.static.chunk_overlap_tokens
        if overlap > size // 2:
            raise ChunkingError(f"chunk_overlap_tokens ({overlap}) must not exceed half of max_chunk_size_tokens "
                                f"({size})")
        return size, overlap
    return None  # auto: the store's default


class StaticChunkingStrategy(BaseModel):
    max_chunk_size_tokens: int
    chunk_overlap_tokens: int


class StaticChunkingStrategyObject(BaseModel):
    type: Literal["static"] = "static"
    static: StaticChunkingStrategy


# ---------- files ----------

class FileObject(BaseModel):
    id: str
    bytes: int
    created_at: int
    filename: str
    object: Literal["file"] = "file"
    purpose: Literal["assistants", "user_data"]
    status: Literal["uploaded", "processed", "error"] = "processed"  # deprecated by OpenAI, still sent
    expires_at: Optional[int] = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: Optional[str] = None
    last_id: Optional[str] = None
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


# ---------- vector stores ----------

class ExpiresAfter(RequestModel):
    anchor: Literal["last_active_at"]
    days: Integer = Field(ge=1, le=365)


class VectorStoreCreateRequest(RequestModel):
    name: Optional[Annotated[str, StringConstraints(max_length=256)]] = None
    description: Optional[Annotated[str, StringConstraints(max_length=512)]] = None
    file_ids: list[ObjectId] = Field(default_factory=list, max_length=500)
    metadata: Optional[Metadata] = None
    chunking_strategy: Optional[ChunkingStrategyParam] = None
    expires_after: Optional[ExpiresAfter] = None


class VectorStoreUpdateRequest(RequestModel):
    name: Optional[Annotated[str, StringConstraints(max_length=256)]] = None
    metadata: Optional[Metadata] = None
    expires_after: Optional[ExpiresAfter] = None  # null removes the expiry


class FileCounts(BaseModel):
    cancelled: int
    completed: int
    failed: int
    in_progress: int
    total: int


class ExpiresAfterObject(BaseModel):
    anchor: Literal["last_active_at"] = "last_active_at"
    days: int


class VectorStoreObject(BaseModel):
    id: str
    created_at: int
    file_counts: FileCounts
    last_active_at: Optional[int] = None
    metadata: Optional[dict[str, str]] = None
    name: str
    object: Literal["vector_store"] = "vector_store"
    status: Literal["expired", "in_progress", "completed"]
    usage_bytes: int
    expires_after: Optional[ExpiresAfterObject] = None
    expires_at: Optional[int] = None


class VectorStoreList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VectorStoreObject]
    first_id: Optional[str] = None
    last_id: Optional[str] = None
    has_more: bool = False


class VectorStoreDeleted(BaseModel):
    id: str
    object: Literal["vector_store.deleted"] = "vector_store.deleted"
    deleted: bool = True


# ---------- vector store files ----------

class VectorStoreFileCreateRequest(RequestModel):
    file_id: ObjectId
    attributes: Optional[Attributes] = None
    chunking_strategy: Optional[ChunkingStrategyParam] = None


class VectorStoreFileUpdateRequest(RequestModel):
    attributes: Optional[Attributes]


class LastError(BaseModel):
    code: Literal["server_error", "unsupported_file", "invalid_file"]
    message: str


class VectorStoreFileObject(BaseModel):
    id: str
    created_at: int
    last_error: Optional[LastError] = None
    object: Literal["vector_store.file"] = "vector_store.file"
    status: Literal["in_progress", "completed", "cancelled", "failed"]
    usage_bytes: int
    vector_store_id: str
    attributes: Optional[dict[str, Union[str, bool, float]]] = None
    chunking_strategy: Optional[StaticChunkingStrategyObject] = None


class VectorStoreFileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VectorStoreFileObject]
    first_id: Optional[str] = None
    last_id: Optional[str] = None
    has_more: bool = False


class VectorStoreFileDeleted(BaseModel):
    id: str
    object: Literal["vector_store.file.deleted"] = "vector_store.file.deleted"
    deleted: bool = True


class TextContent(BaseModel):
    type: Literal["text"] = "text"
    text: str


class VectorStoreFileContentPage(BaseModel):
    object: Literal["vector_store.file_content.page"] = "vector_store.file_content.page"
    data: list[TextContent]
    has_more: bool = False
    next_page: Optional[str] = None


# ---------- file batches ----------

class FileBatchFile(RequestModel):
    file_id: ObjectId
    attributes: Optional[Attributes] = None
    chunking_strategy: Optional[ChunkingStrategyParam] = None


class FileBatchCreateRequest(RequestModel):
    """`file_ids` (with shared `attributes` and `chunking_strategy`) or `files` (each with its own)."""

    file_ids: Optional[Annotated[list[ObjectId], Field(max_length=2000)]] = None
    files: Optional[Annotated[list[FileBatchFile], Field(max_length=2000)]] = None
    attributes: Optional[Attributes] = None
    chunking_strategy: Optional[ChunkingStrategyParam] = None

    # exactly one of the two lists (null counts as absent), stated for the OpenAPI spec as the validator checks it
    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra={"oneOf": [
        {"required": ["file_ids"], "properties": {"file_ids": {"type": "array"}}},
        {"required": ["files"], "properties": {"files": {"type": "array"}}}]})

    @model_validator(mode="after")
    def check_one_list(self):
        if (self.file_ids is None) == (self.files is None):
            raise ValueError("send either file_ids or files")
        return self

    def entries(self) -> list[FileBatchFile]:
        if self.files is not None:
            return self.files
        return [FileBatchFile(file_id=file_id, attributes=self.attributes, chunking_strategy=self.chunking_strategy)
                for file_id in self.file_ids or []]


class VectorStoreFileBatchObject(BaseModel):
    id: str
    created_at: int
    file_counts: FileCounts
    object: Literal["vector_store.files_batch"] = "vector_store.files_batch"
    status: Literal["in_progress", "completed", "cancelled", "failed"]
    vector_store_id: str


# ---------- search ----------

ComparisonValue = Union[Annotated[str, StringConstraints(max_length=512)], bool, Number,
                        Annotated[list[Union[Annotated[str, StringConstraints(max_length=512)], Number]],
                                  Field(max_length=100)]]


class ComparisonFilter(RequestModel):
    type: Literal["eq", "ne", "gt", "gte", "lt", "lte", "in", "nin"]
    key: Key
    value: ComparisonValue

    def matches(self, attributes: dict) -> bool:
        actual = attributes.get(self.key)
        wanted = self.value
        if self.type in ("in", "nin"):
            found = isinstance(wanted, list) and actual is not None and actual in wanted
            return found if self.type == "in" else not found
        if self.type == "eq":
            return actual is not None and same_kind(actual, wanted) and actual == wanted
        if self.type == "ne":
            return not (actual is not None and same_kind(actual, wanted) and actual == wanted)
        if actual is None or isinstance(wanted, list) or not same_kind(actual, wanted) or isinstance(wanted, bool):
            return False  # an order comparison needs two numbers or two strings
        return {"gt": actual > wanted, "gte": actual >= wanted, "lt": actual < wanted, "lte": actual <= wanted}[self.type]


def same_kind(a, b) -> bool:
    """True and 1 are different attribute values; 1 and 1.0 are the same."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool)
    if isinstance(a, str) or isinstance(b, str):
        return isinstance(a, str) and isinstance(b, str)
    return True


class CompoundFilter(RequestModel):
    type: Literal["and", "or"]
    filters: Annotated[list[Union[ComparisonFilter, CompoundFilter]], Field(min_length=1, max_length=32)]

    def matches(self, attributes: dict) -> bool:
        results = (item.matches(attributes) for item in self.filters)
        return all(results) if self.type == "and" else any(results)


class RankingOptions(RequestModel):
    ranker: Optional[Literal["none", "auto", "default-2024-11-15"]] = None
    score_threshold: Optional[float] = Field(None, ge=0, le=1)


Query = Annotated[str, StringConstraints(min_length=1, max_length=4096)]


class VectorStoreSearchRequest(RequestModel):
    query: Union[Query, Annotated[list[Query], Field(min_length=1, max_length=10)]]
    max_num_results: Integer = Field(10, ge=1, le=50)
    filters: Optional[Union[ComparisonFilter, CompoundFilter]] = None
    ranking_options: Optional[RankingOptions] = None
    rewrite_query: bool = False  # accepted; there is no model to rewrite the query, so it is searched as given

    @property
    def queries(self) -> list[str]:
        return [self.query] if isinstance(self.query, str) else list(self.query)


class SearchResult(BaseModel):
    attributes: Optional[dict[str, Union[str, bool, float]]] = None
    content: list[TextContent]
    file_id: str
    filename: str
    score: float


class SearchResultsPage(BaseModel):
    object: Literal["vector_store.search_results.page"] = "vector_store.search_results.page"
    search_query: list[str]
    data: list[SearchResult]
    has_more: bool = False
    next_page: Optional[str] = None

