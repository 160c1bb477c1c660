"""Continuous batching on the real tiny GLM-4: per-row results, slots, queue limits, disconnects, FIFO.

In-process tests use LocalEngine directly; the 429 and disconnect tests go through a live server.
Replies are pinned with forced tokens (allowed_prefixes / test_force_output) or sized with max_tokens;
the tiny model's own words are never asserted.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest

from glm4.engine.base import EngineOverloaded, FinishReason, SamplingParams
from tests.test_engine import (TIMEOUT, chat_prompt, collect, forced, ids_of, long_params, text_of)

PROMPTS = ["hi", "What flags does the server take?", "你好，请介绍一下你自己。", "Tell me a story about a robot "
           "who paints, in three parts, with a moral at the end.", "1 + 1 = ?", "ok", "Explain batching.", "🙂"]


@pytest.fixture
async def make_engine(tiny):
    """LocalEngines with their own limits on the shared tiny model; shut down after the test."""
    from glm4.engine.local import LocalEngine

    engines = []

    async def make(max_num_seqs: int, max_queue: int = 8) -> LocalEngine:
        engine = LocalEngine(tiny.models[0], tiny.tokenizer, tiny.info, max_num_seqs=max_num_seqs,
                             max_queue=max_queue, test_hooks=True)
        await engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.shutdown()


async def first_delta(stream):
    return await asyncio.wait_for(anext(stream), TIMEOUT)


# ---- per-row results in a shared batch ----

async def test_greedy_tokens_same_alone_and_batched_with_seven_others(engine):
    prompt = chat_prompt(engine, "Tell me about continuous batching.")
    greedy = SamplingParams(temperature=0, max_tokens=40)
    alone = await collect(engine.submit(prompt, greedy, "alone"))

    # Seven others of different prompt lengths (left padding in the shared cache), sampled and forced,
    # already decoding when the greedy request joins, and still decoding when it leaves.
    others = [engine.submit(chat_prompt(engine, PROMPTS[i]), long_params(engine, max_tokens=120 + 10 * i,
                                                                        temperature=0.7 * (i % 3)), f"other-{i}")
              for i in range(7)]
    firsts = await asyncio.gather(*(first_delta(stream) for stream in others))
    assert engine.stats()["running"] == 7
    batched = await collect(engine.submit(prompt, greedy, "batched"))
    assert engine.stats()["running"] >= 7  # it really ran inside the full batch
    assert ids_of(batched) == ids_of(alone)
    assert text_of(batched) == text_of(alone)
    assert batched[-1].finish_reason == alone[-1].finish_reason
    for first, stream in zip(firsts, others):
        rest = await collect(stream)
        assert rest[-1].finish_reason is FinishReason.LENGTH
    assert engine.counters["batched_rows"] / engine.counters["steps"] > 4  # mostly full batches


async def test_mixed_params_in_one_batch_are_each_honoured(engine):
    prompt = chat_prompt(engine, "Tell me something.")
    seeded = SamplingParams(temperature=1.0, top_k=50, seed=7, max_tokens=24)
    greedy = SamplingParams(temperature=0, max_tokens=24)
    seeded_alone = ids_of(await collect(engine.submit(prompt, seeded, "seeded-alone")))
    greedy_alone = ids_of(await collect(engine.submit(prompt, greedy, "greedy-alone")))

    cases = {
        "length": long_params(engine, max_tokens=5, temperature=0.9),
        "one-token": long_params(engine, max_tokens=1),
        "stop-string": forced(engine, "keep this ##END## not this", stop=["##END##"], temperature=0.5),
        "stop-token": forced(engine, "exact 文本 🙂"),
        "seeded": seeded,
        "greedy": greedy,
        "hot": SamplingParams(temperature=1.5, top_p=0.9, max_tokens=12),
        "long": long_params(engine, max_tokens=60, temperature=1.0),
    }
    results = dict(zip(cases, await asyncio.gather(
        *(collect(engine.submit(prompt, params, name)) for name, params in cases.items()))))

    assert results["length"][-1].finish_reason is FinishReason.LENGTH
    assert results["length"][-1].usage.completion_tokens == 5
    assert results["one-token"][-1].usage.completion_tokens == 1
    assert text_of(results["stop-string"]) == "keep this "
    assert results["stop-string"][-1].finish_reason is FinishReason.STOP
    assert text_of(results["stop-token"]) == "exact 文本 🙂"
    assert results["stop-token"][-1].finish_reason is FinishReason.STOP
    assert ids_of(results["seeded"]) == seeded_alone
    assert ids_of(results["greedy"]) == greedy_alone
    assert results["hot"][-1].usage.completion_tokens <= 12
    assert results["long"][-1].usage.completion_tokens == 60
    assert engine.counters["batched_rows"] > engine.counters["steps"]  # they did share steps


# ---- slots ----

async def test_cancel_mid_batch_frees_its_slot_while_others_finish(make_engine):
    engine = await make_engine(max_num_seqs=2)
    prompt = chat_prompt(engine)
    doomed = engine.submit(prompt, long_params(engine), "doomed")
    survivor = engine.submit(prompt, forced(engine, "survivor " * 30), "survivor")
    waiting = engine.submit(prompt, forced(engine, "next in line"), "waiting")
    await first_delta(doomed)
    survivor_first = await first_delta(survivor)
    assert engine.stats()["running"] == 2 and engine.stats()["waiting"] == 1

    assert engine.cancel("doomed")
    assert (await collect(doomed))[-1].finish_reason is FinishReason.CANCELLED
    waiting_deltas = await collect(waiting)  # admitted into the freed slot
    assert text_of(waiting_deltas) == "next in line"
    assert engine.stats()["running"] == 1  # finished while the survivor still decodes
    survivor_rest = await collect(survivor)
    assert survivor_first.text + text_of(survivor_rest) == "survivor " * 30
    assert survivor_rest[-1].finish_reason is FinishReason.STOP
    stats = engine.stats()
    assert stats["running"] == 0 and stats["waiting"] == 0
    assert stats["finished_cancelled"] == 1 and stats["finished_stop"] == 2


async def test_cancel_while_waiting_never_runs(make_engine):
    engine = await make_engine(max_num_seqs=1)
    prompt = chat_prompt(engine)
    running = engine.submit(prompt, long_params(engine), "running")
    queued = engine.submit(prompt, long_params(engine), "queued")
    await first_delta(running)
    assert engine.stats()["waiting"] == 1
    assert engine.cancel("queued")
    deltas = await collect(queued)
    assert deltas[-1].finish_reason is FinishReason.CANCELLED
    assert deltas[-1].usage.completion_tokens == 0
    engine.cancel("running")
    await collect(running)


async def test_queue_overflow_raises_overloaded(make_engine):
    engine = await make_engine(max_num_seqs=2, max_queue=3)
    prompt = chat_prompt(engine)
    streams = [engine.submit(prompt, long_params(engine), f"fill-{i}") for i in range(5)]  # 2 running + 3 waiting
    await asyncio.gather(first_delta(streams[0]), first_delta(streams[1]))
    with pytest.raises(EngineOverloaded) as raised:
        engine.submit(prompt, long_params(engine), "one-too-many")
    assert raised.value.retry_after >= 1
    assert engine.stats()["rejected"] == 1
    for i, stream in enumerate(streams):
        engine.cancel(f"fill-{i}")
        await collect(stream)
    assert engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0


# ---- admission order ----

async def test_admission_is_fifo(make_engine):
    engine = await make_engine(max_num_seqs=1)
    prompt = chat_prompt(engine)
    order: list[str] = []

    async def run(name: str, text: str) -> None:
        async for delta in engine.submit(prompt, forced(engine, text), name):
            if delta.text and name not in order:
                order.append(name)

    names = [f"r{i}" for i in range(5)]
    tasks = []
    for name in names:
        tasks.append(asyncio.create_task(run(name, f"reply {name} " * 3)))
        await asyncio.sleep(0.01)  # submitted in this order while earlier ones hold the only slot
    await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)
    assert order == names


async def test_long_request_does_not_starve_short_ones(make_engine):
    engine = await make_engine(max_num_seqs=2)
    prompt = chat_prompt(engine)
    long_stream = engine.submit(prompt, long_params(engine, max_tokens=400), "long")
    await first_delta(long_stream)
    for i in range(4):  # short requests flow through the other slot, one after another
        started_steps = engine.counters["steps"]
        deltas = await collect(engine.submit(prompt, forced(engine, f"short {i}"), f"short-{i}"))
        assert text_of(deltas) == f"short {i}"
        assert engine.counters["steps"] - started_steps < 40  # its own few tokens, not the long one's 400
    assert engine.stats()["running"] == 1  # the long one is still going
    rest = await collect(long_stream)
    assert rest[-1].usage.completion_tokens == 400


# ---- live server: 429 and dropped connections ----

def chat_body(text: str, *, stream: bool) -> dict:
    return {"model": "glm-4", "messages": [{"role": "user", "content": "hi"}], "stream": stream,
            "test_force_output": text, "max_tokens": len(text) + 16}


LONG_TEXT = "busy " * 600  # a few seconds of forced tokens at least


class OpenStream:
    """A streaming request read up to its first data line and then left open (not read further)."""

    def __init__(self, response: httpx.Response):
        self.response = response
        self.lines = response.aiter_lines()  # keep a reference: collecting it would close the connection

    @classmethod
    async def start(cls, client: httpx.AsyncClient, body: dict) -> "OpenStream":
        response = await client.send(client.build_request("POST", "/v1/chat/completions", json=body), stream=True)
        assert response.status_code == 200
        stream = cls(response)
        while not (await asyncio.wait_for(anext(stream.lines), TIMEOUT)).startswith("data:"):
            pass
        return stream

    async def aclose(self) -> None:
        await self.lines.aclose()
        await self.response.aclose()


async def open_stream(client: httpx.AsyncClient, body: dict) -> OpenStream:
    return await OpenStream.start(client, body)


async def wait_metric(live, name: str, condition, timeout: float = 10.0) -> float:
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(live.metric, name)
        if condition(value):
            return value
        assert time.monotonic() < deadline, f"{name} = {value} after {timeout} s"
        await asyncio.sleep(0.05)


async def test_queue_overflow_returns_429_with_retry_after(start_server):
    from openai import AsyncOpenAI, RateLimitError

    live = start_server("--no-ui", "--max-num-seqs", "1", "--max-queue", "1", "--test-hooks")
    async with httpx.AsyncClient(base_url=live.url, timeout=TIMEOUT) as client:
        running = await open_stream(client, chat_body(LONG_TEXT, stream=True))
        waiting = await open_stream(client, chat_body(LONG_TEXT, stream=True))
        await wait_metric(live, "glm4_requests_waiting", lambda value: value == 1)
        assert live.metric("glm4_requests_running") == 1

        refused = await client.post("/v1/chat/completions", json=chat_body("no room", stream=False))
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        error = refused.json()["error"]
        assert set(error) >= {"message", "type", "param", "code"} and error["message"]

        async with AsyncOpenAI(base_url=live.base_url, api_key="unused", max_retries=0) as sdk:
            with pytest.raises(RateLimitError) as raised:
                await sdk.chat.completions.create(model="glm-4", messages=[{"role": "user", "content": "hi"}],
                                                  stream=True, extra_body={"test_force_output": "no room"})
        assert raised.value.status_code == 429
        assert raised.value.response.headers["retry-after"]
        assert live.metric("glm4_requests_rejected_total") == 2
        await running.aclose()
        await waiting.aclose()
    await wait_metric(live, "glm4_requests_running", lambda value: value == 0)
    await wait_metric(live, "glm4_requests_waiting", lambda value: value == 0)


async def test_dropped_streaming_client_is_cancelled(server):
    cancelled = server.metric("glm4_requests_cancelled_total")
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as client:
        response = await open_stream(client, chat_body(LONG_TEXT, stream=True))
        await wait_metric(server, "glm4_requests_running", lambda value: value >= 1)
        started = time.monotonic()
        await response.aclose()  # the connection goes away mid-stream
    await wait_metric(server, "glm4_requests_cancelled_total", lambda value: value >= cancelled + 1, timeout=5)
    await wait_metric(server, "glm4_requests_running", lambda value: value == 0, timeout=5)
    assert time.monotonic() - started < 5


def raw_post(url: str, body: dict) -> socket.socket:
    """Send a non-streaming request over a raw socket and leave it open (the reply is never read)."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=TIMEOUT)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: " + host.encode() + b"\r\n"
                 b"Content-Type: application/json\r\nContent-Length: " + str(len(payload)).encode() + b"\r\n\r\n"
                 + payload)
    return sock


async def test_dropped_non_streaming_client_is_cancelled(server):
    cancelled = server.metric("glm4_requests_cancelled_total")
    sock = raw_post(server.url, chat_body(LONG_TEXT, stream=False))
    try:
        await wait_metric(server, "glm4_requests_running", lambda value: value >= 1)
    finally:
        started = time.monotonic()
        sock.close()
    await wait_metric(server, "glm4_requests_cancelled_total", lambda value: value >= cancelled + 1, timeout=5)
    await wait_metric(server, "glm4_requests_running", lambda value: value == 0, timeout=5)
    assert time.monotonic() - started < 5


async def test_non_streaming_client_timeout_is_cancelled(server):
    cancelled = server.metric("glm4_requests_cancelled_total")
    async with httpx.AsyncClient(base_url=server.url, timeout=httpx.Timeout(TIMEOUT, read=0.5)) as client:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            await client.post("/v1/chat/completions", json=chat_body(LONG_TEXT, stream=False))
    await wait_metric(server, "glm4_requests_cancelled_total", lambda value: value >= cancelled + 1, timeout=5)
    await wait_metric(server, "glm4_requests_running", lambda value: value == 0, timeout=5)
