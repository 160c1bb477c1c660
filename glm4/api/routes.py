"""HTTP glue: /v1 routes (auth-protected), /health and /metrics. Logic lives in serving.py."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Annotated

from pydantic import BaseModel, ValidationError

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from glm4.api.errors import APIError, describe_errors
from glm4.api.protocol import (ChatCompletionRequest, ChatCompletionResponse, ErrorResponse, HealthResponse,
                               ModelCard, ModelList)
from glm4.api.serving import ChatService

ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 500, 503)}


def chat_service(request: Request) -> ChatService:
    return request.app.state.chat


def require_api_key(request: Request) -> None:
    """Bearer auth with a constant-time compare; no keys configured = open."""
    keys: list[str] = request.app.state.settings.api_key
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    valid = scheme.lower() == "bearer" and any(hmac.compare_digest(token.encode(), key.encode()) for key in keys)
    if not valid:
        raise APIError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer <key>'",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    # KV computed under one key is reused only under the same key: a shared prefix cache would let one tenant
    # time another's prompts (vLLM's cache_salt). A digest, so the key itself is not kept with the cache.
    request.state.cache_salt = "key:" + hashlib.sha256(token.encode()).hexdigest()[:32]


Service = Annotated[ChatService, Depends(chat_service)]
v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES)
public = APIRouter()


class NonFiniteNumber(ValueError):
    """NaN, Infinity or -Infinity: Python's json reads them, JSON does not have them."""


def refuse_constant(name: str):
    raise NonFiniteNumber(f"{name} is not a JSON number")


async def read_json_body(request: Request, model: type[BaseModel]):
    """Parse the body as JSON whatever the Content-Type (curl -d sends form-urlencoded) and validate it strictly
    (JSON types as the spec says: "0.7" is not a number, 1 is not true, as OpenAI does), with 400s that say why.
    Every /v1 protocol parses its body here; each turns the APIError into its own envelope."""
    raw = await request.body()
    try:
        data = json.loads(raw, parse_constant=refuse_constant)
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not valid UTF-8", code="invalid_json") from None
    except json.JSONDecodeError as error:
        raise APIError(400, f"the request body is not valid JSON: {error.msg} at position {error.pos}",
                       code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None
    except NonFiniteNumber as error:
        raise APIError(400, f"the request body is not valid JSON: {error}", code="invalid_json") from None
    except ValueError:  # an integer literal beyond Python's 4300-digit conversion limit
        raise APIError(400, "the request body holds a number too long to read", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as error:
        message, param = describe_errors(error.errors(include_url=False))
        raise APIError(400, message, param=param, code="invalid_value") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None


async def chat_request(request: Request) -> ChatCompletionRequest:
    return await read_json_body(request, ChatCompletionRequest)


CHAT_REQUEST_SCHEMA = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}}}


@v1.post("/chat/completions", response_model=ChatCompletionResponse, openapi_extra=CHAT_REQUEST_SCHEMA,
         responses={200: {"content": {"text/event-stream": {}, "application/x-ndjson": {}}}})
async def create_chat_completion(request: Request, service: Service,
                                 body: Annotated[ChatCompletionRequest, Depends(chat_request)]):
    service.check_model(body.model)
    return await request.app.state.chat_completions.create(body, request, body.model or service.engine.info.name)


@v1.get("/models", response_model=ModelList)
async def list_models(service: Service, request: Request) -> ModelList:
    created = service.engine.info.created
    cards = [ModelCard(id=name, created=created) for name in service.model_names]
    embeddings = getattr(request.app.state, "embeddings", None)  # --embedding-model / --rerank-model
    for model in (embeddings.embedder, embeddings.reranker) if embeddings else ():
        if model is not None:
            cards.append(ModelCard(id=model.name, created=created))
    return ModelList(data=cards)


@v1.get("/models/{model_id:path}", response_model=ModelCard)
async def retrieve_model(model_id: str, service: Service, request: Request) -> ModelCard:
    embeddings = getattr(request.app.state, "embeddings", None)
    if embeddings and any(m is not None and model_id in m.names for m in (embeddings.embedder, embeddings.reranker)):
        return ModelCard(id=model_id, created=service.engine.info.created)
    service.check_model(model_id)
    return ModelCard(id=model_id, created=service.engine.info.created)


@public.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def health(request: Request):
    status = request.app.state.status
    return JSONResponse({"status": status}, status_code=200 if status == "ok" else 503)


@public.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
