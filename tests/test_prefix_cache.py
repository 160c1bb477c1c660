"""Prefix reuse on the slot KV cache (issue 20), in-process on the real tiny GLM-4 (fp32, CPU).

A follow-up turn prefills only what is new; greedy replies are token-identical with reuse on and off,
also right after a cancel, a failed request, a max_tokens cut and a stop string cut inside a token; a
shared prefix is copied from a running request's slot; KV evicted from a slot comes back from the host
cache, which stays within its byte budget; and KV is never reused across salts (API keys).
"""

from __future__ import annotations

import asyncio

import pytest

from glm4.engine.base import FinishReason, Prompt, SamplingParams
from glm4.engine.local import LocalEngine
from glm4.prompt import build_prompt
from tests.test_engine import collect, forced, ids_of, long_params, text_of

SYSTEM = "You are the GLM-4 chat server's assistant. " + "Answer briefly and precisely. " * 12
TURNS = ["hi", "What flags does the server take?", "How do I stream with curl?", "你好，请介绍一下你自己。"]


def greedy(tokens: int = 24, **params) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=tokens, **params)


@pytest.fixture
async def make_engine(tiny):
    engines = []

    async def make(**kwargs) -> LocalEngine:
        kwargs.setdefault("max_num_seqs", 2)
        engine = LocalEngine(tiny.models[0], tiny.tokenizer, tiny.info, test_hooks=True, **kwargs)
        await engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.shutdown()


def prompt_for(engine, messages: list[dict], salt: str = "") -> Prompt:
    prompt = build_prompt(engine.tokenizer, messages)
    prompt.cache_salt = salt
    return prompt


async def converse(engine, turns: list[str], tag: str, salt: str = "", tokens: int = 24):
    """A multi-turn conversation; returns per turn (reply ids, prompt tokens, cached tokens)."""
    messages, results = [{"role": "system", "content": SYSTEM}], []
    for index, turn in enumerate(turns):
        messages.append({"role": "user", "content": turn})
        deltas = await collect(engine.submit(prompt_for(engine, messages, salt), greedy(tokens), f"{tag}-{index}"))
        usage = deltas[-1].usage
        results.append((ids_of(deltas), usage.prompt_tokens, usage.cached_tokens))
        messages.append({"role": "assistant", "content": text_of(deltas)})
    return results


async def test_follow_up_turns_reuse_their_history_and_reply_identically(make_engine):
    reuse = await make_engine()
    cold = await make_engine(prefix_caching=False)
    with_reuse = await converse(reuse, TURNS, "on")
    without = await converse(cold, TURNS, "off")
    assert [ids for ids, _, _ in with_reuse] == [ids for ids, _, _ in without]
    assert with_reuse[0][2] == 0 and all(cached == 0 for _, _, cached in without)
    for (_, previous_prompt, _), (_, prompt, cached) in zip(with_reuse, with_reuse[1:]):
        assert cached >= 0.95 * previous_prompt  # the whole previous turn's prompt came from the slot
        assert cached < prompt  # at least one token is prefilled
    assert reuse.counters["admitted_in-place"] == len(TURNS) - 1
    assert reuse.kv.copies == 0  # the conversation continued in its own slot


