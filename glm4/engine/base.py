"""The engine contract: every front end (API, UI) and every backend (local, upstream) speaks this.

Front ends turn their input into a `Prompt` plus `SamplingParams`, call `Engine.submit`, and consume
the async stream of `Delta`s. `Engine.cancel` stops a request at the next decode step.
No FastAPI, Gradio or wire-schema imports here.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol

PREFILL_CHUNK_TOKENS = 2048  # the most prompt tokens one forward pass takes: activations scale with it


class FinishReason(str, enum.Enum):
    STOP = "stop"  # a stop token or stop string ended the reply
    LENGTH = "length"  # max_tokens (or the context window) was reached
    CANCELLED = "cancelled"  # cancel(request_id) or a dropped client
    ERROR = "error"  # the generation failed; Delta.error says why


class MatcherError(Exception):
    """A grammar matcher refused a token or broke: fails only the request that owns it."""


class Matcher(Protocol):
    """One request's grammar state (glm4.engine.constraints builds them). The engine calls, per decode step:
    `fill_bitmask` before sampling, then `accept` with the sampled token. Never shared between requests."""

    def fill_bitmask(self, bitmask: Any, row: int) -> bool:
        """Write the allowed next tokens into bitmask[row] (int32 words, bit i of word w = token 32*w+i);
        False when nothing is constrained at this step (e.g. an `auto` tool call that has not started)."""

    def accept(self, token_id: int) -> None:
        """Advance past a sampled token; raises MatcherError when the grammar does not allow it."""

    def is_finished(self) -> bool:
        """The grammar is complete: the reply ends here (finish reason "stop")."""


class Constraint(Protocol):
    """A compiled grammar (JSON schema, JSON object, GLM-4 tool call); compiled once per request by the chat
    core, so an unsupported schema is a 400 before anything runs."""

    def new_matcher(self) -> Matcher:
        """A fresh matcher at the start of the reply (one per choice of an n > 1 request)."""


@dataclass
class SamplingParams:
    """Per-request sampling. None on a field means "the model's generation default"."""

    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # nucleus mass, 1.0 = off
    top_k: int = 0  # 0 = off
    max_tokens: int | None = 512  # new tokens at most; None = as many as the context allows
    stop: list[str] = field(default_factory=list)  # stop strings, never returned
    seed: int | None = None  # same seed + same prompt → same output
    repetition_penalty: float = 1.0  # HF-style multiplicative penalty, 1.0 = off
    presence_penalty: float = 0.0  # OpenAI-style additive penalties
    frequency_penalty: float = 0.0
    ignore_eos: bool = False  # benchmarks: keep generating through stop tokens up to max_tokens
    allowed_prefixes: list[list[int]] | None = None  # output must start with one of these token sequences
    constraint: Constraint | None = None  # grammar the reply must follow (response_format, strict tools)
    logprobs: int | None = None  # None = off; 0 = the chosen token's logprob; n = also the n most likely (<= 20)
    fault: str | None = None  # test hook ("error" | "oom" | "nan"): honoured only by engines built with test_hooks

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class Prompt:
    """What a backend needs to generate: token ids for a local model, messages for an upstream one."""

    token_ids: list[int]
    messages: list[dict[str, Any]] = field(default_factory=list)  # OpenAI-shaped, for upstream backends
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    prefix: str = ""  # text already forced after <|assistant|> (a forced tool name + "\n")
    cache_salt: str = ""  # KV of this prompt is reused only by prompts with the same salt (API key, UI user)
    cache_hint: str | None = None  # OpenAI's prompt_cache_key: which cached conversation to try first


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (not prefilled again)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class TokenLogprob:
    """Log-probability of one token under the model's own logits (before temperature, penalties and masks)."""

    token_id: int
    token: str  # the token's text; a token that holds part of a UTF-8 character shows U+FFFD, see `bytes`
    logprob: float
    bytes: list[int]  # the token's exact UTF-8 bytes
    top: list["TokenLogprob"] = field(default_factory=list)  # the n most likely tokens at this step, best first


@dataclass
class Delta:
    """One step of a request's stream. The last delta has finish_reason and usage set.

    `text` never holds special tokens except `<|assistant|>`, which GLM-4 writes between two tool calls of
    one reply: the chat core splits calls on it and never shows it as content.
    """

    text: str = ""
    reasoning: str = ""  # reasoning an upstream server split off itself (its reasoning_content / reasoning)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids, when the request asked for them
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    error: str | None = None  # set with FinishReason.ERROR
    error_status: int = 500  # HTTP status that fits the error (503 for overload/OOM, upstream's own 4xx)
    error_code: str | None = None  # machine-readable code for the OpenAI envelope

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class ModelInfo:
    """What the front ends show about the served model."""

    name: str  # served model name, e.g. "glm-4"
    source: str  # HF id or local dir it was loaded from
    quantization: str  # "4bit", "8bit", "none"
    dtype: str  # "bfloat16", ...
    placement: str  # one-line summary, e.g. "all layers on RTX 2080 Ti"
    max_model_len: int  # prompt + completion tokens at most
    aliases: list[str] = field(default_factory=list)  # other accepted model names
    created: int = 0  # unix time the model was loaded
    generation_defaults: dict[str, Any] = field(default_factory=dict)  # temperature/top_p from the checkpoint
    vocab_size: int = 0  # rows of the model's logits (may exceed the tokenizer's vocabulary); grammar masks use it


class EngineOverloaded(Exception):
    """The waiting queue is full: the caller should retry later (HTTP 429)."""

    def __init__(self, retry_after: float = 1.0):
        super().__init__("the server is busy: too many requests are waiting; retry later")
        self.retry_after = retry_after


class EngineUnavailable(Exception):
    """The engine is not serving (loading, draining, upstream down): HTTP 503."""

    def __init__(self, message: str, retry_after: float = 5.0):
        super().__init__(message)
        self.retry_after = retry_after


class Engine(abc.ABC):
    """Async streaming text generation. Implementations: LocalEngine (transformers), UpstreamEngine."""

    info: ModelInfo
    # True when a request can fail with a client error before any output (an upstream's 4xx): the API then
    # waits for the first delta before answering, so that error keeps its HTTP status.
    early_errors: bool = False

    @abc.abstractmethod
    def submit(self, prompt: Prompt, params: SamplingParams, request_id: str) -> AsyncIterator[Delta]:
        """Queue a request and stream its deltas. Raises EngineOverloaded when the queue is full.

        Closing the iterator early (client gone) cancels the request.
        """

    @abc.abstractmethod
    def cancel(self, request_id: str) -> bool:
        """Stop a request at the next decode step; True when it was known and still running."""

    @abc.abstractmethod
    def stats(self) -> dict[str, Any]:
        """Counters for /metrics and tests: running, waiting, finished, cancelled, rejected, ..."""

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text (no special prefix); backends without a tokenizer return []."""
        return []

    async def start(self) -> None:
        """Start worker threads or connections. Idempotent."""

    async def shutdown(self, drain_timeout: float = 0.0) -> None:
        """Stop accepting, let running requests finish up to drain_timeout seconds, then stop."""
