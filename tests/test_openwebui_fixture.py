"""Open WebUI 0.12.4's two default requests, replayed through the official openai SDK against a server started
with DEFAULT flags (the tiny model on CPU): both must be answered, not refused.

tests/data/openwebui-0.12.4-requests.json was captured from Open WebUI with its default settings, one message
typed in its UI: a streamed chat request carrying its 36 built-in tool schemas (~13k tiny-tokenizer tokens),
and the non-streamed title request it sends afterwards. A server whose default context is too small for the
first answers 400 context_length_exceeded, which is what Open WebUI users saw.
"""

from __future__ import annotations

import json

import pytest
from openai import OpenAI

from tests.conftest import ROOT

FIXTURE = ROOT / "tests" / "data" / "openwebui-0.12.4-requests.json"


@pytest.fixture(scope="module")
def requests():
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


@pytest.fixture
def default_server(start_server):
    return start_server()  # conftest adds only --model tiny, --host and --port: everything else is the default


def test_the_fixture_is_open_webuis_default_shape(requests):
    chat = requests["chat_request"]
    assert chat["stream"] is True and len(chat["tools"]) == 36
    assert requests["title_request"]["stream"] is False


@pytest.mark.timeout(600)
def test_open_webui_requests_are_answered_with_default_flags(default_server, requests):
    with OpenAI(base_url=default_server.base_url, api_key="unused", max_retries=0, timeout=300) as client:
        # 1. the chat message: streamed, 36 tools in front of it; the raw SSE must end with [DONE]
        with client.chat.completions.with_streaming_response.create(**requests["chat_request"]) as response:
            assert response.status_code == 200
            events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(event) for event in events[:-1]]
        assert not any("error" in chunk for chunk in chunks), chunks[-1]
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")]
        assert finishes[-1] in ("stop", "length", "tool_calls")
        replied = "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks if c.get("choices"))
        called = any(c["choices"][0]["delta"].get("tool_calls") for c in chunks if c.get("choices"))
        assert replied.strip() or called

        # 2. the title request Open WebUI sends once the reply is in: non-streamed
        title = client.chat.completions.create(**requests["title_request"])
        assert title.choices[0].finish_reason in ("stop", "length")
        assert title.choices[0].message.content
        assert title.usage.prompt_tokens > 0
