"""The chat core: one request → (Prompt, SamplingParams) with one defaults policy → typed events.

Every front end (chat completions, Responses, Anthropic Messages, Completions, Ollama, the Gradio UI) is a
thin translator over this module: it builds a `ChatRequest` from its wire request, calls
`ChatCore.prepare` (which renders the prompt, applies the defaults and compiles constraints; a bad request
raises `ChatError` with the HTTP status to use), then `ChatCore.submit` (which queues the n choices on the
engine; a full queue is a `ChatError` 429, a stopped engine 503) and iterates each `ChoiceStream`'s events.
Nothing here knows a wire format: translators map the events below onto their own chunks.

Interface (protocol-neutral):

    core = ChatCore(engine, reasoning=ReasoningMode | None, test_hooks=False)
    request = ChatRequest(messages=[{"role": "user", "content": "hi"}], tools=None, tool_choice=None,
                          parallel_tool_calls=True, max_tokens=None, n=1, seed=None, stop=[], ...)
    prepared = await core.prepare(request)        # ChatError(400) for bad input / context overflow
    choices = core.submit(prepared, request_id)   # ChatError(429 / 503); list[ChoiceStream], one per n
    async for event in choices[0].events():       # stops after Finish or Error
        TextDelta(text) | ReasoningDelta(text) | ToolCallStart(index, id, name) |
        ToolCallArguments(index, text) | Logprobs(tokens: list[TokenLogprob]) |
        Usage(prompt_tokens, completion_tokens, cached_tokens) | Finish(reason) | Error(message, status, code)
    core.cancel(choices)                          # frees whatever still runs (no-op for finished choices)
    async for choice, event in merged_events(choices): ...   # n > 1: all choices' events as they arrive

Event order per choice: any number of text / reasoning / tool-call / logprobs events, then `Usage`, then
`Finish` ("stop" | "length" | "tool_calls"); or an `Error` instead of Usage + Finish (a failed or
cancelled generation). `ChoiceStream.peek()` waits for the first engine delta so a translator can turn an
early failure (an upstream's 4xx) into an HTTP status before it answers.

Defaults policy (one, for every front end): a field the request leaves None takes the checkpoint's
generation_config value (temperature, top_p, top_k), else 1.0 / 1.0 / off. max_tokens None is passed to the
engine as None (it reserves a reply budget and the slot's room); a 400 only when the prompt itself, or an
explicit max_tokens, does not fit in max_model_len.

Constraints: `response_format` ({"type": "json_object"} or {"type": "json_schema", "json_schema":
{"schema", "strict"}}), strict tools and tool_choice required / named compile through
glm4.engine.constraints.ConstraintCompiler when the engine has a tokenizer; an unsupported schema is a
ChatError 400 naming the feature. Reasoning (`--reasoning-parser`) splits the answer stream before the
tool-call parser, so calls written after `</think>` are found; past reasoning is dropped from the history.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Union

from glm4.engine.base import (Delta, Engine, EngineOverloaded, EngineUnavailable, FinishReason, Prompt,
                              SamplingParams, TokenLogprob)
from glm4.prompt import PromptError, build_prompt
from glm4.reasoning import ReasoningMode, ReasoningSplitter, drop_reasoning_from_history
from glm4.tools import ToolCallStreamParser

FALLBACK_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}  # when the checkpoint sets none (OpenAI's)


class ChatError(Exception):
    """A request the core refuses or cannot run: each translator puts it in its own envelope."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


# ---------- request ----------

