"""The optional embedding model and reranker: sized, placed by the plan, loaded, and run off the event loop.

`--embedding-model` (a sentence-transformers model: BAAI/bge-m3, Qwen/Qwen3-Embedding-0.6B, a local dir, or
`tiny`) serves /v1/embeddings; `--rerank-model` (a cross-encoder: BAAI/bge-reranker-v2-m3, … or `tiny`)
serves /v1/rerank. Neither is loaded unless asked for.

Placement: both are sized from their config (parameters × dtype, plus the activations of the largest batch
the batcher runs) and handed to `placement.plan_auxiliary_models` together with the chat model's plan, so
they only take memory that plan leaves: the GTX 1070 beside a 2080 Ti that holds GLM-4, or the CPU.

Running: each model has one worker thread and a `SharedBatcher` in front of it. Requests that arrive while
a forward pass runs wait in a queue and share the next passes (sorted by length, at most BATCH_TOKENS padded
tokens each), so concurrent small requests cost one pass, a big one cannot take more than its turn, and the
event loop never waits on the model. Tokenizing runs on the same thread.

For other modules (the knowledge base's hybrid search): `await service.embed(texts)` → unit-length
float32 vectors, one row per text; `await service.rerank(query, documents)` → relevance scores.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from glm4 import placement
from glm4.tiny_retrieval import TINY_EMBEDDER_DIR, TINY_RERANKER_DIR

log = logging.getLogger(__name__)

MAX_INPUTS = 2048  # inputs in one /v1/embeddings request, as OpenAI allows
MAX_REQUEST_TOKENS = 300_000  # tokens summed over one request's inputs, as OpenAI allows
MAX_DOCUMENTS = 1000  # documents in one rerank request (Cohere's recommended ceiling)
BATCH_TOKENS = 16384  # padded tokens in one forward pass: bounds activation memory (and the plan counts it)
BATCH_ITEMS = 256  # inputs in one forward pass at most, however short
TINY_SOURCES = {"embedding": TINY_EMBEDDER_DIR, "rerank": TINY_RERANKER_DIR}
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "assets" / "configs"
# Copies of the configs of the models the README names, so --plan-only sizes them offline.
BUNDLED_CONFIGS = {"BAAI/bge-m3": CONFIGS_DIR / "bge-m3", "BAAI/bge-reranker-v2-m3": CONFIGS_DIR / "bge-reranker-v2-m3",
                   "Qwen/Qwen3-Embedding-0.6B": CONFIGS_DIR / "Qwen3-Embedding-0.6B"}


class EmbeddingInputError(ValueError):
    """An input the model cannot take (too long, a token id outside the vocabulary); the message names it."""

    def __init__(self, message: str, param: str = "input", code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


# ---------- naming, sizing, placement (no weights) ----------

def resolve_source(requested: str, role: str) -> str:
    """tiny → the committed tiny checkpoint; anything else (HF id or local dir) as given."""
    return str(TINY_SOURCES[role]) if requested == "tiny" else requested


def served_names(requested: str, source: str) -> list[str]:
    """The name /v1/models lists first, then the other names a client may send: a local dir by its folder
    name (and its path as given), a Hub id as given and by its last part ("bge-m3")."""
    if Path(source).is_dir():
        names = [Path(source).name, requested, source]
    else:
        names = [source, source.rsplit("/", 1)[-1]]
    return [n for i, n in enumerate(names) if n and n not in names[:i]]


def _transformer_dir(source: str) -> str:
    """Where the Hugging Face config lives: the model root, or the Transformer module's folder (older layouts)."""
    import json

    modules = Path(source) / "modules.json"
    if modules.is_file():
        for module in json.loads(modules.read_text()):
            if module.get("type", "").endswith("Transformer"):
                return str(Path(source) / module.get("path", ""))
    return source


