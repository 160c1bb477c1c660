"""Choose the grammar library for constrained decoding by measurement: llguidance vs xgrammar.

Both build from a Hugging Face fast tokenizer. Measured at GLM-4's vocabulary size with a stand-in
tokenizer (bench/standin_tokenizer.py: a 151,329-token byte-level BPE plus GLM-4's special tokens at their
real ids; the real tokenizer cannot be downloaded here) and on the tiny model's tokenizer (assets/tiny-glm4):

- compile: a schema's first matcher and first mask (llguidance builds lazily, xgrammar ahead of time),
  cold (first schema in the process) and warm (a new schema after others);
- mask: per-token time to fill one row of the bitmask, p50/p99/max, along a valid document of each schema
  and along random walks (each step a uniformly drawn allowed token: odd states, long strings);
- batch: one step's masks for 8 rows, one after another and through each library's parallel API;
- apply: setting refused logits to -inf on a [B, vocab] fp32 CPU tensor with masks taken along the paths,
  glm4.engine.constraints.apply_bitmask and xgrammar's C++ CPU kernel;
- GIL: how much pure-Python progress the main thread keeps while a second thread computes masks;
- features: for each JSON Schema feature, whether the library enforces it (a valid document passes and an
  invalid one is refused), refuses the schema with an error, or ignores it silently (the invalid one passes).
"glm4 module" rows are llguidance as glm4/engine/constraints.py configures it (bounded whitespace, optional
leading newline): the cost the server pays.

    python bench/constraints_choice.py            # full run (a few minutes)
    python bench/constraints_choice.py --quick    # small sizes: proves the script works; not for figures

Writes bench/results/constraints_choice.md and .json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import sys
import threading
import time
from pathlib import Path

from common import RESULTS, ROOT, finish_provenance, markdown_table, percentile, provenance

import numpy as np
import torch

import standin_tokenizer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
STOP_TOKENS = ["<|endoftext|>", "<|user|>", "<|observation|>"]

# --- workloads: realistic schemas, each with a valid document in property order ---------------------------

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "城市名"},
        "unit": {"type": "string", "enum": ["摄氏度", "华氏度"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER_DOC = {"city": "北京市朝阳区", "unit": "摄氏度", "days": 3}

ORDER = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "pattern": "^ORD-[0-9]{8}$"},
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 32},
                "phone": {"type": "string", "pattern": "^1[3-9][0-9]{9}$"},
                "address": {
                    "type": "object",
                    "properties": {
                        "province": {"type": "string", "enum": ["北京", "上海", "广东", "浙江", "四川", "湖北"]},
                        "city": {"type": "string"},
                        "street": {"type": "string"},
                        "postcode": {"type": "string", "pattern": "^[0-9]{6}$"},
                    },
                    "required": ["province", "city", "street"],
                    "additionalProperties": False,
                },
            },
            "required": ["name", "address"],
            "additionalProperties": False,
        },
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 20,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string"},
                    "title": {"type": "string"},
                    "quantity": {"type": "integer", "minimum": 1},
                    "price": {"type": "number", "minimum": 0},
                    "tags": {"type": "array", "items": {"type": "string", "enum": ["新品", "促销", "包邮", "限量"]}},
                },
                "required": ["sku", "title", "quantity", "price"],
                "additionalProperties": False,
            },
        },
        "status": {"type": "string", "enum": ["pending", "paid", "shipped", "delivered", "cancelled"]},
        "gift": {"type": "boolean"},
        "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    },
    "required": ["order_id", "customer", "items", "status"],
    "additionalProperties": False,
}
ORDER_DOC = {
    "order_id": "ORD-20261103",
    "customer": {"name": "张伟", "phone": "13812345678",
                 "address": {"province": "浙江", "city": "杭州市", "street": "西湖区文三路 90 号", "postcode": "310012"}},
    "items": [
        {"sku": "A-1001", "title": "无线降噪耳机", "quantity": 1, "price": 899.0, "tags": ["新品", "包邮"]},
        {"sku": "B-2002", "title": "Type-C 充电线 (2m)", "quantity": 3, "price": 29.9, "tags": []},
    ],
    "status": "paid",
    "gift": False,
    "note": "请在工作日送货，谢谢！",
}

# What pydantic (the OpenAI SDK's `parse`) produces: $defs, $ref, nullable anyOf, titles, a date format.
PROFILE = {
    "$defs": {
        "Skill": {
            "type": "object", "title": "Skill",
            "properties": {"name": {"type": "string", "title": "Name"},
                           "level": {"type": "string", "enum": ["入门", "熟练", "精通"], "title": "Level"},
                           "years": {"anyOf": [{"type": "integer"}, {"type": "null"}], "title": "Years"}},
            "required": ["name", "level", "years"], "additionalProperties": False,
        },
        "Job": {
            "type": "object", "title": "Job",
            "properties": {"company": {"type": "string", "title": "Company"},
                           "title": {"type": "string", "title": "Title"},
                           "start": {"type": "string", "format": "date", "title": "Start"},
                           "end": {"anyOf": [{"type": "string", "format": "date"}, {"type": "null"}], "title": "End"},
                           "highlights": {"type": "array", "items": {"type": "string"}, "title": "Highlights"}},
            "required": ["company", "title", "start", "end", "highlights"], "additionalProperties": False,
        },
    },
    "type": "object", "title": "Profile",
    "properties": {
        "full_name": {"type": "string", "title": "Full Name"},
        "email": {"type": "string", "title": "Email"},
        "age": {"type": "integer", "minimum": 16, "maximum": 100, "title": "Age"},
        "languages": {"type": "array", "items": {"type": "string", "enum": ["中文", "English", "日本語"]}},
        "skills": {"type": "array", "items": {"$ref": "#/$defs/Skill"}, "title": "Skills"},
        "jobs": {"type": "array", "items": {"$ref": "#/$defs/Job"}, "title": "Jobs"},
        "remote": {"type": "boolean", "title": "Remote"},
        "summary": {"type": "string", "title": "Summary"},
    },
    "required": ["full_name", "email", "age", "languages", "skills", "jobs", "remote", "summary"],
    "additionalProperties": False,
}
PROFILE_DOC = {
    "full_name": "李娜", "email": "li.na@example.com", "age": 31, "languages": ["中文", "English"],
    "skills": [{"name": "Python", "level": "精通", "years": 8}, {"name": "Kubernetes", "level": "熟练", "years": None}],
    "jobs": [{"company": "杭州云栖科技有限公司", "title": "高级后端工程师", "start": "2019-07-01", "end": None,
              "highlights": ["主导订单系统重构，延迟降低 40%", "带领 5 人团队"]}],
    "remote": True,
    "summary": "八年后端开发经验，熟悉分布式系统与大模型推理服务。",
}

JSON_OBJECT = {"type": "object"}
JSON_OBJECT_DOC = {"answer": "北京今天晴，21°C。", "sources": [{"title": "天气预报", "score": 0.92}], "ok": True}

WORKLOADS = {
    "tool args (3 fields)": (WEATHER, WEATHER_DOC),
    "order (nested, arrays, enums, patterns)": (ORDER, ORDER_DOC),
    "profile (pydantic: $defs, $ref, nullable)": (PROFILE, PROFILE_DOC),
    "json_object (any object)": (JSON_OBJECT, JSON_OBJECT_DOC),
}

# --- JSON Schema features: (feature, schema, valid document, invalid document) ----------------------------

FEATURES = [
    ("enum of Chinese strings", {"enum": ["北京", "上海"]}, "北京", "南京"),
    ("const", {"const": "固定"}, "固定", "变化"),
    ("required", {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}, {"a": 1}, {}),
    ("additionalProperties: false", {"type": "object", "properties": {"a": {"type": "integer"}},
                                     "additionalProperties": False}, {"a": 1}, {"a": 1, "b": 2}),
    ("nested object", {"type": "object", "properties": {"o": {"type": "object", "properties": {
        "x": {"type": "integer"}}, "required": ["x"]}}, "required": ["o"]}, {"o": {"x": 1}}, {"o": {"x": "1"}}),
    ("anyOf", {"anyOf": [{"type": "integer"}, {"type": "boolean"}]}, 3, "3"),
    ("oneOf (disjoint)", {"oneOf": [{"type": "integer"}, {"type": "string"}]}, "a", 1.5),
    ("allOf", {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                         {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}]},
     {"a": 1, "b": 2}, {"a": 1}),
    ("$ref to $defs", {"$defs": {"n": {"type": "integer"}}, "type": "array", "items": {"$ref": "#/$defs/n"}}, [1], ["x"]),
    ("recursive $ref", {"$defs": {"t": {"type": "object", "properties": {"kids": {"type": "array", "items": {
        "$ref": "#/$defs/t"}}}, "required": ["kids"], "additionalProperties": False}}, "$ref": "#/$defs/t"},
     {"kids": [{"kids": []}]}, {"kids": [{}]}),
    ("string minLength/maxLength", {"type": "string", "minLength": 2, "maxLength": 3}, "好的", "好"),
    ("pattern", {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"}, "AB123", "AB12"),
    ("pattern with lookahead", {"type": "string", "pattern": "^(?=.*[0-9]).+$"}, "a1", "ab"),
    ("format: date-time", {"type": "string", "format": "date-time"}, "2026-11-03T10:00:00Z", "yesterday"),
    ("format: email", {"type": "string", "format": "email"}, "a@b.cn", "not-an-email"),
    ("format: unknown", {"type": "string", "format": "favourite-colour"}, "red", None),  # None: nothing to check
    ("integer minimum/maximum", {"type": "integer", "minimum": 1, "maximum": 9}, 5, 10),
    ("exclusiveMinimum", {"type": "number", "exclusiveMinimum": 0}, 0.5, 0),
    ("multipleOf", {"type": "integer", "multipleOf": 5}, 15, 7),
    ("array minItems/maxItems", {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2},
     [1], [1, 2, 3]),
    ("prefixItems", {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False},
     [1, "a"], ["a", 1]),
    ("uniqueItems", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [1, 2], [1, 1]),
    ("contains", {"type": "array", "contains": {"const": 7}}, [1, 7], [1, 2]),
    ("patternProperties", {"type": "object", "patternProperties": {"^n_": {"type": "integer"}},
                           "additionalProperties": False}, {"n_a": 1}, {"n_a": "x"}),
    ("minProperties (map)", {"type": "object", "additionalProperties": {"type": "integer"}, "minProperties": 1},
     {"a": 1}, {}),
    ("not", {"not": {"type": "string"}}, 1, "s"),
    ("if/then/else", {"if": {"type": "integer"}, "then": {"minimum": 10}, "else": {"type": "string"}}, 11, 5),
    ("dependentRequired", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                           "dependentRequired": {"a": ["b"]}}, {"a": 1, "b": 2}, {"a": 1}),
    ("type list with null", {"type": ["string", "null"]}, None, 1),
]


# --- the two libraries behind one small interface -----------------------------------------------------------

class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab_size: int):
        import llguidance
        import llguidance.hf

        self.llg = llguidance
        stops = [tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS]
        started = time.perf_counter()
        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=stops)
        self.tokenizer_seconds = time.perf_counter() - started
        self.vocab_size = vocab_size
        self.executor = llguidance.LLExecutor()

    def compile(self, schema: dict):
        """A grammar handle; raises ValueError with the library's message when it refuses the schema."""
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema)
        failed, messages = self.llg.LLMatcher.validate_grammar_with_warnings(grammar, self.tok)
        if failed:
            lines = [line.strip() for line in messages[0].strip().splitlines()]
            raise ValueError(" ".join(line for line in lines if line and set(line) != {"^"}))
        return grammar

    def matcher(self, grammar):
        return self.llg.LLMatcher(self.tok, grammar, log_level=0)

    def fill(self, matcher, bitmask: torch.Tensor, row: int) -> None:
        view = bitmask[row]
        matcher.unsafe_compute_mask_ptr(view.data_ptr(), view.numel() * 4)

    def accept(self, matcher, token: int) -> bool:
        return matcher.consume_token(token)

    def done(self, matcher) -> bool:
        return matcher.is_stopped()

    def accepting(self, matcher) -> bool:
        return matcher.is_accepting()

    def fill_batch(self, matchers: list, bitmask: torch.Tensor) -> None:
        self.executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bitmask.data_ptr(),
                                              bitmask.shape[1] * 4, bitmask.shape[0])


