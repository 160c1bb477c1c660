"""ReplicatedEngine: one full model replica per GPU (--placement replicate), each request on the least-loaded.

On a 2080 Ti + 1070 this serves two users in parallel instead of one model split across both cards.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, AsyncIterator

from glm4.engine.base import Delta, Engine, Prompt, SamplingParams


class ReplicatedEngine(Engine):
    def __init__(self, replicas: list[Engine]):
        self.replicas = replicas
        self.info = replicas[0].info
        self.tokenizer = getattr(replicas[0], "tokenizer", None)
        self._owner: dict[str, Engine] = {}  # request id → replica serving it

    def encode(self, text: str) -> list[int]:
        return self.replicas[0].encode(text)

    async def start(self) -> None:
        await asyncio.gather(*(replica.start() for replica in self.replicas))

    async def shutdown(self, drain_timeout: float = 0.0) -> None:
        await asyncio.gather(*(replica.shutdown(drain_timeout) for replica in self.replicas))

    def _load(self, replica: Engine) -> int:
        stats = replica.stats()
        return stats.get("running", 0) + stats.get("waiting", 0)

    def submit(self, prompt: Prompt, params: SamplingParams, request_id: str) -> AsyncIterator[Delta]:
        replica = min(self.replicas, key=self._load)  # ties go to the first (fastest) card
        stream = replica.submit(prompt, params, request_id)
        self._owner[request_id] = replica
        return self._tracked(stream, request_id)

    async def _tracked(self, stream: AsyncIterator[Delta], request_id: str) -> AsyncIterator[Delta]:
        try:
            async for delta in stream:
                yield delta
        finally:
            await stream.aclose()
            self._owner.pop(request_id, None)

    def cancel(self, request_id: str) -> bool:
        replica = self._owner.get(request_id)
        return replica.cancel(request_id) if replica else False

    def stats(self) -> dict[str, Any]:
        total: collections.Counter = collections.Counter()
        per_replica = []
        for replica in self.replicas:
            stats = replica.stats()
            per_replica.append(stats)
            total.update({k: v for k, v in stats.items() if isinstance(v, (int, float))})
        return {**total, "replicas": len(self.replicas), "per_replica": per_replica}
