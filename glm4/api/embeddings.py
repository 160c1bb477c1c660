"""POST /v1/embeddings (OpenAI's shape) and POST /v1/rerank (the shape vLLM and llama.cpp serve; also at /rerank
and /v2/rerank, where Cohere- and Jina-style clients call it): wire models, translation and routes.

The models themselves live in glm4/embeddings.py (EmbeddingService on app.state.embeddings); these routes
validate, call it, and build the replies through the pydantic models below.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Annotated, Literal, Union

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from pydantic import ConfigDict, Field, field_validator

from glm4.api.errors import APIError
from glm4.api.protocol import ErrorResponse, OpenAIBaseModel
from glm4.api.routes import require_api_key
from glm4.embeddings import MAX_DOCUMENTS, MAX_INPUTS, EmbeddingInputError, EmbeddingService

ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 500, 503)}
INPUT_SHAPES = "a string, a list of strings, a list of token ids, or a list of token-id lists"


# ---------- wire models ----------

class StrictRequest(OpenAIBaseModel):
    # JSON types as the spec says (1 is not a string, true is not a token id), unknown fields ignored
    model_config = ConfigDict(extra="ignore", strict=True)


class EmbeddingRequest(StrictRequest):
    input: Union[str, list[str], list[int], list[list[int]]]
    model: str | None = None  # OpenAI requires it; None means the configured embedding model
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def check_input(cls, value):
        """One clear sentence per mistake instead of pydantic's list of union branches."""
        if isinstance(value, str):
            if not value:
                raise ValueError("must not be an empty string")
            return value
        if not isinstance(value, list):
            raise ValueError(f"must be {INPUT_SHAPES}")
        if not value:
            raise ValueError("must not be an empty list")
        if len(value) > MAX_INPUTS:
            raise ValueError(f"holds {len(value)} items; at most {MAX_INPUTS} inputs per request")
        if all(isinstance(item, str) for item in value):
            empty = next((n for n, item in enumerate(value) if not item), None)
            if empty is not None:
                raise ValueError(f"item {empty} is an empty string")
        elif all(_is_token_id(item) for item in value):
            pass
        elif all(isinstance(item, list) for item in value):
            for n, item in enumerate(value):
                if not item:
                    raise ValueError(f"item {n} is an empty list of token ids")
                if not all(_is_token_id(t) for t in item):
                    raise ValueError(f"item {n} must hold only integer token ids")
        else:
            kind = _kind(value[0])
            odd = next(n for n, item in enumerate(value) if _kind(item) != kind or kind == "other")
            raise ValueError(f"must be {INPUT_SHAPES}; item {odd} is {_json_type(value[odd])}"
                             + (f" while item 0 is {_json_type(value[0])}" if odd else ""))
        return value

    def to_inputs(self) -> list[str] | list[list[int]]:
        """Always a list: one string or one token-id list becomes a batch of one."""
        if isinstance(self.input, str):
            return [self.input]
        if self.input and isinstance(self.input[0], int):
            return [self.input]
        return self.input


def _is_token_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(item) -> str:
    return "string" if isinstance(item, str) else "id" if _is_token_id(item) else \
        "list" if isinstance(item, list) else "other"


def _json_type(item) -> str:
    names = {bool: "a boolean", str: "a string", int: "an integer", float: "a number", list: "a list",
             dict: "an object", type(None): "null"}
    return names.get(type(item), "a value")