class GlmModule(LLGuidance):
    """llguidance as glm4/engine/constraints.py configures it."""

    name = "glm4 module (llguidance)"

    def __init__(self, tokenizer, vocab_size: int):
        super().__init__(tokenizer, vocab_size)
        from glm4.engine.constraints import ConstraintCompiler

        started = time.perf_counter()
        self.compiler = ConstraintCompiler(tokenizer, vocab_size=vocab_size, cache_size=0)
        self.tokenizer_seconds = time.perf_counter() - started

    def compile(self, schema: dict):
        from glm4.engine.constraints import UnsupportedSchema

        try:
            return self.compiler.json_schema(schema)
        except UnsupportedSchema as error:
            raise ValueError(str(error)) from None

    def matcher(self, constraint):
        return constraint.new_matcher()

    def fill(self, matcher, bitmask: torch.Tensor, row: int) -> None:
        matcher.fill_bitmask(bitmask, row)

    def accept(self, matcher, token: int) -> bool:
        from glm4.engine.base import MatcherError

        try:
            matcher.accept(token)
        except MatcherError:
            return False
        return True

    def done(self, matcher) -> bool:
        return matcher.is_finished()

    def accepting(self, matcher) -> bool:
        return matcher.is_accepting()

    def fill_batch(self, matchers: list, bitmask: torch.Tensor) -> None:
        super().fill_batch([m._matcher for m in matchers], bitmask)


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size: int):
        import xgrammar

        self.xgr = xgrammar
        stops = [tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS]
        started = time.perf_counter()
        self.info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stops)
        self.tokenizer_seconds = time.perf_counter() - started
        self.vocab_size = vocab_size
        self.compiler = xgrammar.GrammarCompiler(self.info, cache_enabled=False)
        self.batch = xgrammar.BatchGrammarMatcher()

    def compile(self, schema: dict):
        try:
            # JSON Schema semantics (extra properties allowed where the schema allows them), like llguidance
            return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=True, strict_mode=False)
        except Exception as error:  # xgrammar raises RuntimeError (and others) for schemas it refuses
            raise ValueError(str(error).strip().splitlines()[0]) from None

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher, bitmask: torch.Tensor, row: int) -> None:
        matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, matcher, token: int) -> bool:
        return matcher.accept_token(token)

    def done(self, matcher) -> bool:
        return matcher.is_terminated()

    def accepting(self, matcher) -> bool:
        return matcher.is_completed()

    def fill_batch(self, matchers: list, bitmask: torch.Tensor) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)


