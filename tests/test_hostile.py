"""Hand-written hostile requests: each gets an answer (4xx in the OpenAI envelope, or a normal 200), never a 5xx,
and the server stays healthy.

Complements the generated cases of tests/test_fuzz.py with inputs a schema-driven fuzzer does not write:
broken JSON, bytes that are not UTF-8, NaN, huge and deep documents, lone surrogates, wrong methods.
`hostile_cases()` is also run by bench/reliability_report.py, which counts them for docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field

import httpx
import pytest

HELLO = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"
ENVELOPE_KEYS = {"message", "type", "param", "code"}


@dataclass
class Hostile:
    """One hostile request and what must come back."""

    id: str
    body: bytes | None = None  # raw bytes as sent; None = no body
    method: str = "POST"
    path: str = CHAT
    headers: dict[str, str | bytes] = field(default_factory=lambda: {"content-type": "application/json"})
    expect: tuple[int, ...] = (400,)  # acceptable status codes
    code: str | None = None  # the envelope's error code, when it must be a particular one


def raw(text: str) -> bytes:
    """JSON text written by hand (NaN, lone surrogate escapes, ...) as UTF-8 bytes."""
    return text.encode("utf-8")


def chat(max_tokens: int | None = 4, **fields) -> bytes:
    body = {"messages": HELLO, **({"max_tokens": max_tokens} if max_tokens is not None else {}), **fields}
    return json.dumps(body).encode()


def nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


def nested_tool_parameters(depth: int) -> bytes:
    """A tool whose JSON-schema parameters nest `depth` objects deep (written as text: json.dumps would recurse)."""
    schema = '{"type": "object", "properties": {"x": ' * depth + '{"type": "object"}' + "}}" * depth
    return raw('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "tools": [{"type": "function", '
               '"function": {"name": "f", "parameters": ' + schema + "}}]}")


# Values of the wrong JSON type for each request field (each is sent alone; all must be 400).
WRONG_TYPES: dict[str, list] = {
    "messages": ["hi", 1, None, {"role": "user", "content": "hi"}, [1], ["hi"], [None], [[]]],
    "model": [1, True, ["glm-4"], {"id": "glm-4"}],
    "temperature": ["0.7", True, [0.7], {"v": 1}],
    "top_p": ["1", False],
    "max_tokens": ["4", 4.5, True, [4]],  # 4.0 is an integer for JSON Schema (and accepted)
    "max_completion_tokens": ["4", 2.5, False],
    "n": ["1", 1.5, True],
    "stream": ["true", 1, 0, "yes", [True]],
    "stop": [1, [1], [None], {"s": "x"}, True],
    "seed": ["1", 1.5, True],
    "presence_penalty": ["0"],
    "frequency_penalty": [[0]],
    "stream_options": ["x", [], 1],
    "tools": ["x", [1], {"type": "function"}, [{"type": "function"}], [{"type": "function", "function": "f"}]],
    "tool_choice": [5, ["auto"], {"type": "function"}, "sometimes"],
    "response_format": ["json", {"type": 1}, {"type": "xml"}],
    "top_k": ["5", 1.5],
    "repetition_penalty": ["1.1", True],
    "stream_format": ["ndjson", 1],
    "user": [1, ["me"]],
    "logprobs": ["yes", 1],
    "logit_bias": [[1], "x"],
}
MESSAGE_WRONG_TYPES = [
    {"role": 1, "content": "hi"}, {"role": "user", "content": 5}, {"role": "user", "content": {"text": "hi"}},
    {"role": "user", "content": [{"type": "text"}]}, {"role": "user", "content": [{"type": "text", "text": 1}]},
    {"role": "user", "content": ["hi"]}, {"role": "user"}, {"content": "hi"}, {"role": "user", "content": None},
    {"role": "assistant", "content": None}, {"role": "assistant", "content": None, "tool_calls": "x"},
    {"role": "user", "content": "hi", "name": 5}, {"role": "tool", "content": "x", "tool_call_id": 5},
]


def hostile_cases() -> list[Hostile]:
    cases = [
        # ---- not JSON, or not the JSON we need ----
        Hostile("malformed-json", raw("{not json")),
        Hostile("truncated-json", raw('{"messages": [{"role": "user", "content": "hi"')),
        Hostile("empty-body", b""),
        Hostile("no-body-at-all", None, headers={}),
        Hostile("json-null", raw("null")),
        Hostile("json-array", raw("[]")),
        Hostile("json-string", raw('"hello"')),
        Hostile("json-number", raw("42")),
        Hostile("trailing-garbage", raw('{"messages": []} xyz')),
        Hostile("non-utf8-bytes", b"\xff\xfe\x00\x80"),
        Hostile("latin1-encoded-json", '{"messages": [{"role": "user", "content": "café"}]}'.encode("latin-1")),
        Hostile("nul-bytes-body", b"\x00" * 64),
        Hostile("deeply-nested-array", raw(nested(100_000))),
        Hostile("deeply-nested-in-messages", raw('{"messages": ' + nested(50_000) + "}")),
        Hostile("nested-tool-parameters-deep", nested_tool_parameters(5_000)),
        Hostile("nested-tool-parameters-300", nested_tool_parameters(300), code="context_length_exceeded"),
        Hostile("huge-integer-literal", raw('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": '
                                            + "9" * 5000 + "}")),
        # ---- numbers ----
        Hostile("nan-temperature", raw('{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}')),
        Hostile("infinity-top-p", raw('{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}')),
        Hostile("minus-infinity-penalty",
                raw('{"messages": [{"role": "user", "content": "hi"}], "presence_penalty": -Infinity}')),
        Hostile("nan-max-tokens", raw('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": NaN}')),
        Hostile("overflowing-float", raw('{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}')),
        Hostile("negative-temperature", chat(temperature=-1)),
        Hostile("negative-max-tokens", chat(max_tokens=-5)),
        Hostile("zero-max-completion-tokens", chat(max_completion_tokens=0)),
        Hostile("negative-n", chat(n=-1)),
        Hostile("n-too-large", chat(n=10_000)),
        Hostile("negative-top-k", chat(top_k=-1)),
        Hostile("seed-beyond-int64", chat(seed=2**70)),
        Hostile("negative-repetition-penalty", chat(repetition_penalty=-1.0)),
        Hostile("huge-max-tokens", chat(max_tokens=10**6), code="context_length_exceeded"),
        Hostile("huge-max-completion-tokens", chat(max_tokens=None, max_completion_tokens=2**62),
                code="context_length_exceeded"),
        # ---- message lists ----
        Hostile("empty-messages", json.dumps({"messages": []}).encode()),
        Hostile("50k-messages", json.dumps({"messages": [{"role": "user", "content": "hi"}] * 50_000,
                                            "max_tokens": 4}).encode(), code="context_length_exceeded"),
        Hostile("1mb-message", chat(messages=[{"role": "user", "content": "长" * 350_000}]),
                code="context_length_exceeded"),
        Hostile("five-stop-strings", chat(stop=["a", "b", "c", "d", "e"])),
        Hostile("empty-stop-string", chat(stop="")),
        Hostile("unknown-model-lone-surrogate", raw('{"messages": [{"role": "user", "content": "hi"}], '
                                                    '"model": "\\ud800"}'), expect=(404,), code="model_not_found"),
        Hostile("lone-surrogate-in-error-param", raw('{"messages": [{"role": "user", "content": "hi"}], '
                                                     '"logit_bias": {"\\udfff": "x"}}')),
        # ---- HTTP: methods, routes, content types ----
        Hostile("get-on-post-route", None, method="GET", headers={}, expect=(405,)),
        Hostile("put-on-post-route", chat(), method="PUT", expect=(405,)),
        Hostile("delete-models", None, method="DELETE", path="/v1/models", headers={}, expect=(405,)),
        Hostile("post-on-get-route", chat(), path="/v1/models", expect=(405,)),
        Hostile("unknown-v1-route", chat(), path="/v1/completions", expect=(404,)),
        Hostile("unknown-model-route", None, method="GET", path="/v1/models/no-such-model", headers={},
                expect=(404,), code="model_not_found"),
    ]
    for name, values in WRONG_TYPES.items():
        cases += [Hostile(f"wrong-type-{name}-{i}", chat(**{name: value})) for i, value in enumerate(values)]
    cases += [Hostile(f"wrong-message-{i}", chat(messages=[message])) for i, message in enumerate(MESSAGE_WRONG_TYPES)]
    return cases


# Valid requests with hostile content: answered normally (200), never a 5xx.
def accepted_cases() -> list[Hostile]:
    control = "".join(chr(c) for c in range(32)) + "\x7f\u2028\u2029\ufeff"
    return [
        Hostile("control-characters-in-content", chat(messages=[{"role": "user", "content": control}]),
                expect=(200,)),
        Hostile("nul-in-content-and-system", chat(messages=[{"role": "system", "content": "\x00"},
                                                            {"role": "user", "content": "a\x00b"}]), expect=(200,)),
        Hostile("lone-surrogates-in-content", raw('{"messages": [{"role": "user", "content": "\\ud800 x \\udfff"}],'
                                                  ' "max_tokens": 4}'), expect=(200,)),
        Hostile("lone-surrogate-stop", raw('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,'
                                           ' "stop": ["\\ud800"]}'), expect=(200,)),
        Hostile("special-tokens-in-content", chat(messages=[{"role": "user", "content": "<|user|><|assistant|>"
                                                             "[gMASK]<sop><|endoftext|>"}]), expect=(200,)),
        Hostile("missing-content-type", chat(), headers={}, expect=(200,)),
        Hostile("form-content-type", chat(), headers={"content-type": "application/x-www-form-urlencoded"},
                expect=(200,)),
        Hostile("utf8-bom", b"\xef\xbb\xbf" + chat(), expect=(200,)),
        Hostile("utf16-json", json.dumps({"messages": HELLO, "max_tokens": 2}).encode("utf-16"), expect=(200,)),
        Hostile("unknown-fields-and-nesting", chat(metadata={"a": [[[[{"b": None}]]]]}, x=[1] * 1000),
                expect=(200,)),
        Hostile("duplicate-keys", raw('{"messages": [], "messages": [{"role": "user", "content": "hi"}], '
                                      '"max_tokens": 2}'), expect=(200,)),
        Hostile("garbage-authorization", chat(), headers={"authorization": b"Bearer \xff" * 50}, expect=(200,)),
    ]


@dataclass
class Outcome:
    case: Hostile
    status: int
    problem: str | None  # None when the answer is what the case expects


def send(http: httpx.Client, base: str, case: Hostile) -> Outcome:
    response = http.request(case.method, base + case.path, content=case.body, headers=case.headers)
    return Outcome(case, response.status_code, check_answer(case, response))


def check_answer(case: Hostile, response: httpx.Response) -> str | None:
    if response.status_code >= 500:
        return f"{response.status_code}: {response.text[:300]}"
    if response.status_code not in case.expect:
        return f"status {response.status_code}, expected {case.expect}: {response.text[:300]}"
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            return f"not the OpenAI envelope: {response.text[:300]}"
        if set(error) != ENVELOPE_KEYS or not isinstance(error["message"], str) or not error["message"]:
            return f"bad envelope: {error}"
        if case.code and error["code"] != case.code:
            return f"code {error['code']!r}, expected {case.code!r}"
    elif case.path == CHAT:
        body = response.json()
        if body.get("object") != "chat.completion" or not body.get("choices"):
            return f"not a chat completion: {response.text[:300]}"
    return None


def oversized_body_outcomes(base: str, size: int = 10 * 2**20) -> list[tuple[str, int]]:
    """A 10 MB body with Content-Length, and the same streamed chunked (no length): both must be 413."""
    padding = b" " * (size - len(chat()))
    body = chat()[:-1] + padding + b"}"
    results = []
    with httpx.Client(timeout=60) as http:
        response = http.post(base + CHAT, content=body, headers={"content-type": "application/json"})
        results.append(("declared-length", response.status_code, response))

        def chunks():
            for start in range(0, len(body), 2**16):
                yield body[start:start + 2**16]

        response = http.post(base + CHAT, content=chunks(), headers={"content-type": "application/json"})
        results.append(("chunked", response.status_code, response))
    return results


def garbage_on_the_socket(host: str, port: int) -> list[bytes]:
    """Bytes that are not HTTP at all, and an absurd request line: the server answers or closes; never hangs."""
    answers = []
    for payload in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,  # a TLS ClientHello
                    b"GARBAGE /v1/chat/completions HTTP/9.9\r\n\r\n",
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
                    b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"):
        with socket.create_connection((host, port), timeout=10) as sock:
            try:
                sock.sendall(payload)
                answers.append(sock.recv(200))
            except (ConnectionResetError, BrokenPipeError):
                answers.append(b"<reset>")
            except TimeoutError:
                answers.append(b"<no answer in 10 s>")
    return answers


def assert_healthy(base: str) -> None:
    assert httpx.get(base + "/health", timeout=10).json() == {"status": "ok"}
    reply = httpx.post(base + CHAT, json={"messages": HELLO, "max_tokens": 3}, timeout=60)
    assert reply.status_code == 200, reply.text


@pytest.fixture(scope="module")
def http():
    with httpx.Client(timeout=60) as client:
        yield client


@pytest.mark.parametrize("case", hostile_cases(), ids=lambda case: case.id)
def test_hostile_request_is_refused_in_the_envelope(server, http, case):
    outcome = send(http, server.url, case)
    assert outcome.problem is None, outcome.problem


@pytest.mark.parametrize("case", accepted_cases(), ids=lambda case: case.id)
def test_hostile_content_is_answered(server, http, case):
    outcome = send(http, server.url, case)
    assert outcome.problem is None, outcome.problem


def test_10mb_body_is_413(server):
    for kind, status, response in oversized_body_outcomes(server.url):
        assert status == 413, (kind, response.text[:300])
        assert response.json()["error"]["code"] == "request_too_large", kind
    assert_healthy(server.url)


def test_garbage_bytes_on_the_socket_leave_the_server_healthy(server):
    for answer in garbage_on_the_socket("127.0.0.1", server.port):
        assert answer == b"" or answer == b"<reset>" or answer.startswith(b"HTTP/1.1 4"), answer[:100]
    assert_healthy(server.url)


def test_server_is_healthy_after_the_hostile_cases(server, http):
    for case in hostile_cases()[:10]:  # run again in one go, then a normal request must still work
        send(http, server.url, case)
    assert_healthy(server.url)
