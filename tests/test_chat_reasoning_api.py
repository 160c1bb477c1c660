"""Reasoning (`reasoning_content`) and several tool calls in one reply, on /v1/chat/completions.

Through the live server and the official SDK. The tiny models are made to write a chosen reply with the
test hook `test_force_output`; the Z1-style tiny checkpoint's generation prompt opens `<think>`, so its
reply reads `reasoning</think>answer`.
"""

from __future__ import annotations

import json

import pytest

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "查询城市天气",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ASK = [{"role": "user", "content": "北京和上海天气怎么样？"}]
TWO_CALLS = 'get_weather\n{"city": "北京"}<|assistant|>get_weather\n{"city": "上海"}'


def force(text: str, **extra) -> dict:
    return {"test_force_output": text, **extra}


@pytest.fixture(scope="module")
def z1_server(tiny_z1_dir):
    from tests.conftest import LiveServer

    live = LiveServer("--model", str(tiny_z1_dir), "--no-ui", "--test-hooks")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def glm4_0414_server(tiny_glm4_dir):
    from tests.conftest import LiveServer

    live = LiveServer("--model", str(tiny_glm4_dir), "--no-ui", "--test-hooks")
    yield live
    live.stop()


def sdk(live):
    from openai import OpenAI

    return OpenAI(base_url=live.base_url, api_key="unused", max_retries=0)


def test_z1_reasoning_arrives_as_reasoning_content(z1_server):
    with sdk(z1_server) as client:
        reply = client.chat.completions.create(model="glm-4", messages=ASK,
                                               extra_body=force("先想一想天气。</think>北京晴，上海多云。"))
    message = reply.choices[0].message
    assert message.reasoning_content == "先想一想天气。"
    assert message.content == "北京晴，上海多云。"
    assert reply.choices[0].finish_reason == "stop"


def test_z1_reasoning_streams_as_reasoning_content_deltas(z1_server):
    with sdk(z1_server) as client:
        chunks = list(client.chat.completions.create(model="glm-4", messages=ASK, stream=True,
                                                     extra_body=force("先想一想天气。</think>北京晴，上海多云。")))
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    reasoning = "".join(getattr(delta, "reasoning_content", None) or "" for delta in deltas)
    content = "".join(delta.content or "" for delta in deltas)
    assert (reasoning, content) == ("先想一想天气。", "北京晴，上海多云。")
    first_answer = next(i for i, d in enumerate(deltas) if d.content)
    assert all(not getattr(d, "reasoning_content", None) for d in deltas[first_answer:])  # reasoning comes first


def test_unclosed_reasoning_is_all_reasoning(z1_server):
    with sdk(z1_server) as client:
        reply = client.chat.completions.create(model="glm-4", messages=ASK, max_tokens=3,
                                               extra_body=force("想了很久很久很久很久很久很久"))
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and choice.message.content == ""
    assert choice.message.reasoning_content


def test_past_reasoning_is_dropped_from_the_next_prompt(z1_server):
    """The Z1 template keeps only the answer of past turns: however the client sends the reasoning back
    (in <think> content, DeepSeek's reasoning_content, vLLM's reasoning), the prompt is the same length."""
    def prompt_tokens(assistant: dict) -> int:
        messages = [*ASK, {"role": "assistant", **assistant}, {"role": "user", "content": "明天呢？"}]
        with sdk(z1_server) as client:
            return client.chat.completions.create(model="glm-4", messages=messages, max_tokens=1).usage.prompt_tokens

    bare = prompt_tokens({"content": "北京晴。"})
    long_thought = "我需要先查一查北京的天气，然后再回答。" * 5
    assert prompt_tokens({"content": f"<think>{long_thought}</think>北京晴。"}) == bare
    assert prompt_tokens({"content": "北京晴。", "reasoning_content": long_thought}) == bare
    assert prompt_tokens({"content": "北京晴。", "reasoning": long_thought}) == bare


def test_tool_call_after_reasoning_is_found(z1_server):
    with sdk(z1_server) as client:
        reply = client.chat.completions.create(model="glm-4", messages=ASK, tools=[WEATHER],
                                               extra_body=force('要查天气。</think>get_weather\n{"city": "北京"}'))
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.reasoning_content == "要查天气。"
    assert [json.loads(c.function.arguments) for c in choice.message.tool_calls] == [{"city": "北京"}]


def test_reasoning_parser_think_splits_a_non_reasoning_checkpoint(start_server):
    live = start_server("--no-ui", "--test-hooks", "--reasoning-parser", "think")
    with sdk(live) as client:
        reply = client.chat.completions.create(model="glm-4", messages=ASK,
                                               extra_body=force("<think>plan</think>answer"))
    assert (reply.choices[0].message.reasoning_content, reply.choices[0].message.content) == ("plan", "answer")


def test_without_a_reasoning_parser_think_text_stays_content(client):
    reply = client.chat.completions.create(model="glm-4", messages=ASK, extra_body=force("<think>plan</think>answer"))
    message = reply.choices[0].message
    assert message.content == "<think>plan</think>answer" and getattr(message, "reasoning_content", None) is None


# ---------- several tool calls in one reply ----------

def check_two_calls(client):
    reply = client.chat.completions.create(model="glm-4", messages=ASK, tools=[WEATHER], extra_body=force(TWO_CALLS))
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert [json.loads(c.function.arguments) for c in calls] == [{"city": "北京"}, {"city": "上海"}]
    assert len({c.id for c in calls}) == 2

    chunks = list(client.chat.completions.create(model="glm-4", messages=ASK, tools=[WEATHER], stream=True,
                                                 extra_body=force(TWO_CALLS)))
    arguments: dict[int, str] = {}
    for chunk in chunks:
        for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            arguments[call.index] = arguments.get(call.index, "") + (call.function.arguments or "")
            assert "<|assistant|>" not in (call.function.arguments or "")
    assert sorted(arguments) == [0, 1]
    assert [json.loads(arguments[i]) for i in (0, 1)] == [{"city": "北京"}, {"city": "上海"}]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_two_calls_in_one_reply_with_the_hf_renderer(client):
    check_two_calls(client)


def test_two_calls_in_one_reply_with_the_0414_template(glm4_0414_server):
    with sdk(glm4_0414_server) as client:
        check_two_calls(client)


def test_parallel_tool_calls_false_keeps_the_first_call(client):
    reply = client.chat.completions.create(model="glm-4", messages=ASK, tools=[WEATHER], parallel_tool_calls=False,
                                           extra_body=force(TWO_CALLS))
    assert [json.loads(c.function.arguments) for c in reply.choices[0].message.tool_calls] == [{"city": "北京"}]


def test_python_literal_arguments_become_json(client):
    reply = client.chat.completions.create(model="glm-4", messages=ASK, tools=[WEATHER],
                                           extra_body=force("get_weather\n{'city': '北京', 'days': None}"))
    (call,) = reply.choices[0].message.tool_calls
    assert json.loads(call.function.arguments) == {"city": "北京", "days": None}


def test_two_calls_and_their_results_round_trip(client):
    """The client sends both calls and both results back; the next reply is plain text."""
    first = client.chat.completions.create(model="glm-4", messages=ASK, tools=[WEATHER], extra_body=force(TWO_CALLS))
    calls = first.choices[0].message.tool_calls
    messages = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
                *({"role": "tool", "tool_call_id": c.id, "content": json.dumps({"weather": "晴"})} for c in calls)]
    second = client.chat.completions.create(model="glm-4", messages=messages, tools=[WEATHER],
                                            extra_body=force("两地都晴。"))
    assert second.choices[0].message.content == "两地都晴。"
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
