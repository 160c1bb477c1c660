"""LocalEngine on the real tiny GLM-4, in-process: streaming text, stop strings, cancel, limits, seeds, faults.

Replies are pinned with `SamplingParams.allowed_prefixes` (the tokens of "\\n" + text, then a stop id)
wherever the test needs known text: the tiny model's own words are never asserted.
"""

from __future__ import annotations

import asyncio

import pytest

from glm4.engine.base import Delta, FinishReason, Prompt, SamplingParams
from glm4.prompt import build_prompt

TIMEOUT = 60  # seconds any single stream may take on a loaded 2-core machine


def chat_prompt(engine, content: str = "hi") -> Prompt:
    return build_prompt(engine.tokenizer, [{"role": "user", "content": content}], None, None)


def stop_id(engine) -> int:
    (token,) = engine.encode("<|user|>")
    assert token in engine.stop_ids
    return token


def forced(engine, text: str, *, end: bool = True, **params) -> SamplingParams:
    """Params that make the model write exactly `text` (then a stop token when `end`)."""
    ids = engine.encode("\n" + text) + ([stop_id(engine)] if end else [])
    params.setdefault("temperature", 0)
    params.setdefault("max_tokens", len(ids) + 8)
    return SamplingParams(allowed_prefixes=[ids], **params)


def long_params(engine, tokens: int = 2000, **params) -> SamplingParams:
    """A reply that keeps going (forced, no stop token) until cancelled or max_tokens."""
    params.setdefault("max_tokens", tokens)
    return forced(engine, "ab" * tokens, end=False, **params)


async def collect(stream) -> list[Delta]:
    async def drain():
        return [delta async for delta in stream]

    return await asyncio.wait_for(drain(), TIMEOUT)


def text_of(deltas: list[Delta]) -> str:
    return "".join(delta.text for delta in deltas)


def ids_of(deltas: list[Delta]) -> list[int]:
    return [token for delta in deltas for token in delta.token_ids]


async def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# ---- streaming text ----

@pytest.mark.parametrize("text", ["你好，世界！🙂👍🏽 café ✨ 中文测试 🚀🇨🇳 done", "Hello\n\n  indented `code` {\"a\": 1}"],
                         ids=["chinese-emoji", "ascii-whitespace"])
async def test_stream_concatenates_to_exact_text(engine, text):
    prompt = chat_prompt(engine)
    params = forced(engine, text)
    deltas = await collect(engine.submit(prompt, params, "exact"))

    assert text_of(deltas) == text  # the "\n" after <|assistant|> is stripped, nothing else changes
    assert all("\ufffd" not in delta.text for delta in deltas)  # no split multibyte character
    assert all(delta.text.encode("utf-8").decode("utf-8") == delta.text for delta in deltas)
    final = deltas[-1]
    assert final.finish_reason is FinishReason.STOP
    assert final.usage.completion_tokens == len(params.allowed_prefixes[0])
    assert ids_of(deltas) == params.allowed_prefixes[0]  # every sampled id reaches the consumer, once
    assert all(not delta.finished for delta in deltas[:-1])


async def test_multibyte_characters_are_held_until_complete(engine):
    text = "🙂你"
    ids = engine.encode("\n" + text)
    assert len(ids) > 1 + len(text), "the tokenizer must split these characters over several tokens"
    deltas = await collect(engine.submit(chat_prompt(engine), forced(engine, text), "held"))
    texts = [delta.text for delta in deltas if delta.text]
    assert texts == ["🙂", "你"]  # one delta per whole character, never a fragment


async def test_usage_prompt_tokens_equal_rendered_prompt(engine):
    prompt = chat_prompt(engine, "How long is this prompt? 多长？")
    deltas = await collect(engine.submit(prompt, forced(engine, "ok"), "usage"))
    usage = deltas[-1].usage
    assert usage.prompt_tokens == len(prompt.token_ids)
    assert usage.completion_tokens == len(engine.encode("\nok")) + 1  # + the stop token


# ---- stop strings ----

async def test_stop_string_across_tokens_is_held_back(engine):
    stop = "<<STOP>>"
    assert len(engine.encode(stop)) >= 3, "the stop string must span several tokens"
    deltas = await collect(engine.submit(chat_prompt(engine), forced(engine, "alpha beta <<STOP>> gamma", stop=[stop]),
                                         "stop"))
    assert text_of(deltas) == "alpha beta "
    assert deltas[-1].finish_reason is FinishReason.STOP
    assert not any("<" in delta.text for delta in deltas)  # not even the first character of the stop string
    assert deltas[-1].usage.completion_tokens < len(engine.encode("\nalpha beta <<STOP>> gamma"))  # stopped early


