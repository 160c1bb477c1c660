"""POST /v1/chat/completions: OpenAI's chat wire translated onto the chat core (glm4/chat.py).

Request → ChatRequest; core events → chat.completion / chat.completion.chunk objects (pydantic models from
protocol.py), or the old project's NDJSON lines (stream_format "legacy"). Extensions beside OpenAI's fields:
`reasoning_content` (DeepSeek's name, which Open WebUI, LobeChat and LangChain read) on messages and deltas
when a reasoning model thinks; `top_k`, `repetition_penalty`, `ignore_eos`, `stream_format`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse

from glm4.api.errors import APIError, error_body
from glm4.api.metrics import Metrics
from glm4.api.protocol import (ChatCompletionChoice, ChatCompletionMessage, ChatCompletionRequest,
                               ChatCompletionResponse, ChatCompletionStreamChoice, ChatCompletionStreamResponse,
                               ChoiceLogprobs, DeltaFunctionCall, DeltaMessage, DeltaToolCall, PromptTokensDetails,
                               TokenLogprobEntry, ToolCall, ToolCallFunction, TopLogprob, UsageInfo, completion_id)
from glm4.api.serving import SSE_HEADERS, EngineStreamingResponse, cache_salt_of, until_disconnect
from glm4.chat import (ChatCore, ChatError, ChatRequest, ChoiceStream, Error, Finish, Logprobs, ReasoningDelta,
                       TextDelta, ToolCallArguments, ToolCallStart, Usage, merged_events)
from glm4.engine.base import TokenLogprob


def api_error(error: ChatError) -> APIError:
    return APIError(error.status, error.message, param=error.param, code=error.code, headers=error.headers)


def to_chat_request(body: ChatCompletionRequest, cache_salt: str) -> ChatRequest:
    """The wire request as the core's protocol-neutral request (one defaults policy lives in the core)."""
    tool_choice = body.tool_choice.model_dump() if hasattr(body.tool_choice, "model_dump") else body.tool_choice
    return ChatRequest(
        messages=[message.model_dump(exclude_none=True) for message in body.messages],
        tools=[tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None,
        tool_choice=tool_choice,
        parallel_tool_calls=body.parallel_tool_calls is not False,
        temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
        max_tokens=body.requested_max_tokens, n=body.n or 1, seed=body.seed, stop=body.stops,
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty, ignore_eos=bool(body.ignore_eos),
        response_format=body.response_format.to_core() if body.response_format else None,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        cache_salt=cache_salt, cache_hint=body.prompt_cache_key,
        force_output=body.test_force_output, fault=body.test_fault,
    )


def logprob_entries(tokens: list[TokenLogprob]) -> list[TokenLogprobEntry]:
    return [TokenLogprobEntry(token=t.token, logprob=t.logprob, bytes=t.bytes,
                              top_logprobs=[TopLogprob(token=top.token, logprob=top.logprob, bytes=top.bytes)
                                            for top in t.top])
            for t in tokens]


def usage_info(choices: list[ChoiceStream]) -> UsageInfo:
    first = choices[0].usage or Usage(0, 0)
    completion = sum(choice.usage.completion_tokens for choice in choices if choice.usage)
    # every choice prefills the same prompt; the first shows how much of it the prefix cache held
    return UsageInfo(prompt_tokens=first.prompt_tokens, completion_tokens=completion,
                     total_tokens=first.prompt_tokens + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=first.cached_tokens))


@dataclass
class Reply:
    """One request's response being written: ids, the model name and the metrics it reports to."""

    id: str
    created: int
    model: str
    started: float
    metrics: Metrics

    def chunk(self, choices: list[ChatCompletionStreamChoice], usage: UsageInfo | None = None,
              include_usage: bool = False) -> str:
        body = ChatCompletionStreamResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                            usage=usage).model_dump(exclude_none=True)
        body["system_fingerprint"] = None
        for choice in body["choices"]:  # OpenAI sends these keys as null rather than leaving them out
            choice.setdefault("logprobs", None)
            choice.setdefault("finish_reason", None)
        if include_usage:
            body.setdefault("usage", None)
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def record(self, choices: list[ChoiceStream]) -> None:
        usage = usage_info(choices)
        ttft = min((choice.first_token_at for choice in choices if choice.first_token_at), default=None)
        self.metrics.observe_request(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                                     ttft=None if ttft is None else ttft - self.started,
                                     duration=time.monotonic() - self.started)


