"""Ollama's /api through the live server (tiny GLM-4 + tiny embedder) with the official `ollama` Python client,
plus raw HTTP for what the client hides (NDJSON lines, status codes, hostile bodies)."""

from __future__ import annotations

import json

import httpx
import jsonschema
import ollama
import pytest

from tests.conftest import LiveServer

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def live():
    server = LiveServer("--no-ui", "--test-hooks", "--embedding-model", "tiny")
    yield server
    server.stop()


@pytest.fixture
def sdk(live):
    return ollama.Client(host=live.url)


@pytest.fixture(scope="module")
def embedder_name(live):
    return next(m.model for m in ollama.Client(host=live.url).list().models if not m.model.startswith("glm-4"))


def lines(response: httpx.Response) -> list[dict]:
    return [json.loads(line) for line in response.text.splitlines() if line]


# ---------- listing and describing ----------

def test_version_answers_as_an_ollama_server(live):
    response = httpx.get(live.url + "/api/version")
    assert response.status_code == 200
    major, minor, _ = response.json()["version"].split(".")
    assert (int(major), int(minor)) >= (0, 6)


def test_list_shows_the_chat_and_embedding_models_with_latest_tags(sdk, embedder_name):
    models = {m.model: m for m in sdk.list().models}
    assert set(models) == {"glm-4:latest", embedder_name}
    assert embedder_name.endswith(":latest")
    assert models["glm-4:latest"].details.family == "glm4"
    assert len(models["glm-4:latest"].digest) == 64


def test_ps_reports_the_loaded_model_and_its_context(sdk):
    (running,) = sdk.ps().models
    assert running.model == "glm-4:latest"
    assert running.context_length >= 8192 and running.details.family == "glm4"


def test_show_gives_details_and_capabilities(sdk, embedder_name):
    shown = sdk.show("glm-4")
    assert shown.capabilities == ["completion", "tools"]  # the tiny model is not a reasoning model
    assert shown.details.family == "glm4"
    assert shown.modelinfo["glm4.context_length"] == sdk.ps().models[0].context_length
    assert sdk.show(embedder_name).capabilities == ["embedding"]


@pytest.mark.parametrize("name", ["glm-4", "glm-4:latest"])
def test_model_names_as_ollama_clients_send_them_resolve(sdk, name):
    assert sdk.chat(model=name, messages=HI, options={"num_predict": 2}).done


@pytest.mark.parametrize("call", ["chat", "generate", "show"])
def test_an_unknown_model_is_a_404_in_ollama_shape(sdk, live, call):
    with pytest.raises(ollama.ResponseError) as caught:
        if call == "chat":
            sdk.chat(model="llama3", messages=HI)
        elif call == "generate":
            sdk.generate(model="llama3", prompt="hi")
        else:
            sdk.show("llama3")
    assert caught.value.status_code == 404
    assert caught.value.error == "model 'llama3' not found"
    raw = httpx.post(live.url + "/api/chat", json={"model": "llama3", "messages": HI})
    assert raw.status_code == 404 and raw.json() == {"error": "model 'llama3' not found"}


# ---------- chat ----------

def test_chat_streams_ndjson_by_default_and_ends_with_counts_and_timings(live):
    response = httpx.post(live.url + "/api/chat", json={"model": "glm-4", "messages": HI,
                                                        "options": {"num_predict": 6, "temperature": 0}})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-ndjson")
    parts = lines(response)
    assert len(parts) >= 3 and all(not p["done"] for p in parts[:-1])
    final = parts[-1]
    assert final["done"] and final["done_reason"] == "length" and final["eval_count"] == 6
    assert final["prompt_eval_count"] > 0
    for key in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(final[key], int) and final[key] >= 0
    assert final["total_duration"] >= final["prompt_eval_duration"] + final["eval_duration"] - 1_000_000
    assert final["total_duration"] < 60 * 10**9  # nanoseconds, not seconds or microseconds of something else
    assert all(p["message"]["role"] == "assistant" for p in parts)


def test_chat_stream_and_not_give_the_same_greedy_reply(sdk):
    options = {"num_predict": 12, "temperature": 0}
    whole = sdk.chat(model="glm-4", messages=HI, options=options)
    streamed = list(sdk.chat(model="glm-4", messages=HI, options=options, stream=True))
    assert whole.message.content and whole.done and whole.eval_count == streamed[-1].eval_count
    assert "".join(part.message.content for part in streamed) == whole.message.content
    assert streamed[-1].done and not any(part.done for part in streamed[:-1])


