"""Load: 64 streaming clients at once against --max-num-seqs 8 --max-queue 32.

Every accepted request must stream to a well-formed end ([DONE]); every refused one must get 429 with
Retry-After in the OpenAI envelope; none may hang or vanish: accepted + refused = 64, and the server's own
counters agree. The 64 connections are opened first (a GET /health each), then the 64 requests leave
together, so the first 40 (8 decoding + 32 queued) fill the engine before any of them can finish.

`burst()` is also run by bench/reliability_report.py for docs/RELIABILITY.md.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import httpx
import pytest

CLIENTS = 64
MAX_NUM_SEQS = 8
MAX_QUEUE = 32
TOKENS = 64  # per request
SERVER_FLAGS = ("--no-ui", "--test-hooks", "--max-num-seqs", str(MAX_NUM_SEQS), "--max-queue", str(MAX_QUEUE))


@dataclass
class BurstReport:
    clients: int
    completed: int = 0  # 200 with a well-formed stream ending in [DONE]
    rejected: int = 0  # 429 with Retry-After in the envelope
    broken: list[str] = field(default_factory=list)  # anything else: bad stream, other status, hang, error
    seconds: float = 0.0
    slowest: float = 0.0  # seconds for the slowest accepted request
    metrics: dict[str, float] = field(default_factory=dict)  # server counter deltas


def stream_problem(events: list) -> str | None:
    """The chunk rules of an OpenAI stream with one choice."""
    if not events or events[-1] != "[DONE]":
        return "no final [DONE]"
    chunks = events[:-1]
    if any("error" in chunk for chunk in chunks):
        return "in-band error"
    if len({chunk["id"] for chunk in chunks}) != 1:
        return "several ids"
    if chunks[0]["choices"][0]["delta"] != {"role": "assistant", "content": ""}:
        return "first chunk is not the role"
    finishing = [chunk for chunk in chunks if chunk["choices"][0]["finish_reason"] is not None]
    if len(finishing) != 1 or finishing[0] is not chunks[-1]:
        return "not exactly one final finish_reason"
    return None


async def one_client(http: httpx.AsyncClient, url: str, index: int) -> tuple[str, str, float]:
    """('completed' | 'rejected' | 'broken', detail, seconds)."""
    started = time.monotonic()
    body = {"messages": [{"role": "user", "content": f"client {index}: hello"}], "stream": True,
            "max_tokens": TOKENS, "temperature": 1, "seed": index}
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
        if response.status_code == 429:
            error = json.loads(await response.aread())["error"]
            retry_after = response.headers.get("retry-after", "")
            ok = retry_after.isdigit() and int(retry_after) >= 1 and error["type"] == "rate_limit_error"
            return ("rejected" if ok else "broken"), f"429 retry-after={retry_after!r} {error}", 0.0
        if response.status_code != 200:
            return "broken", f"status {response.status_code}: {(await response.aread())[:200]!r}", 0.0
        text = "".join([chunk async for chunk in response.aiter_text()])
    # SSE lines end at "\n" only (httpx's aiter_lines would also split at U+2028 inside the JSON)
    events = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
    events = [event if event == "[DONE]" else json.loads(event) for event in events]
    problem = stream_problem(events)
    return ("broken" if problem else "completed"), problem or "", time.monotonic() - started


def counters(live) -> dict[str, float]:
    return {"rejected": live.metric("glm4_requests_rejected_total"),
            "finished": sum(live.metric("glm4_requests_finished_total", f'reason="{r}"') for r in ("stop", "length")),
            "failed": live.metric("glm4_requests_finished_total", 'reason="error"'),
            "cancelled": live.metric("glm4_requests_cancelled_total"),
            "http_200": metric_or_zero(live, "glm4_http_requests_total", 'route="/v1/chat/completions",status="200"'),
            "http_429": metric_or_zero(live, "glm4_http_requests_total", 'route="/v1/chat/completions",status="429"')}


def metric_or_zero(live, name: str, labels: str) -> float:
    try:
        return live.metric(name, labels)
    except KeyError:
        return 0.0


async def run_burst(url: str, clients: int, timeout: float) -> BurstReport:
    report = BurstReport(clients)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as http:
        await asyncio.gather(*(http.get(url + "/health") for _ in range(clients)))  # open the connections
        started = time.monotonic()
        tasks = [asyncio.ensure_future(asyncio.wait_for(one_client(http, url, i), timeout)) for i in range(clients)]
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, BaseException):
                report.broken.append(f"{type(result).__name__}: {result}")  # a hang ends as TimeoutError
                continue
            outcome, detail, seconds = result
            if outcome == "completed":
                report.completed += 1
                report.slowest = max(report.slowest, seconds)
            elif outcome == "rejected":
                report.rejected += 1
            else:
                report.broken.append(detail)
        report.seconds = time.monotonic() - started
    return report


def burst(live, clients: int = CLIENTS, timeout: float = 120.0) -> BurstReport:
    """Fire `clients` streaming requests at once at a running server; return the figures."""
    before = counters(live)
    report = asyncio.run(run_burst(live.url, clients, timeout))
    deadline = time.monotonic() + 30
    while (live.metric("glm4_requests_running") or live.metric("glm4_requests_waiting")) and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    after = counters(live)
    report.metrics = {key: after[key] - before[key] for key in after}
    report.metrics["running_after"] = live.metric("glm4_requests_running")
    report.metrics["waiting_after"] = live.metric("glm4_requests_waiting")
    return report


@pytest.fixture(scope="module")
def loaded_server():
    from tests.conftest import LiveServer

    live = LiveServer(*SERVER_FLAGS)
    yield live
    assert live.stop() == 0


def test_64_streaming_clients_all_complete_or_get_429(loaded_server):
    report = burst(loaded_server)
    print(report)
    assert not report.broken, report.broken[:5]
    assert report.completed + report.rejected == CLIENTS
    assert report.completed >= MAX_NUM_SEQS + MAX_QUEUE
    # The server's counters tell the same story: nothing lost, nothing left behind.
    assert report.metrics["rejected"] == report.rejected == report.metrics["http_429"]
    assert report.metrics["finished"] == report.completed == report.metrics["http_200"]
    assert report.metrics["failed"] == report.metrics["cancelled"] == 0
    assert report.metrics["running_after"] == report.metrics["waiting_after"] == 0


    reply = httpx.post(loaded_server.url + "/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert reply.status_code == 200 and reply.json()["choices"][0]["finish_reason"] in ("stop", "length")


async def fill_queue(live) -> dict:
    """Hold 8 running + 32 queued requests that cannot finish soon, check that one more gets 429, then drop
    all 40 connections: every slot and queue place must come free (the queued ones are cancelled too)."""
    url = live.url + "/v1/chat/completions"
    # A reply forced by the test hook to 4,000 tokens: nothing finishes by itself during the test.
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "test_force_output": "lorem ipsum " * 500}
    limits = httpx.Limits(max_connections=MAX_NUM_SEQS + MAX_QUEUE + 1)
    async with httpx.AsyncClient(limits=limits, timeout=60) as http:
        release = asyncio.Event()

        async def hold():
            async with http.stream("POST", url, json=body) as response:
                assert response.status_code == 200
                await release.wait()

        async def until(condition, timeout=30.0):
            deadline = time.monotonic() + timeout
            while not condition():
                assert time.monotonic() < deadline, "server did not get there in time"
                await asyncio.sleep(0.05)

        running = [asyncio.ensure_future(hold()) for _ in range(MAX_NUM_SEQS)]
        await until(lambda: live.metric("glm4_requests_running") == MAX_NUM_SEQS)
        queued = [asyncio.ensure_future(hold()) for _ in range(MAX_QUEUE)]
        await until(lambda: live.metric("glm4_requests_waiting") == MAX_QUEUE)
        cancelled_before = live.metric("glm4_requests_cancelled_total")
        refused = await http.post(url, json={**body, "stream": False})
        refused_stream = await http.post(url, json=body)
        freed = time.monotonic()
        # All clients go away at once without reading further, running and queued ones mixed: some of the
        # queued ones are being admitted and prefilled while their clients leave.
        everyone = running + queued
        random.Random(0).shuffle(everyone)
        for task in everyone:
            task.cancel()
        await asyncio.gather(*everyone, return_exceptions=True)
        await until(lambda: live.metric("glm4_requests_running") == live.metric("glm4_requests_waiting") == 0)
        freed = time.monotonic() - freed
    return {"refused": [refused, refused_stream], "freed_after_s": freed,
            "cancelled": live.metric("glm4_requests_cancelled_total") - cancelled_before}


def test_full_queue_gets_429_and_gone_clients_free_their_places(loaded_server):
    result = asyncio.run(fill_queue(loaded_server))
    for response in result["refused"]:
        assert response.status_code == 429, response.text
        assert int(response.headers["retry-after"]) >= 1
        assert response.json()["error"]["type"] == "rate_limit_error"
    assert result["cancelled"] == MAX_NUM_SEQS + MAX_QUEUE
    reply = httpx.post(loaded_server.url + "/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert reply.status_code == 200


LONG_PROMPT_TOKENS = 24_000  # 12 prefill chunks of 2,048 tokens on the tiny model


def long_prompt_text(tokens: int = LONG_PROMPT_TOKENS) -> str:
    """User text of about `tokens` tiny-model tokens."""
    from transformers import AutoTokenizer

    from glm4.tiny import TINY_MODEL_DIR

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    unit = "the server reads this long document, line by line. "
    per_unit = len(tokenizer.encode(unit, add_special_tokens=False))
    return unit * (tokens // per_unit)


async def cancel_during_prefill(live) -> dict:
    """A client that leaves while its long prompt is being prefilled: the engine stops between chunks and
    frees the slot, instead of prefilling the rest for nobody."""
    from glm4.engine.base import PREFILL_CHUNK_TOKENS

    url = live.url + "/v1/chat/completions"
    body = {"messages": [{"role": "user", "content": long_prompt_text()}], "stream": True, "max_tokens": 8}
    prefilled_before = live.metric("glm4_prefill_tokens_total")
    async with httpx.AsyncClient(timeout=120) as http:
        async def send():
            async with http.stream("POST", url, json=body) as response:
                async for _ in response.aiter_bytes():
                    pass

        task = asyncio.ensure_future(send())
        deadline = time.monotonic() + 60
        # wait until the prompt is being prefilled, with at least one chunk done and most still to go
        while not (live.metric("glm4_requests_prefilling") == 1 and
                   live.metric("glm4_prefill_tokens_total") - prefilled_before >= PREFILL_CHUNK_TOKENS):
            assert time.monotonic() < deadline, "the long prompt never started prefilling"
            await asyncio.sleep(0.01)
        at_cancel = live.metric("glm4_prefill_tokens_total") - prefilled_before
        gone = time.monotonic()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        while live.metric("glm4_requests_running") != 0:
            assert time.monotonic() - gone < 30, "the slot was never freed"
            await asyncio.sleep(0.01)
        freed_after = time.monotonic() - gone
    prefilled = live.metric("glm4_prefill_tokens_total") - prefilled_before
    return {"prompt_tokens": LONG_PROMPT_TOKENS, "prefilled_at_cancel": at_cancel, "prefilled_in_all": prefilled,
            "freed_after_s": round(freed_after, 3), "chunk_tokens": PREFILL_CHUNK_TOKENS}


def test_client_gone_during_a_long_prefill_frees_its_slot_within_one_chunk(loaded_server):
    result = asyncio.run(cancel_during_prefill(loaded_server))
    # the cancel landed between chunks: at most the chunk in flight (and one more) ran after the client left
    assert result["prefilled_in_all"] <= result["prefilled_at_cancel"] + 2 * result["chunk_tokens"], result
    assert result["prefilled_in_all"] < 0.9 * result["prompt_tokens"], result
    assert loaded_server.metric("glm4_requests_waiting") == 0
