"""Ollama's /api (chat, generate, tags, ps, show, version, embed) as a thin translator over the chat service.

An Ollama request becomes the OpenAI-shaped chat request the chat service takes (messages, tools, sampling), so
the defaults policy, prompt building, tool-call parsing and the test hooks are the ones every protocol shares;
this module only maps names and shapes: `options` → sampling, `format` → a grammar constraint, `think` →
reasoning split, argument objects ↔ JSON strings, NDJSON lines with Ollama's counts and nanosecond timings.
Errors leave as Ollama's `{"error": "..."}` with its status codes (404 for an unknown model).
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import hashlib
import json
import time
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from glm4 import __version__
from glm4.api.errors import APIError, describe_errors
from glm4.api.ollama_protocol import (ChatRequest, ChatResponse, EmbedRequest, EmbedResponse, OllamaErrorResponse,
                                      GenerateRequest, GenerateResponse, LegacyEmbeddingsRequest,
                                      LegacyEmbeddingsResponse, ListedModel, ModelDetails, Options, ProcessResponse,
                                      ResponseMessage, ResponseToolCall, ResponseToolCallFunction, RunningModel,
                                      ShowRequest, ShowResponse, TagsResponse, VersionResponse)
from glm4.api.protocol import ChatCompletionRequest, completion_id
from glm4.api.routes import NonFiniteNumber, refuse_constant, require_api_key
from glm4.api.serving import (ChatService, Choice, EngineStreamingResponse, GenerationFailed, cache_salt_of,
                              choice_events, failure_error, until_disconnect)
from glm4.embeddings import EmbeddingInputError
from glm4.engine.base import Prompt, SamplingParams

# Clients gate features on the server's version (Open WebUI, the VS Code provider): answer as a current Ollama.
OLLAMA_COMPATIBLE_VERSION = "0.12.6"
NDJSON = "application/x-ndjson"
STARTED_AT = datetime.datetime.now(datetime.timezone.utc)


class OllamaError(Exception):
    """Raised below an /api route; becomes {"error": message} with this status."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers

    @classmethod
    def from_api_error(cls, error: APIError) -> "OllamaError":
        return cls(error.status, error.message, error.headers)

    def response(self) -> JSONResponse:
        return JSONResponse(OllamaErrorResponse(error=self.message).model_dump(), status_code=self.status,
                            headers=self.headers)


def ollama_errors(handler):
    """The shared layers raise APIError (OpenAI's envelope); on /api the same status carries Ollama's shape."""
    @functools.wraps(handler)
    async def wrapped(*args, **kwargs):
        try:
            return await handler(*args, **kwargs)
        except APIError as error:
            raise OllamaError.from_api_error(error) from None
    return wrapped


def require_key(request: Request) -> None:
    try:
        require_api_key(request)
    except APIError as error:
        raise OllamaError.from_api_error(error) from None


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def base_name(name: str) -> str:
    """`glm-4:latest` and `glm-4` are the same model to Ollama clients."""
    return name[:-len(":latest")] if name.endswith(":latest") else name


def tagged(name: str) -> str:
    return name if ":" in name else name + ":latest"


async def read_body(request: Request, model: type[BaseModel]):
    """Parse the body as JSON whatever its Content-Type (Ollama's clients and curl -d), with 400s that say why."""
    raw = await request.body()
    try:
        data = json.loads(raw, parse_constant=refuse_constant) if raw.strip() else {}
    except UnicodeDecodeError:
        raise OllamaError(400, "the request body is not valid UTF-8") from None
    except json.JSONDecodeError as error:
        raise OllamaError(400, f"invalid JSON in the request body: {error.msg} at position {error.pos}") from None
    except NonFiniteNumber as error:
        raise OllamaError(400, f"invalid JSON in the request body: {error}") from None
    except (RecursionError, ValueError):
        raise OllamaError(400, "the request body is nested too deeply or holds a number too long to read") from None
    if not isinstance(data, dict):
        raise OllamaError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data, strict=True)  # JSON types as Ollama's Go decoder takes them
    except ValidationError as error:
        message, _ = describe_errors(error.errors(include_url=False))
        raise OllamaError(400, message) from None
    except RecursionError:
        raise OllamaError(400, "the request body is nested too deeply") from None


def ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))


# ---------- translation: Ollama → the chat request ----------

