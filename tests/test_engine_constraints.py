"""Grammar constraints and logprobs inside the engine's batch, on the real tiny GLM-4 (which knows no JSON).

Every reply under a JSON schema parses and validates, also at temperature 1 and eight at a time; a batch
mixing constrained, logprobs and plain requests gives each what it gets alone; a matcher that breaks fails
its own request and leaves its batch-mates untouched.
"""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest

from glm4.engine.base import FinishReason, SamplingParams
from glm4.engine.constraints import ConstraintCompiler
from glm4.engine.local import LocalEngine
from tests.test_engine import chat_prompt, collect, ids_of, text_of

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3},
        "unit": {"enum": ["摄氏", "fahrenheit"]},
        "detail": {"type": "object", "properties": {"note": {"type": "string", "maxLength": 8}},
                   "required": ["note"], "additionalProperties": False},
    },
    "required": ["city", "days", "unit", "detail"],
    "additionalProperties": False,
}


@pytest.fixture
async def engine(tiny):
    local = LocalEngine(tiny.models[0], tiny.tokenizer, tiny.info, max_num_seqs=8, test_hooks=True)
    await local.start()
    yield local
    await local.shutdown()


@pytest.fixture(scope="module")
def compiler(tiny):
    from glm4.engine.local import stop_token_ids

    return ConstraintCompiler(tiny.tokenizer, tiny.info.vocab_size, stop_token_ids(tiny.models[0], tiny.tokenizer))


async def test_json_schema_replies_always_validate_even_eight_at_a_time(engine, compiler):
    constraint = compiler.json_schema(SCHEMA, strict=True)
    prompt = chat_prompt(engine, "北京天气怎么样？")
    streams = [engine.submit(prompt, SamplingParams(temperature=1.0, seed=seed, max_tokens=200,
                                                    constraint=constraint), f"json-{seed}") for seed in range(20)]
    results = await asyncio.gather(*(collect(stream) for stream in streams))
    for deltas in results:
        assert deltas[-1].finish_reason is FinishReason.STOP, text_of(deltas)
        jsonschema.validate(json.loads(text_of(deltas)), SCHEMA)
    assert engine.counters["batched_rows"] > engine.counters["steps"]  # they were decoded together
    assert len({text_of(deltas) for deltas in results}) > 1  # sampled, not one forced answer


async def test_a_mixed_batch_gives_each_request_what_it_gets_alone(engine, compiler):
    prompt = chat_prompt(engine, "Tell me the weather as JSON.")
    cases = {
        "constrained": SamplingParams(temperature=0.9, seed=3, max_tokens=120,
                                      constraint=compiler.json_schema(SCHEMA, strict=True)),
        "logprobs": SamplingParams(temperature=0, max_tokens=20, logprobs=3, ignore_eos=True),
        "plain": SamplingParams(temperature=0.8, seed=4, max_tokens=20, ignore_eos=True),
        "object": SamplingParams(temperature=0.7, seed=5, max_tokens=60, constraint=compiler.json_object()),
    }
    alone = {name: await collect(engine.submit(prompt, params, f"alone-{name}")) for name, params in cases.items()}
    together = dict(zip(cases, await asyncio.gather(
        *(collect(engine.submit(prompt, params, f"together-{name}")) for name, params in cases.items()))))
    for name in cases:
        assert ids_of(together[name]) == ids_of(alone[name]), name
    lp_alone = [lp.logprob for d in alone["logprobs"] for lp in d.logprobs or []]
    lp_together = [lp.logprob for d in together["logprobs"] for lp in d.logprobs or []]
    assert len(lp_together) == 20 and max(abs(a - b) for a, b in zip(lp_alone, lp_together)) < 1e-4
    assert all(d.logprobs is None for d in together["plain"])  # costs nothing when not asked for


class BreaksAfter:
    """A matcher that fails on its fourth step (a fault the real grammar library cannot be made to produce)."""

    def __init__(self, inner):
        self.inner, self.steps = inner, 0

    def fill_bitmask(self, bitmask, row):
        self.steps += 1
        if self.steps > 3:
            raise RuntimeError("matcher state corrupted")
        return self.inner.fill_bitmask(bitmask, row)

    def accept(self, token_id):
        self.inner.accept(token_id)

    def is_finished(self):
        return self.inner.is_finished()


class BreakingConstraint:
    def __init__(self, inner):
        self.inner = inner

    def new_matcher(self):
        return BreaksAfter(self.inner.new_matcher())


async def test_a_broken_matcher_fails_only_its_own_request(engine, compiler):
    prompt = chat_prompt(engine, "hi")
    good = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    expected = ids_of(await collect(engine.submit(prompt, good, "before")))
    broken = SamplingParams(temperature=0, max_tokens=30, constraint=BreakingConstraint(compiler.json_object()))
    results = await asyncio.gather(collect(engine.submit(prompt, broken, "broken")),
                                   *(collect(engine.submit(prompt, good, f"mate-{i}")) for i in range(3)))
    failed = results[0][-1]
    assert failed.finish_reason is FinishReason.ERROR and failed.error_code == "grammar_error"
    assert "matcher" in failed.error
    for deltas in results[1:]:
        assert deltas[-1].finish_reason is FinishReason.LENGTH and ids_of(deltas) == expected
