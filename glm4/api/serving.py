"""/v1/chat/completions logic: request → prompt + SamplingParams → engine stream → OpenAI (or legacy) output.

One primitive, the engine stream: the non-streaming path drains the same stream. Tool-call output is
recognized by glm4.tools; everything else is content.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from glm4.api.errors import APIError, error_body
from glm4.api.metrics import Metrics
from glm4.api.protocol import ChatCompletionRequest, completion_id
from glm4.engine.base import (Delta, Engine, EngineOverloaded, EngineUnavailable, FinishReason, Prompt,
                              SamplingParams)
from glm4.prompt import PromptError, build_prompt
from glm4.settings import Settings
from glm4.tools import ToolCallStreamParser

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # keep proxies from buffering


@dataclass
class Choice:
    """One of the n answers to a request, as the engine produces it."""

    index: int
    stream: AsyncIterator[Delta]
    parser: ToolCallStreamParser
    text: str = ""
    finish_reason: str | None = None
    usage: Any = None
    first_token_at: float | None = None
    events: list = field(default_factory=list)


class ChatService:
    def __init__(self, engine: Engine, settings: Settings, metrics: Metrics):
        self.engine = engine
        self.settings = settings
        self.metrics = metrics

    # ---- model names ----

    @property
    def model_names(self) -> list[str]:
        return [self.engine.info.name, *self.engine.info.aliases]

    def check_model(self, name: str | None) -> None:
        if name and name not in self.model_names:
            raise APIError(404, f"The model {name!r} does not exist; this server serves {self.engine.info.name!r}",
                           param="model", code="model_not_found")

    # ---- request → engine inputs ----

    async def prepare(self, request: ChatCompletionRequest, cache_salt: str = "") -> tuple[Prompt, SamplingParams]:
        """cache_salt: the API key's (request.state.cache_salt): KV is reused only under the same salt."""
        self.check_model(request.model)
        messages = [message.model_dump(exclude_none=True) for message in request.messages]
        tools = [tool.model_dump(exclude_none=True) for tool in request.tools] if request.tools else None
        tool_choice = request.tool_choice.model_dump() if hasattr(request.tool_choice, "model_dump") \
            else request.tool_choice
        try:
            prompt = await asyncio.to_thread(build_prompt, getattr(self.engine, "tokenizer", None), messages,
                                             tools, tool_choice)
        except PromptError as error:
            raise APIError(400, str(error), param=error.param) from None
        prompt.cache_salt, prompt.cache_hint = cache_salt, request.prompt_cache_key
        return prompt, self.sampling_params(request, prompt)

    def sampling_params(self, request: ChatCompletionRequest, prompt: Prompt) -> SamplingParams:
        defaults = self.engine.info.generation_defaults
        limit = self.engine.info.max_model_len
        prompt_tokens = len(prompt.token_ids)
        requested = request.requested_max_tokens
        room = limit - prompt_tokens
        if prompt_tokens and (room <= 0 or (requested is not None and requested > room)):
            asked = requested if requested is not None else 1
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                           f"{prompt_tokens + asked} tokens ({prompt_tokens} in the messages, {asked} in the "
                           "completion). Please reduce the length of the messages or the completion.",
                           param="messages" if room <= 0 else "max_tokens", code="context_length_exceeded")
        params = SamplingParams(
            temperature=first(request.temperature, defaults.get("temperature"), 1.0),
            top_p=first(request.top_p, defaults.get("top_p"), 1.0),
            top_k=first(request.top_k, 0),
            max_tokens=requested if requested is not None else (max(1, room) if prompt_tokens else None),
            stop=request.stops,
            seed=request.seed,
            repetition_penalty=first(request.repetition_penalty, 1.0),
            ignore_eos=bool(request.ignore_eos),
            presence_penalty=first(request.presence_penalty, 0.0),
            frequency_penalty=first(request.frequency_penalty, 0.0),
        )
        self.apply_constraints(request, prompt, params)
        return params

    def apply_constraints(self, request: ChatCompletionRequest, prompt: Prompt, params: SamplingParams) -> None:
        """tool_choice "required" and the forced-output test hook both pin the first tokens of the reply."""
        if request.test_force_output is not None or request.test_fault is not None:
            if not self.settings.test_hooks:
                raise APIError(400, "test_force_output / test_fault need a server started with --test-hooks",
                               param="test_force_output" if request.test_force_output is not None else "test_fault")
            params.fault = request.test_fault
        if request.test_force_output is not None:
            text = request.test_force_output if prompt.prefix else "\n" + request.test_force_output
            stop_id = self.engine.encode("<|user|>")
            params.allowed_prefixes = [self.engine.encode(text) + stop_id]
        elif request.tool_choice == "required" and prompt.tools:
            names = [tool["function"]["name"] for tool in prompt.tools]
            params.allowed_prefixes = [self.engine.encode(name + "\n") for name in names]

    def submit_choices(self, request: ChatCompletionRequest, prompt: Prompt, params: SamplingParams,
                       request_id: str) -> list[Choice]:
        forced = prompt.prefix.rstrip("\n") or None
        choices = []
        try:
            for index in range(request.n or 1):
                seed = None if params.seed is None else params.seed + index
                choice_params = SamplingParams(**{**params.__dict__, "seed": seed})
                stream = self.engine.submit(prompt, choice_params, f"{request_id}-{index}")
                choices.append(Choice(index, stream, ToolCallStreamParser(prompt.tools, forced)))
        except EngineOverloaded as error:
            for choice in choices:
                self.engine.cancel(f"{request_id}-{choice.index}")
            raise APIError(429, str(error), code="server_busy",
                           headers={"Retry-After": str(int(error.retry_after))}) from None
        except EngineUnavailable as error:
            raise APIError(503, str(error), code="unavailable",
                           headers={"Retry-After": str(int(error.retry_after))}) from None
        return choices

    # ---- responses ----

    async def create(self, request: ChatCompletionRequest, raw: Request):
        started = time.monotonic()
        legacy = (request.stream_format or ("legacy" if self.settings.legacy_stream else "openai")) == "legacy"
        if request.stream and legacy and (request.n or 1) > 1:  # its lines carry no choice index
            raise APIError(400, "n > 1 is not supported with the legacy stream format; use stream_format "
                           '"openai" or n = 1', param="n")
        prompt, params = await self.prepare(request, cache_salt_of(raw))
        request_id = completion_id()
        choices = self.submit_choices(request, prompt, params, request_id)

        def cancel() -> None:
            """Free whatever the engine still runs for this request (a no-op for finished choices)."""
            for choice in choices:
                self.engine.cancel(f"{request_id}-{choice.index}")

        try:
            if self.engine.early_errors:
                await until_disconnect(asyncio.gather(*(peek_first(choice) for choice in choices)), raw,
                                       on_cancel=lambda: close_all(choices))
            context = ResponseContext(request_id, int(time.time()), request.model or self.engine.info.name,
                                      started, self.metrics)
            if request.stream and legacy:
                return EngineStreamingResponse(legacy_stream(context, choices[0]), cancel,
                                               media_type="application/x-ndjson", headers=SSE_HEADERS)
            if request.stream:
                include_usage = bool(request.stream_options and request.stream_options.include_usage)
                return EngineStreamingResponse(sse_stream(context, choices, include_usage), cancel,
                                               media_type="text/event-stream", headers=SSE_HEADERS)
            body = await until_disconnect(full_response(context, choices), raw)
        except BaseException:  # a failed choice, a gone client: the other choices must not run on for nobody
            cancel()
            raise
        return JSONResponse(body)


