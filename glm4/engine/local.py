"""LocalEngine: a transformers model on a worker thread, decoding concurrent requests as one batch.

Each pass of the worker loop: take new requests and cancellations, prefill newcomers (FIFO, up to
max_num_seqs running), run one decode step for the whole batch, emit deltas. Requests join and leave
the batch at step boundaries (continuous batching). The asyncio loop only ever awaits queues.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
from typing import Any, AsyncIterator

import torch
from transformers import DynamicCache

from glm4.engine.base import (Delta, Engine, EngineOverloaded, EngineUnavailable, FinishReason, ModelInfo,
                              Prompt, SamplingParams, Usage)
from glm4.engine.batch import Batch, RequestState
from glm4.engine.compiled import StaticDecoder, compile_supported
from glm4.engine.sampling import sample_batch
from glm4.engine.text import ReplyText
from glm4.placement import PREFILL_CHUNK_TOKENS

log = logging.getLogger(__name__)


class InjectedFault(RuntimeError):
    """Raised by the test hook that simulates a failing model step."""


def stop_token_ids(model, tokenizer) -> set[int]:
    """GLM-4 has several end ids (<|endoftext|>, <|user|>, <|observation|>): collect them all."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None)
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    for token in ("<|endoftext|>", "<|user|>", "<|observation|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return ids


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def maybe_limit_cpu_threads(device: torch.device) -> None:
    """On CPU, leave one core to the event loop (HTTP, SSE): torch's default takes them all.

    Decode steps of a small model are many tiny ops; when the intra-op threads share their cores with
    the event loop (or any other process), they spin-wait on each other and a step can take 10-20x
    longer (measured on 2 cores: 100 tokens in 0.8 s with 1 thread, 6-20 s with 2 under load).
    An explicit OMP_NUM_THREADS / MKL_NUM_THREADS wins.
    """
    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ or "MKL_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores - 1)
    if torch.get_num_threads() > threads:
        torch.set_num_threads(threads)
        log.info("CPU decoding with %d torch thread(s), leaving a core to the server (OMP_NUM_THREADS overrides)",
                 threads)


def maybe_static_decoder(model, max_len: int) -> StaticDecoder | None:
    """--compile where the card supports it; one log line saying why not otherwise."""
    supported, reason = compile_supported(model)
    if not supported:
        log.info("--compile: %s, decoding eagerly", reason)
        return None
    log.info("--compile: lone requests decode through torch.compile + CUDA graphs (%s)", reason)
    return StaticDecoder(model, max_len, PREFILL_CHUNK_TOKENS)


class LocalEngine(Engine):
    def __init__(self, model, tokenizer, info: ModelInfo, *, max_num_seqs: int = 8, max_queue: int = 64,
                 test_hooks: bool = False, compile: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self.max_num_seqs = max_num_seqs
        self.max_queue = max_queue
        self.test_hooks = test_hooks
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.device = model.get_input_embeddings().weight.device
        maybe_limit_cpu_threads(self.device)
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._inbox: collections.deque[RequestState] = collections.deque()  # submitted, not yet admitted
        self._cancelled: set[str] = set()  # mark-and-sweep: the worker drops these between steps
        self.static = maybe_static_decoder(model, info.max_model_len) if compile else None
        self.compiled = self.static is not None
        self._batch = Batch(self.device, self.static)
        self._finals: list[tuple[RequestState, Delta]] = []  # emitted after the batch is filtered
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._accepting = True
        self.counters = collections.Counter()  # submitted, finished_<reason>, rejected, steps, tokens ...

    # ---- public interface (event loop side) ----

    async def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="glm4-engine", daemon=True)
            self._thread.start()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def submit(self, prompt: Prompt, params: SamplingParams, request_id: str) -> AsyncIterator[Delta]:
        if not self._accepting:
            raise EngineUnavailable("the server is shutting down; retry on another instance")
        if self._thread is None:
            raise EngineUnavailable("the engine is not started")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Delta] = asyncio.Queue()
        room = self.info.max_model_len - len(prompt.token_ids)
        state = RequestState(
            request_id=request_id, prompt_ids=list(prompt.token_ids), params=params,
            reply=ReplyText(self.tokenizer, params.stop, strip_leading_newline=not prompt.prefix),
            max_new_tokens=max(0, min(params.max_tokens or room, room)),
            emit=lambda delta: loop.call_soon_threadsafe(queue.put_nowait, delta),
            fault=params.fault if self.test_hooks else None,
        )
        with self._lock:
            if len(self._inbox) >= self.max_queue + max(0, self.max_num_seqs - len(self._batch)):
                self.counters["rejected"] += 1
                raise EngineOverloaded(retry_after=self._retry_after())
            self._inbox.append(state)
            self.counters["submitted"] += 1
        self._wakeup.set()
        return self._stream(queue, request_id)

    async def _stream(self, queue: asyncio.Queue, request_id: str) -> AsyncIterator[Delta]:
        finished = False
        try:
            while not finished:
                delta = await queue.get()
                finished = delta.finished
                yield delta
        finally:
            if not finished:  # the consumer went away (client disconnect, UI stop): free the slot
                self.cancel(request_id)

    def cancel(self, request_id: str) -> bool:
        with self._lock:
            known = any(s.request_id == request_id for s in self._inbox) or \
                any(s.request_id == request_id for s in self._batch.rows)
            if known:
                self._cancelled.add(request_id)
        self._wakeup.set()
        return known

    def stats(self) -> dict[str, Any]:
        with self._lock:
            waiting = len(self._inbox)
        running = len(self._batch)
        return {"running": running, "waiting": waiting, "batch_size": running,
                "max_num_seqs": self.max_num_seqs, "max_queue": self.max_queue, **self.counters}

    async def shutdown(self, drain_timeout: float = 0.0) -> None:
        self._accepting = False
        deadline = time.monotonic() + drain_timeout
        while time.monotonic() < deadline and (len(self._batch) or self._inbox):
            await asyncio.sleep(0.05)
        with self._lock:
            self._cancelled.update(s.request_id for s in list(self._inbox) + list(self._batch.rows))
        self._stopping.set()
        self._wakeup.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
            self._thread = None

    def _retry_after(self) -> float:
        """Rough wait before a slot frees: the queue ahead times a typical reply's duration."""
        return float(max(1, min(60, (len(self._inbox) + 1) // max(1, self.max_num_seqs))))

    # ---- worker thread ----

    def _run(self) -> None:
        with torch.inference_mode():
            if self.static is not None:
                self._warm_up_static()
            while not self._stopping.is_set():
                try:
                    if not self._pass():
                        self._wakeup.wait(timeout=0.5)
                        self._wakeup.clear()
                except Exception as error:  # a bug in the loop itself: fail everything, keep serving
                    log.exception("engine loop failed")
                    self._fail_all(f"internal engine error: {type(error).__name__}")
            self._fail_all("the server is shutting down", reason=FinishReason.CANCELLED)

    def _warm_up_static(self) -> None:
        """Compile before serving; if compilation fails, serve eagerly rather than not at all."""
        started = time.monotonic()
        try:
            self.static.warm_up(self.encode("[gMASK]<sop><|user|>\nhello<|assistant|>"))
            log.info("--compile: decode graphs ready in %.1f s", time.monotonic() - started)
        except Exception as error:
            log.warning("--compile failed (%s: %s); decoding eagerly", type(error).__name__, str(error)[:200])
            self.static = self._batch.static = None
            self.compiled = False

    def _pass(self) -> bool:
        """One scheduling pass; False when there was nothing to do."""
        self._sweep_cancelled()
        admitted = False
        while len(self._batch) < self.max_num_seqs:
            with self._lock:
                if not self._inbox:
                    break
                state = self._inbox.popleft()
            self._prefill(state)
            admitted = True
        if len(self._batch):
            self._decode_step()
        self._emit_finals()
        return admitted or bool(len(self._batch))

    def _sweep_cancelled(self) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            waiting = [s for s in self._inbox if s.request_id in cancelled]
            for state in waiting:
                self._inbox.remove(state)
        for state in waiting:
            self._finish(state, FinishReason.CANCELLED)
        gone = [i for i, s in enumerate(self._batch.rows) if s.request_id in cancelled]
        for i in gone:
            self._finish(self._batch.rows[i], FinishReason.CANCELLED)
        if gone:
            self._batch.filter([i for i in range(len(self._batch)) if i not in gone])

    def _prefill(self, state: RequestState) -> None:
        if state.max_new_tokens <= 0:
            self._finish(state, FinishReason.LENGTH)
            return
        if self.static is not None and not len(self._batch) and not self._inbox:
            self._prefill_solo(state)
            return
        try:
            cache = DynamicCache(config=self.model.config)
            prompt = torch.tensor([state.prompt_ids], dtype=torch.long, device=self.device)
            # Chunks bound the activation memory of long prompts (the placement plan reserves one chunk).
            for start in range(0, prompt.shape[1], PREFILL_CHUNK_TOKENS):
                chunk = prompt[:, start:start + PREFILL_CHUNK_TOKENS]
                out = self.model(input_ids=chunk, cache=cache, use_cache=True, logits_to_keep=1)
            token = sample_batch(out.logits[:, -1, :], [state])[0]
        except Exception as error:  # only this request was in the step
            self._fail([state], error)
            return
        state.first_token_at = time.monotonic()
        self.counters["prompt_tokens"] += len(state.prompt_ids)
        if self._accept_token(state, token):
            self._batch.add(state, cache, token)

    def _prefill_solo(self, state: RequestState) -> None:
        try:
            token = sample_batch(self.static.prefill(state.prompt_ids), [state])[0]
        except Exception as error:
            self._fail([state], error)
            return
        state.first_token_at = time.monotonic()
        self.counters["prompt_tokens"] += len(state.prompt_ids)
        if self._accept_token(state, token):
            self._batch.add_solo(state, token)

    def _decode_step(self) -> None:
        batch = self._batch
        try:
            self._maybe_inject_fault(batch.rows)
            tokens = sample_batch(batch.step_logits(self.model), batch.rows)
        except Exception as error:  # the whole batch shared the failed step
            rows = list(batch.rows)
            batch.filter([])
            self._fail(rows, error)
            return
        self.counters["steps"] += 1
        self.counters["batched_rows"] += len(batch)
        keep = []
        for i, (state, token) in enumerate(zip(batch.rows, tokens)):
            if self._accept_token(state, token):
                batch.next_tokens[i] = token
                keep.append(i)
        batch.filter(keep)

    def _accept_token(self, state: RequestState, token: int) -> bool:
        """Record one sampled token, emit text; False when the request finished."""
        state.output_ids.append(token)
        state.unsent_ids.append(token)
        self.counters["generation_tokens"] += 1
        if token in self.stop_ids and not state.params.ignore_eos and state.allowed_next_tokens() is None:
            self._finish(state, FinishReason.STOP, text=state.reply.finish())
            return False
        text = state.reply.push(token)
        if state.reply.stopped:
            self._finish(state, FinishReason.STOP, text=text)
            return False
        if len(state.output_ids) >= state.max_new_tokens:
            self._finish(state, FinishReason.LENGTH, text=text + state.reply.finish())
            return False
        if text:  # token ids travel with their text: held-back tokens come with the delta that releases them
            state.emit(Delta(text=text, token_ids=state.unsent_ids))
            state.unsent_ids = []
        return True

    def _finish(self, state: RequestState, reason: FinishReason, text: str = "", error: str | None = None,
                status: int = 500) -> None:
        self.counters[f"finished_{reason.value}"] += 1
        unsent, state.unsent_ids = state.unsent_ids, []
        self._finals.append((state, Delta(text=text, token_ids=unsent, finish_reason=reason, error=error,
                                          error_status=status,
                                          usage=Usage(len(state.prompt_ids), len(state.output_ids)))))

    def _emit_finals(self) -> None:
        finals, self._finals = self._finals, []
        for state, delta in finals:
            state.emit(delta)

    def _fail(self, states: list[RequestState], error: Exception) -> None:
        oom = is_out_of_memory(error)
        if oom and torch.cuda.is_available():
            torch.cuda.empty_cache()  # give the allocator's cached blocks back before the next step
        log.error("generation step failed for %d request(s): %s: %s", len(states), type(error).__name__, error)
        message = ("the GPU ran out of memory during generation; retry, or lower max_tokens / --max-num-seqs"
                   if oom else f"generation failed: {type(error).__name__}")
        for state in states:
            self._finish(state, FinishReason.ERROR, error=message, status=503 if oom else 500)

    def _fail_all(self, message: str, reason: FinishReason = FinishReason.ERROR) -> None:
        with self._lock:
            pending = list(self._inbox) + list(self._batch.rows)
            self._inbox.clear()
        self._batch.filter([])
        for state in pending:
            self._finish(state, reason, error=message if reason is FinishReason.ERROR else None)
        self._emit_finals()

    def _maybe_inject_fault(self, rows: list[RequestState]) -> None:
        """Test hook (--test-hooks only): a request asks its step to raise after its first tokens."""
        for state in rows:
            if state.fault and len(state.output_ids) >= 2:
                kind, state.fault = state.fault, None
                if kind == "oom":
                    raise torch.OutOfMemoryError("CUDA out of memory (simulated by the test hook)")
                raise InjectedFault("injected fault (test hook)")