def to_chat_messages(messages) -> list[dict[str, Any]]:
    """Ollama messages as OpenAI-shaped ones: argument objects become JSON strings, past thinking is dropped."""
    out = []
    for n, message in enumerate(messages):
        if message.images:
            raise OllamaError(400, f"messages[{n}] holds images, but this model reads text only")
        item: dict[str, Any] = {"role": message.role, "content": message.content}
        if message.role == "assistant" and message.tool_calls:
            item["tool_calls"] = [{"id": f"call_{n}_{k}", "type": "function",
                                   "function": {"name": call.function.name,
                                                "arguments": json.dumps(call.function.arguments, ensure_ascii=False)}}
                                  for k, call in enumerate(message.tool_calls)]
        if message.role == "tool" and message.tool_name:
            item["name"] = message.tool_name
        out.append(item)
    return out


def sampling_fields(options: Options | None) -> dict[str, Any]:
    """Ollama's options under the chat request's names (None: the shared defaults decide)."""
    if options is None:
        return {}
    fields = {"temperature": options.temperature, "top_p": options.top_p, "top_k": options.top_k,
              "seed": options.seed, "stop": options.stop or None, "repetition_penalty": options.repeat_penalty,
              "presence_penalty": options.presence_penalty, "frequency_penalty": options.frequency_penalty,
              "test_force_output": options.test_force_output, "test_fault": options.test_fault}
    if options.num_predict is not None and options.num_predict > 0:  # -1/-2: as long as the context allows
        fields["max_tokens"] = options.num_predict
    return {key: value for key, value in fields.items() if value is not None}


def chat_request(model: str, messages: list[dict], tools, options: Options | None) -> ChatCompletionRequest:
    body: dict[str, Any] = {"model": model, "messages": messages, **sampling_fields(options)}
    if tools:
        body["tools"] = [tool.model_dump(exclude_none=True) for tool in tools]
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as error:
        message, _ = describe_errors(error.errors(include_url=False))
        raise OllamaError(400, message) from None


def check_num_ctx(options: Options | None, prompt_tokens: int, max_model_len: int) -> None:
    """num_ctx is the window the client expects; it may be smaller than the plan's, never larger."""
    if options is None or options.num_ctx is None:
        return
    if options.num_ctx > max_model_len:
        raise OllamaError(400, f"options.num_ctx is {options.num_ctx}, but this server's context is "
                          f"{max_model_len} tokens (--max-model-len); ask for {max_model_len} or less")
    if prompt_tokens > options.num_ctx:
        raise OllamaError(400, f"the prompt is {prompt_tokens} tokens, more than options.num_ctx "
                          f"({options.num_ctx}); shorten it or raise num_ctx (at most {max_model_len})")


def limit_to_num_ctx(params: SamplingParams, options: Options | None, prompt_tokens: int) -> None:
    if options is not None and options.num_ctx is not None:
        room = max(1, options.num_ctx - prompt_tokens)
        params.max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)


def done_reason(choice: Choice) -> str:
    return "length" if choice.finish_reason == "length" else "stop"  # a tool call ends as "stop" in Ollama


def tool_calls_of(choice: Choice) -> list[ResponseToolCall] | None:
    calls = getattr(choice.parser, "tool_calls", None) or ([choice.parser.tool_call] if choice.parser.tool_call else [])
    out = []
    for index, call in enumerate(calls):
        try:
            arguments = json.loads(call.arguments or "{}")
        except json.JSONDecodeError:  # the parser hands out objects' text; anything else is kept, not lost
            arguments = {"arguments": call.arguments}
        if not isinstance(arguments, dict):
            arguments = {"value": arguments}
        out.append(ResponseToolCall(function=ResponseToolCallFunction(index=index, name=call.name,
                                                                      arguments=arguments)))
    return out or None


# ---------- the service ----------

