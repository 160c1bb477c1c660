"""LocalEngine: a transformers model on a worker thread, decoding concurrent requests on a slot KV cache.

Each pass of the worker loop: sweep cancellations, admit waiting requests to slots (glm4.engine.prefix picks
the slot and the K/V they reuse), prefill one chunk (so a cancel lands between chunks and running streams
keep flowing during a long prompt), run one decode step for every running request, then emit. Requests
join and leave at step boundaries (continuous batching) without moving any cache.

A decode step launches the forward pass first; the host work of the previous step (incremental
detokenization, stop strings, emitting deltas) and this step's grammar masks run while the device computes,
then the step's tokens come back in one copy. A row finished by a stop string during that host work had one
wasted row in the step; its token is dropped.

Failures stay with their request: a non-finite logits row, a grammar matcher error, or a test fault fails
only that request. A batched forward that raises (an exception, CUDA out of memory) cannot be attributed:
each survivor is decoded again alone from the K/V its slot already holds (the failed step wrote nothing the
retry does not overwrite), and only a request that still fails alone gets the error. The asyncio loop only
ever awaits queues.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import numpy as np
import torch

from glm4.engine.base import (PREFILL_CHUNK_TOKENS, Delta, Engine, EngineOverloaded, EngineUnavailable,
                              FinishReason, Matcher, MatcherError, ModelInfo, Prompt, SamplingParams, TokenLogprob,
                              Usage)
from glm4.engine.constraints import allocate_bitmask
from glm4.engine.kv import HostEntry, HostPromptCache, Slot, SlotKVCache
from glm4.engine.prefix import MIN_REUSE_TOKENS, Admission, choose_admission
from glm4.engine.runner import (DecodeRow, ModelRunner, compile_supported, execution_device, graphs_supported,
                                pool_geometry, slot_capacities_for)
from glm4.engine.sampling import Sampled, sample_step
from glm4.engine.text import ReplyText, TokenTexts

log = logging.getLogger(__name__)

DEFAULT_REPLY_RESERVE = 1024  # capacity a request without max_tokens asks of a slot, beyond its prompt


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


@dataclass
class RequestState:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    reply: ReplyText
    emit: Callable[[Delta], None]  # hands a delta to the request's consumer (thread-safe)
    salt: str = ""
    hint: str | None = None
    fault: str | None = None  # test hook: "error"/"oom" raised in its decode steps, "nan" poisons its logits
    matcher: Matcher | None = None
    slot: Slot | None = None
    prefilled: int = 0  # prompt tokens whose K/V are in the slot
    cached: int = 0  # of those, reused from the prefix cache
    max_new_tokens: int = 0  # set at admission: max_tokens clipped to the slot's room
    next_token: int | None = None  # the last sampled token, fed at the next decode step
    output_ids: list[int] = field(default_factory=list)
    unsent_ids: list[int] = field(default_factory=list)  # sampled, not yet in a delta (text held back)
    unsent_logprobs: list[TokenLogprob] = field(default_factory=list)
    leaving: bool = False  # finished: out of the batch, its final delta queued
    done: bool = False  # final delta sent
    first_token_at: float | None = None
    _uniforms: torch.Generator | None = None
    _prompt_tensor: torch.Tensor | None = None
    _prompt_array: np.ndarray | None = None

    @property
    def prompt_tensor(self) -> torch.Tensor:
        if self._prompt_tensor is None:
            self._prompt_tensor = torch.tensor(self.prompt_ids, dtype=torch.long)
        return self._prompt_tensor

    @property
    def prompt_array(self) -> np.ndarray:
        if self._prompt_array is None:
            self._prompt_array = np.asarray(self.prompt_ids, dtype=np.int64)
        return self._prompt_array

    def output_tensor(self) -> torch.Tensor:
        return torch.tensor(self.output_ids, dtype=torch.long)

    def uniform(self) -> float:
        """The next uniform draw of this request's own generator (seeded requests repeat in any batch)."""
        if self._uniforms is None:
            self._uniforms = torch.Generator()
            seed = self.params.seed if self.params.seed is not None else secrets.randbits(63)
            self._uniforms.manual_seed(seed % 2**63)
        return float(torch.rand(1, generator=self._uniforms))

    def capacity_needed(self, longest: int) -> int:
        """Slot capacity to ask for: the prompt plus max_tokens, or a default reserve when it is unset."""
        reply = self.params.max_tokens if self.params.max_tokens is not None else DEFAULT_REPLY_RESERVE
        return min(longest, len(self.prompt_ids) + max(1, reply))

    def allowed_next_tokens(self) -> list[int] | None:
        """Tokens that keep the output on one of the allowed prefixes; None once it is past them."""
        if not self.params.allowed_prefixes:
            return None
        done = len(self.output_ids)
        candidates = {prefix[done] for prefix in self.params.allowed_prefixes
                      if len(prefix) > done and prefix[:done] == self.output_ids}
        return sorted(candidates) or None