# --- measurements ---------------------------------------------------------------------------------------

def allowed_tokens(bitmask: torch.Tensor, row: int, vocab: int) -> np.ndarray:
    bits = np.unpackbits(bitmask[row].numpy().view(np.uint8), count=vocab, bitorder="little")
    return np.flatnonzero(bits)


def is_allowed(bitmask: torch.Tensor, row: int, token: int) -> bool:
    return bool((int(bitmask[row, token // 32]) >> (token % 32)) & 1)


def perturbed(schema: dict, i: int) -> dict:
    """A schema the library has not seen (one more optional property): compile without warm caches."""
    schema = copy.deepcopy(schema)
    schema.setdefault("properties", {})[f"extra_{i}"] = {"type": "integer"}
    return schema


def measure_compile(lib, schema: dict, repeats: int) -> dict:
    """Milliseconds from schema to the first mask: cold (first), then warm new schemas (median)."""
    bitmask = torch.full((1, (lib.vocab_size + 31) // 32), -1, dtype=torch.int32)
    times = []
    for i in range(repeats + 1):
        started = time.perf_counter()
        lib.fill(lib.matcher(lib.compile(perturbed(schema, i))), bitmask, 0)
        times.append((time.perf_counter() - started) * 1e3)
    return {"cold_ms": times[0], "warm_ms_p50": percentile(times[1:], 50), "warm_ms_max": max(times[1:])}


def walk_document(lib, grammar, tokens: list[int], bitmask: torch.Tensor, keep_masks: list | None = None) -> dict:
    """Fill and accept along a valid document; times in ms per token (the first mask apart)."""
    matcher = lib.matcher(grammar)
    times, refused = [], 0
    for token in tokens:
        started = time.perf_counter()
        lib.fill(matcher, bitmask, 0)
        times.append((time.perf_counter() - started) * 1e3)
        if keep_masks is not None:
            keep_masks.append(bitmask[0].clone())
        if not is_allowed(bitmask, 0, token) or not lib.accept(matcher, token):
            refused += 1
            break
    return {"times": times, "refused": refused, "complete": lib.accepting(matcher)}


def walk_random(lib, grammar, bitmask: torch.Tensor, rng: random.Random, steps: int) -> list[float]:
    """Fill and accept uniformly drawn allowed tokens (stop tokens aside) for up to `steps` tokens."""
    matcher = lib.matcher(grammar)
    times = []
    for _ in range(steps):
        if lib.done(matcher):
            break
        started = time.perf_counter()
        lib.fill(matcher, bitmask, 0)
        times.append((time.perf_counter() - started) * 1e3)
        choices = [t for t in allowed_tokens(bitmask, 0, lib.vocab_size).tolist() if t not in lib.stop_ids]
        if not choices:
            break
        lib.accept(matcher, rng.choice(choices))
    return times


def measure_masks(lib, tokenizer, workloads: dict, repeats: int, walks: int, steps: int, masks_out: list) -> dict:
    out = {}
    bitmask = torch.full((1, (lib.vocab_size + 31) // 32), -1, dtype=torch.int32)
    for name, (schema, doc) in workloads.items():
        grammar = lib.compile(schema)
        tokens = tokenizer.encode(json.dumps(doc, ensure_ascii=False), add_special_tokens=False)
        doc_times, first, ok = [], [], True
        for r in range(repeats):
            result = walk_document(lib, grammar, tokens, bitmask, masks_out if r == 0 else None)
            ok = ok and not result["refused"] and result["complete"]
            first.append(result["times"][0])
            doc_times.extend(result["times"][1:])
        rng = random.Random(0)
        random_times = []
        for _ in range(walks):
            random_times.extend(walk_random(lib, grammar, bitmask, rng, steps))
        out[name] = {
            "document_tokens": len(tokens), "document_accepted": ok,
            "first_mask_ms_p50": percentile(first, 50),
            "doc_ms_p50": percentile(doc_times, 50), "doc_ms_p99": percentile(doc_times, 99),
            "doc_ms_max": max(doc_times, default=float("nan")),
            "random_ms_p50": percentile(random_times, 50), "random_ms_p99": percentile(random_times, 99),
            "random_ms_max": max(random_times, default=float("nan")), "random_steps": len(random_times),
        }
    return out


def measure_batch(lib, tokenizer, rows: int, repeats: int) -> dict:
    """One decode step of `rows` constrained requests (the order schema, each at a different position)."""
    schema, doc = WORKLOADS["order (nested, arrays, enums, patterns)"]
    grammar = lib.compile(schema)
    tokens = tokenizer.encode(json.dumps(doc, ensure_ascii=False), add_special_tokens=False)
    bitmask = torch.full((rows, (lib.vocab_size + 31) // 32), -1, dtype=torch.int32)
    sequential, parallel = [], []
    for r in range(repeats):
        matchers = []
        for i in range(rows):
            matcher = lib.matcher(grammar)
            offset = (i * len(tokens) // rows + r) % (len(tokens) - 1)
            for token in tokens[:offset]:
                lib.accept(matcher, token)
            matchers.append(matcher)
        started = time.perf_counter()
        for i, matcher in enumerate(matchers):
            lib.fill(matcher, bitmask, i)
        sequential.append((time.perf_counter() - started) * 1e3)
        started = time.perf_counter()
        lib.fill_batch(matchers, bitmask)
        parallel.append((time.perf_counter() - started) * 1e3)
    return {"rows": rows, "sequential_ms_p50": percentile(sequential, 50), "sequential_ms_p99": percentile(sequential, 99),
            "parallel_api_ms_p50": percentile(parallel, 50), "parallel_api_ms_p99": percentile(parallel, 99)}


def measure_apply(masks: list[torch.Tensor], vocab: int, batch_sizes: list[int], repeats: int) -> dict:
    """ms to apply B real masks to [B, vocab] fp32 CPU logits: the module's helper and xgrammar's kernel."""
    import xgrammar

    from glm4.engine.constraints import apply_bitmask

    out = {}
    for batch in batch_sizes:
        ours, theirs = [], []
        for r in range(repeats):
            rows = [masks[(r * batch + i) % len(masks)] for i in range(batch)]
            bitmask = torch.stack(rows)
            logits = torch.randn(batch, vocab)
            started = time.perf_counter()
            apply_bitmask(logits, bitmask, list(range(batch)))
            ours.append((time.perf_counter() - started) * 1e3)
            logits = torch.randn(batch, vocab)
            started = time.perf_counter()
            xgrammar.apply_token_bitmask_inplace(logits, bitmask)
            theirs.append((time.perf_counter() - started) * 1e3)
        out[str(batch)] = {
            "glm4_apply_bitmask_ms_p50": percentile(ours, 50), "glm4_apply_bitmask_ms_p99": percentile(ours, 99),
            "xgrammar_kernel_ms_p50": percentile(theirs, 50), "xgrammar_kernel_ms_p99": percentile(theirs, 99),
        }
    return out


def python_progress(seconds: float, background=None) -> int:
    """Iterations of a pure-Python loop in `seconds`, while `background()` runs in a thread if given."""
    stop = threading.Event()

    def loop_background():
        while not stop.is_set():
            background()

    thread = threading.Thread(target=loop_background, daemon=True) if background else None
    if thread:
        thread.start()
    count, deadline = 0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        count += 1
    stop.set()
    if thread:
        thread.join()
    return count


def measure_gil(libs: list, tokenizer, seconds: float) -> dict:
    """Main-thread Python progress kept while another thread computes masks (1.0 = GIL released).

    Controls: a pure-Python background loop (holds the GIL) and hashing a large buffer (releases it)."""
    import hashlib

    schema, doc = WORKLOADS["order (nested, arrays, enums, patterns)"]
    alone = python_progress(seconds)
    buffer = os.urandom(1 << 20)
    out = {
        "control: pure Python (holds GIL)": python_progress(seconds, lambda: sum(range(2000))) / alone,
        "control: sha256 of 1 MiB (releases GIL)": python_progress(seconds, lambda: hashlib.sha256(buffer).digest()) / alone,
    }
    for lib in libs:
        grammar = lib.compile(schema)
        tokens = tokenizer.encode(json.dumps(doc, ensure_ascii=False), add_special_tokens=False)
        bitmask = torch.full((8, (lib.vocab_size + 31) // 32), -1, dtype=torch.int32)
        matchers = [lib.matcher(grammar) for _ in range(8)]
        for i, matcher in enumerate(matchers):  # positions inside strings: the most expensive masks
            for token in tokens[: 3 + 7 * i]:
                lib.accept(matcher, token)

        def fill_all(lib=lib, matchers=matchers, bitmask=bitmask):
            for i, matcher in enumerate(matchers):
                lib.fill(matcher, bitmask, i)

        out[lib.name] = python_progress(seconds, fill_all) / alone
    return out


def encode_value(tokenizer, value) -> list[int]:
    return tokenizer.encode(json.dumps(value, ensure_ascii=False), add_special_tokens=False)


def accepts(lib, grammar, tokenizer, value) -> bool:
    matcher = lib.matcher(grammar)
    bitmask = torch.full((1, (lib.vocab_size + 31) // 32), -1, dtype=torch.int32)
    for token in encode_value(tokenizer, value):
        lib.fill(matcher, bitmask, 0)
        if not is_allowed(bitmask, 0, token) or not lib.accept(matcher, token):
            return False
    return lib.accepting(matcher)


def feature_table(libs: list, tokenizer) -> dict:
    """Per feature and library: "enforced", "refused: <message>", "IGNORED (accepts invalid)", "too strict",
    or "compiles, not checked" for a feature with no invalid document (an unknown format)."""
    out = {}
    for feature, schema, valid, invalid in FEATURES:
        row = {}
        for lib in libs:
            try:
                grammar = lib.compile(schema)
            except ValueError as error:
                row[lib.name] = "refused: " + str(error)[:90]
                continue
            ok = accepts(lib, grammar, tokenizer, valid)
            if invalid is None:
                row[lib.name] = "compiles, not checked (silent)" if ok else "too strict (refuses valid)"
                continue
            bad = accepts(lib, grammar, tokenizer, invalid)
            row[lib.name] = ("enforced" if ok and not bad else "IGNORED (accepts invalid)" if bad
                             else "too strict (refuses valid)")
        out[feature] = row
    return out


def special_token_support(tokenizer, vocab: int) -> dict:
    """Can a grammar require the special token <|assistant|> (GLM-4's separator between tool calls), as
    opposed to the same characters spelled with ordinary tokens?"""
    import llguidance
    import llguidance.hf
    import xgrammar

    separator = tokenizer.convert_tokens_to_ids("<|assistant|>")
    ordinary = tokenizer.convert_tokens_to_ids("<")  # first byte of the separator's spelling as text
    prefix = tokenizer.encode("a", add_special_tokens=False)
    stops = [tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS]
    bitmask = torch.full((1, (vocab + 31) // 32), -1, dtype=torch.int32)
    tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=stops)
    matcher = llguidance.LLMatcher(tok, llguidance.LLMatcher.grammar_from_lark('start: "a" <|assistant|> "b"'), log_level=0)
    matcher.consume_tokens(prefix)
    matcher.unsafe_compute_mask_ptr(bitmask[0].data_ptr(), bitmask.shape[1] * 4)
    llg = (not matcher.is_error(), is_allowed(bitmask, 0, separator), is_allowed(bitmask, 0, ordinary))
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=stops)
    compiled = xgrammar.GrammarCompiler(info).compile_grammar('root ::= "a" "<|assistant|>" "b"')
    xmatcher = xgrammar.GrammarMatcher(compiled)
    for token in prefix:
        xmatcher.accept_token(token)
    xmatcher.fill_next_token_bitmask(bitmask, 0)
    xgr = (True, is_allowed(bitmask, 0, separator), is_allowed(bitmask, 0, ordinary))

    def verdict(ok: bool, special: bool, text: bool) -> str:
        if not ok or not special:
            return "no"
        return "special token only" if not text else "special token or the same text in ordinary tokens (no distinction)"

    return {"llguidance": verdict(*llg), "xgrammar": verdict(*xgr)}


def specials_inside_strings(lib, tokenizer) -> list[str]:
    """Special tokens (other than the stop tokens) a JSON-string position allows: they are not text."""
    grammar = lib.compile({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]})
    matcher = lib.matcher(grammar)
    for token in tokenizer.encode('{"a": "', add_special_tokens=False):
        lib.accept(matcher, token)
    bitmask = torch.full((1, (lib.vocab_size + 31) // 32), -1, dtype=torch.int32)
    lib.fill(matcher, bitmask, 0)
    from glm4.tiny import SPECIAL_TOKENS

    ids = [tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS]
    return [tokenizer.convert_ids_to_tokens(t) for t in ids if t not in lib.stop_ids and is_allowed(bitmask, 0, t)]


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch_threads": torch.get_num_threads()}


def versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("llguidance", "xgrammar", "torch", "transformers", "tokenizers", "numpy")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: proves the script runs, figures are rough")
    parser.add_argument("--out", default=str(RESULTS / "constraints_choice"), help="results path without suffix")
    args = parser.parse_args()
    repeats, walks, steps, compiles, gil_seconds = (2, 2, 24, 2, 0.3) if args.quick else (10, 12, 64, 8, 1.5)

    torch.set_num_threads(1)  # the engine's CPU setting on a small box; mask work is single-threaded per row
    load_start = os.getloadavg()[0]
    from transformers import AutoTokenizer

    tokenizers = {
        "stand-in GLM-4 (151,552 logits)": (standin_tokenizer.load(), standin_tokenizer.GLM4_LOGITS_ROWS),
    }
    tiny = AutoTokenizer.from_pretrained(ROOT / "assets" / "tiny-glm4")
    tokenizers["tiny GLM-4 (3,010 logits)"] = (tiny, len(tiny))

    results: dict = {"provenance": provenance(), "machine": machine(), "versions": versions(), "command": " ".join([sys.executable] + sys.argv),
                     "quick": args.quick, "load_average_start": load_start, "by_tokenizer": {}}
    for label, (tokenizer, vocab) in tokenizers.items():
        print(f"== {label}", flush=True)
        libs = [LLGuidance(tokenizer, vocab), XGrammar(tokenizer, vocab), GlmModule(tokenizer, vocab)]
        for lib in libs:
            lib.stop_ids = {tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS}
        entry = {"vocab": vocab, "tokenizer_tokens": len(tokenizer), "libraries": {}}
        masks: list[torch.Tensor] = []
        for lib in libs:
            print(f"   {lib.name}", flush=True)
            lib_masks: list[torch.Tensor] = []
            entry["libraries"][lib.name] = {
                "tokenizer_setup_s": lib.tokenizer_seconds,
                "compile": {name: measure_compile(lib, schema, compiles) for name, (schema, _) in WORKLOADS.items()},
                "masks": measure_masks(lib, tokenizer, WORKLOADS, repeats, walks, steps, lib_masks),
                "batch8": measure_batch(lib, tokenizer, 8, repeats * 3),
            }
            if lib.name == "llguidance":
                masks = lib_masks
        entry["apply_cpu_fp32"] = measure_apply(masks, vocab, [1, 8, 32], repeats * 3)
        entry["gil_progress_kept"] = measure_gil(libs[:2], tokenizer, gil_seconds)
        entry["special_tokens_inside_json_strings"] = {lib.name: specials_inside_strings(lib, tokenizer) for lib in libs}
        results["by_tokenizer"][label] = entry
    results["features"] = feature_table([LLGuidance(tiny, len(tiny)), XGrammar(tiny, len(tiny))], tiny)
    results["special_token_in_grammar"] = special_token_support(tiny, len(tiny))
    results["load_average_end"] = os.getloadavg()[0]
    finish_provenance(results["provenance"])

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(render(results), encoding="utf-8")
    print(f"wrote {out}.md and {out}.json")


def fmt(value: float) -> str:
    return "n/a" if value != value else f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.0f}"


def render(results: dict) -> str:
    m, v = results["machine"], results["versions"]
    lines = [
        "# Grammar library for constrained decoding: llguidance vs xgrammar",
        "",
        f"Written by `bench/constraints_choice.py`{' (--quick: rough figures)' if results['quick'] else ''}.",
        f"Machine: {m['cpu']}, {m['cpus']} CPUs, Python {m['python']}, torch threads {m['torch_threads']}; "
        f"load average {results['load_average_start']:.1f} at start, {results['load_average_end']:.1f} at end "
        "(a shared box: other work ran at the same time, so treat absolute figures as upper bounds).",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        f"Command: `{results['command']}`.",
        "The GLM-4 vocabulary is a stand-in (bench/standin_tokenizer.py): a byte-level BPE of GLM-4's size trained "
        "on local Python sources and Chinese text, with GLM-4's special tokens at their real ids; the real "
        "tokenizer could not be downloaded. All times are milliseconds, single-threaded unless a parallel API says so.",
        "",
    ]
    for label, entry in results["by_tokenizer"].items():
        lines += [f"## {label}", ""]
        libs = entry["libraries"]
        lines += ["Tokenizer setup (once per model): " + ", ".join(
            f"{name} {lib['tokenizer_setup_s']:.2f} s" for name, lib in libs.items()) + ".", ""]
        lines += ["### Per-token mask time (ms)", ""]
        header = ["schema", "library", "first mask", "doc p50", "doc p99", "doc max", "random p50", "random p99",
                  "random max", "doc ok"]
        rows = []
        for name, lib in libs.items():
            for schema, r in lib["masks"].items():
                rows.append([schema, name, fmt(r["first_mask_ms_p50"]), fmt(r["doc_ms_p50"]), fmt(r["doc_ms_p99"]),
                             fmt(r["doc_ms_max"]), fmt(r["random_ms_p50"]), fmt(r["random_ms_p99"]),
                             fmt(r["random_ms_max"]), "yes" if r["document_accepted"] else "NO"])
        lines += [markdown_table(header, rows), ""]
        lines += ["### Compile: schema to first mask (ms)", ""]
        rows = [[schema, name, fmt(c["cold_ms"]), fmt(c["warm_ms_p50"]), fmt(c["warm_ms_max"])]
                for name, lib in libs.items() for schema, c in lib["compile"].items()]
        lines += [markdown_table(["schema", "library", "first in process", "new schema p50", "new schema max"], rows), ""]
        lines += ["### One step of 8 constrained rows (ms)", ""]
        rows = [[name, fmt(lib["batch8"]["sequential_ms_p50"]), fmt(lib["batch8"]["sequential_ms_p99"]),
                 fmt(lib["batch8"]["parallel_api_ms_p50"]), fmt(lib["batch8"]["parallel_api_ms_p99"])]
                for name, lib in libs.items()]
        lines += [markdown_table(["library", "one by one p50", "one by one p99", "parallel API p50", "parallel API p99"],
                                 rows), ""]
        lines += [f"### Applying masks to [B, {entry['vocab']}] fp32 logits on the CPU (ms)", ""]
        rows = [[b, fmt(a["glm4_apply_bitmask_ms_p50"]), fmt(a["glm4_apply_bitmask_ms_p99"]),
                 fmt(a["xgrammar_kernel_ms_p50"]), fmt(a["xgrammar_kernel_ms_p99"])]
                for b, a in entry["apply_cpu_fp32"].items()]
        lines += [markdown_table(["B", "glm4 apply_bitmask p50", "p99", "xgrammar CPU kernel p50", "p99"], rows), ""]
        lines += ["### Special tokens a JSON string position allows (they would break the reply: not text)", ""]
        lines += [f"- {name}: {', '.join(f'`{t}`' for t in found) or 'none'}"
                  for name, found in entry["special_tokens_inside_json_strings"].items()]
        lines += [""]
        lines += ["### Main-thread Python progress kept while another thread computes masks (1.0 = GIL released)", ""]
        lines += [markdown_table(["background work", "progress kept"],
                                 [[k, f"{val:.2f}"] for k, val in entry["gil_progress_kept"].items()]), ""]
    lines += ["## JSON Schema features (tiny tokenizer; a valid and an invalid document per feature)", ""]
    names = list(next(iter(results["features"].values())).keys())
    rows = [[feature] + [row[n] for n in names] for feature, row in results["features"].items()]
    lines += [markdown_table(["feature"] + names, rows).replace("|---:", "|:---"), ""]
    lines += ["## Special token inside a grammar (GLM-4 separates parallel tool calls with `<|assistant|>`)", ""]
    lines += [f"- {name}: {answer}" for name, answer in results["special_token_in_grammar"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
