"""Ollama's /api wire models (pydantic only; no torch here), as Ollama's api/types.go and its Python client shape them.

Requests accept unknown fields (newer clients send more); the options we cannot honour (num_gpu, mirostat, …)
are accepted and ignored, as Ollama itself ignores options a runner does not use.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from glm4.api.protocol import finite, integral_floats


class OllamaModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---------- requests ----------

class Options(OllamaModel):
    """The runner options we map onto our sampling (glm4.engine.base.SamplingParams)."""

    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    num_predict: int | None = Field(None, ge=-2)  # -1: until the context is full; -2: fill the context (Ollama)
    stop: list[str] | None = Field(None, max_length=4, json_schema_extra={"items": {"type": "string", "minLength": 1}})
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    repeat_penalty: float | None = Field(None, gt=0.0, le=10.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    num_ctx: int | None = Field(None, ge=1)
    # test hooks (--test-hooks only; refused otherwise), left out of the OpenAPI spec:
    test_force_output: SkipJsonSchema[str | None] = None
    test_fault: SkipJsonSchema[Literal["error", "oom"] | None] = None

    @model_validator(mode="before")
    @classmethod
    def accept_integral_floats(cls, data):
        return integral_floats(data, ("top_k", "num_predict", "seed", "num_ctx"))

    @field_validator("temperature", "top_p", "repeat_penalty", "presence_penalty", "frequency_penalty")
    @classmethod
    def check_finite(cls, value):
        return finite(value)

    @field_validator("stop")
    @classmethod
    def check_stop(cls, value):
        if value and any(not stop for stop in value):
            raise ValueError("stop sequences must not be empty")
        return value


class ToolCallFunction(OllamaModel):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)  # an object, not a JSON string (Ollama's shape)
    index: int | None = None


class ToolCall(OllamaModel):
    function: ToolCallFunction


class Message(OllamaModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    thinking: str | None = None  # past reasoning: not sent back to the model
    images: list[str] | None = Field(None, json_schema_extra={"maxItems": 0})  # a 400: GLM-4-9B-chat reads text only
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None  # on role "tool": which function this result is from


class FunctionDefinition(OllamaModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(OllamaModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


Format = Union[Literal["", "json"], dict[str, Any], None]  # "json": any JSON object; an object: a JSON schema


class ChatRequest(OllamaModel):
    model: str = Field(min_length=1)
    messages: list[Message] = Field(default_factory=list)
    tools: list[Tool] | None = None
    format: Format = None
    options: Options | None = None
    stream: bool = True  # Ollama streams unless told not to
    think: bool | Literal["low", "medium", "high"] | None = None
    keep_alive: Union[str, float, None] = None  # the model stays loaded: accepted and ignored


class GenerateRequest(OllamaModel):
    model: str = Field(min_length=1)
    prompt: str = ""
    # suffix (fill-in-the-middle), template (Go templates), context (deprecated state) and images are refused
    # when not empty, with a 400 that says why; the spec says so too
    suffix: str | None = Field(None, json_schema_extra={"maxLength": 0})
    system: str | None = None
    template: str | None = Field(None, json_schema_extra={"maxLength": 0})
    context: list[int] | None = Field(None, json_schema_extra={"maxItems": 0})
    raw: bool = False
    images: list[str] | None = Field(None, json_schema_extra={"maxItems": 0})
    format: Format = None
    options: Options | None = None
    stream: bool = True
    think: bool | Literal["low", "medium", "high"] | None = None
    keep_alive: Union[str, float, None] = None


class ShowRequest(OllamaModel):
    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"required": ["model"], "properties": {"model": {"type": "string"}}},
        {"required": ["name"], "properties": {"name": {"type": "string"}}}]})

    model: str | None = Field(None, min_length=1)
    name: str | None = Field(None, min_length=1)  # the older clients' spelling
    verbose: bool = False

    @property
    def requested(self) -> str:
        return self.model or self.name or ""


class EmbedRequest(OllamaModel):
    model: str = Field(min_length=1)
    input: Union[str, list[str]]
    truncate: bool = True
    dimensions: int | None = Field(None, ge=1)
    options: dict[str, Any] | None = None
    keep_alive: Union[str, float, None] = None

    @model_validator(mode="before")
    @classmethod
    def accept_integral_floats(cls, data):
        return integral_floats(data, ("dimensions",))


class LegacyEmbeddingsRequest(OllamaModel):
    model: str = Field(min_length=1)
    prompt: str
    options: dict[str, Any] | None = None
    keep_alive: Union[str, float, None] = None


# ---------- responses ----------

class ModelDetails(OllamaModel):
    parent_model: str = ""
    format: str = "safetensors"
    family: str
    families: list[str]
    parameter_size: str
    quantization_level: str


class ListedModel(OllamaModel):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: ModelDetails


class TagsResponse(OllamaModel):
    models: list[ListedModel]


class RunningModel(OllamaModel):
    name: str
    model: str
    size: int
    digest: str
    details: ModelDetails
    expires_at: str
    size_vram: int
    context_length: int


class ProcessResponse(OllamaModel):
    models: list[RunningModel]


class ShowResponse(OllamaModel):
    modelfile: str
    parameters: str
    template: str
    details: ModelDetails
    model_info: dict[str, Any]
    capabilities: list[Literal["completion", "tools", "thinking", "embedding"]]
    modified_at: str


class VersionResponse(OllamaModel):
    version: str


class ResponseToolCallFunction(OllamaModel):
    index: int
    name: str
    arguments: dict[str, Any]


class ResponseToolCall(OllamaModel):
    function: ResponseToolCallFunction


class ResponseMessage(OllamaModel):
    role: Literal["assistant"] = "assistant"
    content: str = ""
    thinking: str | None = None
    tool_calls: list[ResponseToolCall] | None = None


class FinalCounts(OllamaModel):
    """The last line's counts and durations (nanoseconds), as Ollama's; absent from the lines before it."""

    done_reason: str | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class ChatResponse(FinalCounts):
    model: str
    created_at: str
    message: ResponseMessage
    done: bool


class GenerateResponse(FinalCounts):
    model: str
    created_at: str
    response: str
    thinking: str | None = None
    done: bool


class EmbedResponse(OllamaModel):
    model: str
    embeddings: list[list[float]]
    total_duration: int
    load_duration: int
    prompt_eval_count: int


class LegacyEmbeddingsResponse(OllamaModel):
    embedding: list[float]


class OllamaErrorResponse(OllamaModel):
    error: str
