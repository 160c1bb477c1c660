"""The --compile decode path (static cache, solo request) gives the same tokens as the dynamic batch.

CPU has no CUDA graphs, so the static path runs eagerly here; bench/gpu_check.py --compile measures it compiled.
"""

from __future__ import annotations

import asyncio

from glm4.engine.base import SamplingParams
from glm4.engine.compiled import StaticDecoder, compile_supported
from glm4.engine.local import LocalEngine
from glm4.placement import PREFILL_CHUNK_TOKENS
from glm4.prompt import build_prompt

QUESTIONS = ["How do I use 4-bit?", "你好", "What does --placement do?"]


async def run(engine, tokenizer, question: str, request_id: str, tokens: int = 24, delay: float = 0.0):
    await asyncio.sleep(delay)
    prompt = build_prompt(tokenizer, [{"role": "user", "content": question}])
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    return [t async for delta in engine.submit(prompt, params, request_id) for t in delta.token_ids]


async def test_solo_static_path_matches_dynamic_and_hands_over_to_the_batch(tiny):
    model, tokenizer = tiny.models[0], tiny.tokenizer
    plain = LocalEngine(model, tokenizer, tiny.info)
    await plain.start()
    expected = [await run(plain, tokenizer, q, f"plain-{i}") for i, q in enumerate(QUESTIONS)]
    await plain.shutdown()

    static = LocalEngine(model, tokenizer, tiny.info)
    static.static = static._batch.static = StaticDecoder(model, tiny.info.max_model_len, PREFILL_CHUNK_TOKENS,
                                                         compile=False)
    await static.start()
    assert await run(static, tokenizer, QUESTIONS[0], "solo") == expected[0]
    # the first request starts alone (static cache); the others join mid-way (moved to the dynamic batch)
    together = await asyncio.gather(*(run(static, tokenizer, q, f"joined-{i}", delay=0.05 * i)
                                      for i, q in enumerate(QUESTIONS)))
    await static.shutdown()
    assert together == expected


def test_compile_is_refused_cleanly_without_cuda(tiny):
    supported, reason = compile_supported(tiny.models[0])
    assert not supported and reason == "no CUDA device"
    engine = LocalEngine(tiny.models[0], tiny.tokenizer, tiny.info, compile=True)
    assert engine.compiled is False and engine.static is None
