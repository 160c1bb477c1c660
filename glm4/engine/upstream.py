"""UpstreamEngine: the engine contract over existing OpenAI-compatible servers (vLLM, SGLang, this app).

The heavy lifting (tensor/data parallel, paged attention) stays with the upstream engine; this class
streams its chat completions through, spreading requests by least outstanding requests, checking
health in the background, and failing over to the next upstream on connection errors. Tool calls
that come back structured are turned back into GLM-4's `name\\n{json}` text, so the front ends'
single tool-call parser serves both backends.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import httpx

from glm4.engine.base import (Delta, Engine, EngineUnavailable, FinishReason, ModelInfo, Prompt, SamplingParams,
                              Usage)

log = logging.getLogger(__name__)

HEALTH_INTERVAL = 5.0  # seconds between background health checks of each upstream
CONNECT_TIMEOUT = 3.0  # a dead upstream must fail fast so failover is quick
DEFAULT_CONTEXT_TOKENS = 32768  # --max-model-len auto before an upstream has said its own limit


@dataclass
class Upstream:
    url: str  # base URL ending in /v1
    client: httpx.AsyncClient
    healthy: bool = True
    outstanding: int = 0
    counters: collections.Counter = field(default_factory=collections.Counter)
    models: list[str] = field(default_factory=list)
    max_model_len: int | None = None  # vLLM's /v1/models cards carry it


class UpstreamError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


def request_body(prompt: Prompt, params: SamplingParams, model: str) -> dict[str, Any]:
    """The OpenAI request for one choice; extensions vLLM understands are sent only when set."""
    body: dict[str, Any] = {
        "model": model, "messages": prompt.messages, "stream": True, "stream_options": {"include_usage": True},
        "temperature": params.temperature, "top_p": params.top_p,
    }
    optional = {"max_tokens": params.max_tokens, "stop": params.stop or None, "seed": params.seed,
                "presence_penalty": params.presence_penalty or None,
                "frequency_penalty": params.frequency_penalty or None,
                "top_k": params.top_k or None,
                "repetition_penalty": params.repetition_penalty if params.repetition_penalty != 1.0 else None,
                "ignore_eos": params.ignore_eos or None,
                "tools": prompt.tools, "tool_choice": prompt.tool_choice if prompt.tools else None}
    body.update({key: value for key, value in optional.items() if value is not None})
    return body


def upstream_error(response: httpx.Response, body: bytes) -> UpstreamError:
    try:
        error = json.loads(body)["error"]
        message, code = str(error.get("message")), error.get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        message, code = body.decode("utf-8", "replace")[:500] or response.reason_phrase, None
    return UpstreamError(response.status_code, f"upstream: {message}", str(code) if code is not None else None)


class ToolCallText:
    """Structured tool-call deltas → GLM-4 text `name\\n{arguments}` (the name is omitted when forced)."""

    def __init__(self, forced: bool):
        self.forced = forced
        self.calls: dict[int, dict[str, str]] = {}

    def feed(self, deltas: list[dict]) -> None:
        for delta in deltas:
            call = self.calls.setdefault(delta.get("index", 0), {"name": "", "arguments": ""})
            function = delta.get("function") or {}
            call["name"] += function.get("name") or ""
            call["arguments"] += function.get("arguments") or ""

    def text(self) -> str:
        if not self.calls:
            return ""
        # GLM-4's own text for several calls: each `name\n{arguments}`, separated by <|assistant|> (the chat
        # core's parser splits on it); a forced call's name is already in the prompt.
        texts = [call["arguments"] if self.forced and i == 0 else f"{call['name']}\n{call['arguments']}"
                 for i, call in enumerate(self.calls[index] for index in sorted(self.calls))]
        return "<|assistant|>".join(texts)


class UpstreamEngine(Engine):
    early_errors = True  # the upstream validates too: its 4xx must reach the client as a 4xx

    def __init__(self, settings):
        self.settings = settings
        self.tokenizer = None  # the upstream tokenizes; prompts carry messages
        headers = {"Authorization": f"Bearer {settings.upstream_api_key}"} if settings.upstream_api_key else {}
        timeout = httpx.Timeout(connect=CONNECT_TIMEOUT, read=None, write=30.0, pool=30.0)
        self.upstreams = [Upstream(url.rstrip("/"), httpx.AsyncClient(headers=headers, timeout=timeout))
                          for url in settings.upstream_url]
        self.info = ModelInfo(
            name=settings.served_model_name, source=", ".join(u.url for u in self.upstreams),
            quantization="upstream", dtype="upstream",
            max_model_len=settings.requested_model_len or DEFAULT_CONTEXT_TOKENS,
            placement=f"{len(self.upstreams)} upstream engine(s): " + ", ".join(u.url for u in self.upstreams),
            aliases=["glm4"], created=int(time.time()),
        )
        self.counters = collections.Counter()
        self._cancelled: set[str] = set()
        self._running: set[str] = set()
        self._health_task: asyncio.Task | None = None

    # ---- lifecycle and health ----

    async def start(self) -> None:
        if self._health_task is None:
            await self.check_health()
            self._health_task = asyncio.create_task(self._health_loop())

    async def shutdown(self, drain_timeout: float = 0.0) -> None:
        deadline = time.monotonic() + drain_timeout
        while self._running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._cancelled.update(self._running)
        if self._health_task:
            self._health_task.cancel()
            self._health_task = None
        for upstream in self.upstreams:
            await upstream.client.aclose()

    async def check_health(self) -> None:
        async def probe(upstream: Upstream):
            try:
                response = await upstream.client.get(upstream.url + "/models", timeout=CONNECT_TIMEOUT)
                upstream.healthy = response.status_code == 200
                if upstream.healthy:
                    cards = [m for m in response.json().get("data", []) if "id" in m]
                    upstream.models = [m["id"] for m in cards]
                    upstream.max_model_len = min((m["max_model_len"] for m in cards
                                                  if isinstance(m.get("max_model_len"), int)), default=None)
            except (httpx.HTTPError, ValueError):
                upstream.healthy = False
        await asyncio.gather(*(probe(u) for u in self.upstreams))
        models = [m for u in self.upstreams for m in u.models]
        self.info.aliases = list(dict.fromkeys(["glm4", *models]))  # /v1/models reflects the upstreams
        limits = [u.max_model_len for u in self.upstreams if u.max_model_len]
        if limits and self.settings.requested_model_len is None:  # auto: what the upstreams serve (vLLM says)
            self.info.max_model_len = min(limits)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_INTERVAL)
            await self.check_health()

    def model_for(self, upstream: Upstream) -> str:
        return self.settings.upstream_model or (upstream.models[0] if upstream.models else self.info.name)

    def _candidates(self) -> list[Upstream]:
        """Healthy upstreams by fewest outstanding requests, then the rest (they may be back)."""
        return sorted(self.upstreams, key=lambda u: (not u.healthy, u.outstanding))

    # ---- the contract ----

    def submit(self, prompt: Prompt, params: SamplingParams, request_id: str) -> AsyncIterator[Delta]:
        if not self.upstreams:
            raise EngineUnavailable("no upstream configured")
        self.counters["submitted"] += 1
        self._running.add(request_id)
        return self._stream(prompt, params, request_id)

    def cancel(self, request_id: str) -> bool:
        if request_id in self._running:
            self._cancelled.add(request_id)
            return True
        return False

    def stats(self) -> dict[str, Any]:
        return {"running": len(self._running), "waiting": 0, "batch_size": len(self._running), **self.counters,
                "upstreams": [{"url": u.url, "healthy": u.healthy, "outstanding": u.outstanding,
                               **u.counters} for u in self.upstreams]}

    async def _stream(self, prompt: Prompt, params: SamplingParams, request_id: str) -> AsyncIterator[Delta]:
        finished = False
        try:
            last_error: Exception | None = None
            for upstream in self._candidates():
                try:
                    async for delta in self._from_upstream(upstream, prompt, params, request_id):
                        finished = delta.finished
                        yield delta
                    return
                except (httpx.ConnectError, httpx.ConnectTimeout) as error:  # nothing was sent yet: fail over to the next upstream
                    upstream.healthy = False
                    upstream.counters["connect_errors"] += 1
                    log.warning("upstream %s unreachable, failing over", upstream.url)
                    last_error = error
            self.counters["finished_error"] += 1
            finished = True
            yield Delta(finish_reason=FinishReason.ERROR, error=f"all upstream engines are unreachable "
                        f"({type(last_error).__name__})", error_status=503, usage=Usage(0, 0))
        except UpstreamError as error:
            self.counters["finished_error"] += 1
            finished = True
            yield Delta(finish_reason=FinishReason.ERROR, error=str(error), error_status=error.status,
                        error_code=error.code, usage=Usage(0, 0))
        except httpx.HTTPError as error:  # the upstream broke off mid-stream
            self.counters["finished_error"] += 1
            finished = True
            yield Delta(finish_reason=FinishReason.ERROR, error=f"upstream failed: {type(error).__name__}",
                        error_status=502, usage=Usage(0, 0))
        finally:
            if not finished:
                self.counters["finished_cancelled"] += 1
            self._running.discard(request_id)
            self._cancelled.discard(request_id)

    async def _from_upstream(self, upstream: Upstream, prompt: Prompt, params: SamplingParams,
                             request_id: str) -> AsyncIterator[Delta]:
        body = request_body(prompt, params, self.model_for(upstream))
        upstream.outstanding += 1
        upstream.counters["requests"] += 1
        tools = ToolCallText(forced=bool(prompt.prefix))
        finish, usage = None, Usage(0, 0)
        try:
            async with upstream.client.stream("POST", upstream.url + "/chat/completions", json=body) as response:
                if response.status_code != 200:
                    upstream.counters["errors"] += 1
                    raise upstream_error(response, await response.aread())
                upstream.healthy = True
                async for line in response.aiter_lines():
                    if request_id in self._cancelled:
                        upstream.counters["cancelled"] += 1
                        self.counters["finished_cancelled"] += 1
                        yield Delta(finish_reason=FinishReason.CANCELLED, usage=usage)
                        return  # leaving the block closes the upstream request
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise UpstreamError(502, f"upstream: {chunk['error'].get('message', 'error')}")
                    if chunk.get("usage"):
                        usage = Usage(chunk["usage"].get("prompt_tokens", 0), chunk["usage"].get("completion_tokens", 0))
                    for choice in chunk.get("choices") or []:
                        delta = choice.get("delta") or {}
                        if delta.get("tool_calls"):
                            tools.feed(delta["tool_calls"])
                        reasoning = delta.get("reasoning_content") or delta.get("reasoning")  # vLLM: both names
                        if delta.get("content") or reasoning:
                            yield Delta(text=delta.get("content") or "", reasoning=reasoning or "")
                        finish = choice.get("finish_reason") or finish
        finally:
            upstream.outstanding -= 1
        reason = FinishReason.LENGTH if finish == "length" else FinishReason.STOP
        self.counters[f"finished_{reason.value}"] += 1
        yield Delta(text=tools.text(), finish_reason=reason, usage=usage)