def delta_for(event) -> DeltaMessage | None:
    if isinstance(event, TextDelta):
        return DeltaMessage(content=event.text)
    if isinstance(event, ReasoningDelta):
        return DeltaMessage(reasoning_content=event.text)
    if isinstance(event, ToolCallStart):
        return DeltaMessage(tool_calls=[DeltaToolCall(index=event.index, id=event.id, type="function",
                                                      function=DeltaFunctionCall(name=event.name, arguments=""))])
    if isinstance(event, ToolCallArguments):
        return DeltaMessage(tool_calls=[DeltaToolCall(index=event.index,
                                                      function=DeltaFunctionCall(arguments=event.text))])
    return None


def error_line(error: Error) -> str:
    kind = "service_unavailable" if error.status == 503 else (
        "invalid_request_error" if 400 <= error.status < 500 else "internal_server_error")
    return json.dumps(error_body(error.message, kind, code=error.code or str(error.status)), ensure_ascii=False)


async def sse_stream(reply: Reply, choices: list[ChoiceStream], include_usage: bool,
                     wants_logprobs: bool) -> AsyncIterator[str]:
    """chat.completion.chunk events. A choice's logprobs ride on its next content chunk (the tokens whose text
    that chunk carries, or held back text before it); whatever is left goes out with its finish chunk."""
    pending: dict[int, list[TokenLogprob]] = {choice.index: [] for choice in choices}

    def logprobs_of(index: int) -> ChoiceLogprobs | None:
        if not wants_logprobs or not pending[index]:
            return None
        entries, pending[index] = logprob_entries(pending[index]), []
        return ChoiceLogprobs(content=entries)

    def choice_chunk(index: int, delta: DeltaMessage, finish_reason: str | None = None,
                     logprobs: ChoiceLogprobs | None = None) -> str:
        return reply.chunk([ChatCompletionStreamChoice(index=index, delta=delta, logprobs=logprobs,
                                                       finish_reason=finish_reason)], include_usage=include_usage)

    for choice in choices:
        yield choice_chunk(choice.index, DeltaMessage(role="assistant", content=""))
    async for choice, event in merged_events(choices):
        if isinstance(event, Logprobs):
            pending[choice.index] += event.tokens
        elif isinstance(event, Finish):
            yield choice_chunk(choice.index, DeltaMessage(), event.reason, logprobs_of(choice.index))
        elif isinstance(event, Error):
            yield f"data: {error_line(event)}\n\n"
            break
        elif (delta := delta_for(event)) is not None:
            logprobs = logprobs_of(choice.index) if isinstance(event, TextDelta) else None
            yield choice_chunk(choice.index, delta, logprobs=logprobs)
    else:
        if include_usage:
            yield reply.chunk([], usage=usage_info(choices), include_usage=True)
        reply.record(choices)
    yield "data: [DONE]\n\n"


async def legacy_stream(reply: Reply, choice: ChoiceStream) -> AsyncIterator[str]:
    """The old project's NDJSON lines: content = new text, response = text so far, finished flag."""
    written, calls = "", 0

    def line(content: str, finished: bool) -> str:
        body = {"id": reply.id, "choices": [{"delta": {"content": content, "response": written,
                                                       "finished": finished}}]}
        return json.dumps(body, ensure_ascii=False) + "\n"

    async for _, event in merged_events([choice]):
        text = ""
        if isinstance(event, TextDelta):
            text = event.text
        elif isinstance(event, ToolCallStart):  # the old clients read a call as GLM-4's own `name\n{args}` text
            text = ("\n" if calls else "") + event.name + "\n"
            calls += 1
        elif isinstance(event, ToolCallArguments):
            text = event.text
        elif isinstance(event, Finish):
            yield line("", True)
        elif isinstance(event, Error):
            yield error_line(event) + "\n"
            break
        if text:
            written += text
            yield line(text, False)
    else:
        reply.record([choice])
    yield '["DONE"]\n'


