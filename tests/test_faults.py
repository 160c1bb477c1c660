"""Faults: clients that vanish mid-stream (TCP reset), a model step that raises, a simulated CUDA out-of-memory,
and SIGTERM while a request runs. After each, the server frees what it held and keeps serving.

The faults are injected with the server's test hooks (--test-hooks): the request field `test_fault` makes
every model step the request is in raise, from its third token on, `"error"` as a plain exception and `"oom"` as
torch.OutOfMemoryError. A step is shared by every request in the batch and the exception does not say whose it
was, so the engine decodes each row again alone: only the faulty request fails, the others go on.

The scenario functions return their figures; bench/reliability_report.py runs them for docs/RELIABILITY.md.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import signal
import socket
import struct
import time

import httpx
import pytest

from glm4.engine.base import Delta, Engine, ModelInfo

HELLO = [{"role": "user", "content": "hi"}]
# Replies forced by the test hook have a known length whatever the model would say: LONG (4,000 tokens)
# cannot finish during a test, FAULTY (30 tokens) always reaches the fault after its first two tokens.
LONG = {"messages": HELLO, "test_force_output": "lorem ipsum " * 500}
FAULTY = {"test_force_output": "fault " * 10}
COUNTED = " ".join(str(i) for i in range(120))  # 258 tokens: a few seconds of streaming


def chat(base: str, timeout: float = 60, **body) -> httpx.Response:
    return httpx.post(base + "/v1/chat/completions", json={"messages": HELLO, **body}, timeout=timeout)


def sse_events(text: str) -> list:
    events = []
    for line in text.split("\n"):
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def counters(live) -> dict[str, float]:
    return {"running": live.metric("glm4_requests_running"), "waiting": live.metric("glm4_requests_waiting"),
            "cancelled": live.metric("glm4_requests_cancelled_total"),
            **{reason: live.metric("glm4_requests_finished_total", f'reason="{reason}"')
               for reason in ("stop", "length", "error")}}


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02) -> float:
    """Seconds until predicate() held; raises AssertionError after timeout."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"condition not reached in {timeout} s")
        time.sleep(interval)
    return time.monotonic() - started


def wait_idle(live, timeout: float = 30.0) -> None:
    wait_for(lambda: live.metric("glm4_requests_running") == 0 and live.metric("glm4_requests_waiting") == 0,
             timeout)


def raw_request(body: dict) -> bytes:
    payload = json.dumps(body).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(payload)) + payload


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends a TCP RST instead of a FIN (a crashed client, a dropped NAT)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def reset_mid_stream(live, stream: bool = True) -> dict:
    """Start a long request on a raw socket, reset the connection once it runs, and time until its slot is free."""
    wait_idle(live)
    before = counters(live)
    sock = socket.create_connection(("127.0.0.1", live.port), timeout=30)
    sock.sendall(raw_request({**LONG, "stream": stream}))
    if stream:
        received = b""
        while received.count(b"data: ") < 2:  # the role chunk, then a token: the request is decoding
            received += sock.recv(4096)
    else:
        wait_for(lambda: live.metric("glm4_requests_running") == 1)
    reset(sock)
    freed_after = wait_for(lambda: live.metric("glm4_requests_running") == 0)
    after = counters(live)
    assert after["cancelled"] == before["cancelled"] + 1, (before, after)
    assert after["length"] == before["length"] and after["stop"] == before["stop"], (before, after)
    follow_up = chat(live.url, max_tokens=4)
    assert follow_up.status_code == 200, follow_up.text
    return {"freed_after_s": freed_after}


