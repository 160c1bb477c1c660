"""The /v1 contract through the real server and the official openai SDK (sync and async, stream and not)."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from glm4.prompt import render_prompt

HELLO = [{"role": "user", "content": "你好"}]
STORY = [{"role": "user", "content": "Tell me a long story about a robot."}]  # the tiny model is unsure here


def sse_events(response: httpx.Response) -> list:
    """Raw SSE payloads in order ('[DONE]' kept as a string)."""
    events = []
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        payload = line[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def stream_raw(server, **body) -> list:
    with httpx.stream("POST", server.base_url + "/chat/completions", json={"messages": HELLO, **body},
                      timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return sse_events(response)


def test_non_stream_shape_and_exact_usage(client, tiny):
    reply = client.chat.completions.create(model="glm-4", messages=HELLO, max_tokens=12, temperature=0)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.model == "glm-4"
    choice = reply.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    prompt_ids = tiny.tokenizer.encode(render_prompt(HELLO), add_special_tokens=False)
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert 1 <= reply.usage.completion_tokens <= 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    if choice.finish_reason == "length":
        assert reply.usage.completion_tokens == 12


def test_stream_chunk_rules(server):
    events = stream_raw(server, stream=True, max_tokens=16, temperature=0.9, seed=3)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    finishing = [c for c in chunks if c["choices"][0]["finish_reason"] is not None]
    assert len(finishing) == 1 and finishing[0] is chunks[-1]
    assert all("usage" not in c for c in chunks)  # only with stream_options.include_usage


def test_stream_include_usage(server, tiny):
    events = stream_raw(server, stream=True, max_tokens=10, temperature=0.9,
                        stream_options={"include_usage": True})
    chunks = events[:-1]
    assert all("usage" in c for c in chunks)
    assert all(c["usage"] is None for c in chunks[:-1])
    last = chunks[-1]
    assert last["choices"] == []
    assert last["usage"]["prompt_tokens"] == len(tiny.tokenizer.encode(render_prompt(HELLO),
                                                                        add_special_tokens=False))
    generated = sum(1 for c in chunks[:-1] if c["choices"] and c["choices"][0]["delta"].get("content"))
    assert last["usage"]["completion_tokens"] >= generated
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + last["usage"]["completion_tokens"]


def test_stream_equals_non_stream_at_temperature_zero(client):
    kwargs = dict(model="glm-4", messages=[{"role": "user", "content": "How do I use 4-bit?"}],
                  temperature=0, seed=7, max_tokens=40)
    whole = client.chat.completions.create(**kwargs)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in
                       client.chat.completions.create(stream=True, **kwargs) if chunk.choices)
    assert streamed == whole.choices[0].message.content


async def test_async_sdk_stream_and_non_stream(async_client):
    reply = await async_client.chat.completions.create(model="glm4", messages=HELLO, max_tokens=8, temperature=0)
    assert reply.choices[0].message.content is not None
    stream = await async_client.chat.completions.create(model="glm4", messages=HELLO, max_tokens=8,
                                                        temperature=0, stream=True)
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
    assert text == reply.choices[0].message.content


def test_forced_output_round_trips_chinese_and_emoji(client):
    text = "你好！我是 GLM-4 🙂👍🏽，代码：`print('hi')`"
    reply = client.chat.completions.create(model="glm-4", messages=HELLO, extra_body={"test_force_output": text})
    assert reply.choices[0].message.content == text
    assert reply.choices[0].finish_reason == "stop"


def test_stop_string_is_held_back(client):
    reply = client.chat.completions.create(model="glm-4", messages=HELLO, stop=["STOP", "never"],
                                           extra_body={"test_force_output": "one two STOP three"})
    assert reply.choices[0].message.content == "one two "
    assert reply.choices[0].finish_reason == "stop"


def test_n_choices_differ_and_follow_per_choice_seeds(client):
    """Choice i of a request with seed s is sampled with seed s + i (glm4/api/serving.py): the n choices differ
    under sampling, the same seed gives the same n replies, and choice i equals a lone request with seed s + i."""
    kwargs = dict(model="glm-4", messages=STORY, max_tokens=12, temperature=1, top_p=1)
    reply = client.chat.completions.create(n=3, seed=5, **kwargs)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    texts = [c.message.content for c in reply.choices]
    assert len(set(texts)) > 1, texts  # sampled independently, not one reply copied n times
    again = client.chat.completions.create(n=3, seed=5, **kwargs)
    assert [c.message.content for c in again.choices] == texts
    alone_tokens = 0
    for index, text in enumerate(texts):
        alone = client.chat.completions.create(seed=5 + index, **kwargs)
        assert alone.choices[0].message.content == text, index
        alone_tokens += alone.usage.completion_tokens
    assert reply.usage.completion_tokens == alone_tokens  # usage counts every choice
    streamed = client.chat.completions.create(model="glm-4", messages=HELLO, n=2, max_tokens=6, stream=True)
    finishes = {}
    for chunk in streamed:
        for choice in chunk.choices:
            if choice.finish_reason:
                assert choice.index not in finishes
                finishes[choice.index] = choice.finish_reason
    assert sorted(finishes) == [0, 1]


def reply_text(client, **kwargs) -> str:
    return client.chat.completions.create(model="glm-4", **kwargs).choices[0].message.content


def test_unset_sampling_parameters_take_the_checkpoint_generation_defaults(client, tiny):
    assert tiny.info.generation_defaults == {"temperature": 0.8, "top_p": 0.8}  # its generation_config.json
    differs = 0
    for seed in range(4):
        unset = reply_text(client, messages=STORY, max_tokens=12, seed=seed)
        assert unset == reply_text(client, messages=STORY, max_tokens=12, seed=seed, temperature=0.8, top_p=0.8)
        differs += unset != reply_text(client, messages=STORY, max_tokens=12, seed=seed, temperature=1.0, top_p=1.0)
    assert differs >= 2  # 1.0 / 1.0 is another distribution: the defaults were not 1.0 / 1.0


def test_top_k_1_samples_the_greedy_reply(client):
    greedy = reply_text(client, messages=STORY, max_tokens=16, temperature=0)
    for seed in range(3):
        assert reply_text(client, messages=STORY, max_tokens=16, temperature=1, top_p=1, seed=seed,
                          extra_body={"top_k": 1}) == greedy
    assert any(reply_text(client, messages=STORY, max_tokens=16, temperature=1, top_p=1, seed=seed,
                          extra_body={"top_k": 2}) != greedy for seed in range(4))


@pytest.mark.parametrize("penalty", [{"presence_penalty": 2.0}, {"frequency_penalty": 2.0},
                                     {"extra_body": {"repetition_penalty": 1.5}}],
                         ids=["presence", "frequency", "repetition"])
def test_penalties_change_a_greedy_reply_that_repeats_itself(client, penalty):
    """60 greedy tokens past the end of the reply (ignore_eos) repeat tokens: a penalty must steer away."""
    kwargs = dict(messages=STORY, max_tokens=60, temperature=0)
    plain = reply_text(client, **kwargs, extra_body={"ignore_eos": True})
    extra = {"ignore_eos": True, **penalty.get("extra_body", {})}
    openai_penalty = {k: v for k, v in penalty.items() if k != "extra_body"}
    penalized = reply_text(client, **kwargs, **openai_penalty, extra_body=extra)
    assert penalized != plain
    neutral = {k: 0.0 for k in openai_penalty}
    neutral_extra = {"ignore_eos": True, **({"repetition_penalty": 1.0} if "extra_body" in penalty else {})}
    assert reply_text(client, **kwargs, **neutral, extra_body=neutral_extra) == plain  # 0 / 1.0 = off


def test_max_completion_tokens_limits_the_reply_and_wins_over_max_tokens(client):
    long_text = {"test_force_output": "one two three four five six seven eight nine ten eleven twelve"}
    for limits in ({"max_completion_tokens": 4}, {"max_completion_tokens": 4, "max_tokens": 9}):
        reply = client.chat.completions.create(model="glm-4", messages=HELLO, extra_body=long_text, **limits)
        assert (reply.usage.completion_tokens, reply.choices[0].finish_reason) == (4, "length"), limits
    reply = client.chat.completions.create(model="glm-4", messages=HELLO, max_tokens=9, extra_body=long_text)
    assert (reply.usage.completion_tokens, reply.choices[0].finish_reason) == (9, "length")
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="glm-4", messages=HELLO, max_completion_tokens=10**6)
    assert caught.value.code == "context_length_exceeded"


def test_content_parts_developer_role_and_unknown_fields(server, tiny):
    body = {"model": "glm-4", "max_tokens": 4, "some_future_field": {"x": 1},
            "messages": [{"role": "developer", "content": "Answer in English."},
                         {"role": "user", "content": [{"type": "text", "text": "What is "},
                                                      {"type": "text", "text": "GLM-4?"}]}]}
    reply = httpx.post(server.base_url + "/chat/completions", json=body, timeout=60)
    assert reply.status_code == 200
    expected = "[gMASK]<sop><|system|>\nAnswer in English.<|user|>\nWhat is GLM-4?<|assistant|>"
    assert reply.json()["usage"]["prompt_tokens"] == len(tiny.tokenizer.encode(expected, add_special_tokens=False))


@pytest.mark.parametrize("bad", [
    pytest.param({"temperature": 3}, id="temperature-too-high"),
    pytest.param({"top_p": 0}, id="top-p-zero"),
    pytest.param({"max_tokens": 0}, id="max-tokens-zero"),
    pytest.param({"stop": ["a", "b", "c", "d", "e"]}, id="five-stops"),
    pytest.param({"stream_options": {"include_usage": True}}, id="stream-options-without-stream"),
    pytest.param({"logprobs": True, "top_logprobs": 21}, id="top-logprobs-over-20"),
    pytest.param({"top_logprobs": 2}, id="top-logprobs-without-logprobs"),
    pytest.param({"response_format": {"type": "json_schema"}}, id="json-schema-without-schema"),
    pytest.param({"response_format": {"type": "xml"}}, id="unknown-response-format"),
    pytest.param({"n": 0}, id="n-zero"),
    pytest.param({"tool_choice": "required"}, id="tool-choice-without-tools"),
    pytest.param({"messages": []}, id="no-messages"),
    pytest.param({"messages": [{"role": "wizard", "content": "hi"}]}, id="unknown-role"),
    pytest.param({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
                 id="image-part"),
])
def test_bad_input_is_bad_request(client, bad):
    kwargs = {"model": "glm-4", "messages": HELLO, "max_tokens": 4, **bad}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**kwargs)
    error = caught.value.body
    assert error["type"] == "invalid_request_error" and error["message"]


def test_context_length_exceeded(client, server):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="glm-4", messages=HELLO, max_tokens=10**6)
    assert caught.value.code == "context_length_exceeded"
    assert "32768" in caught.value.body["message"]  # --max-model-len auto: the tiny checkpoint's 32k positions


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-5", messages=HELLO)
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-5")


def test_models_list_and_aliases(client):
    ids = [model.id for model in client.models.list()]
    assert ids[0] == "glm-4" and "glm4" in ids
    assert client.models.retrieve("glm4").id == "glm4"
    card = client.models.retrieve("glm-4")
    assert card.object == "model" and card.created > 0


def test_malformed_json_and_validation_errors_use_the_envelope(server):
    for body in (b"{not json", b"\xff\xfe\x00", b"[]", b'{"messages": "hi"}'):
        response = httpx.post(server.base_url + "/chat/completions", content=body,
                              headers={"content-type": "application/json"})
        assert response.status_code == 400, body
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"


def test_unknown_route_is_enveloped_404(server):
    response = httpx.get(server.base_url + "/nothing-here")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


CHAT_200 = 'route="/v1/chat/completions",status="200"'
CHAT_400 = 'route="/v1/chat/completions",status="400"'


def metric_or_zero(server, name: str, labels: str = "") -> float:
    """A sample that does not exist yet (a label combination never seen) counts as 0."""
    try:
        return server.metric(name, labels)
    except KeyError:
        return 0.0


def wait_for_metric(server, name: str, labels: str, expected: float, timeout: float = 10.0) -> None:
    """The HTTP counter is bumped once the response has gone out, so it may trail the client by a moment."""
    deadline = time.monotonic() + timeout
    while metric_or_zero(server, name, labels) != expected and time.monotonic() < deadline:
        time.sleep(0.02)
    assert metric_or_zero(server, name, labels) == expected, name


def test_health_and_metrics_count_what_happened(server, client):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    wait_for_metric(server, "glm4_requests_running", "", 0)  # idle before (the server is shared by the session)
    names = ("glm4_prompt_tokens_total", "glm4_generation_tokens_total", "glm4_time_to_first_token_seconds_count",
             "glm4_time_per_output_token_seconds_count", "glm4_engine_requests_submitted_total")
    before = {name: metric_or_zero(server, name) for name in names}
    before_200, before_400 = metric_or_zero(server, "glm4_http_requests_total", CHAT_200), \
        metric_or_zero(server, "glm4_http_requests_total", CHAT_400)
    before_length = metric_or_zero(server, "glm4_requests_finished_total", 'reason="length"')
    reply = client.chat.completions.create(model="glm-4", messages=HELLO, max_tokens=5, temperature=0,
                                           extra_body={"test_force_output": "one two three four five six"})
    assert reply.usage.completion_tokens == 5 and reply.choices[0].finish_reason == "length"
    wait_for_metric(server, "glm4_http_requests_total", CHAT_200, before_200 + 1)
    after = {name: metric_or_zero(server, name) for name in names}
    assert after["glm4_prompt_tokens_total"] - before["glm4_prompt_tokens_total"] == reply.usage.prompt_tokens
    assert after["glm4_generation_tokens_total"] - before["glm4_generation_tokens_total"] == 5
    assert after["glm4_time_to_first_token_seconds_count"] - before["glm4_time_to_first_token_seconds_count"] == 1
    assert after["glm4_time_per_output_token_seconds_count"] - before["glm4_time_per_output_token_seconds_count"] == 1
    assert after["glm4_engine_requests_submitted_total"] - before["glm4_engine_requests_submitted_total"] == 1
    assert metric_or_zero(server, "glm4_requests_finished_total", 'reason="length"') == before_length + 1
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="glm-4", messages=HELLO, temperature=3)
    wait_for_metric(server, "glm4_http_requests_total", CHAT_400, before_400 + 1)
    assert metric_or_zero(server, "glm4_engine_requests_submitted_total") == \
        after["glm4_engine_requests_submitted_total"]  # refused before the engine

    # The gauges follow a request that is running, and come back to 0 when it is gone.
    before_cancelled = metric_or_zero(server, "glm4_requests_cancelled_total")
    body = {"messages": HELLO, "stream": True, "max_tokens": 4000, "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", server.base_url + "/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()  # kept: a discarded iterator can leave httpx's socket open after the block
        next(lines)
        assert server.metric("glm4_requests_running") == 1 and server.metric("glm4_batch_size") == 1
        assert server.metric("glm4_requests_waiting") == 0
    for gauge in ("glm4_requests_running", "glm4_batch_size", "glm4_requests_waiting"):
        wait_for_metric(server, gauge, "", 0)
    wait_for_metric(server, "glm4_requests_cancelled_total", "", before_cancelled + 1)


def test_api_key_auth(start_server):
    live = start_server("--no-ui", "--api-key", "sk-one", "--api-key", "sk-two")
    for key in ("sk-one", "sk-two"):
        with openai.OpenAI(base_url=live.base_url, api_key=key, max_retries=0) as sdk:
            assert sdk.models.list().data
    for key in ("wrong", "sk-one-but-longer"):
        with openai.OpenAI(base_url=live.base_url, api_key=key, max_retries=0) as sdk:
            with pytest.raises(openai.AuthenticationError) as caught:
                sdk.chat.completions.create(model="glm-4", messages=HELLO)
            assert caught.value.body["type"] == "authentication_error"
    assert httpx.get(live.base_url + "/models").status_code == 401
    assert httpx.get(live.url + "/health").status_code == 200  # health stays open
    assert "sk-one" not in live.log() and "sk-two" not in live.log()


def test_legacy_stream_format(start_server):
    live = start_server("--no-ui", "--test-hooks", "--legacy-stream")
    body = {"messages": HELLO, "stream": True, "test_force_output": "你好呀"}
    with httpx.stream("POST", live.base_url + "/chat/completions", json=body, timeout=60) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == '["DONE"]'
    records = [json.loads(line) for line in lines[:-1]]
    assert len({r["id"] for r in records}) == 1 and records[0]["id"].startswith("chatcmpl-")
    deltas = [r["choices"][0]["delta"] for r in records]
    assert [d["finished"] for d in deltas] == [False] * (len(deltas) - 1) + [True]
    assert "".join(d["content"] for d in deltas) == "你好呀"
    assert deltas[-1]["response"] == "你好呀"
    so_far = ""
    for delta in deltas[:-1]:
        so_far += delta["content"]
        assert delta["response"] == so_far
    assert lines[0].startswith('{"id": "chatcmpl-') and '"finished": false}' in lines[0]
    # the flag changes the default; a client can still ask for the OpenAI format
    events = stream_raw(live, stream=True, stream_format="openai", max_tokens=3)
    assert events[-1] == "[DONE]"


def test_legacy_format_per_request(server):
    body = {"messages": HELLO, "stream": True, "stream_format": "legacy", "test_force_output": "ok"}
    with httpx.stream("POST", server.base_url + "/chat/completions", json=body, timeout=60) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == '["DONE"]' and json.loads(lines[-2])["choices"][0]["delta"]["finished"] is True


def test_cors_is_off_unless_configured(server, start_server):
    preflight = {"Origin": "http://example.test", "Access-Control-Request-Method": "POST"}
    response = httpx.options(server.base_url + "/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in response.headers
    live = start_server("--no-ui", "--cors-origins", "http://example.test")
    response = httpx.options(live.base_url + "/chat/completions", headers=preflight)
    assert response.headers["access-control-allow-origin"] == "http://example.test"


def test_error_after_stream_started_is_in_band(server):
    events = stream_raw(server, stream=True, test_fault="error", max_tokens=50, temperature=1)
    assert events[-1] == "[DONE]"
    assert "error" in events[-2] and events[-2]["error"]["message"]
    follow_up = httpx.post(server.base_url + "/chat/completions", json={"messages": HELLO, "max_tokens": 3})
    assert follow_up.status_code == 200


def test_test_hooks_are_refused_without_the_flag(start_server):
    live = start_server("--no-ui")
    response = httpx.post(live.base_url + "/chat/completions",
                          json={"messages": HELLO, "test_force_output": "x"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "test_force_output"


def test_root_path_serves_the_prefix_with_or_without_a_stripping_proxy(start_server):
    """--root-path /glm. uvicorn alone expects a proxy that strips the prefix (/glm/v1/models arrives as
    /v1/models); the server also answers paths that still carry it (a proxy that passes the path on, or no
    proxy), so the SDK works at .../glm/v1 either way. URLs the server generates carry the prefix."""
    live = start_server("--root-path", "/glm")  # with the UI, whose asset URLs must carry the prefix too
    for base_url in (live.url + "/glm/v1", live.base_url):  # as sent by the client / as a stripping proxy forwards
        with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0) as sdk:
            assert sdk.models.list().data[0].id == "glm-4"
            reply = sdk.chat.completions.create(model="glm-4", messages=HELLO, max_tokens=3, temperature=0)
            streamed = "".join(chunk.choices[0].delta.content or "" for chunk in sdk.chat.completions.create(
                model="glm-4", messages=HELLO, max_tokens=3, temperature=0, stream=True) if chunk.choices)
            assert streamed == reply.choices[0].message.content
    assert httpx.get(live.url + "/glm/health").json() == {"status": "ok"}
    assert httpx.get(live.url + "/glm/openapi.json").json()["servers"] == [{"url": "/glm"}]
    assert httpx.get(live.url + "/glm/").status_code == 200
    assert httpx.get(live.url + "/glm/config").json()["root"].endswith("/glm")