@dataclass
class ChatRequest:
    """A chat request in OpenAI's shapes (plain dicts), whatever protocol it arrived in."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None  # OpenAI function tools: {"type": "function", "function": {...}}
    tool_choice: Any = None  # None | "none" | "auto" | "required" | {"type": "function", "function": {"name"}}
    parallel_tool_calls: bool = True  # False: the reply ends after its first complete call
    temperature: float | None = None  # None = the defaults policy
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None  # None = not sent: the engine reserves a reply budget
    n: int = 1
    seed: int | None = None  # choice i uses seed + i
    stop: list[str] = field(default_factory=list)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    response_format: dict[str, Any] | None = None  # {"type": "text" | "json_object" | "json_schema", ...}
    logprobs: int | None = None  # None = off; 0 = the chosen token only; k = also the k most likely (<= 20)
    cache_salt: str = ""  # the API key (or UI user): KV is reused only under the same salt
    cache_hint: str | None = None  # prompt_cache_key
    reasoning: bool | None = None  # None = the server's --reasoning-parser; False = do not split this reply
    force_output: str | None = None  # test hook (--test-hooks): the model must write exactly this
    fault: str | None = None  # test hook: "error" | "oom" | "nan"


@dataclass
class PreparedChat:
    """What prepare() decided: the engine inputs plus what the reply parsers need."""

    request: ChatRequest
    prompt: Prompt
    params: SamplingParams
    opens_reasoning: bool  # the prompt ends inside <think>: the reply starts as reasoning
    reasoning: bool  # split this reply into reasoning and answer


# ---------- events ----------

@dataclass
class TextDelta:
    text: str


@dataclass
class ReasoningDelta:
    text: str


@dataclass
class ToolCallStart:
    index: int  # 0, 1, … within the reply
    id: str
    name: str


@dataclass
class ToolCallArguments:
    index: int
    text: str  # a fragment of the arguments' JSON text


@dataclass
class Logprobs:
    tokens: list[TokenLogprob]


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Finish:
    reason: str  # "stop" | "length" | "tool_calls"


@dataclass
class Error:
    message: str
    status: int = 500  # 503 overload/OOM, an upstream's own 4xx, 499 cancelled
    code: str | None = None


ChatEvent = Union[TextDelta, ReasoningDelta, ToolCallStart, ToolCallArguments, Logprobs, Usage, Finish, Error]


# ---------- one choice's stream ----------

class ChoiceStream:
    """One of the n answers: engine deltas → events. Keeps the whole reply for non-streamed responses."""

    def __init__(self, index: int, request_id: str, stream: AsyncIterator[Delta], prepared: PreparedChat):
        self.index = index
        self.request_id = request_id
        self._stream = stream
        self._peeked: Delta | None = None
        forced = prepared.prompt.prefix.rstrip("\n") or None
        self.parser = ToolCallStreamParser(prepared.prompt.tools, forced, parallel=prepared.request.parallel_tool_calls)
        self.splitter = ReasoningSplitter(prepared.opens_reasoning) if prepared.reasoning and not forced else None
        self.text = ""  # answer content (not tool calls, not reasoning)
        self.reasoning_text = ""
        self.logprobs: list[TokenLogprob] = []
        self.usage: Usage | None = None
        self.finish_reason: str | None = None
        self.first_token_at: float | None = None

    @property
    def tool_calls(self):
        return self.parser.tool_calls

    async def peek(self) -> Delta:
        """The first delta, kept for events(): lets a translator map an early error onto its HTTP status."""
        if self._peeked is None:
            self._peeked = await self._stream.__anext__()
            self.first_token_at = time.monotonic()
        return self._peeked

    async def aclose(self) -> None:
        """Close the engine stream (cancels the request) without reading further."""
        await self._stream.aclose()

    async def _deltas(self) -> AsyncIterator[Delta]:
        if self._peeked is not None:
            yield self._peeked
        async for delta in self._stream:
            yield delta

    def _answer_events(self, text: str) -> list[ChatEvent]:
        events: list[ChatEvent] = []
        for event in self.parser.feed(text) if text else []:
            events.append(self._tool_event(event))
        return events

    def _tool_event(self, event) -> ChatEvent:
        if event.kind == "content":
            self.text += event.text
            return TextDelta(event.text)
        index = event.index or 0
        if event.kind == "tool_call_start":
            return ToolCallStart(index, event.call.id, event.call.name)
        return ToolCallArguments(index, event.text)

    def _split(self, text: str, final: bool = False) -> list[ChatEvent]:
        if self.splitter is None:
            return self._answer_events(text)
        part = self.splitter.finish() if final else self.splitter.feed(text)
        events: list[ChatEvent] = []
        if part.reasoning:
            self.reasoning_text += part.reasoning
            events.append(ReasoningDelta(part.reasoning))
        events += self._answer_events(part.answer)
        return events

    async def events(self) -> AsyncIterator[ChatEvent]:
        try:
            async for delta in self._deltas():
                if self.first_token_at is None:
                    self.first_token_at = time.monotonic()
                if delta.finish_reason in (FinishReason.ERROR, FinishReason.CANCELLED):
                    status = 499 if delta.finish_reason is FinishReason.CANCELLED else delta.error_status
                    yield Error(delta.error or "generation failed", status, delta.error_code)
                    return
                if delta.logprobs:
                    self.logprobs += delta.logprobs
                    yield Logprobs(list(delta.logprobs))
                if delta.reasoning:  # an upstream engine's own reasoning_content / reasoning deltas
                    self.reasoning_text += delta.reasoning
                    yield ReasoningDelta(delta.reasoning)
                for event in self._split(delta.text):
                    yield event
                if delta.finished:
                    tail = self._split("", final=True) if self.splitter else []
                    for event in tail + [self._tool_event(e) for e in self.parser.finish()]:
                        yield event
                    usage = delta.usage
                    self.usage = Usage(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens) \
                        if usage else Usage(0, 0)
                    self.finish_reason = "tool_calls" if self.parser.is_tool_call else delta.finish_reason.value
                    yield self.usage
                    yield Finish(self.finish_reason)
                    return
        finally:
            await self._stream.aclose()


# ---------- the core ----------

class ChatCore:
    """The only caller of the engine for chat: defaults, prompt, constraints, submission."""

    def __init__(self, engine: Engine, reasoning: ReasoningMode | None = None, test_hooks: bool = False):
        self.engine = engine
        self.reasoning = reasoning
        self.test_hooks = test_hooks
        self._compiler = None

    @property
    def tokenizer(self):
        return getattr(self.engine, "tokenizer", None)

    def sampling_defaults(self) -> dict[str, Any]:
        """The one defaults policy: the checkpoint's generation_config first, then OpenAI's 1.0 / 1.0."""
        defaults = self.engine.info.generation_defaults
        return {key: defaults.get(key) if defaults.get(key) is not None else fallback
                for key, fallback in FALLBACK_SAMPLING.items()}

    async def prepare(self, request: ChatRequest) -> PreparedChat:
        reasoning = self.reasoning is not None and self.reasoning.enabled and request.reasoning is not False
        messages = drop_reasoning_from_history(request.messages)
        try:
            rendered = await asyncio.to_thread(self._render, messages, request.tools, request.tool_choice)
        except PromptError as error:
            raise ChatError(400, str(error), param=error.param) from None
        prompt = rendered.to_prompt() if hasattr(rendered, "to_prompt") else rendered
        prompt.cache_salt, prompt.cache_hint = request.cache_salt, request.cache_hint
        opens = bool(getattr(rendered, "opens_reasoning", False))
        params = self.sampling_params(request, prompt)
        prepared = PreparedChat(request, prompt, params, opens, reasoning)
        self.apply_test_hooks(request, prepared)
        if request.force_output is None:
            await asyncio.to_thread(self.apply_constraints, request, prepared)
        return prepared

    def _render(self, messages, tools, tool_choice):
        from glm4.chat_template import renderer_for

        tokenizer = self.tokenizer
        if tokenizer is None:  # upstream engines: messages travel as they are
            return build_prompt(None, messages, tools, tool_choice)
        return renderer_for(tokenizer).render(messages, tools, tool_choice)

    def sampling_params(self, request: ChatRequest, prompt: Prompt) -> SamplingParams:
        limit = self.engine.info.max_model_len
        prompt_tokens = len(prompt.token_ids)
        room = limit - prompt_tokens
        if prompt_tokens and (room <= 0 or (request.max_tokens is not None and request.max_tokens > room)):
            asked = request.max_tokens if request.max_tokens is not None else 1
            raise ChatError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                            f"{prompt_tokens + asked} tokens ({prompt_tokens} in the messages, {asked} in the "
                            "completion). Please reduce the length of the messages or the completion.",
                            param="messages" if room <= 0 else "max_tokens", code="context_length_exceeded")
        defaults = self.sampling_defaults()
        return SamplingParams(
            temperature=first(request.temperature, defaults["temperature"]),
            top_p=first(request.top_p, defaults["top_p"]),
            top_k=int(first(request.top_k, defaults["top_k"])),
            max_tokens=request.max_tokens,
            stop=list(request.stop),
            seed=request.seed,
            repetition_penalty=first(request.repetition_penalty, 1.0),
            presence_penalty=first(request.presence_penalty, 0.0),
            frequency_penalty=first(request.frequency_penalty, 0.0),
            ignore_eos=request.ignore_eos,
            logprobs=request.logprobs,
        )

    def apply_test_hooks(self, request: ChatRequest, prepared: PreparedChat) -> None:
        if request.force_output is None and request.fault is None:
            return
        if not self.test_hooks:
            raise ChatError(400, "test_force_output / test_fault need a server started with --test-hooks",
                            param="test_force_output" if request.force_output is not None else "test_fault")
        prepared.params.fault = request.fault
        if request.force_output is not None:
            text = request.force_output if prepared.prompt.prefix else "\n" + request.force_output
            prepared.params.allowed_prefixes = [self.engine.encode(text) + self.engine.encode("<|user|>")]

    def compiler(self):
        """The engine's ConstraintCompiler, built on first use (None for engines without a tokenizer)."""
        if self._compiler is None and self.tokenizer is not None:
            from glm4.engine.constraints import ConstraintCompiler

            self._compiler = ConstraintCompiler(self.tokenizer, vocab_size=self.engine.info.vocab_size)
        return self._compiler

    def apply_constraints(self, request: ChatRequest, prepared: PreparedChat) -> None:
        """response_format and strict / required / named tool calls become the engine's grammar."""
        prompt, params = prepared.prompt, prepared.params
        fmt = request.response_format or {}
        kind = fmt.get("type", "text")
        wants_tools = bool(prompt.tools) and request.tool_choice != "none" and (
            request.tool_choice == "required" or isinstance(request.tool_choice, dict)
            or any((tool.get("function") or {}).get("strict") for tool in prompt.tools))
        if kind == "text" and not wants_tools:
            return
        compiler = self.compiler()
        if compiler is None:  # an upstream engine enforces response_format itself
            if wants_tools and request.tool_choice == "required":
                names = [tool["function"]["name"] for tool in prompt.tools]
                params.allowed_prefixes = [self.engine.encode(name + "\n") for name in names] or None
            return
        from glm4.engine.constraints import UnsupportedSchema

        try:
            if kind == "json_object":
                params.constraint = compiler.json_object()
            elif kind == "json_schema":
                spec = fmt.get("json_schema") or {}
                params.constraint = compiler.json_schema(spec.get("schema") or {}, strict=bool(spec.get("strict")))
            elif wants_tools:
                choice = request.tool_choice if request.tool_choice is not None else "auto"
                params.constraint = compiler.tool_call(prompt.tools, choice, request.parallel_tool_calls)
        except UnsupportedSchema as error:
            param = "response_format" if kind != "text" else "tools"
            raise ChatError(400, str(error), param=param, code="unsupported_schema") from None

    def submit(self, prepared: PreparedChat, request_id: str) -> list[ChoiceStream]:
        choices: list[ChoiceStream] = []
        try:
            for index in range(prepared.request.n or 1):
                seed = None if prepared.params.seed is None else prepared.params.seed + index
                choice_id = f"{request_id}-{index}"
                stream = self.engine.submit(prepared.prompt, replace(prepared.params, seed=seed), choice_id)
                choices.append(ChoiceStream(index, choice_id, stream, prepared))
        except EngineOverloaded as error:
            self.cancel(choices)
            raise ChatError(429, str(error), code="server_busy",
                            headers={"Retry-After": str(int(error.retry_after))}) from None
        except EngineUnavailable as error:
            self.cancel(choices)
            raise ChatError(503, str(error), code="unavailable",
                            headers={"Retry-After": str(int(error.retry_after))}) from None
        return choices

    def cancel(self, choices: list[ChoiceStream]) -> None:
        for choice in choices:
            self.engine.cancel(choice.request_id)