def test_options_map_onto_sampling(sdk):
    seeded = [sdk.chat(model="glm-4", messages=HI, options={"seed": 7, "temperature": 1.5, "top_k": 50,
                                                             "top_p": 0.9, "num_predict": 10}).message.content
              for _ in range(2)]
    assert seeded[0] == seeded[1]
    reply = sdk.chat(model="glm-4", messages=HI, options={"temperature": 0, "num_predict": 30})
    cut = reply.message.content.split()[1]
    stopped = sdk.chat(model="glm-4", messages=HI, options={"temperature": 0, "num_predict": 30, "stop": [cut]})
    assert cut not in stopped.message.content and stopped.done_reason == "stop"
    assert reply.message.content.startswith(stopped.message.content)


def test_chat_with_a_tool_call_gives_argument_objects(sdk):
    response = sdk.chat(model="glm-4", messages=[{"role": "user", "content": "Weather in Paris?"}],
                        tools=[WEATHER_TOOL],
                        options={"test_force_output": 'get_weather\n{"city": "Paris", "days": 2}'})
    (call,) = response.message.tool_calls
    assert call.function.name == "get_weather"
    assert call.function.arguments == {"city": "Paris", "days": 2}  # an object, not a JSON string
    assert response.message.content == "" and response.done_reason == "stop"


def test_streamed_tool_call_and_the_tool_result_turn(sdk):
    parts = list(sdk.chat(model="glm-4", messages=[{"role": "user", "content": "Weather in Paris?"}],
                          tools=[WEATHER_TOOL], stream=True,
                          options={"test_force_output": 'get_weather\n{"city": "Paris"}'}))
    calls = [call for part in parts for call in (part.message.tool_calls or [])]
    assert [(c.function.name, c.function.arguments) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert parts[-1].done
    follow_up = sdk.chat(model="glm-4", tools=[WEATHER_TOOL], options={"num_predict": 8}, messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                          "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_name": "get_weather", "content": "18 °C, sunny"}])
    assert follow_up.done and follow_up.prompt_eval_count > parts[-1].prompt_eval_count


def test_format_json_and_a_schema_constrain_the_reply(sdk):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
              "required": ["city"], "additionalProperties": False}
    for seed in range(3):
        reply = sdk.chat(model="glm-4", messages=HI, format=schema, options={"seed": seed, "num_predict": 60})
        if reply.done_reason == "stop":
            jsonschema.validate(json.loads(reply.message.content), schema)
        assert reply.message.content.startswith('{"city"')
    reply = sdk.chat(model="glm-4", messages=HI, format="json", options={"seed": 1, "num_predict": 40})
    assert reply.message.content.lstrip().startswith("{")


def test_think_on_a_model_without_reasoning_is_a_clear_400(sdk):
    with pytest.raises(ollama.ResponseError) as caught:
        sdk.chat(model="glm-4", messages=HI, think=True)
    assert caught.value.status_code == 400 and "does not support thinking" in caught.value.error
    assert sdk.chat(model="glm-4", messages=HI, think=False, options={"num_predict": 2}).message.thinking is None


def test_an_empty_chat_loads_the_model(live):
    response = httpx.post(live.url + "/api/chat", json={"model": "glm-4", "messages": []})
    assert response.status_code == 200
    assert response.json()["done"] and response.json()["done_reason"] == "load"


def test_a_fault_mid_stream_ends_the_stream_with_an_error_line(live):
    response = httpx.post(live.url + "/api/chat", json={"model": "glm-4", "messages": HI,
                                                        "options": {"test_fault": "error", "num_predict": 8}})
    parts = lines(response)
    assert "error" in parts[-1] and isinstance(parts[-1]["error"], str)
    whole = httpx.post(live.url + "/api/chat", json={"model": "glm-4", "messages": HI, "stream": False,
                                                     "options": {"test_fault": "error", "num_predict": 8}})
    assert whole.status_code >= 500 and isinstance(whole.json()["error"], str)
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}


# ---------- generate ----------