class OllamaService:
    def __init__(self, chat: ChatService, app_state):
        self.chat = chat
        self.engine = chat.engine
        self.settings = chat.settings
        self.state = app_state
        self._compiler = None
        self._reasoning = None

    # ---- names and descriptions ----

    def resolve(self, name: str) -> str:
        if base_name(name) in self.chat.model_names or name in self.chat.model_names:
            return self.engine.info.name
        raise OllamaError(404, f"model '{name}' not found")

    @property
    def embedder(self):
        embeddings = getattr(self.state, "embeddings", None)
        return embeddings.embedder if embeddings else None

    def resolve_embedder(self, name: str):
        embedder = self.embedder
        if embedder is not None and (name in embedder.names or base_name(name) in embedder.names):
            return embedder
        if embedder is None and (base_name(name) in self.chat.model_names or name in self.chat.model_names):
            raise OllamaError(400, f"\"{name}\" does not support embeddings: this server has no embedding model "
                              "(start it with --embedding-model)")
        if base_name(name) in self.chat.model_names or name in self.chat.model_names:
            raise OllamaError(400, f"\"{name}\" does not support embeddings; use \"{tagged(embedder.name)}\"")
        raise OllamaError(404, f"model '{name}' not found")

    def reasoning_mode(self):
        if self._reasoning is None:
            from glm4.reasoning import ReasoningMode, reasoning_mode_for

            tokenizer = getattr(self.engine, "tokenizer", None)
            self._reasoning = reasoning_mode_for(tokenizer, self.settings.reasoning_parser) if tokenizer is not None \
                else ReasoningMode(False, False, "no local tokenizer")
        return self._reasoning

    def details(self) -> ModelDetails:
        info = self.engine.info
        return ModelDetails(family="glm4", families=["glm4"], parameter_size=parameter_size(self.engine),
                            quantization_level=info.quantization.upper() if info.quantization != "none" else info.dtype)

    def capabilities(self) -> list[str]:
        capabilities = ["completion", "tools"]
        if self.reasoning_mode().enabled:
            capabilities.append("thinking")
        return capabilities

    # ---- constraints and reasoning ----

    def constraint_for(self, format) -> Any:
        if format in (None, ""):
            return None
        tokenizer = getattr(self.engine, "tokenizer", None)
        if tokenizer is None:
            raise OllamaError(400, "format needs a local model; this server's backend cannot constrain its output")
        from glm4.engine.constraints import ConstraintCompiler, UnsupportedSchema

        if self._compiler is None:
            self._compiler = ConstraintCompiler(tokenizer, self.engine.info.vocab_size,
                                                getattr(self.engine, "stop_ids", None))
        try:
            return self._compiler.json_object() if format == "json" else self._compiler.json_schema(format)
        except UnsupportedSchema as error:
            raise OllamaError(400, f"format: {error}") from None
        except ValueError as error:
            raise OllamaError(400, f"format is not a usable JSON schema: {error}") from None

    def splitter(self, think) -> Any:
        """A reasoning splitter for a reasoning model (None otherwise); think: false drops what it splits off."""
        mode = self.reasoning_mode()
        if think not in (None, False) and not mode.enabled:
            raise OllamaError(400, f"\"{self.engine.info.name}\" does not support thinking")
        splitter = mode.splitter()
        if splitter is not None:
            splitter.show_thinking = think is not False
        return splitter

    # ---- chat / generate ----

    async def prepare(self, request: ChatCompletionRequest, options: Options | None, format, cache_salt: str,
                      prompt: Prompt | None = None) -> tuple[Prompt, SamplingParams]:
        if prompt is None:
            prompt, params = await self.chat.prepare(request, cache_salt)
        else:  # raw generate: the caller's text is the prompt, as it is
            self.chat.check_model(request.model)
            prompt.cache_salt = cache_salt
            params = self.chat.sampling_params(request, prompt)
        check_num_ctx(options, len(prompt.token_ids), self.engine.info.max_model_len)
        limit_to_num_ctx(params, options, len(prompt.token_ids))
        constraint = self.constraint_for(format)
        if constraint is not None:
            params.constraint = constraint
        return prompt, params

    async def run(self, raw: Request, request: ChatCompletionRequest, prompt: Prompt, params: SamplingParams,
                  stream: bool, splitter, line) -> Response:
        """Submit one choice and answer with NDJSON lines (stream) or one JSON object; `line` builds each."""
        started = time.monotonic()
        request_id = completion_id()
        choice = self.chat.submit_choices(request, prompt, params, request_id)[0]
        run = Run(choice, splitter, started, self.chat.metrics)

        def cancel() -> None:
            self.engine.cancel(f"{request_id}-0")

        if stream:
            async def lines() -> AsyncIterator[str]:
                try:
                    async for part in run.parts():
                        yield line(part, None).model_dump_json(exclude_none=True) + "\n"
                    yield line(run.final_part(), run).model_dump_json(exclude_none=True) + "\n"
                except GenerationFailed as failure:
                    yield OllamaErrorResponse(error=str(failure)).model_dump_json() + "\n"
            return EngineStreamingResponse(lines(), cancel, media_type=NDJSON)
        try:
            whole = await until_disconnect(run.drain(), raw)
        except GenerationFailed as failure:
            raise OllamaError.from_api_error(failure_error(failure.delta)) from None
        except BaseException:
            cancel()
            raise
        return JSONResponse(line(whole, run).model_dump(exclude_none=True))

    async def create_chat(self, body: ChatRequest, raw: Request) -> Response:
        name = self.resolve(body.model)
        if not body.messages:  # Ollama's way to load a model: an empty chat answers done at once
            return JSONResponse(ChatResponse(model=body.model, created_at=now_iso(), message=ResponseMessage(),
                                             done=True, done_reason="load").model_dump(exclude_none=True))
        if body.tools and body.format not in (None, ""):
            # NOTE(ollama): a tool call is GLM-4's own text, not JSON of the format's schema: one grammar cannot be both
            raise OllamaError(400, "format cannot be combined with tools: send one or the other")
        request = chat_request(name, to_chat_messages(body.messages), body.tools, body.options)
        splitter = self.splitter(body.think)
        prompt, params = await self.prepare(request, body.options, body.format, cache_salt_of(raw))

        def line(part: ResponseMessage, run: "Run | None") -> ChatResponse:
            return ChatResponse(model=body.model, created_at=now_iso(), message=part, done=run is not None,
                                **(run.timings() if run else {}))

        return await self.run(raw, request, prompt, params, body.stream, splitter, line)

    async def create_generate(self, body: GenerateRequest, raw: Request) -> Response:
        name = self.resolve(body.model)
        if body.images:
            raise OllamaError(400, "images were sent, but this model reads text only")
        if body.template:
            raise OllamaError(400, "template is not supported: this server renders GLM-4's own chat format "
                              "(send raw: true with the whole prompt instead)")
        if body.context:
            raise OllamaError(400, "context (a deprecated conversation state) is not supported; send the "
                              "conversation to /api/chat")
        if body.suffix:
            raise OllamaError(400, "suffix (fill-in-the-middle) is not supported by this model")
        if not body.prompt:  # Ollama's way to load a model
            return JSONResponse(GenerateResponse(model=body.model, created_at=now_iso(), response="", done=True,
                                                 done_reason="load").model_dump(exclude_none=True))
        if body.raw:
            if getattr(self.engine, "tokenizer", None) is None:
                raise OllamaError(400, "raw needs a local model; this server's backend takes messages only")
            request = chat_request(name, [{"role": "user", "content": body.prompt}], None, body.options)
            token_ids = await asyncio.to_thread(self.engine.encode, body.prompt)
            prompt = Prompt(token_ids=token_ids, messages=request.model_dump(exclude_none=True)["messages"])
            prompt_in, params = await self.prepare(request, body.options, body.format, cache_salt_of(raw),
                                                   prompt=prompt)
            splitter = None
        else:
            messages = ([{"role": "system", "content": body.system}] if body.system else []) + \
                [{"role": "user", "content": body.prompt}]
            request = chat_request(name, messages, None, body.options)
            splitter = self.splitter(body.think)
            prompt_in, params = await self.prepare(request, body.options, body.format, cache_salt_of(raw))

        def line(part: ResponseMessage, run: "Run | None") -> GenerateResponse:
            return GenerateResponse(model=body.model, created_at=now_iso(), response=part.content,
                                    thinking=part.thinking, done=run is not None, **(run.timings() if run else {}))

        return await self.run(raw, request, prompt_in, params, body.stream, splitter, line)

    # ---- embeddings ----

    async def embed(self, names: str, texts: list[str], truncate: bool, dimensions: int | None):
        embedder = self.resolve_embedder(names)
        if not texts:
            raise OllamaError(400, "input must not be empty")
        if any(not text for text in texts):
            raise OllamaError(400, "input must not hold empty strings")
        try:
            return embedder, await self.state.embeddings.embed_inputs(texts, dimensions, truncate=truncate)
        except EmbeddingInputError as error:
            raise OllamaError(400, str(error)) from None


