"""--compile: a lone request decodes on a preallocated KV cache through a compiled forward (CUDA graphs).

Eager decoding of a 9B model is bound by Python and kernel launches (~14 tok/s on an H200, against a
memory-bandwidth bound near 256). With a static cache every decode step has the same shapes, so
torch.compile(mode="reduce-overhead") can replay one captured CUDA graph per token. Prompts still
prefill eagerly (their lengths vary). When a second request arrives, the cache is copied into a
dynamic cache and the request joins the ordinary batch (continuous batching needs growing shapes).
"""

from __future__ import annotations

import logging

import torch
from transformers import DynamicCache, StaticCache

log = logging.getLogger(__name__)


def compile_supported(model) -> tuple[bool, str]:
    """(supported, reason): CUDA sm_75+ with Triton, and the whole model on one GPU."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1:
        return False, "the model is split across devices"
    (device,) = devices
    capability = torch.cuda.get_device_capability(device)
    if capability < (7, 5):
        return False, f"sm_{capability[0]}{capability[1]} has no Triton support"
    try:
        import triton  # noqa: F401  (torch.compile's GPU code generator)
    except ImportError:
        return False, "Triton is not installed"
    return True, f"sm_{capability[0]}{capability[1]}"


class StaticDecoder:
    """Prefill and decode one request on a StaticCache; `compile=False` runs the same path eagerly (tests)."""

    def __init__(self, model, max_len: int, prefill_chunk: int, compile: bool = True):
        self.model = model
        self.max_len = max_len
        self.prefill_chunk = prefill_chunk
        self.device = model.get_input_embeddings().weight.device
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.step_forward = torch.compile(model.forward, mode="reduce-overhead") if compile \
            else model.forward
        self.length = 0  # tokens in the cache

    def prefill(self, prompt_ids: list[int]) -> torch.Tensor:
        """Eager prefill in chunks; returns the last position's logits [1, vocab]."""
        self.cache.reset()
        prompt = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        for start in range(0, prompt.shape[1], self.prefill_chunk):
            out = self.model(input_ids=prompt[:, start:start + self.prefill_chunk], cache=self.cache,
                             use_cache=True, logits_to_keep=1)
        self.length = len(prompt_ids)
        return out.logits[:, -1, :]

    def step(self, token: int) -> torch.Tensor:
        """Feed one token at the next position; returns logits [1, vocab] (a copy: graph outputs get reused)."""
        input_ids = torch.tensor([[token]], dtype=torch.long, device=self.device)
        position_ids = torch.tensor([[self.length]], dtype=torch.long, device=self.device)
        out = self.step_forward(input_ids=input_ids, position_ids=position_ids, cache=self.cache, use_cache=True,
                                logits_to_keep=1)
        self.length += 1
        return out.logits[:, -1, :].clone()

    def to_dynamic(self) -> DynamicCache:
        """The cached tokens as a DynamicCache (batch of 1), so the request can join a growing batch."""
        dynamic = DynamicCache(config=self.model.config)
        for static_layer, layer in zip(self.cache.layers, dynamic.layers):
            keys = static_layer.keys[:, :, : self.length].clone()
            values = static_layer.values[:, :, : self.length].clone()
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
        return dynamic

    def warm_up(self, prompt_ids: list[int], steps: int = 3) -> None:
        """Compile and capture the graphs now, so the first user does not pay for it."""
        token = int(self.prefill(prompt_ids).argmax())
        for _ in range(steps):
            token = int(self.step(token).argmax())
        self.cache.reset()
        self.length = 0