def test_generate_with_system_and_raw(sdk):
    options = {"num_predict": 8, "temperature": 0}
    plain = sdk.generate(model="glm-4", prompt="hi", options=options)
    chatted = sdk.chat(model="glm-4", messages=HI, options=options)
    assert plain.response == chatted.message.content and plain.done and plain.eval_count == 8
    with_system = sdk.generate(model="glm-4", prompt="hi", system="Answer in French.", options=options)
    assert with_system.prompt_eval_count > plain.prompt_eval_count
    raw = sdk.generate(model="glm-4", prompt="[gMASK]<sop><|user|>\nhi<|assistant|>", raw=True, options=options)
    assert raw.response.strip() == plain.response.strip()
    streamed = list(sdk.generate(model="glm-4", prompt="hi", options=options, stream=True))
    assert "".join(part.response for part in streamed) == plain.response and streamed[-1].done


def test_generate_refuses_what_it_cannot_do(live):
    for extra, words in [({"images": ["aGVsbG8="]}, "text only"), ({"template": "{{ .Prompt }}"}, "template"),
                         ({"suffix": "end"}, "suffix"), ({"context": [1, 2]}, "context")]:
        response = httpx.post(live.url + "/api/generate", json={"model": "glm-4", "prompt": "hi", **extra})
        assert response.status_code == 400, extra
        assert words in response.json()["error"], response.json()


# ---------- embeddings ----------

def test_embed_and_the_legacy_embeddings_route(sdk, embedder_name):
    result = sdk.embed(model=embedder_name, input=["first text", "second text"])
    assert len(result.embeddings) == 2 and result.prompt_eval_count > 0
    single = sdk.embed(model=embedder_name, input="second text").embeddings[0]
    assert single == pytest.approx(result.embeddings[1], abs=1e-5)
    assert sum(x * x for x in single) == pytest.approx(1.0, abs=1e-4)
    legacy = sdk.embeddings(model=embedder_name, prompt="second text").embedding
    assert legacy == pytest.approx(single, abs=1e-5)
    short = sdk.embed(model=embedder_name.removesuffix(":latest"), input="second text", dimensions=32).embeddings[0]
    assert len(short) == 32


def test_embed_with_the_chat_model_or_without_an_embedder_is_a_clear_400(sdk, start_server):
    with pytest.raises(ollama.ResponseError) as caught:
        sdk.embed(model="glm-4", input="text")
    assert caught.value.status_code == 400 and "does not support embeddings" in caught.value.error
    bare = start_server("--no-ui")
    response = httpx.post(bare.url + "/api/embed", json={"model": "glm-4", "input": "text"})
    assert response.status_code == 400 and "--embedding-model" in response.json()["error"]
    # the test hooks are refused where the server was not started with them
    hooked = httpx.post(bare.url + "/api/chat", json={"model": "glm-4", "messages": HI,
                                                      "options": {"test_force_output": "x"}})
    assert hooked.status_code == 400 and "--test-hooks" in hooked.json()["error"]
    assert "embedding" not in ollama.Client(host=bare.url).show("glm-4").capabilities


# ---------- hostile input and limits ----------

@pytest.mark.parametrize("body, words", [
    (b"{not json", "invalid JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"model": "glm-4", "messages": [{"role": "user", "content": "hi"}], "options": {"temperature": NaN}}',
     "not a JSON number"),
    (b'{"model": "glm-4", "messages": [{"role": "wizard", "content": "hi"}]}', "messages.0.role"),
    (b'{"model": "glm-4", "messages": "hi"}', "messages"),
    (b'{"model": 4, "messages": []}', "model"),
    (b'{"model": "glm-4", "messages": [], "stream": "yes"}', "stream"),
    (b'{"model": "glm-4", "messages": [{"role": "user", "content": "hi"}], "options": {"temperature": "0.7"}}',
     "options.temperature"),
    (b'{"model": "glm-4", "messages": [{"role": "user", "content": "hi"}], "options": {"top_p": 0}}', "top_p"),
    (b'{"model": "glm-4", "messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]}', "images"),
    (b'{"messages": []}', "model"),
    (b'{"model": "\xc3\x28"}', "UTF-8"),
    (b"[" * 100_000, "nested too deeply"),
], ids=lambda value: value[:40].decode("latin-1") if isinstance(value, bytes) else value)
def test_hostile_chat_bodies_are_400s_in_ollama_shape(live, body, words):
    response = httpx.post(live.url + "/api/chat", content=body)
    assert response.status_code == 400, response.text
    assert set(response.json()) == {"error"} and words in response.json()["error"], response.json()