def fault_in_stream(live, kind: str, n: int = 1) -> dict:
    """A step that raises: the stream ends with an error event and [DONE]; the next request succeeds."""
    wait_idle(live)
    before = counters(live)
    response = chat(live.url, stream=True, test_fault=kind, n=n, **FAULTY)
    assert response.status_code == 200  # the stream had started: the failure is reported in-band
    events = sse_events(response.text)
    assert events[-1] == "[DONE]", events[-3:]
    error = events[-2]["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    expected = ("503", "service_unavailable") if kind == "oom" else ("500", "internal_server_error")
    assert (error["code"], error["type"]) == expected, error
    assert not any("error" in event for event in events[:-2] if isinstance(event, dict))
    follow_up = chat(live.url, max_tokens=4)
    assert follow_up.status_code == 200, follow_up.text
    wait_idle(live)
    after = counters(live)
    assert after["error"] == before["error"] + n and after["running"] == 0  # the n choices share the step
    return {"error": error}


def fault_non_stream(live, kind: str, n: int = 1) -> dict:
    """Without streaming the failure is the HTTP status: 503 (retryable) for OOM, 500 for a broken step."""
    wait_idle(live)
    response = chat(live.url, test_fault=kind, n=n, **FAULTY)
    expected = 503 if kind == "oom" else 500
    assert response.status_code == expected, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    if kind == "oom":
        assert "Retry-After" in response.headers
    assert chat(live.url, max_tokens=4).status_code == 200
    wait_idle(live)
    return {"status": response.status_code}


def fault_with_bystanders(live, kind: str = "oom", bystanders: int = 6, rounds: int = 20) -> dict:
    """One request with a failing step among `bystanders` ordinary streams decoding beside it, `rounds` times:
    the faulty one fails (503 for OOM, 500 otherwise), every other stream ends with [DONE] and a normal finish
    reason. The batched step cannot tell whose fault it was; the engine decodes each row again alone."""
    wait_idle(live)
    before = counters(live)
    expected = "503" if kind == "oom" else "500"

    def one(body: dict) -> str:
        """The finish reason, or the status of the failure (in-band in the stream, or HTTP)."""
        response = chat(live.url, stream=True, **body)
        if response.status_code != 200:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
            return str(response.status_code)
        events = sse_events(response.text)
        assert events[-1] == "[DONE]", events[-3:]
        errors = [event["error"] for event in events if isinstance(event, dict) and "error" in event]
        if errors:
            return errors[0]["code"]
        finishes = [event["choices"][0]["finish_reason"] for event in events[:-1] if event["choices"]]
        return finishes[-1]

    outcomes: collections.Counter = collections.Counter()
    with concurrent.futures.ThreadPoolExecutor(bystanders + 1) as pool:
        for round_ in range(rounds):
            bodies = [{"test_fault": kind, **FAULTY}] + \
                [{"max_tokens": 30, "temperature": 1, "seed": 100 * round_ + i} for i in range(bystanders)]
            results = list(pool.map(one, bodies))
            assert results[0] == expected, (round_, results)
            assert all(outcome in ("stop", "length") for outcome in results[1:]), (round_, results)
            outcomes.update(results[1:])
    wait_idle(live)
    after = counters(live)
    assert after["error"] - before["error"] == rounds  # the faulty requests only
    assert chat(live.url, max_tokens=4).status_code == 200
    return {"rounds": rounds, "faulty requests failed": rounds, "bystanders": rounds * bystanders,
            "bystanders failed": 0, "bystander finish reasons": dict(outcomes)}


def oom_spares_the_queue(live) -> dict:
    """On a one-slot server: a request ahead, the OOM one, one behind. Only the OOM request fails."""
    wait_idle(live)
    bodies = [{"max_tokens": 40, "temperature": 0},
              {"test_fault": "oom", **FAULTY},
              {"max_tokens": 40, "temperature": 0, "seed": 1}]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = []
        for body in bodies:  # submitted in this order: FIFO admission makes the outcome deterministic
            futures.append(pool.submit(chat, live.url, **body))
            wait_for(lambda n=len(futures): live.metric("glm4_requests_running") +
                     live.metric("glm4_requests_waiting") >= n or futures[-1].done())
        responses = [future.result() for future in futures]
    statuses = [response.status_code for response in responses]
    assert statuses == [200, 503, 200], [r.text[:200] for r in responses]
    wait_idle(live)
    return {"statuses": statuses}


def drain_on_sigterm(live) -> dict:
    """SIGTERM during a request: new /v1 requests get 503, the running one streams to the end, exit code 0."""
    wait_idle(live)
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", live.url + "/v1/chat/completions",
                         json={"messages": HELLO, "stream": True, "test_force_output": COUNTED}) as running:
            assert running.status_code == 200
            lines = running.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            live.process.send_signal(signal.SIGTERM)
            time.sleep(0.3)  # the signal handler runs on the server's event loop
            refused = http.post(live.url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 4})
            health = http.get(live.url + "/health")
            rest = [first] + [line for line in lines if line.startswith("data: ")]
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "unavailable" and "Retry-After" in refused.headers
    assert health.status_code == 503 and health.json() == {"status": "draining"}
    events = [line[len("data: "):] for line in rest]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert not any("error" in chunk for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    text = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks)
    assert text == COUNTED  # the whole reply came out
    returncode = live.process.wait(timeout=60)
    assert returncode == 0, live.log()[-2000:]
    return {"refused_status": refused.status_code, "returncode": returncode, "reply_chars": len(text)}


