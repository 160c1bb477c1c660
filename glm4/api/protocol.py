"""OpenAI wire models for /v1/chat/completions and /v1/models (pydantic only; no torch here).

Field order follows OpenAI's objects; fields OpenAI does not have come last, marked as extensions.
Unknown request fields are accepted and ignored, so newer clients keep working.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema


def integral_floats(data, keys: tuple[str, ...]):
    """JSON Schema's integer includes 4.0, which Python's json reads as a float (requests are validated strictly)."""
    if isinstance(data, dict):
        for key in keys:
            value = data.get(key)
            if isinstance(value, float) and value.is_integer():
                data = {**data, key: int(value)}
    return data


def finite(value: float | None) -> float | None:
    """JSON has no NaN or Infinity, but Python's json reads them: refuse them as a client error."""
    if value is not None and not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---------- request ----------

class TextContentPart(OpenAIBaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(OpenAIBaseModel):
    name: str
    arguments: str


class ToolCallItem(OpenAIBaseModel):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


# The cross-field rules below, written as JSON Schema too, so the OpenAPI spec (and the fuzzer that reads it)
# describes exactly what the validators accept.
CONTENT_RULE = {"anyOf": [
    {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
    {"required": ["role", "tool_calls"],
     "properties": {"role": {"const": "assistant"}, "tool_calls": {"type": "array", "minItems": 1}}},
]}
REQUEST_RULES = {"allOf": [
    {"if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"not": {"enum": [None, 0]}}}},
     "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}},
    {"if": {"required": ["stream_options"], "properties": {"stream_options": {"not": {"type": "null"}}}},
     "then": {"required": ["stream"], "properties": {"stream": {"const": True}}}},
    {"if": {"required": ["tool_choice"], "properties": {"tool_choice": {"not": {"enum": [None, "none", "auto"]}}}},
     "then": {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}}},
    {"if": {"required": ["stream", "stream_format"],
            "properties": {"stream": {"const": True}, "stream_format": {"const": "legacy"}}},
     "then": {"properties": {"n": {"enum": [1, None]}}}},  # legacy lines carry no choice index
]}

INTEGER_FIELDS = ("max_completion_tokens", "max_tokens", "n", "seed", "top_k", "top_logprobs")


class ChatMessage(OpenAIBaseModel):
    model_config = ConfigDict(json_schema_extra=CONTENT_RULE)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextContentPart], None] = None
    name: str | None = None
    tool_calls: list[ToolCallItem] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def check_content(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content (only assistant messages with tool_calls may omit it)")
        return self


class FunctionDefinition(OpenAIBaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(OpenAIBaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(OpenAIBaseModel):
    name: str


class NamedToolChoice(OpenAIBaseModel):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(OpenAIBaseModel):
    include_usage: bool | None = False


class JSONSchemaFormat(OpenAIBaseModel):
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # `schema` shadows a BaseModel attribute
    strict: bool | None = None


class ResponseFormat(OpenAIBaseModel):
    """text, json_object (any JSON object) or json_schema: enforced by the engine's grammar (llguidance)."""

    model_config = ConfigDict(json_schema_extra={"if": {"properties": {"type": {"const": "json_schema"}}},
                                                 "then": {"required": ["json_schema"],
                                                          "properties": {"json_schema": {"type": "object"}}}})

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def check_schema(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs json_schema: {name, schema, strict}")
        return self

    def to_core(self) -> dict[str, Any]:
        if self.type == "json_schema":
            spec = self.json_schema
            return {"type": "json_schema", "json_schema": {"name": spec.name, "schema": spec.schema_ or {},
                                                           "strict": bool(spec.strict)}}
        return {"type": self.type}


class ChatCompletionRequest(OpenAIBaseModel):
    model_config = ConfigDict(json_schema_extra=REQUEST_RULES)

    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(None, json_schema_extra={"maxProperties": 0})  # unsupported
    logprobs: bool | None = None  # log-softmax of the model's own logits (before temperature, penalties, masks)
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(1, ge=1, le=16)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    response_format: ResponseFormat | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: Union[str, list[str], None] = Field(None, json_schema_extra={"minLength": 1, "maxItems": 4,
                                                                       "items": {"type": "string", "minLength": 1}})
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    tools: list[ToolDefinition] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool | None = None
    user: str | None = None
    prompt_cache_key: str | None = Field(None, max_length=1024)  # steers which cached conversation is tried first
    # --- extensions (not in OpenAI's API) ---
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    ignore_eos: bool | None = None  # as in vLLM: keep generating through stop tokens (benchmarks, load tests)
    stream_format: Literal["openai", "legacy"] | None = None  # "legacy": the old project's NDJSON stream
    # test hooks (--test-hooks only), left out of the OpenAPI spec:
    test_force_output: SkipJsonSchema[str | None] = None  # the model must write exactly this
    test_fault: SkipJsonSchema[Literal["error", "oom"] | None] = None  # fail a decode step

    @model_validator(mode="before")
    @classmethod
    def accept_integral_floats(cls, data):
        return integral_floats(data, INTEGER_FIELDS)

    @field_validator("frequency_penalty", "presence_penalty", "temperature", "top_p", "repetition_penalty")
    @classmethod
    def check_finite(cls, value):
        return finite(value)

    @field_validator("stop")
    @classmethod
    def check_stop(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if any(not stop for stop in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    @model_validator(mode="after")
    def check_unsupported(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by this server")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise ValueError("tool_choice requires tools")
        return self

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def requested_max_tokens(self) -> int | None:
        """max_completion_tokens is the current name; max_tokens the deprecated one."""
        return self.max_completion_tokens or self.max_tokens


# ---------- response ----------

def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class PromptTokensDetails(OpenAIBaseModel):
    cached_tokens: int = 0


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ToolCallFunction(OpenAIBaseModel):
    name: str
    arguments: str


class ToolCall(OpenAIBaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class TopLogprob(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(OpenAIBaseModel):
    content: list[TokenLogprobEntry] | None
    refusal: None = None


class ChatCompletionMessage(OpenAIBaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCall] | None = None
    reasoning_content: str | None = None  # extension (DeepSeek's field): a reasoning model's <think> text


class ChatCompletionChoice(OpenAIBaseModel):
    index: int
    message: ChatCompletionMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"]


class ChatCompletionResponse(OpenAIBaseModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class DeltaFunctionCall(OpenAIBaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(OpenAIBaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(OpenAIBaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None  # extension (DeepSeek's field)
    tool_calls: list[DeltaToolCall] | None = None


class ChatCompletionStreamChoice(OpenAIBaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None


class ChatCompletionStreamResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "glm4-server"


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIBaseModel):
    error: ErrorDetail


class HealthResponse(OpenAIBaseModel):
    status: Literal["ok", "loading", "draining"]