def test_num_ctx_is_checked_against_the_plan(sdk):
    context = sdk.ps().models[0].context_length
    with pytest.raises(ollama.ResponseError) as caught:
        sdk.chat(model="glm-4", messages=HI, options={"num_ctx": context + 1})
    assert caught.value.status_code == 400
    assert f"{context}" in caught.value.error and "num_ctx" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        sdk.chat(model="glm-4", messages=[{"role": "user", "content": "word " * 50}], options={"num_ctx": 8})
    assert caught.value.status_code == 400 and "num_ctx" in caught.value.error
    capped = sdk.chat(model="glm-4", messages=HI, options={"num_ctx": 12, "temperature": 0})
    assert capped.prompt_eval_count + capped.eval_count <= 12 and capped.done_reason == "length"


def test_a_huge_prompt_and_bad_format_are_clear_400s(live):
    huge = httpx.post(live.url + "/api/chat", json={"model": "glm-4", "messages": [
        {"role": "user", "content": "word " * 200_000}]}, timeout=120)
    assert huge.status_code in (400, 413) and isinstance(huge.json()["error"], str)
    bad_format = httpx.post(live.url + "/api/chat", json={"model": "glm-4", "messages": HI, "format": "yaml"})
    assert bad_format.status_code == 400 and "format" in bad_format.json()["error"]
    bad_schema = httpx.post(live.url + "/api/chat", json={"model": "glm-4", "messages": HI,
                                                          "format": {"type": "object", "uniqueItems": "x"}})
    assert bad_schema.status_code == 400 and "format" in bad_schema.json()["error"]
    empty_embed = httpx.post(live.url + "/api/embed", json={"model": "tiny-embedder", "input": []})
    assert empty_embed.status_code == 400 and isinstance(empty_embed.json()["error"], str)


def test_routes_in_the_spec_and_in_metrics_by_route(live):
    spec = httpx.get(live.url + "/openapi.json").json()
    for path in ("/api/chat", "/api/generate", "/api/show", "/api/tags", "/api/ps", "/api/version", "/api/embed"):
        assert path in spec["paths"], path
    chat = spec["paths"]["/api/chat"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/OllamaChatRequest")
    options = spec["components"]["schemas"]["OllamaOptions"]["properties"]
    assert "num_predict" in options and not {"test_force_output", "test_fault"} & set(options)
    httpx.get(live.url + "/api/tags")
    assert live.metric("glm4_http_requests_total", 'route="/api/tags",status="200"') >= 1


def test_api_key_protects_the_ollama_routes(start_server):
    guarded = start_server("--no-ui", "--api-key", "sekret")
    refused = httpx.get(guarded.url + "/api/tags")
    assert refused.status_code == 401 and set(refused.json()) == {"error"}
    with pytest.raises(ollama.ResponseError) as caught:
        ollama.Client(host=guarded.url).chat(model="glm-4", messages=HI)
    assert caught.value.status_code == 401
    client = ollama.Client(host=guarded.url, headers={"Authorization": "Bearer sekret"})
    assert client.chat(model="glm-4", messages=HI, options={"num_predict": 2}).done
    assert [m.model for m in client.list().models] == ["glm-4:latest"]


def test_a_reasoning_model_shows_thinking_apart_and_think_false_leaves_it_out(start_server, tiny_z1_dir):
    z1 = start_server("--no-ui", "--test-hooks", "--model", str(tiny_z1_dir))
    client = ollama.Client(host=z1.url)
    assert "thinking" in client.show("glm-4").capabilities
    forced = {"test_force_output": "Paris is in France.</think>It is Paris.", "num_predict": 40}
    reply = client.chat(model="glm-4", messages=HI, think=True, options=forced)
    assert reply.message.thinking.strip() == "Paris is in France."
    assert reply.message.content.strip() == "It is Paris."
    streamed = list(client.chat(model="glm-4", messages=HI, think=True, options=forced, stream=True))
    assert "".join(p.message.thinking or "" for p in streamed).strip() == "Paris is in France."
    hidden = client.chat(model="glm-4", messages=HI, think=False, options=forced)
    assert hidden.message.thinking is None and hidden.message.content.strip() == "It is Paris."
