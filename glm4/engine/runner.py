"""Forward passes over the slot KV cache: chunked prefill into one slot, one decode step for many rows.

The runner drives the model's own modules (embeddings, rotary embedding, decoder layers, final norm, lm_head)
instead of its `forward`, so the attention layers read and write the slot pools (glm4.engine.kv) with masks
built here, and the same code serves glm (glm-4-9b-chat-hf) and glm4 (GLM-4-0414) checkpoints, quantized or
not, on one device or split across several (accelerate's hooks move activations between layers).

Decode, one path for every batch size:
- eager (CPU, or wherever graphs are off): a lone row attends to a plain slice of its slot; several rows
  gather the rows they attend to, exactly as many as the longest needs (the attention cost follows the tokens
  in the cache, never --max-model-len);
- CUDA graphs: the step is padded to a fixed shape — batch to a bucket (1, 2, 4, 8, ...), attended length to
  a power of two — and each shape is captured once with torch.cuda.CUDAGraph at start-up and replayed every
  token. Padding rows point at the pool's scratch row. `--compile` wraps the captured step with torch.compile
  where the card has Triton. The fixed-shape step runs eagerly on CPU too (`static_shapes=True`), so the
  tests check the exact code the graphs replay.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from glm4.engine.kv import DecodeAddress, PrefillAddress, Slot, SlotKVCache

log = logging.getLogger(__name__)

MIN_SPAN = 256  # smallest attended-length bucket of a fixed-shape step


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, ... up to and including max_batch."""
    buckets, size = [], 1
    while size < max_batch:
        buckets.append(size)
        size *= 2
    return buckets + [max_batch]


def span_buckets(max_span: int) -> list[int]:
    """Powers of two from MIN_SPAN, the last one exactly max_span."""
    buckets, size = [], MIN_SPAN
    while size < max_span:
        buckets.append(size)
        size *= 2
    return buckets + [max_span]


def bucket_for(value: int, buckets: list[int]) -> int:
    return next(bucket for bucket in buckets if bucket >= value)


@dataclass
class DecodeRow:
    slot: Slot
    position: int  # where the fed token goes (= tokens already in the slot)
    token: int  # the token fed at this step