class EngineStreamingResponse(StreamingResponse):
    """A StreamingResponse that cancels its engine requests however it ends.

    Closing the body iterator cancels them only once it has started: a client that leaves before the first
    chunk (while its request was being tokenized or queued) makes Starlette cancel the response before the
    generator ever ran, and its `finally` never runs. Without this the request would decode to max_tokens
    for nobody, holding a batch slot.
    """

    def __init__(self, content, cancel, **kwargs):
        super().__init__(content, **kwargs)
        self.cancel = cancel

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.cancel()


def cache_salt_of(raw: Request) -> str:
    """The salt require_api_key set for this request's key ("" when the server has no keys)."""
    return getattr(raw.state, "cache_salt", "")


def first(*values):
    return next((value for value in values if value is not None), None)


def failure_error(delta: Delta) -> APIError:
    """An engine error delta as an HTTP error (used while no response has started)."""
    headers = {"Retry-After": "5"} if delta.error_status in (429, 503) else None
    return APIError(delta.error_status, delta.error or "generation failed",
                    code=delta.error_code or ("generation_failed" if delta.error_status >= 500 else None),
                    headers=headers)


async def peek_first(choice: Choice) -> None:
    """Wait for a choice's first delta; a failure there becomes the HTTP status (upstream 4xx stays 4xx)."""
    stream = choice.stream
    delta = await stream.__anext__()
    choice.first_token_at = time.monotonic()
    if delta.finish_reason is FinishReason.ERROR:
        await stream.aclose()
        raise failure_error(delta)

    async def replay() -> AsyncIterator[Delta]:
        try:
            yield delta
            async for later in stream:
                yield later
        finally:
            await stream.aclose()

    choice.stream = replay()