# ---- tests ----

@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
def test_tcp_reset_mid_request_frees_the_slot(server, stream):
    reset_mid_stream(server, stream=stream)


FAULTS = [pytest.param("error", 1, id="error"), pytest.param("oom", 1, id="oom"),
          pytest.param("oom", 2, id="oom-n2")]


@pytest.mark.parametrize("kind,n", FAULTS)
def test_failing_step_ends_the_stream_in_band(server, kind, n):
    fault_in_stream(server, kind, n)


@pytest.mark.parametrize("kind,n", FAULTS)
def test_failing_step_without_streaming_is_the_http_status(server, kind, n):
    fault_non_stream(server, kind, n)


@pytest.mark.parametrize("kind", ["oom", "error"])
def test_a_failing_step_fails_only_the_request_it_belongs_to(server, kind):
    fault_with_bystanders(server, kind)


ONE_SLOT_FLAGS = ("--no-ui", "--test-hooks", "--max-num-seqs", "1", "--drain-timeout", "30")


@pytest.fixture(scope="module")
def one_slot():
    """A one-slot server (requests queue behind each other), started again if a test stopped it."""
    from tests.conftest import LiveServer

    servers: list[LiveServer] = []

    def get() -> LiveServer:
        if not servers or servers[-1].process.poll() is not None:
            servers.append(LiveServer(*ONE_SLOT_FLAGS))
        return servers[-1]

    yield get
    for live in servers:
        live.stop()


def test_oom_spares_queued_requests(one_slot):
    oom_spares_the_queue(one_slot())


def test_sigterm_drains_running_requests_and_exits_0(one_slot):
    drain_on_sigterm(one_slot())  # last: it stops the server


class ParkedEngine(Engine):
    """A scripted engine whose requests never produce anything; it records submits, starts and cancels."""

    info = ModelInfo(name="glm-4", source="scripted", quantization="none", dtype="float32", placement="none",
                     max_model_len=64)

    def __init__(self):
        self.submitted: list[str] = []
        self.started: list[str] = []
        self.cancelled: list[str] = []

    def submit(self, prompt, params, request_id):
        self.submitted.append(request_id)

        async def stream():
            self.started.append(request_id)
            await asyncio.Event().wait()
            yield Delta()

        return stream()

    def cancel(self, request_id: str) -> bool:
        self.cancelled.append(request_id)
        return True

    def stats(self) -> dict:
        return {}


async def test_client_gone_before_the_first_chunk_cancels_the_engine_request():
    """Starlette (ASGI 2.3) cancels a streaming response whose client already left before its body iterator
    ever ran, so the iterator's `finally` cannot free the engine request: the response itself must."""
    from starlette.requests import Request

    from glm4.api.protocol import ChatCompletionRequest
    from glm4.server import create_app
    from glm4.settings import Settings

    engine = ParkedEngine()
    app = create_app(Settings(model="tiny", no_ui=True), engine)
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "method": "POST",
             "path": "/v1/chat/completions", "headers": [], "query_string": b""}
    for n in (1, 3):
        engine.submitted.clear(), engine.cancelled.clear()
        body = ChatCompletionRequest.model_validate({"messages": HELLO, "stream": True, "n": n})
        response = await app.state.chat_completions.create(body, Request(scope), "glm-4")
        sent = []

        async def gone():
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        await asyncio.wait_for(response(scope, gone, send), 10)
        assert len(engine.submitted) == n and sorted(engine.cancelled) == sorted(engine.submitted)