class StaticStep:
    """One fixed decode shape [batch, span]: input buffers, and (on CUDA) its captured graph."""

    def __init__(self, runner: "ModelRunner", batch: int, span: int):
        device = runner.device
        self.batch, self.span = batch, span
        self.input_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.write = torch.zeros(batch, dtype=torch.long, device=device)  # pool row of each row's new K/V
        self.base = torch.zeros(batch, dtype=torch.long, device=device)  # each row's slot offset
        self.last = torch.zeros(batch, dtype=torch.long, device=device)  # last pool row a row may read
        self.steps = torch.arange(span, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def fill(self, rows: list[DecodeRow], scratch: int) -> None:
        """Copy this step's rows into the buffers; padding rows attend to and write the scratch row only."""
        pad = self.batch - len(rows)
        values = torch.tensor(
            [[row.token, row.position, row.slot.offset + row.position, row.slot.offset,
              row.slot.offset + row.position] for row in rows] + [[0, 0, scratch, scratch, scratch]] * pad,
            dtype=torch.long)
        for buffer, column in zip((self.input_ids[:, 0], self.positions[:, 0], self.write, self.base, self.last),
                                  values.t()):
            buffer.copy_(column, non_blocking=True)

    def body(self, runner: "ModelRunner") -> torch.Tensor:
        """The step itself, with every shape fixed: what a CUDA graph captures."""
        read = torch.minimum(self.base[:, None] + self.steps[None, :], self.last[:, None])  # [B, span]
        mask = (self.base[:, None] + self.steps[None, :] <= self.last[:, None])[:, None, None, :]  # [B,1,1,span]
        address = DecodeAddress(write=self.write, read=read)
        return runner.forward(self.input_ids, self.positions, mask, address)

    def run(self, runner: "ModelRunner") -> torch.Tensor:
        if self.graph is None:
            return self.body(runner)
        self.graph.replay()
        return self.logits


class ModelRunner:
    def __init__(self, model, kv: SlotKVCache, *, max_batch: int, use_graphs: bool = False,
                 compile: bool = False, static_shapes: bool = False):
        self.model = model
        self.body = model.model
        self.kv = kv
        embeddings = model.get_input_embeddings()
        self.device = execution_device(embeddings, embeddings.weight)
        self.max_batch = max_batch
        self.use_graphs = use_graphs
        self.static_shapes = static_shapes or use_graphs  # fixed-shape steps (graphs need them)
        self.compile = compile
        self.batches = batch_buckets(max_batch)
        self.spans = span_buckets(kv.max_capacity)
        self.steps: dict[tuple[int, int], StaticStep] = {}
        self.mempool = None

    # ---- one forward pass ----

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                address: PrefillAddress | DecodeAddress) -> torch.Tensor:
        """input_ids, positions: [B, q]; mask: bool [B, 1, q, keys] or None (causal / all keys). Returns the
        logits of each row's last position, [B, vocab], fp32."""
        hidden = self.body.embed_tokens(input_ids)
        position_embeddings = self.body.rotary_emb(hidden, position_ids=positions)
        self.kv.address = address
        for layer in self.body.layers:
            hidden = layer(hidden, attention_mask=mask, position_ids=positions, cache=self.kv, use_cache=True,
                           position_embeddings=position_embeddings)
        hidden = self.body.norm(hidden[:, -1:, :])
        return self.model.lm_head(hidden)[:, 0, :].float()

    def prefill(self, slot: Slot, token_ids: list[int], start: int) -> torch.Tensor:
        """Write `token_ids` at positions start.. of `slot`; logits [1, vocab] after the last one."""
        count = len(token_ids)
        input_ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        positions = torch.arange(start, start + count, device=self.device)[None, :]
        mask = None  # from position 0, SDPA's own causal mask is exact (and takes the fused kernels)
        if start:  # after cached tokens: every new token sees them all, and the new ones causally
            keys = torch.arange(start + count, device=self.device)
            mask = (keys[None, :] <= positions[0, :, None])[None, None]  # [1, 1, count, start + count]
        return self.forward(input_ids, positions, mask, PrefillAddress(slot.offset, start, count))

    def decode(self, rows: list[DecodeRow]) -> torch.Tensor:
        """One token for each row; logits [len(rows), vocab]."""
        if self.static_shapes and len(rows) <= self.max_batch:
            step = self.static_step(len(rows), max(row.position + 1 for row in rows))
            step.fill(rows, self.kv.scratch_row)
            return step.run(self)[:len(rows)]
        write = torch.tensor([row.slot.offset + row.position for row in rows], dtype=torch.long)
        input_ids = torch.tensor([[row.token] for row in rows], dtype=torch.long, device=self.device)
        positions = torch.tensor([[row.position] for row in rows], dtype=torch.long, device=self.device)
        if len(rows) == 1:  # a plain slice of the slot: no gather, no mask
            row = rows[0]
            return self.forward(input_ids, positions, None,
                                DecodeAddress(write=write, view=(row.slot.offset, row.position + 1)))
        span = max(row.position + 1 for row in rows)
        steps = torch.arange(span)
        lengths = torch.tensor([row.position + 1 for row in rows])
        offsets = torch.tensor([row.slot.offset for row in rows])
        read = offsets[:, None] + torch.minimum(steps[None, :], lengths[:, None] - 1)  # [B, span]
        mask = (steps[None, :] < lengths[:, None])[:, None, None, :].to(self.device)
        return self.forward(input_ids, positions, mask, DecodeAddress(write=write, read=read))

    # ---- fixed shapes and CUDA graphs ----

    def static_step(self, batch: int, span: int) -> StaticStep:
        key = (bucket_for(batch, self.batches), bucket_for(span, self.spans))
        if key not in self.steps:
            self.steps[key] = StaticStep(self, *key)
        return self.steps[key]

    def capture(self) -> float:
        """Capture every (batch, span) bucket as a CUDA graph; returns the seconds it took. A shape that fails
        to capture (an op that syncs the host, an unsupported kernel) stays eager, with one log line."""
        if not self.use_graphs:
            return 0.0
        started = time.monotonic()
        shapes = [(b, s) for s in self.spans for b in self.batches]
        log.info("CUDA graphs: capturing %d decode shapes (batch buckets %s, attended-length buckets %s)",
                 len(shapes), self.batches, self.spans)
        self.mempool = torch.cuda.graph_pool_handle()
        body = torch.compile(StaticStep.body, dynamic=False) if self.compile else StaticStep.body
        failed = []
        for done, (batch, span) in enumerate(shapes, 1):
            step = self.static_step(batch, span)
            step.fill([], self.kv.scratch_row)
            try:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):  # warm-up runs allocate outside the graph
                    for _ in range(2):
                        body(step, self)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.mempool):
                    step.logits = body(step, self)
                step.graph = graph
            except Exception as error:  # this shape decodes eagerly; the others keep their graphs
                failed.append((batch, span))
                step.graph, step.logits = None, None
                log.warning("CUDA graph capture failed for batch %d x span %d (%s: %s): that shape runs eagerly",
                            batch, span, type(error).__name__, str(error)[:200])
            if done % 8 == 0 or done == len(shapes):
                log.info("CUDA graphs: %d/%d shapes captured (%.1f s)", done - len(failed), len(shapes),
                         time.monotonic() - started)
        torch.cuda.synchronize()
        return time.monotonic() - started


def graphs_supported(model) -> tuple[bool, str]:
    """(supported, reason): CUDA graphs need the whole model on one CUDA device."""
    if not torch.cuda.is_available():
        return False, "no CUDA device: decoding eagerly (same slot cache, same code path)"
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        return False, "the model is split across devices: decoding eagerly on the same slot cache"
    return True, f"{torch.cuda.get_device_name(next(iter(devices)))}"


def compile_supported(model) -> tuple[bool, str]:
    """(supported, reason): torch.compile's GPU code generator needs Triton and sm_75 or newer."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    capability = torch.cuda.get_device_capability(next(model.parameters()).device)
    if capability < (7, 5):
        return False, f"sm_{capability[0]}{capability[1]} has no Triton support"
    try:
        import triton  # noqa: F401  (torch.compile's GPU code generator)
    except ImportError:
        return False, "Triton is not installed"
    return True, f"sm_{capability[0]}{capability[1]}"


def execution_device(module: torch.nn.Module, weight: torch.Tensor) -> torch.device:
    """Where a module computes: its weight's device, or, for weights accelerate offloaded (meta), the device its
    hook loads them to."""
    if weight.device.type != "meta":
        return weight.device
    device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    return torch.device(f"cuda:{device}" if isinstance(device, int) else device or "cpu")


def pool_geometry(model) -> tuple[list[torch.device], int, int, torch.dtype]:
    """Layer devices, KV heads, head dim and the K/V dtype the slot pools need."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    devices = [execution_device(layer, layer.self_attn.k_proj.weight) for layer in model.model.layers]
    dtype = model.get_input_embeddings().weight.dtype  # the compute dtype, also for bitsandbytes models
    return devices, kv_heads, head_dim, dtype


def slot_capacities_for(max_model_len: int, max_num_seqs: int) -> list[int]:
    """Equal slots when the caller has no plan (in-process engines in tests and benches)."""
    return [max_model_len] * max_num_seqs