def load_auxiliary_config(source: str):
    """The Hugging Face config of an embedding/rerank model; the bundled copy when the Hub is unreachable."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(_transformer_dir(source))
    except (OSError, ValueError) as error:
        if source in BUNDLED_CONFIGS:
            log.info("%s is not reachable: sizing it with the bundled copy of its config.json", source)
            return AutoConfig.from_pretrained(BUNDLED_CONFIGS[source])
        offline = " (offline mode is on)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        what = "a directory without a usable config.json" if Path(source).is_dir() else \
            f"no local directory, and no Hugging Face Hub id that is downloaded or reachable{offline}"
        raise placement.PlacementError(
            f"Cannot load the embedding/rerank model {source!r}: it is {what}. Pass `tiny`, a sentence-transformers "
            f"model directory, or a Hub id such as BAAI/bge-m3. ({str(error).splitlines()[0][:200]})") from None


def size_auxiliary_model(role: str, name: str, config) -> placement.AuxiliaryModel:
    """Parameters counted on the meta device (no memory); activations of the largest forward pass: BATCH_TOKENS
    padded tokens, or one input of the model's full length, whichever is more, at (3·intermediate + 8·hidden)
    values per token (the fit the chat model's plan uses; attention through SDPA adds no length² term)."""
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification

    model_class = AutoModelForSequenceClassification if role == "rerank" else AutoModel
    with torch.device("meta"):
        model = model_class.from_config(config)
    parameters = sum(p.numel() for p in model.parameters())
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    tokens = max(BATCH_TOKENS, getattr(config, "max_position_embeddings", 0) or 0)
    return placement.AuxiliaryModel(role, name, parameters, tokens * (3 * intermediate + 8 * hidden))


@dataclass
class AuxiliaryRequest:
    role: str
    requested: str  # as the flag said
    source: str  # what loads
    names: list[str]


def requested_models(settings) -> list[AuxiliaryRequest]:
    wanted = [("embedding", settings.embedding_model), ("rerank", settings.rerank_model)]
    requests = []
    for role, requested in wanted:
        if requested:
            source = resolve_source(requested, role)
            requests.append(AuxiliaryRequest(role, requested, source, served_names(requested, source)))
    return requests


def plan_embedding_models(settings, chat_plan, gpus) -> list[placement.AuxiliaryPlacement]:
    """Where the configured embedding/rerank models go: the plan's choice, or --embedding-device as forced."""
    requests = requested_models(settings)
    models = [size_auxiliary_model(r.role, r.names[0], load_auxiliary_config(r.source)) for r in requests]
    if settings.embedding_device == "auto":
        return placement.plan_auxiliary_models(chat_plan, gpus, models,
                                               placement.parse_gpu_memory_caps(settings.gpu_memory))
    device = settings.embedding_device
    index = None if device == "cpu" else int(device.partition(":")[2] or 0)
    gpu = next((g for g in gpus if g.index == index), None)
    if index is not None and gpu is None:
        raise placement.PlacementError(f"--embedding-device {device}: there is no GPU {index} "
                                       f"(visible: {', '.join(g.label for g in gpus) or 'none'}).")
    dtype = placement.auxiliary_dtype(gpu)
    return [placement.AuxiliaryPlacement(m.role, m.name, "cpu" if gpu is None else gpu.index, dtype,
                                         m.weight_bytes(dtype), m.activation_bytes(dtype),
                                         f"--embedding-device {device}") for m in models]


# ---------- batching ----------

@dataclass
class _Job:
    items: list
    lengths: list[int]
    future: asyncio.Future
    results: list = field(default_factory=list)
    remaining: int = 0


class SharedBatcher:
    """One worker thread per model. Jobs queued while it is busy are merged, sorted by length and cut into
    forward passes of at most BATCH_TOKENS padded tokens; results go back to each job in its own order.
    A job whose caller went away (cancelled future) is skipped; a failing pass fails only its jobs."""

    def __init__(self, run: Callable[[list], list], name: str, batch_tokens: int = BATCH_TOKENS,
                 batch_items: int = BATCH_ITEMS):
        self._run = run
        self._batch_tokens = batch_tokens
        self._batch_items = batch_items
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task | None = None
        self.passes = 0  # forward passes run (tests read it to see that requests shared them)

    async def call(self, fn: Callable, *args):
        """Run fn on the model's thread (tokenizing, counting): off the event loop, in turn with the passes."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def submit(self, items: list, lengths: list[int]) -> list:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done() or self._worker.get_loop() is not loop:
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._work())
        job = _Job(list(items), list(lengths), loop.create_future(), [None] * len(items), len(items))
        if not items:
            return []
        self._queue.put_nowait(job)
        return await job.future

    def _passes(self, work: list[tuple[_Job, int]]) -> list[list[tuple[_Job, int]]]:
        """Cut length-sorted work into passes: a pass's padded size is its count × its longest (last) length."""
        passes, current = [], []
        for job, i in work:
            if current and (len(current) >= self._batch_items
                            or (len(current) + 1) * job.lengths[i] > self._batch_tokens):
                passes.append(current)
                current = []
            current.append((job, i))
        if current:
            passes.append(current)
        return passes

    async def _work(self) -> None:
        while True:
            jobs = [await self._queue.get()]
            while not self._queue.empty():
                jobs.append(self._queue.get_nowait())
            work = sorted(((job, i) for job in jobs if not job.future.done() for i in range(len(job.items))),
                          key=lambda item: item[0].lengths[item[1]])
            for batch in self._passes(work):
                live = [(job, i) for job, i in batch if not job.future.done()]
                if not live:
                    continue
                try:
                    outputs = await self.call(self._run, [job.items[i] for job, i in live])
                except Exception as error:  # noqa: BLE001 — this pass's jobs fail; the worker goes on
                    log.exception("embedding/rerank forward pass failed")
                    for job, _ in live:
                        if not job.future.done():
                            job.future.set_exception(error)
                    continue
                self.passes += 1
                for (job, i), output in zip(live, outputs):
                    job.results[i] = output
                    job.remaining -= 1
                    if job.remaining == 0 and not job.future.done():
                        job.future.set_result(job.results)

    def close(self) -> None:
        if self._worker is not None and not self._worker.done():
            self._worker.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


# ---------- the models ----------

def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def _parse_dimensions(flag: str | None, config, full: int) -> tuple[bool, list[int] | None]:
    """(may truncate at all, the sizes allowed or None for any): the flag first, then config.json's
    `matryoshka_dimensions` / `is_matryoshka` (vLLM's convention)."""
    if flag:
        flag = flag.replace(" ", "")
        return (True, None) if flag == "any" else (True, sorted({int(d) for d in flag.split(",")}))
    sizes = getattr(config, "matryoshka_dimensions", None)
    if sizes:
        return True, sorted(int(d) for d in sizes)
    return bool(getattr(config, "is_matryoshka", False)), None


class Embedder:
    """A sentence-transformers model, run from token ids (so token-id inputs and text share one path)."""

    def __init__(self, request: AuxiliaryRequest, where: placement.AuxiliaryPlacement, dimensions_flag: str | None):
        from sentence_transformers import SentenceTransformer

        self.names = request.names
        self.device = where.torch_device
        self.model = SentenceTransformer(request.source, device=self.device,
                                         model_kwargs={"dtype": _torch_dtype(where.dtype)})
        self.model.eval()
        self.tokenizer = self.model.tokenizer
        self.max_tokens = int(self.model.max_seq_length or self.tokenizer.model_max_length)
        self.dimensions = int(self.model.get_embedding_dimension())
        config = self.model.transformers_model.config if self.model.transformers_model is not None else None
        self.truncatable, self.allowed_dimensions = _parse_dimensions(dimensions_flag, config, self.dimensions)
        self.vocab_size = len(self.tokenizer)
        self._prefix, self._suffix = _special_wrap(self.tokenizer)
        self._needs_token_types = "token_type_ids" in self.tokenizer.model_input_names
        self.batcher = SharedBatcher(self.forward, name="embedding")

    @property
    def name(self) -> str:
        return self.names[0]

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids with the model's special tokens, exactly as the tokenizer adds them; nothing truncated."""
        return self.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]

    def wrap(self, ids: list[int]) -> list[int]:
        """Token-id input gets the same special tokens a text would: OpenAI's token ids are the text's."""
        return self._prefix + list(ids) + self._suffix

    def forward(self, batch: list[list[int]]) -> list[np.ndarray]:
        """One forward pass: unit-length float32 vectors, one per input."""
        import torch

        features = dict(self.tokenizer.pad({"input_ids": batch}, padding=True, return_tensors="pt"))
        if self._needs_token_types:
            features["token_type_ids"] = torch.zeros_like(features["input_ids"])
        features = {k: v.to(self.device) for k, v in features.items()}
        with torch.inference_mode():
            vectors = self.model(features)["sentence_embedding"].float()
            vectors = torch.nn.functional.normalize(vectors, dim=-1)
        return list(vectors.cpu().numpy())

    def check_dimensions(self, dimensions: int | None) -> None:
        if dimensions is None or dimensions == self.dimensions:  # the full vector: nothing to cut
            return
        if not self.truncatable:
            raise EmbeddingInputError(
                f"the model {self.name!r} does not support matryoshka representation: its {self.dimensions}-dimensional "
                "vectors cannot be shortened without losing quality (omit dimensions, or start the server with "
                "--embedding-dimensions if the model was trained for it)", param="dimensions")
        if dimensions > self.dimensions:
            raise EmbeddingInputError(f"dimensions {dimensions} is more than the model's {self.dimensions}",
                                      param="dimensions")
        if self.allowed_dimensions and dimensions not in self.allowed_dimensions:
            sizes = ", ".join(map(str, self.allowed_dimensions))
            raise EmbeddingInputError(f"the model {self.name!r} only supports dimensions {sizes}", param="dimensions")


