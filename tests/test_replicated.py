"""--placement replicate: each request goes to the least-loaded replica (two real LocalEngines over the tiny model
here), and cancel reaches the replica that owns the request."""

from __future__ import annotations

from glm4.engine.base import SamplingParams
from glm4.engine.local import LocalEngine
from glm4.engine.replicated import ReplicatedEngine
from glm4.prompt import build_prompt

LONG = SamplingParams(temperature=0, max_tokens=4000, ignore_eos=True)  # cannot finish during the test
SHORT = SamplingParams(temperature=0, max_tokens=2)


def submitted(engine: ReplicatedEngine) -> list[int]:
    return [replica.get("submitted", 0) for replica in engine.stats()["per_replica"]]


async def test_requests_go_to_the_least_loaded_replica_and_cancel_reaches_the_owner(tiny):
    replicas = [LocalEngine(tiny.models[0], tiny.tokenizer, tiny.info) for _ in range(2)]
    engine = ReplicatedEngine(replicas)
    await engine.start()
    prompt = build_prompt(tiny.tokenizer, [{"role": "user", "content": "你好"}])
    try:
        busy = engine.submit(prompt, LONG, "busy")
        await anext(busy)  # decoding on replica 0 (a tie goes to the first)
        assert [r.stats()["running"] for r in replicas] == [1, 0]
        # One after another, each short request finishing before the next: all go to the idle replica 1
        # (round-robin would send the 2nd and 4th to replica 0, a random pick half of them).
        for i in range(4):
            deltas = [delta async for delta in engine.submit(prompt, SHORT, f"short-{i}")]
            assert deltas[-1].finish_reason.value == "length"
            assert submitted(engine) == [1, i + 1]
        # Both loaded, then replica 1 frees up again: the next goes there, not to the busy replica 0.
        second = engine.submit(prompt, LONG, "second")
        await anext(second)
        assert [r.stats()["running"] for r in replicas] == [1, 1]
        assert engine.stats()["running"] == 2 and engine.stats()["replicas"] == 2
        assert engine.cancel("second")
        rest = [delta async for delta in second]
        assert rest[-1].finish_reason.value == "cancelled"
        assert replicas[1].stats()["finished_cancelled"] == 1 and replicas[0].stats().get("finished_cancelled", 0) == 0
        [delta async for delta in engine.submit(prompt, SHORT, "after")]
        assert submitted(engine) == [1, 6]
        # Cancel reaches the owner of the long request too, and then replica 0 is the least loaded again.
        assert engine.cancel("busy")
        rest = [delta async for delta in busy]
        assert rest[-1].finish_reason.value == "cancelled" and replicas[0].stats()["finished_cancelled"] == 1
        [delta async for delta in engine.submit(prompt, SHORT, "last")]
        assert submitted(engine) == [2, 6]  # idle again: the tie goes to the first (fastest) card
        assert not engine.cancel("nobody")
    finally:
        await engine.shutdown()
