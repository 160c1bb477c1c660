"""Structured outputs and logprobs on /v1/chat/completions, through the live server and the official SDK.

The tiny GLM-4 knows nothing of JSON: its replies parse and validate only because the engine's grammar masks
(llguidance, glm4/engine/constraints.py) make them. n choices decode together in one batch with seeds
seed, seed + 1, …, so one request of n = 10 is ten independently seeded samples.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import jsonschema
import openai
import pydantic
import pytest
import torch

from tests.test_constraints import ORDER, PERSON

ASK_JSON = [{"role": "user", "content": "请只用 JSON 回答：介绍一下你自己。"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "查询城市天气",
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string", "enum": ["北京", "上海", "东京"]},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["location", "unit"], "additionalProperties": False}}}
SEARCH = {"type": "function", "function": {
    "name": "search_docs", "description": "搜索文档", "strict": True,
    "parameters": {"type": "object", "properties": {"query": {"type": "string", "maxLength": 12}},
                   "required": ["query"], "additionalProperties": False}}}
PARAMETERS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (WEATHER, SEARCH)}


def schema_format(schema: dict, strict: bool = False) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": strict}}


@pytest.mark.parametrize("schema", [PERSON, ORDER], ids=["person-nested-enums-chinese", "order-array-of-objects"])
def test_twenty_seeded_json_schema_replies_all_validate(client, schema):
    replies = []
    for seed in (0, 10):  # 2 × n=10: seeds 0..19
        reply = client.chat.completions.create(model="glm-4", messages=ASK_JSON, temperature=1.0, n=10, seed=seed,
                                               max_tokens=400, response_format=schema_format(schema))
        replies += reply.choices
    assert len(replies) == 20
    for choice in replies:
        assert choice.finish_reason == "stop", choice  # the grammar ended it: no trailing text
        jsonschema.validate(json.loads(choice.message.content), schema)
    assert len({choice.message.content for choice in replies}) > 10, "the seeds should give different replies"


def test_json_object_replies_parse(client):
    reply = client.chat.completions.create(model="glm-4", messages=ASK_JSON, temperature=1.0, n=10, seed=3,
                                           max_tokens=512, response_format={"type": "json_object"})
    finished = [choice for choice in reply.choices if choice.finish_reason == "stop"]
    for choice in finished:
        assert isinstance(json.loads(choice.message.content), dict)
    for choice in reply.choices:  # free strings are unbounded: a reply may reach max_tokens, still an object so far
        assert choice.message.content.startswith("{")
    assert len(finished) >= 3  # seeded, so fixed: 4 of these 10 close their object within 512 tokens


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=6)
    population_millions: int = pydantic.Field(ge=0, le=40)
    districts: list[Annotated[str, pydantic.Field(max_length=4)]] = pydantic.Field(max_length=3)
    capital: bool


def test_extreme_penalty_cannot_break_the_grammar(client):
    """repetition_penalty near 0 sends allowed logits to +inf; the reply must still follow the mask."""
    reply = client.chat.completions.create(model="glm-4", messages=ASK_JSON, temperature=1.0, seed=1, max_tokens=40,
                                           response_format={"type": "json_object"}, logprobs=True,
                                           extra_body={"repetition_penalty": 4e-44})
    assert reply.choices[0].message.content.startswith("{")


def test_sdk_parse_returns_the_pydantic_object(client):
    for seed in range(3):
        completion = client.chat.completions.parse(model="glm-4", messages=ASK_JSON, response_format=City,
                                                   temperature=1.0, seed=seed, max_tokens=300)
        parsed = completion.choices[0].message.parsed
        assert isinstance(parsed, City), completion.choices[0].message.content


def test_stream_json_schema_is_the_same_as_non_stream(client):
    kwargs = dict(model="glm-4", messages=ASK_JSON, temperature=1.0, seed=7, max_tokens=300,
                  response_format=schema_format(PERSON))
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        stream=True, **kwargs) if chunk.choices)
    assert streamed == whole
    jsonschema.validate(json.loads(streamed), PERSON)


def test_langchain_with_structured_output(server):
    from langchain_openai import ChatOpenAI

    model = ChatOpenAI(base_url=server.base_url, api_key="unused", model="glm-4", temperature=1.0, max_retries=0,
                       max_tokens=300, seed=1)
    structured = model.with_structured_output(City, method="json_schema")
    assert isinstance(structured.invoke("介绍一个城市，用 JSON。"), City)


@pytest.mark.parametrize("tool_choice", ["required", "strict-auto-forced-start"])
def test_strict_or_required_tools_always_give_valid_calls(client, tool_choice):
    if tool_choice == "required":
        tools, choice = [WEATHER, SEARCH], "required"
    else:  # a strict tool with tool_choice naming it: the name is in the prompt, the arguments are masked
        tools, choice = [SEARCH], {"type": "function", "function": {"name": "search_docs"}}
    reply = client.chat.completions.create(model="glm-4", messages=[{"role": "user", "content": "北京天气怎么样？"}],
                                           tools=tools, tool_choice=choice, temperature=1.0, n=10, seed=0,
                                           max_tokens=200)
    for item in reply.choices:
        assert item.finish_reason == "tool_calls", item
        assert item.message.tool_calls, item
        for call in item.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


def test_parallel_tool_calls_false_gives_one_call(client):
    reply = client.chat.completions.create(model="glm-4", messages=[{"role": "user", "content": "北京天气怎么样？"}],
                                           tools=[WEATHER, SEARCH], tool_choice="required", parallel_tool_calls=False,
                                           temperature=1.0, n=8, seed=0, max_tokens=200)
    assert all(len(item.message.tool_calls) == 1 for item in reply.choices)


@pytest.mark.parametrize("response_format, words", [
    (schema_format({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}), "missing"),
    (schema_format({"type": "string", "pattern": "(?<=a)b"}), "look-around"),
], ids=["dangling-ref", "lookbehind-pattern"])
def test_unsupported_schema_is_a_400_naming_it(client, response_format, words):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="glm-4", messages=ASK_JSON, max_tokens=8, response_format=response_format)
    body = caught.value.body
    assert body["param"] == "response_format" and body["code"] == "unsupported_schema"
    assert words in body["message"].lower()


# ---------- logprobs ----------

def raw_log_softmax(tiny, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits = tiny.models[0](torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


@pytest.fixture(scope="module")
def id_of_bytes(tiny) -> dict[bytes, int]:
    """Token ids are not on the wire; a byte-level token's exact bytes name it (the first id wins for the few
    special tokens that share theirs)."""
    from glm4.engine.text import TokenTexts

    texts = TokenTexts(tiny.tokenizer)
    table: dict[bytes, int] = {}
    for token_id in range(len(tiny.tokenizer)):
        table.setdefault(bytes(texts.bytes(token_id)), token_id)
    return table


def test_logprobs_equal_a_raw_forward_of_the_model(client, tiny, id_of_bytes):
    from glm4.prompt import build_prompt

    messages = [{"role": "user", "content": "你好，介绍一下你自己。"}]
    reply = client.chat.completions.create(model="glm-4", messages=messages, temperature=1.0, seed=4, max_tokens=12,
                                           logprobs=True, top_logprobs=5, extra_body={"ignore_eos": True})
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 12
    prompt_ids = build_prompt(tiny.tokenizer, messages).token_ids
    ids = [id_of_bytes[bytes(entry.bytes)] for entry in content]
    reference = raw_log_softmax(tiny, prompt_ids + ids)
    for step, (token, entry) in enumerate(zip(ids, content)):
        row = reference[len(prompt_ids) - 1 + step]
        assert abs(entry.logprob - row[token].item()) < 1e-4, step
        values, top_ids = row.topk(5)
        assert [id_of_bytes[bytes(top.bytes)] for top in entry.top_logprobs] == top_ids.tolist()
        assert max(abs(top.logprob - v) for top, v in zip(entry.top_logprobs, values.tolist())) < 1e-4


def test_greedy_token_is_the_most_likely_and_stream_agrees(client):
    kwargs = dict(model="glm-4", messages=[{"role": "user", "content": "写一首诗"}], temperature=0, max_tokens=16,
                  logprobs=True, top_logprobs=3)
    whole = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    for entry in whole:
        assert entry.logprob == pytest.approx(max(top.logprob for top in entry.top_logprobs), abs=1e-6)
        assert entry.token == entry.top_logprobs[0].token
    streamed = [entry for chunk in client.chat.completions.create(stream=True, **kwargs)
                if chunk.choices and chunk.choices[0].logprobs for entry in chunk.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in whole]


def test_no_logprobs_unless_asked(client):
    reply = client.chat.completions.create(model="glm-4", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert reply.choices[0].logprobs is None


async def test_a_mixed_batch_gives_each_request_what_it_gets_alone(async_client):
    """Constrained, logprobs and plain requests decoding together: each equals its own run alone."""
    requests = [
        dict(response_format=schema_format(PERSON), temperature=1.0, seed=11, max_tokens=300),
        dict(logprobs=True, top_logprobs=2, temperature=1.0, seed=12, max_tokens=24),
        dict(temperature=1.0, seed=13, max_tokens=24),
        dict(tools=[WEATHER, SEARCH], tool_choice="required", temperature=1.0, seed=14, max_tokens=120),
    ]

    async def run(kwargs):
        reply = await async_client.chat.completions.create(model="glm-4", messages=ASK_JSON, **kwargs)
        choice = reply.choices[0]
        calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
        logprobs = [(e.token, round(e.logprob, 4)) for e in choice.logprobs.content] if choice.logprobs else None
        return choice.message.content, calls, logprobs

    alone = [await run(kwargs) for kwargs in requests]
    together = await asyncio.gather(*(run(kwargs) for kwargs in requests))
    assert list(together) == alone