async def test_reuse_after_cancel_failure_length_and_stop_string_gives_the_same_replies(make_engine):
    reuse = await make_engine(max_num_seqs=1)
    cold = await make_engine(max_num_seqs=1, prefix_caching=False)
    base = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TURNS[1]}]
    follow = base + [{"role": "assistant", "content": "The flags are listed in the README."},
                     {"role": "user", "content": TURNS[2]}]
    for engine in (reuse, cold):
        # a cancel halfway through a reply: the slot keeps what it computed
        stream = engine.submit(prompt_for(engine, base), long_params(engine, 400), "cancelled")
        await asyncio.wait_for(anext(stream), 30)
        engine.cancel("cancelled")
        assert (await collect(stream))[-1].finish_reason is FinishReason.CANCELLED
    after_cancel = [ids_of(await collect(e.submit(prompt_for(e, follow), greedy(), "after-cancel")))
                    for e in (reuse, cold)]
    assert after_cancel[0] == after_cancel[1]
    assert reuse.counters["prefix_hit_tokens"] > 0  # the cancelled request's prefill was reused

    for engine in (reuse, cold):  # a request that fails: its slot's K/V are not trusted again
        deltas = await collect(engine.submit(prompt_for(engine, base), greedy(40, fault="error"), "failed"))
        assert deltas[-1].finish_reason is FinishReason.ERROR
    assert reuse.kv.slots[0].length == 0
    after_failure = [ids_of(await collect(e.submit(prompt_for(e, follow), greedy(), "after-fail"))) for e in (reuse, cold)]
    assert after_failure[0] == after_failure[1]

    for engine in (reuse, cold):  # a max_tokens cut, and a stop string that ends inside a token
        assert (await collect(engine.submit(prompt_for(engine, base), greedy(7), "length")))[-1].finish_reason \
            is FinishReason.LENGTH
        # "ell" ends inside the token "Hello": the reply is cut mid-token, the slot keeps only fed ids
        cut = await collect(engine.submit(prompt_for(engine, base), forced(engine, "Hello world", stop=["ell"]), "stop"))
        assert cut[-1].finish_reason is FinishReason.STOP and text_of(cut) == "H"
    after_cuts = [ids_of(await collect(e.submit(prompt_for(e, follow), greedy(), "after-cuts"))) for e in (reuse, cold)]
    assert after_cuts[0] == after_cuts[1]
    assert reuse.counters["prefix_hit_tokens"] > 0


async def test_a_shared_prefix_is_copied_from_a_running_requests_slot(make_engine):
    engine = await make_engine(max_num_seqs=2)
    cold = await make_engine(max_num_seqs=2, prefix_caching=False)
    shared = [{"role": "system", "content": SYSTEM}]
    first = engine.submit(prompt_for(engine, shared + [{"role": "user", "content": TURNS[0]}]),
                          long_params(engine, 300), "running")
    await asyncio.wait_for(anext(first), 30)  # decoding, its slot being written
    other = shared + [{"role": "user", "content": TURNS[3]}]
    deltas = await collect(engine.submit(prompt_for(engine, other), greedy(), "joins"))
    shared_tokens = len(build_prompt(engine.tokenizer, shared + [{"role": "user", "content": ""}]).token_ids)
    assert deltas[-1].usage.cached_tokens >= shared_tokens - 8  # the system block came from the other slot
    assert engine.counters["admitted_slot-copy"] == 1 and engine.kv.copies == 1
    assert ids_of(deltas) == ids_of(await collect(cold.submit(prompt_for(cold, other), greedy(), "cold")))
    engine.cancel("running")
    await collect(first)


async def test_evicted_kv_comes_back_from_the_host_cache_within_its_budget(make_engine):
    engine = await make_engine(max_num_seqs=1, cache_ram_bytes=10**9)
    token_bytes = engine.kv.token_bytes()
    a = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TURNS[1]}]
    b = [{"role": "system", "content": "Reply in Chinese. " * 20}, {"role": "user", "content": TURNS[3]}]
    reply_a = text_of(await collect(engine.submit(prompt_for(engine, a), greedy(), "a1")))
    await collect(engine.submit(prompt_for(engine, b), greedy(), "b1"))  # takes the only slot: A goes to host
    assert engine.stats()["host_cache_entries"] == 1
    a2 = a + [{"role": "assistant", "content": reply_a}, {"role": "user", "content": TURNS[2]}]
    deltas = await collect(engine.submit(prompt_for(engine, a2), greedy(), "a2"))
    assert deltas[-1].usage.cached_tokens >= len(prompt_for(engine, a).token_ids)
    assert engine.counters["admitted_host"] == 1 and engine.host_cache.hits == 1
    cold = await make_engine(max_num_seqs=1, prefix_caching=False)
    assert ids_of(deltas) == ids_of(await collect(cold.submit(prompt_for(cold, a2), greedy(), "cold")))

    small = await make_engine(max_num_seqs=1, cache_ram_bytes=300 * token_bytes)  # room for ~300 tokens
    for index, turn in enumerate(TURNS):
        messages = [{"role": "system", "content": f"Conversation {index}. " + SYSTEM}, {"role": "user", "content": turn}]
        await collect(small.submit(prompt_for(small, messages), greedy(8), f"c{index}"))
        assert small.host_cache.used_bytes <= small.host_cache.capacity_bytes
    assert small.host_cache.stored >= 2 and len(small.host_cache.entries) == 1


