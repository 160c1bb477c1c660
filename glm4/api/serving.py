"""Shared serving pieces: model names, the engine-stream response that cancels however it ends, disconnect
races, and the older request → prompt path the Ollama API still uses (chat completions run on glm4/chat.py's
core, glm4/api/chat_completions.py; Ollama moves there next and this path goes).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from glm4.api.errors import APIError
from glm4.api.metrics import Metrics
from glm4.api.protocol import ChatCompletionRequest
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
