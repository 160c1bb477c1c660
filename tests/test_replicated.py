"""--placement replicate: requests go to the least-loaded replica (two engines over the tiny model here)."""

from __future__ import annotations


from glm4.engine.base import SamplingParams
from glm4.engine.local import LocalEngine
from glm4.engine.replicated import ReplicatedEngine
from glm4.prompt import build_prompt


async def test_requests_spread_over_replicas_and_cancel_reaches_the_owner(tiny):
    replicas = [LocalEngine(tiny.models[0], tiny.tokenizer, tiny.info) for _ in range(2)]
    engine = ReplicatedEngine(replicas)
    await engine.start()
    prompt = build_prompt(tiny.tokenizer, [{"role": "user", "content": "你好"}])
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    first, second = engine.submit(prompt, params, "a"), engine.submit(prompt, params, "b")
    await anext(first), await anext(second)  # both running now
    assert [r.stats()["running"] for r in replicas] == [1, 1]
    assert engine.stats()["running"] == 2 and engine.stats()["replicas"] == 2
    assert engine.cancel("b")
    rest = [delta async for delta in second]
    assert rest[-1].finish_reason.value == "cancelled"
    done = [delta async for delta in first]
    assert done[-1].usage.completion_tokens == 200
    await engine.shutdown()