async def test_kv_is_never_reused_across_salts(make_engine):
    engine = await make_engine(max_num_seqs=2, cache_ram_bytes=10**9)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TURNS[1]}]
    first = await collect(engine.submit(prompt_for(engine, messages, salt="key-a"), greedy(), "a"))
    other = await collect(engine.submit(prompt_for(engine, messages, salt="key-b"), greedy(), "b"))
    assert other[-1].usage.cached_tokens == 0  # same prompt, another key: prefilled from token 0
    again = await collect(engine.submit(prompt_for(engine, messages, salt="key-a"), greedy(), "a-again"))
    assert again[-1].usage.cached_tokens > 0.9 * again[-1].usage.prompt_tokens
    assert ids_of(first) == ids_of(other) == ids_of(again)


# ---- through the live server: what clients see ----

def chat_turns(client, turns: list[str], **extra) -> list:
    """A conversation with replies forced to a fixed text; the usage of each turn (stream and not alternate)."""
    messages, usages = [{"role": "system", "content": SYSTEM}], []
    for index, question in enumerate(turns):
        messages.append({"role": "user", "content": question})
        body = {"test_force_output": f"Answer number {index}: " + "the server streams tokens. " * 6}
        if index % 2:
            stream = client.chat.completions.create(model="glm-4", messages=messages, stream=True,
                                                    stream_options={"include_usage": True}, extra_body=body, **extra)
            chunks = list(stream)
            reply, usage = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].usage
        else:
            response = client.chat.completions.create(model="glm-4", messages=messages, extra_body=body, **extra)
            reply, usage = response.choices[0].message.content, response.usage
        messages.append({"role": "assistant", "content": reply})
        usages.append(usage)
    return usages


def test_follow_up_turns_report_their_cached_prompt_tokens(start_server):
    from openai import OpenAI

    live = start_server("--no-ui", "--test-hooks")
    usages = chat_turns(OpenAI(base_url=live.base_url, api_key="x"), TURNS, prompt_cache_key="conversation-1")
    assert usages[0].prompt_tokens_details.cached_tokens == 0  # nothing was there to reuse
    for before, after in zip(usages, usages[1:]):
        # the whole previous turn (its prompt and the reply it generated) is reused, stream or not
        assert after.prompt_tokens_details.cached_tokens >= 0.95 * before.prompt_tokens
        assert after.prompt_tokens_details.cached_tokens < after.prompt_tokens  # at least one token is prefilled


def test_another_api_key_never_reuses_the_first_keys_kv(start_server):
    from openai import OpenAI

    live = start_server("--no-ui", "--test-hooks", "--api-key", "alice-key,bob-key")
    alice = OpenAI(base_url=live.base_url, api_key="alice-key")
    bob = OpenAI(base_url=live.base_url, api_key="bob-key")
    first = chat_turns(alice, TURNS[:2])
    replayed = chat_turns(bob, TURNS[:2])  # the very same messages under the other key: nothing reused
    assert [u.prompt_tokens for u in replayed] == [u.prompt_tokens for u in first]
    assert replayed[0].prompt_tokens_details.cached_tokens == 0  # alice's identical first turn is not reused
    assert replayed[1].prompt_tokens_details.cached_tokens <= replayed[0].prompt_tokens + replayed[0].completion_tokens
    again = chat_turns(alice, TURNS[:2])  # while the first key still finds its own conversation
    assert again[0].prompt_tokens_details.cached_tokens >= 0.95 * first[0].prompt_tokens - 1


def test_ollama_requests_are_salted_with_their_key_too(start_server):
    import httpx

    live = start_server("--no-ui", "--api-key", "alice-key,bob-key")
    body = {"model": "glm-4", "stream": False, "options": {"num_predict": 4, "temperature": 0},
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TURNS[1]}]}

    def chat(key: str) -> float:
        reply = httpx.post(live.url + "/api/chat", json=body, headers={"Authorization": f"Bearer {key}"},
                           timeout=60)
        assert reply.status_code == 200, reply.text
        return live.metric("glm4_prefix_cache_hits_total")

    first = chat("alice-key")
    assert chat("bob-key") == first  # the same prompt under another key reuses nothing
    assert chat("alice-key") > first  # while the first key finds its own KV