async def full_response(reply: Reply, choices: list[ChoiceStream], wants_logprobs: bool) -> dict:
    async for _, event in merged_events(choices):
        if isinstance(event, Error):
            headers = {"Retry-After": "5"} if event.status in (429, 503) else None
            raise APIError(event.status, event.message, headers=headers,
                           code=event.code or ("generation_failed" if event.status >= 500 else None))
    reply.record(choices)
    body_choices = []
    for choice in choices:
        calls = [ToolCall(id=call.id, function=ToolCallFunction(name=call.name, arguments=call.arguments))
                 for call in choice.tool_calls]
        message = ChatCompletionMessage(content=None if calls else choice.text, tool_calls=calls or None,
                                        reasoning_content=choice.reasoning_text or None)
        logprobs = ChoiceLogprobs(content=logprob_entries(choice.logprobs)) if wants_logprobs else None
        body_choices.append(ChatCompletionChoice(index=choice.index, message=message, logprobs=logprobs,
                                                 finish_reason=choice.finish_reason))
    response = ChatCompletionResponse(id=reply.id, created=reply.created, model=reply.model, choices=body_choices,
                                      usage=usage_info(choices))
    body = response.model_dump(exclude_none=True)
    for choice in body["choices"]:  # keys OpenAI always sends, null when empty
        choice["message"].setdefault("content", None)
        choice["message"]["refusal"] = None
        choice.setdefault("logprobs", None)
    body["system_fingerprint"] = None
    return body


class ChatCompletions:
    """The translator: one per app, over the app's chat core."""

    def __init__(self, core: ChatCore, metrics: Metrics, legacy_default: bool):
        self.core = core
        self.metrics = metrics
        self.legacy_default = legacy_default

    async def create(self, body: ChatCompletionRequest, raw: Request, model: str):
        started = time.monotonic()
        legacy = (body.stream_format or ("legacy" if self.legacy_default else "openai")) == "legacy"
        if body.stream and legacy and (body.n or 1) > 1:  # its lines carry no choice index
            raise APIError(400, "n > 1 is not supported with the legacy stream format; use stream_format "
                           '"openai" or n = 1', param="n")
        try:
            prepared = await self.core.prepare(to_chat_request(body, cache_salt_of(raw)))
            reply = Reply(completion_id(), int(time.time()), model, started, self.metrics)
            choices = self.core.submit(prepared, reply.id)
        except ChatError as error:
            raise api_error(error) from None

        def cancel() -> None:
            self.core.cancel(choices)

        wants_logprobs = bool(body.logprobs)
        try:
            if self.core.engine.early_errors:  # an upstream's 4xx before any output keeps its status
                await until_disconnect(self.first_deltas(choices), raw, on_cancel=lambda: self.close(choices))
            if body.stream and legacy:
                return EngineStreamingResponse(legacy_stream(reply, choices[0]), cancel,
                                               media_type="application/x-ndjson", headers=SSE_HEADERS)
            if body.stream:
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                return EngineStreamingResponse(sse_stream(reply, choices, include_usage, wants_logprobs), cancel,
                                               media_type="text/event-stream", headers=SSE_HEADERS)
            result = await until_disconnect(full_response(reply, choices, wants_logprobs), raw)
        except BaseException:  # a failed choice, a gone client: the other choices must not run on for nobody
            cancel()
            raise
        return JSONResponse(result)

    @staticmethod
    async def first_deltas(choices: list[ChoiceStream]) -> None:
        from glm4.engine.base import FinishReason

        for choice in choices:
            delta = await choice.peek()
            if delta.finish_reason is FinishReason.ERROR:
                headers = {"Retry-After": "5"} if delta.error_status in (429, 503) else None
                raise APIError(delta.error_status, delta.error or "generation failed", headers=headers,
                               code=delta.error_code or ("generation_failed" if delta.error_status >= 500 else None))

    @staticmethod
    async def close(choices: list[ChoiceStream]) -> None:
        for choice in choices:
            await choice.aclose()