def parameter_size(engine) -> str:
    model = getattr(engine, "model", None)
    try:
        count = sum(p.numel() for p in model.parameters()) if model is not None else 0
    except (AttributeError, TypeError):
        count = 0
    if not count:
        return "9.4B"  # GLM-4-9B behind an upstream backend
    return f"{count / 1e9:.1f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"


class Run:
    """One generation's parts (content, thinking, tool calls) and its counts, from the shared event stream."""

    def __init__(self, choice: Choice, splitter, started: float, metrics):
        self.choice = choice
        self.splitter = splitter
        self.started = started
        self.metrics = metrics
        self.finished_at: float | None = None

    def split(self, text: str, final: bool = False) -> ResponseMessage:
        if self.splitter is None:
            return ResponseMessage(content=text)
        out = self.splitter.feed(text) if text else None
        answer, thinking = (out.answer, out.reasoning) if out else ("", "")
        if final:
            rest = self.splitter.finish()
            answer, thinking = answer + rest.answer, thinking + rest.reasoning
        shown = getattr(self.splitter, "show_thinking", True)
        return ResponseMessage(content=answer, thinking=(thinking or None) if shown else None)

    async def parts(self) -> AsyncIterator[ResponseMessage]:
        async for choice, events in choice_events(self.choice):
            text = "".join(event.text for event in events if event.kind == "content")
            part = self.split(text, final=bool(choice.finish_reason))
            if part.content or part.thinking:
                yield part
            if choice.finish_reason:
                self.finished_at = time.monotonic()
                calls = tool_calls_of(choice)
                if calls:
                    yield ResponseMessage(tool_calls=calls)
        self.record()

    def final_part(self) -> ResponseMessage:
        return ResponseMessage()

    async def drain(self) -> ResponseMessage:
        whole = ResponseMessage()
        thinking = ""
        async for part in self.parts():
            whole.content += part.content
            thinking += part.thinking or ""
            if part.tool_calls:
                whole.tool_calls = part.tool_calls
        whole.thinking = thinking or None
        return whole

    def record(self) -> None:
        usage = self.choice.usage
        ttft = None if self.choice.first_token_at is None else self.choice.first_token_at - self.started
        self.metrics.observe_request(prompt_tokens=usage.prompt_tokens if usage else 0,
                                     completion_tokens=usage.completion_tokens if usage else 0, ttft=ttft,
                                     duration=time.monotonic() - self.started)

    def timings(self) -> dict[str, Any]:
        end = self.finished_at or time.monotonic()
        first = self.choice.first_token_at or end
        usage = self.choice.usage
        return {"done_reason": done_reason(self.choice), "total_duration": ns(end - self.started),
                "load_duration": 0,  # the model stays loaded for the server's life
                "prompt_eval_count": usage.prompt_tokens if usage else 0,
                "prompt_eval_duration": ns(first - self.started),
                "eval_count": usage.completion_tokens if usage else 0, "eval_duration": ns(end - first)}