async def test_partial_stop_string_is_released_when_ruled_out(engine):
    text = "a <<STO b <<STOP c"  # two near misses of "<<STOP>>"
    deltas = await collect(engine.submit(chat_prompt(engine), forced(engine, text, stop=["<<STOP>>"]), "near"))
    assert text_of(deltas) == text
    assert deltas[-1].finish_reason is FinishReason.STOP


async def test_earliest_of_several_stop_strings_wins(engine):
    params = forced(engine, "one two three four", stop=["four", "two"])
    deltas = await collect(engine.submit(chat_prompt(engine), params, "stops"))
    assert text_of(deltas) == "one "


# ---- limits ----

async def test_max_tokens_finishes_with_length(engine):
    deltas = await collect(engine.submit(chat_prompt(engine), long_params(engine, max_tokens=7), "length"))
    final = deltas[-1]
    assert final.finish_reason is FinishReason.LENGTH
    assert final.usage.completion_tokens == 7
    assert len(ids_of(deltas)) == 7


async def test_max_tokens_finishes_with_length_when_sampling(engine):
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=5)
    deltas = await collect(engine.submit(chat_prompt(engine), params, "length-sampled"))
    final = deltas[-1]
    assert final.finish_reason in (FinishReason.LENGTH, FinishReason.STOP)  # the model may end on its own
    if final.finish_reason is FinishReason.LENGTH:
        assert final.usage.completion_tokens == 5
    assert final.usage.completion_tokens <= 5


# ---- seeds ----

async def test_same_seed_same_output_at_temperature_one(engine):
    prompt = chat_prompt(engine, "Tell me something.")
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=40)
    first = await collect(engine.submit(prompt, params, "seed-a"))
    second = await collect(engine.submit(prompt, params, "seed-b"))
    assert ids_of(first) == ids_of(second)
    assert text_of(first) == text_of(second)
    assert first[-1].usage == second[-1].usage


async def test_same_seed_same_output_when_submitted_together(engine):
    prompt = chat_prompt(engine, "Tell me something.")
    params = SamplingParams(temperature=1.0, seed=99, max_tokens=30)
    runs = await asyncio.gather(*(collect(engine.submit(prompt, params, f"seed-{i}")) for i in range(3)))
    assert ids_of(runs[0]) == ids_of(runs[1]) == ids_of(runs[2])


# ---- cancel ----

async def test_cancel_stops_within_one_step_and_frees_the_slot(engine):
    stream = engine.submit(chat_prompt(engine), long_params(engine), "cancel-me")
    seen = [await asyncio.wait_for(anext(stream), TIMEOUT) for _ in range(3)]
    assert all(not delta.finished for delta in seen)
    steps_at_cancel = engine.counters["steps"]
    assert engine.cancel("cancel-me") is True
    rest = await collect(stream)
    assert rest[-1].finish_reason is FinishReason.CANCELLED
    assert engine.counters["steps"] - steps_at_cancel <= 1  # the step in flight may finish, no more
    assert engine.stats()["running"] == 0
    assert engine.stats()["finished_cancelled"] == 1
    assert engine.cancel("cancel-me") is False  # gone
    deltas = await collect(engine.submit(chat_prompt(engine), forced(engine, "next"), "after-cancel"))
    assert text_of(deltas) == "next"


async def test_closing_the_stream_cancels(engine):
    stream = engine.submit(chat_prompt(engine), long_params(engine), "closed")
    await asyncio.wait_for(anext(stream), TIMEOUT)
    await stream.aclose()  # what a dropped client or the UI stop button does
    await wait_for(lambda: engine.stats()["running"] == 0 and engine.stats()["finished_cancelled"] == 1)


async def test_cancel_of_unknown_request_is_false(engine):
    assert engine.cancel("never-submitted") is False


# ---- faults ----

@pytest.mark.parametrize("fault,status", [("error", 500), ("oom", 503)])
async def test_injected_fault_becomes_error_delta_and_engine_keeps_serving(engine, fault, status):
    params = long_params(engine, max_tokens=50)
    params.fault = fault
    deltas = await collect(engine.submit(chat_prompt(engine), params, "faulty"))
    final = deltas[-1]
    assert final.finish_reason is FinishReason.ERROR
    assert final.error and final.error_status == status
    assert engine.stats()["running"] == 0
    deltas = await collect(engine.submit(chat_prompt(engine), forced(engine, "still here"), "healthy"))
    assert text_of(deltas) == "still here"
    assert deltas[-1].finish_reason is FinishReason.STOP