async def close_all(choices: list[Choice]) -> None:
    for choice in choices:
        await choice.stream.aclose()


@dataclass
class ResponseContext:
    id: str
    created: int
    model: str
    started: float
    metrics: Metrics

    def chunk(self, choices: list[dict], usage: Any = None, include_usage: bool = False) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}
        if include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def record(self, choices: list[Choice]) -> None:
        prompt_tokens = choices[0].usage.prompt_tokens if choices[0].usage else 0
        completion_tokens = sum(c.usage.completion_tokens for c in choices if c.usage)
        ttft = min((c.first_token_at for c in choices if c.first_token_at), default=None)
        self.metrics.observe_request(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                     ttft=None if ttft is None else ttft - self.started,
                                     duration=time.monotonic() - self.started)


def usage_dict(choices: list[Choice]) -> dict:
    prompt = choices[0].usage.prompt_tokens if choices[0].usage else 0
    completion = sum(c.usage.completion_tokens for c in choices if c.usage)
    cached = choices[0].usage.cached_tokens if choices[0].usage else 0  # the first choice's prefill shows reuse
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


class GenerationFailed(Exception):
    def __init__(self, delta: Delta):
        super().__init__(delta.error or "generation failed")
        self.delta = delta


async def choice_events(choice: Choice) -> AsyncIterator[tuple[Choice, list]]:
    """Parser events of one choice; the last yield has finish_reason set. Raises GenerationFailed."""
    async for delta in choice.stream:
        if choice.first_token_at is None:
            choice.first_token_at = time.monotonic()
        if delta.finish_reason in (FinishReason.ERROR, FinishReason.CANCELLED):
            raise GenerationFailed(delta)
        events = choice.parser.feed(delta.text) if delta.text else []
        if delta.finished:
            events += choice.parser.finish()
            choice.usage = delta.usage
            choice.finish_reason = "tool_calls" if choice.parser.is_tool_call else delta.finish_reason.value
        yield choice, events


async def merged_events(choices: list[Choice]) -> AsyncIterator[tuple[Choice, list]]:
    """Interleave the n choices' events as they arrive."""
    if len(choices) == 1:
        async for item in choice_events(choices[0]):
            yield item
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(choice: Choice):
        try:
            async for item in choice_events(choice):
                await queue.put(item)
        except BaseException as error:  # forwarded to the consumer, which re-raises it
            await queue.put(error)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(choice)) for choice in choices]
    try:
        remaining = len(choices)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        # Cancelling a pump unwinds its stream, whose own `finally` cancels the engine request. Closing the
        # streams here instead raced the pumps still inside them ("aclose(): asynchronous generator is
        # already running"): an n > 1 stream was cut off without its error event and [DONE], a non-stream
        # reply became a 500.
        for task in tasks:
            task.cancel()


