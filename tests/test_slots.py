"""The slot KV cache decode path (issue 14) on the real tiny GLM-4, in-process.

Greedy output must equal raw `model.generate` token for token, for requests that join and leave a running
batch; slots are reused, never reallocated or copied when requests come and go; a cancel frees its slot; the
fixed-shape step that CUDA graphs replay (batch and attended length padded to buckets, padding rows on the
scratch row) gives the same tokens when run eagerly here.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from glm4.engine.base import FinishReason, SamplingParams
from glm4.engine.local import LocalEngine
from glm4.engine.runner import batch_buckets, span_buckets
from glm4.prompt import build_prompt
from tests.test_engine import chat_prompt, collect, forced, ids_of, long_params

QUESTIONS = ["hi", "你好，请介绍一下你自己。", "What flags does the server take?", "How do I stream with curl?",
             "Tell me a story about a robot who paints.", "1 + 1 = ?"]
TOKENS = 24


def raw_greedy(tiny, prompt_ids: list[int], tokens: int = TOKENS) -> list[int]:
    """transformers' own generate: the reference every decode path must match."""
    model = tiny.models[0]
    input_ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=tokens,
                             eos_token_id=None, do_sample=False, pad_token_id=model.config.pad_token_id)
    return out[0, len(prompt_ids):].tolist()


def greedy(tokens: int = TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)


@pytest.fixture
async def make_engine(tiny):
    engines = []

    async def make(**kwargs) -> LocalEngine:
        kwargs.setdefault("max_num_seqs", 4)
        engine = LocalEngine(tiny.models[0], tiny.tokenizer, tiny.info, test_hooks=True, **kwargs)
        await engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.shutdown()


@pytest.fixture(scope="module")
def expected(tiny):
    from glm4.prompt import build_prompt

    return [raw_greedy(tiny, build_prompt(tiny.tokenizer, [{"role": "user", "content": q}]).token_ids)
            for q in QUESTIONS]


@pytest.mark.parametrize("static_shapes", [False, True], ids=["eager", "fixed-shapes"])
async def test_greedy_equals_raw_generate_when_requests_join_and_leave(make_engine, expected, static_shapes):
    engine = await make_engine(max_num_seqs=4, static_shapes=static_shapes, prefix_caching=False)
    alone = ids_of(await collect(engine.submit(chat_prompt(engine, QUESTIONS[0]), greedy(), "alone")))
    assert alone == expected[0]

    async def staggered(index: int) -> list[int]:
        await asyncio.sleep(0.03 * index)  # join a batch that is already decoding
        tokens = TOKENS - 2 * (index % 3)  # and leave it at different steps
        deltas = await collect(engine.submit(chat_prompt(engine, QUESTIONS[index]), greedy(tokens), f"r{index}"))
        return ids_of(deltas)

    results = await asyncio.gather(*(staggered(i) for i in range(len(QUESTIONS))))  # 6 requests on 4 slots
    for index, ids in enumerate(results):
        assert ids == expected[index][:len(ids)] and len(ids) == TOKENS - 2 * (index % 3)
    assert engine.counters["batched_rows"] > engine.counters["steps"]  # they did share steps
    if static_shapes:  # every shape used was a bucket: padded batch and attended length
        assert engine.runner.steps and all(b in batch_buckets(4) and s in span_buckets(engine.kv.max_capacity)
                                           for b, s in engine.runner.steps)


async def test_slots_are_reused_and_never_copied_or_reallocated(make_engine):
    engine = await make_engine(max_num_seqs=2, prefix_caching=False)
    pools = [pool.data_ptr() for pool in engine.kv.pools]
    owners = []
    for round_ in range(3):
        streams = [engine.submit(chat_prompt(engine, QUESTIONS[i]), long_params(engine, 12), f"{round_}-{i}")
                   for i in range(3)]  # 3 requests, 2 slots: one waits, then takes a freed slot
        for stream in streams:
            assert (await collect(stream))[-1].finish_reason is FinishReason.LENGTH
        owners.append([slot.owner for slot in engine.kv.slots])
    assert all(owner is None for round_owners in owners for owner in round_owners)  # all freed
    assert [pool.data_ptr() for pool in engine.kv.pools] == pools  # the same memory throughout
    assert engine.kv.copies == 0  # joining and leaving moved no K/V
    assert engine.counters["finished_length"] == 9
    assert engine.counters["admitted_cold"] == 9


async def test_cancel_frees_its_slot_for_the_next_request(make_engine):
    engine = await make_engine(max_num_seqs=1)
    doomed = engine.submit(chat_prompt(engine), long_params(engine), "doomed")
    await asyncio.wait_for(anext(doomed), 30)
    waiting = engine.submit(chat_prompt(engine, "next"), forced(engine, "next one"), "waiting")
    assert engine.stats()["waiting"] == 1 and engine.kv.slots[0].owner == "doomed"
    assert engine.cancel("doomed")
    assert (await collect(doomed))[-1].finish_reason is FinishReason.CANCELLED
    deltas = await collect(waiting)
    assert "".join(d.text for d in deltas) == "next one"
    assert engine.kv.slots[0].owner is None and engine.stats()["running"] == 0