# ---------- routes ----------

def ollama_service(request: Request) -> OllamaService:
    return request.app.state.ollama


ERRORS = {status: {"model": OllamaErrorResponse} for status in (400, 401, 404, 413, 429, 500, 503)}
router = APIRouter(prefix="/api", dependencies=[Depends(require_key)], responses=ERRORS, tags=["ollama"])


def body_schema(model: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/Ollama{model.__name__}"}}}}}


OLLAMA_REQUEST_MODELS = (ChatRequest, GenerateRequest, ShowRequest, EmbedRequest, LegacyEmbeddingsRequest)


@router.get("/version", response_model=VersionResponse)
async def version() -> VersionResponse:
    return VersionResponse(version=OLLAMA_COMPATIBLE_VERSION)


@router.get("/tags", response_model=TagsResponse)
async def tags(request: Request) -> TagsResponse:
    service = ollama_service(request)
    modified = STARTED_AT.isoformat().replace("+00:00", "Z")
    names = [service.engine.info.name] + ([service.embedder.name] if service.embedder else [])
    details = [service.details()] + ([embedder_details(service.embedder)] if service.embedder else [])
    return TagsResponse(models=[ListedModel(name=tagged(name), model=tagged(name), modified_at=modified, size=0,
                                            digest=digest(name), details=detail)
                                for name, detail in zip(names, details)])


def embedder_details(embedder) -> ModelDetails:
    return ModelDetails(family="embedding", families=["embedding"], parameter_size="", quantization_level="F32")


@router.get("/ps", response_model=ProcessResponse)
async def ps(request: Request) -> ProcessResponse:
    service = ollama_service(request)
    name = service.engine.info.name
    forever = "2318-01-01T00:00:00Z"  # loaded for the server's life (Ollama's keep_alive -1 reads the same)
    return ProcessResponse(models=[RunningModel(name=tagged(name), model=tagged(name), size=0, digest=digest(name),
                                                details=service.details(), expires_at=forever, size_vram=0,
                                                context_length=service.engine.info.max_model_len)])


@router.post("/show", response_model=ShowResponse, openapi_extra=body_schema(ShowRequest))
@ollama_errors
async def show(request: Request) -> ShowResponse:
    service = ollama_service(request)
    body: ShowRequest = await read_body(request, ShowRequest)
    if not body.requested:
        raise OllamaError(400, "model is required")
    modified = STARTED_AT.isoformat().replace("+00:00", "Z")
    embedder = service.embedder
    if embedder is not None and (body.requested in embedder.names or base_name(body.requested) in embedder.names):
        return ShowResponse(modelfile="", parameters="", template="", details=embedder_details(embedder),
                            model_info={"general.architecture": "embedding",
                                        "embedding.embedding_length": embedder.dimensions,
                                        "embedding.context_length": embedder.max_tokens},
                            capabilities=["embedding"], modified_at=modified)
    service.resolve(body.requested)
    info = service.engine.info
    defaults = info.generation_defaults
    parameters = "\n".join(f"{key:<15}{value}" for key, value in (("temperature", defaults.get("temperature")),
                                                                  ("top_p", defaults.get("top_p")),
                                                                  ("num_ctx", info.max_model_len)) if value is not None)
    return ShowResponse(modelfile=f"FROM {info.source}\n", parameters=parameters, template="{{ .Prompt }}",
                        details=service.details(),
                        model_info={"general.architecture": "glm4", "general.basename": info.name,
                                    "glm4.context_length": info.max_model_len},
                        capabilities=service.capabilities(), modified_at=modified)


@router.post("/chat", response_model=ChatResponse, openapi_extra=body_schema(ChatRequest),
             responses={200: {"content": {NDJSON: {}}}})
@ollama_errors
async def chat(request: Request):
    body = await read_body(request, ChatRequest)
    return await ollama_service(request).create_chat(body, request)


@router.post("/generate", response_model=GenerateResponse, openapi_extra=body_schema(GenerateRequest),
             responses={200: {"content": {NDJSON: {}}}})
@ollama_errors
async def generate(request: Request):
    body = await read_body(request, GenerateRequest)
    return await ollama_service(request).create_generate(body, request)


@router.post("/embed", response_model=EmbedResponse, openapi_extra=body_schema(EmbedRequest))
@ollama_errors
async def embed(request: Request) -> EmbedResponse:
    started = time.monotonic()
    body: EmbedRequest = await read_body(request, EmbedRequest)
    texts = [body.input] if isinstance(body.input, str) else body.input
    embedder, result = await ollama_service(request).embed(body.model, texts, body.truncate, body.dimensions)
    return EmbedResponse(model=body.model, embeddings=[[float(x) for x in vector] for vector in result.vectors],
                         total_duration=ns(time.monotonic() - started), load_duration=0,
                         prompt_eval_count=result.prompt_tokens)


@router.post("/embeddings", response_model=LegacyEmbeddingsResponse,
             openapi_extra=body_schema(LegacyEmbeddingsRequest))
@ollama_errors
async def legacy_embeddings(request: Request) -> LegacyEmbeddingsResponse:
    body: LegacyEmbeddingsRequest = await read_body(request, LegacyEmbeddingsRequest)
    _, result = await ollama_service(request).embed(body.model, [body.prompt], True, None)
    return LegacyEmbeddingsResponse(embedding=[float(x) for x in result.vectors[0]])


def install_ollama(app: FastAPI) -> None:
    """Ollama's /api beside /v1 (before the UI mount, which would shadow it); errors in Ollama's shape."""
    app.state.ollama = OllamaService(app.state.chat, app.state)

    @app.exception_handler(OllamaError)
    async def ollama_error(_: Request, exc: OllamaError):
        return exc.response()

    app.include_router(router)


def ollama_request_schemas() -> dict[str, dict]:
    """The /api request bodies for the OpenAPI spec (the routes parse their bodies themselves)."""
    schemas: dict[str, dict] = {}
    for model in OLLAMA_REQUEST_MODELS:
        schema = model.model_json_schema(ref_template="#/components/schemas/Ollama{model}")
        for name, sub in schema.pop("$defs", {}).items():
            schemas[f"Ollama{name}"] = sub
        schemas[f"Ollama{model.__name__}"] = schema
    return schemas