async def merged_events(choices: list[ChoiceStream]) -> AsyncIterator[tuple[ChoiceStream, ChatEvent]]:
    """The n choices' events interleaved as they arrive, each with its choice (n > 1 replies stream together)."""
    if len(choices) == 1:
        async for event in choices[0].events():
            yield choices[0], event
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(choice: ChoiceStream):
        try:
            async for event in choice.events():
                await queue.put((choice, event))
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
        # Cancelling a pump unwinds its stream, whose own `finally` closes the engine request; closing the
        # streams from here instead would race the pumps still inside them.
        for task in tasks:
            task.cancel()


def build_core(engine: Engine, settings) -> ChatCore:
    """The one core of a server: --reasoning-parser resolved against the served checkpoint's template (an
    upstream engine has no template here: its server splits reasoning itself and the deltas carry it)."""
    from glm4.reasoning import reasoning_mode_for, resolve_reasoning

    tokenizer = getattr(engine, "tokenizer", None)
    mode = reasoning_mode_for(tokenizer, settings.reasoning_parser) if tokenizer is not None \
        else resolve_reasoning(settings.reasoning_parser, False)
    return ChatCore(engine, reasoning=mode, test_hooks=settings.test_hooks)


def first(*values):
    return next((value for value in values if value is not None), None)