def delta_from_event(event) -> dict:
    if event.kind == "content":
        return {"content": event.text}
    if event.kind == "tool_call_start":
        call = event.call
        return {"tool_calls": [{"index": 0, "id": call.id, "type": "function",
                                "function": {"name": call.name, "arguments": ""}}]}
    return {"tool_calls": [{"index": 0, "function": {"arguments": event.text}}]}


async def sse_stream(context: ResponseContext, choices: list[Choice], include_usage: bool) -> AsyncIterator[str]:
    def choice_chunk(index: int, delta: dict, finish_reason: str | None = None) -> str:
        return context.chunk([{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
                             include_usage=include_usage)

    try:
        for choice in choices:
            yield choice_chunk(choice.index, {"role": "assistant", "content": ""})
        async for choice, events in merged_events(choices):
            for event in events:
                yield choice_chunk(choice.index, delta_from_event(event))
            if choice.finish_reason:
                yield choice_chunk(choice.index, {}, choice.finish_reason)
        if include_usage:
            yield context.chunk([], usage=usage_dict(choices), include_usage=True)
        context.record(choices)
    except GenerationFailed as failure:
        status = failure.delta.error_status
        kind = "service_unavailable" if status == 503 else "internal_server_error"
        yield f"data: {json.dumps(error_body(str(failure), kind, code=str(status)), ensure_ascii=False)}\n\n"
    yield "data: [DONE]\n\n"


async def legacy_stream(context: ResponseContext, choice: Choice) -> AsyncIterator[str]:
    """The old project's NDJSON lines: content = new text, response = text so far, finished flag."""
    def line(content: str, finished: bool) -> str:
        body = {"id": context.id, "choices": [{"delta": {"content": content, "response": choice.text,
                                                         "finished": finished}}]}
        return json.dumps(body, ensure_ascii=False) + "\n"

    try:
        async for _, events in merged_events([choice]):
            text = "".join(event.text for event in events)
            if events and not all(event.kind == "content" for event in events):
                call = choice.parser.tool_call
                text = f"{call.name}\n{call.arguments}" if call else text
            if text:
                choice.text += text
                yield line(text, False)
            if choice.finish_reason:
                yield line("", True)
        context.record([choice])
    except GenerationFailed as failure:
        yield json.dumps(error_body(str(failure), "internal_server_error"), ensure_ascii=False) + "\n"
    yield '["DONE"]\n'


async def full_response(context: ResponseContext, choices: list[Choice]) -> dict:
    try:
        async for choice, events in merged_events(choices):
            choice.text += "".join(event.text for event in events if event.kind == "content")
    except GenerationFailed as failure:
        raise failure_error(failure.delta) from None
    context.record(choices)
    body_choices = []
    for choice in choices:
        call = choice.parser.tool_call
        message: dict[str, Any] = {"role": "assistant", "content": None if call else choice.text, "refusal": None}
        if call:
            message["tool_calls"] = [{"id": call.id, "type": "function",
                                      "function": {"name": call.name, "arguments": call.arguments}}]
        body_choices.append({"index": choice.index, "message": message, "logprobs": None,
                             "finish_reason": choice.finish_reason})
    return {"id": context.id, "object": "chat.completion", "created": context.created, "model": context.model,
            "system_fingerprint": None, "choices": body_choices, "usage": usage_dict(choices)}


async def until_disconnect(coroutine, raw: Request, on_cancel=None):
    """Race a non-streaming handler against the client going away; cancel generation if it does.

    Starlette only notices disconnects for streaming responses, so listen for http.disconnect here.
    """
    work = asyncio.ensure_future(coroutine)

    async def wait_disconnect():
        while True:
            message = await raw.receive()
            if message["type"] == "http.disconnect":
                return

    listener = asyncio.ensure_future(wait_disconnect())
    try:
        done, _ = await asyncio.wait({work, listener}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            return work.result()
        work.cancel()  # closes the engine streams, which cancels the requests
        try:
            await work
        except asyncio.CancelledError:
            pass
        if on_cancel is not None:
            await on_cancel()
        raise APIError(499, "client closed the request", code="client_closed_request")
    finally:
        listener.cancel()