class Embedding(OpenAIBaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: Union[list[float], str]  # floats, or base64 of little-endian float32 (encoding_format)
    index: int


class EmbeddingUsage(OpenAIBaseModel):
    prompt_tokens: int
    total_tokens: int


class CreateEmbeddingResponse(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class RerankDocumentIn(StrictRequest):
    text: str


class RerankRequest(StrictRequest):
    model: str | None = None
    query: str = Field(min_length=1)
    documents: list[Union[str, RerankDocumentIn]] = Field(min_length=1, max_length=MAX_DOCUMENTS)
    top_n: int | None = Field(None, ge=0)  # None or 0: every document (vLLM's reading of 0)
    return_documents: bool = True

    @field_validator("documents", mode="before")
    @classmethod
    def check_documents(cls, value):
        for n, item in enumerate(value if isinstance(value, list) else []):
            if not (isinstance(item, str) or isinstance(item, dict) and isinstance(item.get("text"), str)):
                raise ValueError(f"item {n} must be a string or an object with a \"text\" string")
        return value

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class RerankDocument(OpenAIBaseModel):
    text: str


class RerankResult(OpenAIBaseModel):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class RerankUsage(OpenAIBaseModel):
    prompt_tokens: int
    total_tokens: int


class RerankResponse(OpenAIBaseModel):
    id: str
    object: Literal["list"] = "list"
    model: str
    results: list[RerankResult]
    usage: RerankUsage
    created: int = Field(default_factory=lambda: int(time.time()))  # extension, as vLLM's score replies have


# ---------- translation ----------

def embedding_service(request: Request) -> EmbeddingService:
    return request.app.state.embeddings


Service = Annotated[EmbeddingService, Depends(embedding_service)]


def check_model(service: EmbeddingService, requested: str | None, role: str, chat_names: list[str]) -> str:
    """The served name of the model for `role`; a 404 (or a 400 for a model that exists but cannot do this)."""
    model = service.embedder if role == "embedding" else service.reranker
    flag = "--embedding-model" if role == "embedding" else "--rerank-model"
    other = service.reranker if role == "embedding" else service.embedder
    if model is not None and (requested is None or requested in model.names):
        return model.name
    if requested is not None and (requested in chat_names or (other is not None and requested in other.names)):
        kind = "a chat model" if requested in chat_names else f"the {'rerank' if role == 'embedding' else 'embedding'} model"
        serves = f"{role} requests go to {model.name!r}" if model else f"no {role} model is configured ({flag})"
        raise APIError(400, f"The model {requested!r} is {kind} and cannot serve {role} requests; {serves}.",
                       param="model", code="model_not_supported")
    if model is None:
        raise APIError(404, f"This server has no {role} model: start it with {flag} (e.g. {flag} tiny, or a "
                       "sentence-transformers model id or directory).", param="model", code="model_not_found")
    raise APIError(404, f"The model {requested!r} does not exist; {role} requests are served by {model.name!r}.",
                   param="model", code="model_not_found")


def to_api_error(error: EmbeddingInputError) -> APIError:
    return APIError(400, str(error), param=error.param, code=error.code or "invalid_value")


def encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # what the openai SDK decodes with numpy.frombuffer(..., "float32")
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return np.asarray(vector, dtype=np.float32).tolist()


def json_response(model: OpenAIBaseModel) -> Response:
    return Response(model.model_dump_json(exclude_none=True), media_type="application/json")


def chat_names(request: Request) -> list[str]:
    chat = getattr(request.app.state, "chat", None)
    return list(getattr(chat, "model_names", []) or [])


# ---------- routes ----------

class JSONBodyRoute(APIRoute):
    """Reads the body as JSON whatever its Content-Type (curl -d sends form-urlencoded), as the chat route does."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def read_as_json(request: Request):
            headers = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"]
            scope = {**request.scope, "headers": [*headers, (b"content-type", b"application/json")]}
            return await handler(Request(scope, request.receive))

        return read_as_json


router = APIRouter(dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES, route_class=JSONBodyRoute)


@router.post("/v1/embeddings", response_model=CreateEmbeddingResponse)
async def create_embeddings(body: EmbeddingRequest, service: Service, request: Request):
    name = check_model(service, body.model, "embedding", chat_names(request))
    try:
        result = await service.embed_inputs(body.to_inputs(), body.dimensions)
    except EmbeddingInputError as error:
        raise to_api_error(error) from None
    data = [Embedding(embedding=encode_vector(v, body.encoding_format), index=i) for i, v in enumerate(result.vectors)]
    usage = EmbeddingUsage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens)
    return json_response(CreateEmbeddingResponse(data=data, model=name, usage=usage))


async def create_rerank(body: RerankRequest, service: Service, request: Request):
    name = check_model(service, body.model, "rerank", chat_names(request))
    documents = body.texts()
    try:
        result = await service.rerank(body.query, documents)
    except EmbeddingInputError as error:
        raise to_api_error(error) from None
    order = sorted(range(len(documents)), key=lambda i: -result.scores[i])  # stable: ties keep input order
    if body.top_n:
        order = order[:body.top_n]
    results = [RerankResult(index=i, relevance_score=result.scores[i],
                            document=RerankDocument(text=documents[i]) if body.return_documents else None)
               for i in order]
    usage = RerankUsage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens)
    return json_response(RerankResponse(id=f"rerank-{uuid.uuid4().hex}", model=name, results=results, usage=usage))


for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
    router.add_api_route(path, create_rerank, methods=["POST"], response_model=RerankResponse,
                         include_in_schema=path == "/v1/rerank")


def install_embeddings(app: FastAPI, service: EmbeddingService | None) -> None:
    """Put the service on the app and add the routes (before the UI mount, which would shadow them)."""
    app.state.embeddings = service or EmbeddingService()
    app.include_router(router)