def _special_wrap(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text's own tokens ([CLS] … [SEP], <s> … </s>)."""
    probe = "hello"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return full[:start], full[start + len(bare):]
    log.warning("cannot tell which special tokens the tokenizer adds: token-id input is embedded as given")
    return [], []


class Reranker:
    """A sentence-transformers CrossEncoder: one relevance score per (query, document)."""

    def __init__(self, request: AuxiliaryRequest, where: placement.AuxiliaryPlacement):
        from sentence_transformers import CrossEncoder

        self.names = request.names
        self.model = CrossEncoder(request.source, device=where.torch_device,
                                  model_kwargs={"dtype": _torch_dtype(where.dtype)})
        self.model.eval()
        self.tokenizer = self.model.tokenizer
        self.max_tokens = int(self.model.max_length or self.tokenizer.model_max_length)
        self.batcher = SharedBatcher(self.score, name="rerank")

    @property
    def name(self) -> str:
        return self.names[0]

    def count_tokens(self, query: str, documents: list[str]) -> list[int]:
        encoded = self.tokenizer([query] * len(documents), documents, truncation=False, verbose=False)
        return [len(ids) for ids in encoded["input_ids"]]

    def score(self, pairs: list[tuple[str, str]]) -> list[float]:
        scores = self.model.predict(pairs, batch_size=len(pairs), show_progress_bar=False, convert_to_numpy=True)
        return [float(s) for s in np.atleast_1d(scores)]


# ---------- the service the routes (and the knowledge base) call ----------

@dataclass
class EmbeddingResult:
    vectors: list[np.ndarray]
    prompt_tokens: int


@dataclass
class RerankResult:
    scores: list[float]  # one per document, in the documents' order
    prompt_tokens: int


class EmbeddingService:
    """What /v1/embeddings and /v1/rerank call; either model may be absent."""

    def __init__(self, embedder: Embedder | None = None, reranker: Reranker | None = None,
                 placements: Sequence[placement.AuxiliaryPlacement] = ()):
        self.embedder = embedder
        self.reranker = reranker
        self.placements = list(placements)

    async def embed_inputs(self, inputs: list[str] | list[list[int]], dimensions: int | None = None,
                           truncate: bool = False) -> EmbeddingResult:
        """Texts or token-id lists → unit vectors (shortened to `dimensions` and renormalised), in order.
        Raises EmbeddingInputError for an input longer than the model takes (unless truncate) or an unknown id."""
        embedder = self.embedder
        embedder.check_dimensions(dimensions)
        if inputs and isinstance(inputs[0], str):
            ids = await embedder.batcher.call(embedder.tokenize, inputs)
        else:
            ids = [embedder.wrap(item) for item in inputs]
            for n, item in enumerate(inputs):
                bad = next((t for t in item if not 0 <= t < embedder.vocab_size), None)
                if bad is not None:
                    raise EmbeddingInputError(f"input[{n}] holds the token id {bad}, outside the model's vocabulary "
                                              f"(0 to {embedder.vocab_size - 1})")
        if truncate:
            ids = [item if len(item) <= embedder.max_tokens else item[:embedder.max_tokens - len(embedder._suffix)]
                   + embedder._suffix for item in ids]
        for n, item in enumerate(ids):
            if len(item) > embedder.max_tokens:
                where = f"input[{n}]" if len(ids) > 1 else "the input"
                raise EmbeddingInputError(
                    f"This model's maximum context length is {embedder.max_tokens} tokens, however {where} has "
                    f"{len(item)} tokens. Please shorten it (embedding inputs are refused, not truncated).",
                    code="context_length_exceeded")
        total = sum(map(len, ids))
        if total > MAX_REQUEST_TOKENS:
            raise EmbeddingInputError(f"the inputs add up to {total} tokens; at most {MAX_REQUEST_TOKENS} per request",
                                      code="context_length_exceeded")
        vectors = await embedder.batcher.submit(ids, [len(item) for item in ids])
        if dimensions is not None and dimensions != embedder.dimensions:
            vectors = [_shorten(v, dimensions) for v in vectors]
        return EmbeddingResult(vectors, total)

    async def embed(self, texts: list[str], dimensions: int | None = None, truncate: bool = True) -> np.ndarray:
        """For other modules: one unit-length float32 row per text. Long texts are cut to the model's length
        (an index wants a vector for every chunk); pass truncate=False to get EmbeddingInputError instead."""
        if not texts:
            return np.zeros((0, dimensions or self.embedder.dimensions), dtype=np.float32)
        result = await self.embed_inputs(list(texts), dimensions, truncate=truncate)
        return np.stack(result.vectors).astype(np.float32)

    async def rerank(self, query: str, documents: list[str]) -> RerankResult:
        """Relevance of each document to the query (higher is more relevant; sigmoid scores in 0..1 for
        one-logit cross-encoders), in the documents' order. Raises EmbeddingInputError for a pair too long."""
        reranker = self.reranker
        counts = await reranker.batcher.call(reranker.count_tokens, query, documents)
        for n, count in enumerate(counts):
            if count > reranker.max_tokens:
                raise EmbeddingInputError(
                    f"This model's maximum context length is {reranker.max_tokens} tokens, however the query with "
                    f"documents[{n}] has {count} tokens. Please shorten it.", param="documents",
                    code="context_length_exceeded")
        scores = await reranker.batcher.submit([(query, d) for d in documents], counts)
        return RerankResult(scores, sum(counts))

    def close(self) -> None:
        for model in (self.embedder, self.reranker):
            if model is not None:
                model.batcher.close()


def _shorten(vector: np.ndarray, dimensions: int) -> np.ndarray:
    head = vector[:dimensions]
    norm = float(np.linalg.norm(head))
    return head / norm if norm > 0 and math.isfinite(norm) else head


def load_embedding_service(settings, placements: list[placement.AuxiliaryPlacement]) -> EmbeddingService:
    """Load the configured models where the plan put them; an empty service when none is configured."""
    from glm4.loading import ModelLoadError

    requests = {r.role: r for r in requested_models(settings)}
    where = {p.role: p for p in placements}
    embedder = reranker = None
    try:
        if "embedding" in requests:
            embedder = Embedder(requests["embedding"], where["embedding"], settings.embedding_dimensions)
        if "rerank" in requests:
            reranker = Reranker(requests["rerank"], where["rerank"])
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"Could not load the embedding/rerank model: {str(error).splitlines()[0][:300]}. "
                             "--embedding-model and --rerank-model take `tiny`, a sentence-transformers model "
                             "directory, or a Hub id that is downloaded (or reachable).") from None
    if embedder is not None:
        log.info("Embedding model %s (%d dimensions, up to %d tokens): %s", embedder.name, embedder.dimensions,
                 embedder.max_tokens, where["embedding"].describe())
    if reranker is not None:
        log.info("Rerank model %s (up to %d tokens): %s", reranker.name, reranker.max_tokens,
                 where["rerank"].describe())
    return EmbeddingService(embedder, reranker, placements)


def chat_plan_and_gpus(settings) -> tuple[Any, list]:
    """The chat model's plan (None for --backend upstream: no local chat model) and the GPUs it was made for,
    computed as load_model computes it, before any weights take memory."""
    from glm4.loading import load_config, plan_for, resolve_model_source

    gpus = placement.parse_simulated_gpus(settings.simulate_gpus) if settings.simulate_gpus \
        else placement.detect_gpus()
    if settings.backend == "upstream":
        return None, gpus
    source = resolve_model_source(settings.model, has_gpu=bool(gpus))
    plan = plan_for(settings, load_config(source, settings), gpus=gpus)[0]
    return plan, gpus