class LocalEngine(Engine):
    def __init__(self, model, tokenizer, info: ModelInfo, *, max_num_seqs: int = 8, max_queue: int = 64,
                 test_hooks: bool = False, compile: bool = False, slot_capacities: list[int] | None = None,
                 prefix_caching: bool = True, cache_ram_bytes: int = 0, cuda_graphs: bool | None = None,
                 static_shapes: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self.max_queue = max_queue
        self.test_hooks = test_hooks
        self.prefix_caching = prefix_caching
        self.stop_ids = stop_token_ids(model, tokenizer)
        embeddings = model.get_input_embeddings()
        self.device = execution_device(embeddings, embeddings.weight)
        maybe_limit_cpu_threads(self.device)
        devices, kv_heads, head_dim, dtype = pool_geometry(model)
        capacities = slot_capacities or slot_capacities_for(info.max_model_len, max_num_seqs)
        self.kv = SlotKVCache(devices, kv_heads, head_dim, dtype, capacities)
        self.max_num_seqs = len(capacities)
        self.host_cache = HostPromptCache(cache_ram_bytes if prefix_caching else 0, pin=self.device.type == "cuda")
        graphs, reason = graphs_supported(model)
        use_graphs = graphs if cuda_graphs is None else (cuda_graphs and graphs)
        compiled = compile and use_graphs and compile_supported(model)[0]
        if compile and not compiled:
            log.info("--compile: %s; CUDA graphs %s", compile_supported(model)[1] if use_graphs else reason,
                     "still capture the decode steps" if use_graphs else "are off too")
        if not use_graphs:
            log.info("Decode: %s", reason if not graphs else "CUDA graphs turned off")
        self.runner = ModelRunner(model, self.kv, max_batch=self.max_num_seqs, use_graphs=use_graphs,
                                  compile=compiled, static_shapes=static_shapes)
        self.compiled = compiled
        self.texts = TokenTexts(tokenizer)
        self.bitmask: torch.Tensor | None = None  # [max_num_seqs, vocab/32] int32, made for the first grammar
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._inbox: collections.deque[RequestState] = collections.deque()  # submitted, not yet admitted
        self._cancelled: set[str] = set()  # mark-and-sweep: the worker drops these between chunks and steps
        self._prefilling: list[RequestState] = []  # admitted, prompt partly in their slots
        self._running: list[RequestState] = []  # decoding
        self._host_work: list[tuple[RequestState, int, bool, Any, FinishReason | None]] = []
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._accepting = True
        self.capture_seconds = 0.0
        self.counters = collections.Counter()  # submitted, finished_<reason>, rejected, steps, tokens ...
        log.info("KV cache: %d slots (%s tokens), %.2f GiB, prefix caching %s, host cache %.2f GiB",
                 self.max_num_seqs, describe_capacities(capacities), self.kv.bytes / 2**30,
                 "on" if prefix_caching else "off", self.host_cache.capacity_bytes / 2**30)

    # ---- public interface (event loop side) ----

    async def start(self) -> None:
        if self._thread is None:
            ready = threading.Event()
            self._thread = threading.Thread(target=self._run, args=(ready,), name="glm4-engine", daemon=True)
            self._thread.start()
            await asyncio.to_thread(ready.wait)  # CUDA graphs are captured before the first request

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def submit(self, prompt: Prompt, params: SamplingParams, request_id: str) -> AsyncIterator[Delta]:
        if not self._accepting:
            raise EngineUnavailable("the server is shutting down; retry on another instance")
        if self._thread is None:
            raise EngineUnavailable("the engine is not started")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Delta] = asyncio.Queue()
        state = RequestState(
            request_id=request_id, prompt_ids=list(prompt.token_ids), params=params,
            reply=ReplyText(self.tokenizer, params.stop, strip_leading_newline=not prompt.prefix),
            emit=lambda delta: loop.call_soon_threadsafe(queue.put_nowait, delta),
            salt=prompt.cache_salt, hint=prompt.cache_hint, fault=params.fault if self.test_hooks else None,
            matcher=params.constraint.new_matcher() if params.constraint is not None else None,
        )
        if len(state.prompt_ids) >= self.kv.max_capacity:
            queue.put_nowait(Delta(finish_reason=FinishReason.ERROR, error_status=400,
                                   error_code="context_length_exceeded", usage=Usage(len(state.prompt_ids), 0),
                                   error=f"the prompt has {len(state.prompt_ids)} tokens; the longest slot holds "
                                         f"{self.kv.max_capacity} including the reply"))
            return self._stream(queue, request_id)
        with self._lock:
            busy = len(self._prefilling) + len(self._running)
            if len(self._inbox) >= self.max_queue + max(0, self.max_num_seqs - busy):
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
            known = any(s.request_id == request_id and not s.leaving
                        for s in (*self._inbox, *self._prefilling, *self._running))
            if known:
                self._cancelled.add(request_id)
        self._wakeup.set()
        return known

    def stats(self) -> dict[str, Any]:
        with self._lock:
            waiting = len(self._inbox)
            prefilling = sum(not s.leaving for s in self._prefilling)
            decoding = sum(not s.leaving for s in self._running)
        cache = self.host_cache
        return {"running": prefilling + decoding, "waiting": waiting, "batch_size": decoding,
                "prefilling": prefilling, "max_num_seqs": self.max_num_seqs, "max_queue": self.max_queue,
                "slots": self.max_num_seqs, "slot_capacities": [s.capacity for s in self.kv.slots],
                "warm_slots": sum(1 for s in self.kv.slots if s.owner is None and s.length),
                "host_cache_bytes": cache.used_bytes, "host_cache_capacity_bytes": cache.capacity_bytes,
                "host_cache_entries": len(cache.entries), "host_cache_hits": cache.hits,
                "kv_copies": self.kv.copies, **self.counters}

    async def shutdown(self, drain_timeout: float = 0.0) -> None:
        self._accepting = False
        deadline = time.monotonic() + drain_timeout
        while time.monotonic() < deadline and (self._running or self._prefilling or self._inbox):
            await asyncio.sleep(0.05)
        with self._lock:
            self._cancelled.update(s.request_id for s in (*self._inbox, *self._prefilling, *self._running))
        self._stopping.set()
        self._wakeup.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
            self._thread = None

    def _retry_after(self) -> float:
        """Rough wait before a slot frees: the queue ahead times a typical reply's duration."""
        return float(max(1, min(60, (len(self._inbox) + 1) // max(1, self.max_num_seqs))))

    # ---- worker thread ----

    def _run(self, ready: threading.Event) -> None:
        with torch.inference_mode():
            try:
                self.capture_seconds = self.runner.capture()
            except Exception as error:  # serve eagerly rather than not at all
                log.warning("CUDA graph capture failed (%s: %s); decoding eagerly", type(error).__name__, error)
                self.runner.use_graphs = self.runner.static_shapes = False
                self.runner.steps.clear()
            ready.set()
            while not self._stopping.is_set():
                try:
                    if not self._pass():
                        self._wakeup.wait(timeout=0.5)
                        self._wakeup.clear()
                except Exception as error:  # a bug in the loop itself: fail everything, keep serving
                    log.exception("engine loop failed")
                    self._fail_all(f"internal engine error: {type(error).__name__}")
            self._fail_all("the server is shutting down", reason=FinishReason.CANCELLED)

    def _pass(self) -> bool:
        """One scheduling pass; False when there was nothing to do."""
        self._sweep_cancelled()
        admitted = self._admit()
        worked = self._prefill_chunk()
        self._flush_host_work()  # first tokens go out now, not after the next decode step
        if self._running:
            self._decode_step()
            worked = True
        self._flush_host_work()
        return admitted or worked

    def _sweep_cancelled(self) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            waiting = [s for s in self._inbox if s.request_id in cancelled]
            for state in waiting:
                self._inbox.remove(state)
        if not cancelled:
            return
        for state in waiting:
            self._finish(state, FinishReason.CANCELLED)
        for state in (*self._prefilling, *self._running):
            if state.request_id in cancelled and not state.leaving:
                self._leave(state)
                self._finish(state, FinishReason.CANCELLED)
        self._drop_finished()

    def _drop_finished(self) -> None:
        with self._lock:
            self._prefilling = [s for s in self._prefilling if not s.leaving]
            self._running = [s for s in self._running if not s.leaving]

    # ---- admission (prefix reuse) ----

    def _admit(self) -> bool:
        with self._lock:
            waiting = list(self._inbox)
        admitted = False
        for state in waiting:
            if len(self._prefilling) + len(self._running) >= self.max_num_seqs:
                break
            admission = choose_admission(state.prompt_array, state.capacity_needed(self.kv.max_capacity),
                                         state.salt, state.hint, self.kv.slots, self.host_cache,
                                         self.prefix_caching)
            if admission is None:  # no free slot holds it yet: it waits, later (smaller) ones may go first
                continue
            with self._lock:
                self._inbox.remove(state)
            self._place(state, admission)
            admitted = True
        return admitted

    def _place(self, state: RequestState, admission: Admission) -> None:
        slot = admission.slot
        if admission.evict:
            self._maybe_keep_in_host(slot)
        source = admission.source
        if isinstance(source, Slot):
            self.kv.copy_prefix(source, slot, admission.reuse)
        elif isinstance(source, HostEntry):
            self.kv.write_prefix(slot, source.layers, source.ids[:admission.reuse].tolist())
            source.last_used = time.monotonic()
            self.host_cache.hits += 1
        else:
            del slot.ids[admission.reuse:]
        slot.owner, slot.salt, slot.hint = state.request_id, state.salt, state.hint
        state.slot, state.prefilled, state.cached = slot, admission.reuse, admission.reuse
        room = slot.capacity - len(state.prompt_ids)
        state.max_new_tokens = max(0, min(room, state.params.max_tokens if state.params.max_tokens else room))
        self.counters["prefix_query_tokens"] += len(state.prompt_ids)
        self.counters["prefix_hit_tokens"] += admission.reuse
        self.counters[f"admitted_{admission.kind}"] += 1
        log.debug("admit %s → slot %d (%s, capacity %d): %d cached, %d to prefill", state.request_id, slot.index,
                  admission.kind, slot.capacity, admission.reuse, len(state.prompt_ids) - admission.reuse)
        if state.max_new_tokens <= 0:
            self._leave(state)
            self._finish(state, FinishReason.LENGTH)
            return
        self._prefilling.append(state)

    def _maybe_keep_in_host(self, slot: Slot) -> None:
        """Before a warm slot is overwritten: its K/V to the host cache, unless kept elsewhere already."""
        cache = self.host_cache
        if not cache.enabled or slot.length < MIN_REUSE_TOKENS:
            return
        ids = slot.id_array()
        if cache.covers(ids, slot.salt):
            return
        if cache.put(ids, slot.salt, slot.hint, self.kv.read_prefix(slot, slot.length, pin=cache.pin)):
            self.counters["host_cache_stored"] += 1

    # ---- prefill ----

    def _prefill_chunk(self) -> bool:
        """Up to PREFILL_CHUNK_TOKENS prompt tokens (several short prompts, or one chunk of a long one)."""
        budget, worked = PREFILL_CHUNK_TOKENS, False
        while self._prefilling and budget > 0:
            state = self._prefilling[0]
            start = state.prefilled
            chunk = state.prompt_ids[start:start + budget]
            try:
                logits = self.runner.prefill(state.slot, chunk, start)
            except Exception as error:  # only this request was in the pass
                self._prefilling.pop(0)
                self._fail(state, error)
                continue
            worked = True
            state.slot.ids.extend(chunk)
            state.prefilled += len(chunk)
            budget -= len(chunk)
            self.counters["prompt_tokens"] += len(chunk)
            if state.prefilled < len(state.prompt_ids):
                break  # a long prompt: one chunk per pass, so cancels land and other streams keep flowing
            self._prefilling.pop(0)
            state.first_token_at = time.monotonic()
            sampled = self._sample(logits, [state])
            if not state.leaving:
                self._record(state, sampled.tokens[0], sampled.logprobs[0])
            if not state.leaving:
                self._running.append(state)
        return worked

    # ---- decode ----

    def _decode_step(self) -> None:
        # not those a stop string ended in the host work just before (their slot is already free)
        rows = [state for state in self._running if not state.leaving]
        if not rows:
            self._drop_finished()
            return
        try:
            logits = self._forward(rows)
        except Exception as error:  # the whole batch shared the step: find out who it belongs to
            self._recover(rows, error)
            return
        for state in rows:
            state.slot.ids.append(state.next_token)  # its K/V are now in the slot
        self._flush_host_work()  # overlapped with the device's step
        sampled = self._sample(logits, rows)
        self.counters["steps"] += 1
        self.counters["batched_rows"] += len(rows)
        for state, token, logprob in zip(rows, sampled.tokens, sampled.logprobs):
            if not state.leaving:  # a stop string may have ended it during the host work
                self._record(state, token, logprob)
        self._drop_finished()

    def _forward(self, rows: list[RequestState]) -> torch.Tensor:
        self._maybe_inject_fault(rows)
        logits = self.runner.decode([DecodeRow(s.slot, s.slot.length, s.next_token) for s in rows])
        for i, state in enumerate(rows):  # test hook: this row's activations overflowed (fp16 on an old card)
            if state.fault == "nan" and len(state.output_ids) >= 2:
                logits[i] = float("nan")
        return logits

    def _recover(self, rows: list[RequestState], error: Exception) -> None:
        """A batched step failed: decode each row again alone; only a row that fails alone is failed."""
        if is_out_of_memory(error) and torch.cuda.is_available():
            torch.cuda.empty_cache()  # give the allocator's cached blocks back before the retries
        if len(rows) == 1:
            self._fail(rows[0], error)
            self._drop_finished()
            return
        self.counters["step_retries"] += 1
        log.warning("decode step failed for %d requests (%s: %s); decoding each alone", len(rows),
                    type(error).__name__, str(error)[:200])
        for state in rows:
            try:
                logits = self._forward([state])
            except Exception as alone:
                self._fail(state, alone)
                continue
            state.slot.ids.append(state.next_token)
            sampled = self._sample(logits, [state])
            if not state.leaving:
                self._record(state, sampled.tokens[0], sampled.logprobs[0])
        self._drop_finished()

    def _sample(self, logits: torch.Tensor, rows: list[RequestState]) -> Sampled:
        """Grammar masks (per row; a broken matcher fails its request alone), then the batch's sampling."""
        masked = None
        if any(state.matcher is not None for state in rows):
            if self.bitmask is None or self.bitmask.shape[0] < len(rows):
                self.bitmask = allocate_bitmask(self.max_num_seqs, logits.shape[-1])
            masked = []
            for i, state in enumerate(rows):
                try:
                    masked.append(state.matcher is not None and bool(state.matcher.fill_bitmask(self.bitmask, i)))
                except Exception as error:
                    masked.append(False)
                    self._fail(state, MatcherError(f"grammar matcher failed: {type(error).__name__}: {error}"))
        return sample_step(logits, rows, self.bitmask, masked)

    def _record(self, state: RequestState, token: int, logprob) -> None:
        """One sampled token: finished or fed at the next step; its text is made in the host work."""
        if token < 0:
            self._fail(state, None, message="the model produced non-finite logits (inf/NaN) for this request, "
                       "usually an fp16 overflow; the request was stopped. Try --dtype bfloat16 or float32.",
                       code="non_finite_logits")
            return
        state.output_ids.append(token)
        self.counters["generation_tokens"] += 1
        if state.matcher is not None and not (token in self.stop_ids and state.matcher.is_finished()):
            try:
                state.matcher.accept(token)
            except Exception as error:
                self._fail(state, MatcherError(f"grammar matcher refused token {token}: {error}"))
                return
        reason, visible = None, True
        if token in self.stop_ids and not state.params.ignore_eos and state.allowed_next_tokens() is None:
            reason, visible = FinishReason.STOP, False
        elif state.matcher is not None and state.matcher.is_finished():
            reason = FinishReason.STOP
        elif len(state.output_ids) >= state.max_new_tokens:
            reason = FinishReason.LENGTH
        self._host_work.append((state, token, visible, logprob if visible else None, reason))
        if reason is not None:
            self._leave(state)
        else:
            state.next_token = token

    def _flush_host_work(self) -> None:
        """Detokenize, match stop strings and emit what the last step sampled."""
        work, self._host_work = self._host_work, []
        for state, token, visible, logprob, reason in work:
            if state.done:
                continue
            text = ""
            state.unsent_ids.append(token)  # a stop token's id reaches the consumer too, never its text
            if visible:
                if logprob is not None:
                    state.unsent_logprobs.append(self._token_logprob(token, logprob))
                text = state.reply.push(token)
                if state.reply.stopped and reason is None:  # a stop string: the reply ends here
                    reason = FinishReason.STOP
                    self._leave(state)
            if reason is not None:
                self._finish(state, reason, text + state.reply.finish())
            elif text:  # token ids travel with their text: held-back tokens come with the delta releasing them
                state.emit(Delta(text=text, token_ids=state.unsent_ids,
                                 logprobs=state.unsent_logprobs if state.params.logprobs is not None else None))
                state.unsent_ids, state.unsent_logprobs = [], []

    def _token_logprob(self, token: int, logprob) -> TokenLogprob:
        chosen, top_ids, top_values = logprob
        return TokenLogprob(token, self.texts.text(token), chosen, self.texts.bytes(token),
                            [TokenLogprob(i, self.texts.text(i), v, self.texts.bytes(i))
                             for i, v in zip(top_ids, top_values)])

    # ---- endings ----

    def _leave(self, state: RequestState, keep_kv: bool = True) -> None:
        """Out of the batch; the slot is free again and keeps what it computed (warm) unless told not to."""
        state.leaving = True
        slot, state.slot = state.slot, None
        if slot is not None:
            slot.owner = None
            slot.last_used = time.monotonic()
            if not keep_kv or not self.prefix_caching:
                slot.ids.clear()

    def _finish(self, state: RequestState, reason: FinishReason, text: str = "", error: str | None = None,
                status: int = 500, code: str | None = None) -> None:
        if state.done:
            return
        state.done = state.leaving = True
        self.counters[f"finished_{reason.value}"] += 1
        logprobs = state.unsent_logprobs if state.params.logprobs is not None else None
        delta = Delta(text=text, token_ids=state.unsent_ids, logprobs=logprobs, finish_reason=reason, error=error,
                      error_status=status, error_code=code,
                      usage=Usage(len(state.prompt_ids), len(state.output_ids), state.cached))
        state.unsent_ids, state.unsent_logprobs = [], []
        state.emit(delta)

    def _fail(self, state: RequestState, error: Exception | None, message: str | None = None,
              code: str | None = None) -> None:
        """End one request with an error; its slot's K/V are not trusted again."""
        oom = error is not None and is_out_of_memory(error)
        if error is not None:
            log.error("request %s failed: %s: %s", state.request_id, type(error).__name__, str(error)[:300])
        if message is None:
            if oom:
                message = "the GPU ran out of memory during generation; retry, or lower max_tokens / --max-num-seqs"
            elif isinstance(error, MatcherError):
                message, code = str(error), "grammar_error"
            else:
                message = f"generation failed: {type(error).__name__}"
        self._leave(state, keep_kv=False)
        self._finish(state, FinishReason.ERROR, error=message, status=503 if oom else 500, code=code)

    def _fail_all(self, message: str, reason: FinishReason = FinishReason.ERROR) -> None:
        with self._lock:
            pending = list(self._inbox) + self._prefilling + self._running
            self._inbox.clear()
            self._prefilling, self._running, self._host_work = [], [], []
        for state in pending:
            self._leave(state, keep_kv=reason is not FinishReason.ERROR)
            self._finish(state, reason, error=message if reason is FinishReason.ERROR else None)

    def _maybe_inject_fault(self, rows: list[RequestState]) -> None:
        """Test hook (--test-hooks only): a request makes every decode step it is in raise, from its third
        token on. In a batch the engine cannot tell whose fault it was, so it retries each row alone."""
        for state in rows:
            if state.fault in ("error", "oom") and len(state.output_ids) >= 2:
                if state.fault == "oom":
                    raise torch.OutOfMemoryError("CUDA out of memory (simulated by the test hook)")
                raise InjectedFault("injected fault (test hook)")


def describe_capacities(capacities: list[int]) -> str:
    """'1 x 32768 + 7 x 8192'"""
    counts = collections.Counter(capacities)
    return " + ".join(f"{n} x {capacity}" for capacity, n in sorted(counts.items(), reverse=True))