async def test_requests_go_to_the_smallest_slot_that_holds_them(make_engine):
    engine = await make_engine(slot_capacities=[1024, 96, 96])
    short, long_prompt = chat_prompt(engine, "hi"), chat_prompt(engine, "word " * 60)
    first = engine.submit(short, long_params(engine, 200, max_tokens=40), "short")  # fits a 96-token slot
    await asyncio.wait_for(anext(first), 30)
    assert engine.kv.slots[0].owner is None and {engine.kv.slots[1].owner, engine.kv.slots[2].owner} == {"short", None}
    second = engine.submit(long_prompt, long_params(engine, 200, max_tokens=100), "long")  # only the 1024 one holds it
    await asyncio.wait_for(anext(second), 30)
    assert engine.kv.slots[0].owner == "long"
    for stream in (first, second):
        assert (await collect(stream))[-1].finish_reason is FinishReason.LENGTH


async def test_prompt_longer_than_every_slot_is_refused(make_engine):
    engine = await make_engine(slot_capacities=[64, 64])
    deltas = await collect(engine.submit(chat_prompt(engine, "word " * 80), greedy(), "huge"))
    assert deltas[-1].finish_reason is FinishReason.ERROR and deltas[-1].error_status == 400
    assert engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0


async def test_reply_without_max_tokens_stops_at_its_slot_capacity(make_engine):
    engine = await make_engine(slot_capacities=[80])
    prompt = chat_prompt(engine)
    deltas = await collect(engine.submit(prompt, SamplingParams(temperature=0, max_tokens=None, ignore_eos=True), "x"))
    assert deltas[-1].finish_reason is FinishReason.LENGTH
    assert deltas[-1].usage.completion_tokens == 80 - len(prompt.token_ids)


async def test_a_row_with_non_finite_logits_fails_alone_with_a_clear_error(make_engine):
    """fp16 overflow (inf/NaN logits) in one request's row: that request fails, never with `!!!!` text; the
    others in the same steps are untouched (the test hook poisons one row of the real logits)."""
    engine = await make_engine(max_num_seqs=4)
    prompt = chat_prompt(engine, QUESTIONS[1])
    expected = ids_of(await collect(engine.submit(prompt, greedy(), "alone")))
    poisoned = SamplingParams(temperature=0.7, max_tokens=TOKENS, ignore_eos=True, fault="nan")
    results = await asyncio.gather(collect(engine.submit(prompt, poisoned, "overflow")),
                                   *(collect(engine.submit(prompt, greedy(), f"ok-{i}")) for i in range(3)))
    failed = results[0][-1]
    assert failed.finish_reason is FinishReason.ERROR and failed.error_code == "non_finite_logits"
    assert "non-finite" in failed.error and failed.usage.completion_tokens == 2
    assert "!!" not in "".join(d.text for d in results[0])  # what fp16 overflow used to print
    for deltas in results[1:]:
        assert deltas[-1].finish_reason is FinishReason.LENGTH and ids_of(deltas) == expected


def raw_logprobs(tiny, ids: list[int]) -> torch.Tensor:
    """log-softmax of transformers' own forward over the whole sequence: row p is the distribution of token p+1."""
    with torch.inference_mode():
        logits = tiny.models[0](torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


@pytest.mark.parametrize("static_shapes", [False, True], ids=["eager", "fixed-shapes"])
async def test_every_step_matches_a_raw_forward_numerically(make_engine, tiny, static_shapes):
    """Greedy tokens of a confident model survive small errors; logprobs do not. Every token's logprob and
    top-5 alternatives, for rows decoding together in slots (reused and fresh), equal a raw forward to 1e-4."""
    engine = await make_engine(max_num_seqs=3, static_shapes=static_shapes)
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=16, ignore_eos=True, logprobs=5)
    system = {"role": "system", "content": "Answer briefly, in the language of the question. " * 4}
    prompts = [build_prompt(engine.tokenizer, [system, {"role": "user", "content": q}]) for q in QUESTIONS[:3]]

    async def run(index: int):
        await asyncio.sleep(0.02 * index)
        return await collect(engine.submit(prompts[index], params, f"lp{index}"))

    for round_ in range(2):  # the second round reuses the warm slots' prefixes
        for prompt, deltas in zip(prompts, await asyncio.gather(*(run(i) for i in range(3)))):
            ids = ids_of(deltas)
            logprobs = [lp for delta in deltas for lp in delta.logprobs or []]
            assert len(logprobs) == len(ids)
            reference = raw_logprobs(tiny, prompt.token_ids + ids)
            for step, (token, lp) in enumerate(zip(ids, logprobs)):
                row = reference[len(prompt.token_ids) - 1 + step]
                assert lp.token_id == token
                assert abs(lp.logprob - row[token].item()) < 1e-4, (round_, step)
                values, top_ids = row.topk(5)
                assert [t.token_id for t in lp.top] == top_ids.tolist()
                assert max(abs(t.logprob - v) for t, v in zip(lp.top, values.tolist())) < 1e-4
    assert engine.counters["prefix_hit_tokens"] > 0
