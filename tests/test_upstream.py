"""--backend upstream: this app in front of another OpenAI-compatible engine (here: a second instance)."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.conftest import free_port

HELLO = [{"role": "user", "content": "你好"}]


@pytest.fixture(scope="module")
def upstream():
    from tests.conftest import LiveServer

    live = LiveServer("--no-ui", "--served-model-name", "glm-4-upstream")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def front(upstream):
    from tests.conftest import LiveServer

    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens here: requests must fail over
    live = LiveServer("--no-ui", "--backend", "upstream", "--upstream-url", dead, "--upstream-url",
                      upstream.base_url)
    yield live
    live.stop()


def sdk(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.base_url, api_key="unused", max_retries=0)


def test_non_stream_and_stream_match_the_upstream(front, upstream):
    kwargs = dict(messages=[{"role": "user", "content": "How do I use 4-bit?"}], temperature=0, max_tokens=24)
    direct = sdk(upstream).chat.completions.create(model="glm-4-upstream", **kwargs)
    proxied = sdk(front).chat.completions.create(model="glm-4", **kwargs)
    assert proxied.choices[0].message.content == direct.choices[0].message.content
    assert proxied.choices[0].finish_reason == direct.choices[0].finish_reason
    assert proxied.usage.prompt_tokens == direct.usage.prompt_tokens
    assert proxied.usage.completion_tokens == direct.usage.completion_tokens
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       sdk(front).chat.completions.create(model="glm-4", stream=True, **kwargs) if c.choices)
    assert streamed == direct.choices[0].message.content


def test_a_dead_upstream_is_marked_unhealthy(front):
    sdk(front).chat.completions.create(model="glm-4", messages=HELLO, max_tokens=2)
    health = {line.split('"')[1]: line.rsplit(" ", 1)[1] for line in httpx.get(front.url + "/metrics").text.splitlines()
              if line.startswith("glm4_upstream_healthy{")}
    assert sorted(health.values()) == ["0.0", "1.0"]


def test_failover_when_an_upstream_dies(start_server, upstream):
    doomed = start_server("--no-ui")
    live = start_server("--no-ui", "--backend", "upstream", "--upstream-url", doomed.base_url,
                        "--upstream-url", upstream.base_url)
    doomed.stop()  # still marked healthy until the next health check: the front must fail over
    reply = sdk(live).chat.completions.create(model="glm-4", messages=HELLO, max_tokens=3)
    assert reply.choices[0].message.content is not None
    assert live.metric("glm4_upstream_requests_total", f'outcome="connect_errors",upstream="{doomed.base_url}"') == 1


def test_models_reflect_the_upstream(front):
    ids = [model.id for model in sdk(front).models.list()]
    assert "glm-4" in ids and "glm-4-upstream" in ids


def test_upstream_4xx_stays_4xx(front):
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(front).chat.completions.create(model="glm-4", messages=HELLO, max_tokens=10**6)
    assert caught.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):  # validated by the front itself
        sdk(front).chat.completions.create(model="glm-4", messages=HELLO, temperature=7)


def test_cancel_closes_the_upstream_request(front, upstream):
    before = upstream.metric("glm4_requests_cancelled_total")
    body = {"messages": HELLO, "stream": True, "max_tokens": 4000, "ignore_eos": True}
    with httpx.stream("POST", front.base_url + "/chat/completions", json=body, timeout=60) as response:
        for index, _ in enumerate(response.iter_lines()):
            if index > 3:
                break
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and upstream.metric("glm4_requests_cancelled_total") <= before:
        time.sleep(0.2)
    assert upstream.metric("glm4_requests_cancelled_total") > before
    assert upstream.metric("glm4_requests_running") == 0


def test_legacy_format_through_the_front(front):
    body = {"messages": HELLO, "stream": True, "stream_format": "legacy", "max_tokens": 8, "temperature": 0}
    with httpx.stream("POST", front.base_url + "/chat/completions", json=body, timeout=60) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == '["DONE"]'
    records = [json.loads(line) for line in lines[:-1]]
    assert records[-1]["choices"][0]["delta"]["finished"] is True
    assert records[-1]["choices"][0]["delta"]["response"] == "".join(
        r["choices"][0]["delta"]["content"] for r in records)


def test_all_upstreams_down_is_503_with_retry_after(start_server):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    live = start_server("--no-ui", "--backend", "upstream", "--upstream-url", dead)
    response = httpx.post(live.base_url + "/chat/completions", json={"messages": HELLO}, timeout=30)
    assert response.status_code == 503
    assert "Retry-After" in response.headers
    assert response.json()["error"]["type"] == "service_unavailable"
    with pytest.raises(openai.InternalServerError):
        sdk(live).chat.completions.create(model="glm-4", messages=HELLO)
