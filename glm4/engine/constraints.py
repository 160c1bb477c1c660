"""Grammar constraints for constrained decoding: a JSON schema, any JSON object, GLM-4 tool calls.

Built on llguidance (chosen by measurement against xgrammar: bench/results/constraints_choice.md and
docs/STRUCTURED_OUTPUT.md). One `ConstraintCompiler` per loaded tokenizer compiles requests into
`Constraint`s (base.Constraint); each request's reply gets its own `Matcher` (base.Matcher):

    compiler = ConstraintCompiler(tokenizer, vocab_size=info.vocab_size)     # once per model (~1.5 s at 151k)
    constraint = compiler.json_schema(schema, strict=True)                  # UnsupportedSchema -> HTTP 400
    matcher = constraint.new_matcher()                                      # per choice
    bitmask = allocate_bitmask(batch_rows, compiler.vocab_size)             # once per engine, reused
    # each step: masked = [i for i, m in rows_with_matchers if m.fill_bitmask(bitmask, i)]
    #            apply_bitmask(logits, bitmask, masked); token = sample(...); matcher.accept(token)
    #            matcher.is_finished() -> the reply ends here (finish reason "stop")

Grammars:
- `json_schema(schema, strict)`: one JSON value of the schema, optionally after the single "\\n" GLM-4
  writes after `<|assistant|>` (the engine strips it); generation ends when the value is complete.
  `strict` follows OpenAI's structured outputs: every object is closed (additionalProperties false) and
  every property required; a schema that says otherwise is refused.
- `json_object()`: any JSON object (OpenAI's `json_object` response format).
- `tool_call(tools, tool_choice, parallel_tool_calls)`: GLM-4's tool-call text `{name}\\n{arguments}`,
  the name one of the offered functions, the arguments that function's `parameters`; parallel calls are
  separated by the special token `<|assistant|>`. "required" must call; a named function (the prompt
  already ends with `<|assistant|>{name}\\n`) writes only its arguments; "auto" leaves the reply
  unconstrained until its first line has become a tool name, then constrains the call.

JSON is written on one line, as GLM-4 writes tool arguments: `{"city": "北京", "days": 3}`, a space after
"," and ":" optional, no other whitespace. Free whitespace is a known way for a sampled model to loop until
max_tokens (vLLM added an option to turn it off for that reason); a one-line value parses the same.
Schema features llguidance cannot enforce raise `UnsupportedSchema` naming the feature and its JSON-pointer
path; nothing is ignored silently.

Threads: llguidance releases the GIL while it computes a mask or builds a grammar, so `fill_bitmask`
may run on a background thread while the device computes. A matcher is used by one thread at a time;
compilers and constraints may be shared between threads.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from typing import Any, Iterable

import llguidance
import llguidance.hf
import numpy as np
import torch

from glm4.engine.base import MatcherError

log = logging.getLogger(__name__)

__all__ = [
    "CALL_SEPARATOR",
    "ConstraintCompiler",
    "GrammarConstraint",
    "GrammarMatcher",
    "AutoToolCallConstraint",
    "AutoToolCallMatcher",
    "UnsupportedSchema",
    "allocate_bitmask",
    "apply_bitmask",
]

STOP_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")  # GLM-4's end ids: allowed once a grammar is complete
CALL_SEPARATOR = "<|assistant|>"  # GLM-4 writes this special token between two tool calls of one reply
# One-line JSON: the separators as regexes (an optional space after each), no whitespace anywhere else.
JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ?", "key_separator": ": ?"}
CACHE_SIZE = 256  # compiled grammars kept (LRU, by schema text); one is a few KB to a few hundred KB
# Keys that hold subschemas: by name (dict of schemas), in a list, or as a single schema.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalProperties", "unevaluatedProperties", "unevaluatedItems", "contains",
                  "propertyNames", "not", "if", "then", "else", "additionalItems")


class UnsupportedSchema(ValueError):
    """A schema (or tool list) the grammar library cannot enforce or that cannot be satisfied: HTTP 400.

    `path` is a JSON pointer into the schema ("#/properties/tags"), prefixed with the tool's position for
    tool parameters; `reason` is the library's own words.
    """

    def __init__(self, reason: str, path: str = "#"):
        self.reason = reason
        self.path = path
        super().__init__(f"unsupported JSON schema at {path}: {reason}")


# --- bitmask helpers: the layout every matcher writes and the engine applies ----------------------------

def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """An int32 [rows, ceil(vocab_size/32)] CPU tensor (bit i of word w = token 32*w+i), all allowed.

    Pinned when CUDA is available, so apply_bitmask's copy to the device is asynchronous; the engine must
    not refill a row before the step that used it has synchronised (sampling's .tolist() does).
    """
    shape = (rows, (vocab_size + 31) // 32)
    pin = torch.cuda.is_available()
    return torch.full(shape, -1, dtype=torch.int32, pin_memory=pin)


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """In place: for each i in rows, set logits[i, t] = -inf for every token t that bitmask[i] refuses.

    logits: [B, V] on any device (V may exceed the mask's 32*W columns: those tokens are refused);
    bitmask: [>=B, W] int32 on the CPU; rows: the rows whose fill_bitmask returned True.
    Apply after guard_logits (which would turn -inf back into a finite value).
    """
    if not rows:
        return
    vocab = logits.shape[-1]
    words = bitmask[rows] if len(rows) < bitmask.shape[0] or rows != list(range(len(rows))) else bitmask
    if logits.device.type == "cpu":
        # numpy unpacks bits in one C pass; torch's shift-and-mask builds a 32x wider int tensor first
        bits = np.unpackbits(words.numpy().view(np.uint8), axis=1, count=min(vocab, words.shape[1] * 32),
                             bitorder="little")
        refused = torch.from_numpy(bits.view(np.bool_)).logical_not_()
    else:
        shifts = _SHIFTS.get(logits.device)
        if shifts is None:
            shifts = _SHIFTS[logits.device] = torch.arange(32, dtype=torch.int32, device=logits.device)
        words = words.to(logits.device, non_blocking=True)
        refused = ((words.unsqueeze(-1) >> shifts) & 1).view(len(rows), -1)[:, :vocab] == 0
    if refused.shape[1] < vocab:  # logits wider than the mask: the extra tokens are never allowed
        pad = torch.ones(len(rows), vocab - refused.shape[1], dtype=torch.bool, device=refused.device)
        refused = torch.cat([refused, pad], dim=1)
    if rows == list(range(logits.shape[0])):
        logits.masked_fill_(refused, float("-inf"))
        return
    index = torch.tensor(rows, device=logits.device)
    logits.index_copy_(0, index, logits.index_select(0, index).masked_fill_(refused, float("-inf")))


# --- matchers ---------------------------------------------------------------------------------------------

def _first_line(error: str) -> str:
    """llguidance's matcher errors carry a parser dump after the first line, which says what happened."""
    return error.strip().splitlines()[0] if error.strip() else "grammar matcher failed"


def _condense(message: str) -> str:
    """A schema error on one line: a regex error spans lines (the pattern, a caret line, the reason)."""
    lines = [line.strip() for line in message.strip().splitlines()]
    return " ".join(line for line in lines if line and set(line) != {"^"}) or "the schema cannot be compiled"


class GrammarMatcher:
    """One reply's position in a grammar (base.Matcher)."""

    __slots__ = ("_matcher", "_stop_ids")

    def __init__(self, matcher: llguidance.LLMatcher, stop_ids: frozenset[int]):
        self._matcher = matcher
        self._stop_ids = stop_ids

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> bool:
        if bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or not bitmask.is_contiguous():
            raise ValueError("bitmask must be a contiguous int32 CPU tensor (see allocate_bitmask)")
        target = bitmask[row]
        # Releases the GIL; raises ValueError when the row's width does not fit the compiler's vocab_size.
        self._matcher.unsafe_compute_mask_ptr(target.data_ptr(), target.numel() * 4)
        if self._matcher.is_error():
            raise MatcherError(_first_line(self._matcher.get_error()))
        return True

    def accept(self, token_id: int) -> None:
        if self._matcher.is_stopped() and not self._matcher.is_error() and token_id in self._stop_ids:
            return  # the grammar is complete and the model ended the turn: nothing left to check
        if not self._matcher.consume_token(token_id):
            raise MatcherError(_first_line(self._matcher.get_error()))

    def is_finished(self) -> bool:
        return self._matcher.is_stopped() and not self._matcher.is_error()

    def is_accepting(self) -> bool:
        """The text so far is complete (the engine may stop here), though the grammar may allow more."""
        return self._matcher.is_accepting()


class AutoToolCallMatcher:
    """tool_choice "auto": unconstrained until the reply's first line has become a tool name.

    Every token is tried on a tool-call matcher while the reply could still be a call; the first token it
    refuses makes the reply prose (never masked again). Once an accepted token completes the name line,
    the rest of the call is constrained. A token that completes a name and continues with something that
    is not JSON in the same token makes the reply prose: it was sampled before the call had begun.
    """

    __slots__ = ("_call", "_tokenizer", "_state", "_held")

    def __init__(self, call: GrammarMatcher, tokenizer: llguidance.LLTokenizer):
        self._call = call
        self._tokenizer = tokenizer
        self._state = "undecided"  # -> "call" | "prose"
        self._held = b""  # bytes of the reply while undecided

    @property
    def state(self) -> str:
        return self._state

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> bool:
        if self._state != "call":
            return False
        return self._call.fill_bitmask(bitmask, row)

    def accept(self, token_id: int) -> None:
        if self._state == "call":
            self._call.accept(token_id)
        elif self._state == "undecided":
            if not self._call._matcher.consume_token(token_id):
                self._state, self._call = "prose", None  # the grammar refused: this reply is not a call
                return
            self._held += self._tokenizer.decode_bytes([token_id])
            if b"\n" in self._held:  # the grammar accepted "name\n": a call has begun
                self._state, self._held = "call", b""

    def is_finished(self) -> bool:
        return self._state == "call" and self._call.is_finished()


# --- constraints ------------------------------------------------------------------------------------------

class GrammarConstraint:
    """A compiled grammar (base.Constraint): new_matcher copies a pristine matcher (microseconds)."""

    def __init__(self, prototype: llguidance.LLMatcher, stop_ids: frozenset[int], description: str):
        self._prototype = prototype
        self._stop_ids = stop_ids
        self._lock = threading.Lock()  # the prototype is shared by every request that uses this grammar
        self.description = description

    def new_matcher(self) -> GrammarMatcher:
        with self._lock:
            copy = self._prototype.deep_copy()
        return GrammarMatcher(copy, self._stop_ids)


class AutoToolCallConstraint:
    """tool_choice "auto" (base.Constraint): prose passes, a call once begun is constrained."""

    def __init__(self, calls: GrammarConstraint, tokenizer: llguidance.LLTokenizer):
        self._calls = calls
        self._tokenizer = tokenizer
        self.description = "auto: " + calls.description

    def new_matcher(self) -> AutoToolCallMatcher:
        return AutoToolCallMatcher(self._calls.new_matcher(), self._tokenizer)


# --- schema preparation -----------------------------------------------------------------------------------

def _pointer(parts: Iterable[Any]) -> str:
    """A JSON pointer ("#/properties/a~1b/items") for error messages."""
    escaped = [str(part).replace("~", "~0").replace("/", "~1") for part in parts]
    return "#" + "".join("/" + part for part in escaped)


def _subschemas(schema: Any, path: tuple = ()) -> Iterable[tuple[tuple, dict]]:
    """Every schema object inside `schema` (itself first) with its path; data (enum, const) is skipped."""
    if not isinstance(schema, dict):
        return
    yield path, schema
    for key in _SCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            for name, sub in schema[key].items():
                yield from _subschemas(sub, path + (key, name))
    for key in _SCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            for i, sub in enumerate(schema[key]):
                yield from _subschemas(sub, path + (key, i))
    for key in _SCHEMA_VALUES:
        yield from _subschemas(schema.get(key), path + (key,))


def _is_object_schema(schema: dict) -> bool:
    kind = schema.get("type")
    return kind == "object" or (isinstance(kind, list) and "object" in kind) or "properties" in schema


def _apply_strict(schema: dict) -> dict:
    """OpenAI's strict rules on a copy: objects closed, every property required; contradictions refused."""
    schema = json.loads(json.dumps(schema))
    for path, sub in _subschemas(schema):
        if not _is_object_schema(sub):
            continue
        where = _pointer(path)
        extra = sub.setdefault("additionalProperties", False)
        if extra is not False:
            raise UnsupportedSchema("strict mode requires 'additionalProperties': false on every object", where)
        properties = list((sub.get("properties") or {}).keys())
        required = sub.setdefault("required", properties)
        missing = [name for name in properties if name not in required]
        if missing:
            raise UnsupportedSchema(f"strict mode requires every property in 'required'; missing {missing}", where)
    return schema


def _locate(schema: dict, reason: str) -> str:
    """The path of the schema object an llguidance error is about, or "#" when it cannot be told."""
    def find(test) -> str | None:
        for path, sub in _subschemas(schema):
            if test(sub):
                return _pointer(path)
        return None

    found = None
    if match := re.search(r"Unimplemented keys: \[(.*?)\]", reason):
        keys = re.findall(r'"((?:[^"\\]|\\.)*)"', match.group(1))
        found = find(lambda sub: any(key in sub for key in keys))
    elif match := re.search(r"Unknown format: (\S+)", reason):
        found = find(lambda sub: sub.get("format") == match.group(1))
    elif "regex" in reason:
        found = find(lambda sub: isinstance(sub.get("pattern"), str) and sub["pattern"] in reason) or \
            find(lambda sub: any(key in reason for key in (sub.get("patternProperties") or {})))
    elif match := re.search(r"(?:Pointer|Resource) '([^']*)'", reason):
        target = match.group(1)
        found = find(lambda sub: isinstance(sub.get("$ref"), str) and sub["$ref"].lstrip("#") == target.lstrip("#"))
    elif match := re.search(r"required property '([^']*)'", reason):
        found = find(lambda sub: match.group(1) in (sub.get("required") or []))
    return found or "#"


def _lark_string(text: str) -> str:
    """A Lark string literal (JSON escapes are valid Lark escapes)."""
    return json.dumps(text, ensure_ascii=False)


def _tool_functions(tools: list[Any]) -> list[dict]:
    """The `function` objects of OpenAI tools (dicts or pydantic models), checked and deduplicated."""
    functions, seen = [], set()
    for i, tool in enumerate(tools or []):
        if hasattr(tool, "model_dump"):
            tool = tool.model_dump(exclude_none=True)
        function = tool.get("function") if isinstance(tool, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name or "\n" in name or name != name.strip():
            raise UnsupportedSchema("a tool needs a function name without whitespace at its ends", f"tools[{i}]")
        if name in seen:
            raise UnsupportedSchema(f"function name {name!r} is offered twice", f"tools[{i}]")
        seen.add(name)
        functions.append(function)
    if not functions:
        raise UnsupportedSchema("a tool-call constraint needs at least one function", "tools")
    return functions


# --- the compiler -----------------------------------------------------------------------------------------

class ConstraintCompiler:
    """Compiles constraints for one tokenizer; repeated schemas are compiled once (LRU cache).

    vocab_size: rows of the model's logits (ModelInfo.vocab_size); masks are this wide and tokens the
    tokenizer does not have are never allowed. stop_token_ids: the engine's end ids (default: GLM-4's).
    """

    def __init__(self, tokenizer, vocab_size: int = 0, stop_token_ids: Iterable[int] | None = None,
                 cache_size: int = CACHE_SIZE):
        if stop_token_ids is None:
            stop_token_ids = [tokenizer.convert_tokens_to_ids(token) for token in STOP_TOKENS]
        stop_ids = sorted({int(i) for i in stop_token_ids if i is not None and i != tokenizer.unk_token_id})
        if not stop_ids:
            raise ValueError("the tokenizer has none of GLM-4's stop tokens; pass stop_token_ids")
        self.vocab_size = max(int(vocab_size or 0), len(tokenizer))
        self.stop_ids = frozenset(stop_ids)
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=self.vocab_size, eos_token=stop_ids)
        separator = tokenizer.convert_tokens_to_ids(CALL_SEPARATOR)
        self._has_separator = isinstance(separator, int) and separator != tokenizer.unk_token_id
        self._cache: OrderedDict[str, GrammarConstraint | AutoToolCallConstraint] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    # public constructors

    def json_schema(self, schema: Any, strict: bool = False) -> GrammarConstraint:
        """OpenAI `response_format: {"type": "json_schema", "json_schema": {"schema", "strict"}}`."""
        description = "strict JSON schema" if strict else "JSON schema"
        return self._cached(["json_schema", schema, bool(strict)], lambda: self._compile_json(schema, strict, description))

    def json_object(self) -> GrammarConstraint:
        """OpenAI `response_format: {"type": "json_object"}`: any JSON object."""
        return self._cached(["json_object"], lambda: self._compile_json({"type": "object"}, False, "JSON object"))

    def tool_call(self, tools: list[Any], tool_choice: Any = "required",
                  parallel_tool_calls: bool = True) -> GrammarConstraint | AutoToolCallConstraint:
        """GLM-4 tool-call text for OpenAI `tools` and `tool_choice` ("auto", "required" or
        {"type": "function", "function": {"name": ...}}); a function's `strict: true` applies OpenAI's
        strict rules to its parameters."""
        functions = _tool_functions(tools)
        forced = self._forced_name(tool_choice, functions)
        key = ["tool_call", functions, forced or tool_choice, bool(parallel_tool_calls)]
        return self._cached(key, lambda: self._compile_tool_call(functions, tool_choice, forced,
                                                                 bool(parallel_tool_calls)))

    def cache_info(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "size": len(self._cache)}

    # compilation

    def _cached(self, key_parts: list, build):
        try:
            key = json.dumps(key_parts, ensure_ascii=False, separators=(",", ":"))
        except (TypeError, ValueError) as error:
            raise UnsupportedSchema(f"the schema is not JSON: {error}") from None
        with self._lock:
            constraint = self._cache.get(key)
            if constraint is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return constraint
            self.misses += 1
        constraint = build()  # outside the lock: llguidance builds with the GIL released
        with self._lock:
            self._cache[key] = constraint
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return constraint

    def _prepare(self, schema: Any, strict: bool, where: str = "") -> dict:
        """The schema as llguidance compiles it, checked: UnsupportedSchema names what it cannot enforce."""
        if isinstance(schema, bool):
            schema = {} if schema else {"not": {}}
        if not isinstance(schema, dict):
            raise UnsupportedSchema("a schema must be a JSON object", where + "#")
        schema = {key: value for key, value in schema.items() if key != "x-guidance"}  # options are ours
        if strict:
            try:
                schema = _apply_strict(schema)
            except UnsupportedSchema as error:
                raise UnsupportedSchema(error.reason, where + error.path) from None
        schema["x-guidance"] = {**JSON_FORMAT, "lenient": False, "coerce_one_of": False}
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
        except ValueError as error:
            raise UnsupportedSchema(str(error), where + "#") from None
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if failed:
            reason = _condense(messages[0] if messages else "")
            raise UnsupportedSchema(reason, where + _locate(schema, messages[0] if messages else ""))
        for message in messages:
            log.info("JSON schema warning at %s: %s", where or "#", message)
        return schema

    def _build(self, lark: str, description: str) -> GrammarConstraint:
        matcher = llguidance.LLMatcher(self.tokenizer, llguidance.LLMatcher.grammar_from_lark(lark), log_level=0)
        if matcher.is_error():
            raise UnsupportedSchema(_first_line(matcher.get_error()))
        return GrammarConstraint(matcher, self.stop_ids, description)

    def _compile_json(self, schema: Any, strict: bool, description: str) -> GrammarConstraint:
        prepared = self._prepare(schema, strict)
        # GLM-4 begins every reply with "\n" (stripped by the engine): allow it, then exactly one value.
        lark = 'start: "\\n"? value\nvalue: %json ' + json.dumps(prepared, ensure_ascii=False)
        return self._build(lark, description)

    def _forced_name(self, tool_choice: Any, functions: list[dict]) -> str | None:
        if isinstance(tool_choice, str):
            if tool_choice not in ("auto", "required"):
                raise UnsupportedSchema(f"tool_choice {tool_choice!r} needs no constraint", "tool_choice")
            return None
        if hasattr(tool_choice, "model_dump"):
            tool_choice = tool_choice.model_dump(exclude_none=True)
        name = (tool_choice.get("function") or {}).get("name") if isinstance(tool_choice, dict) else None
        if name not in {function["name"] for function in functions}:
            raise UnsupportedSchema(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
        return name

    def _compile_tool_call(self, functions: list[dict], tool_choice: Any, forced: str | None,
                           parallel: bool) -> GrammarConstraint | AutoToolCallConstraint:
        arguments = {}
        for i, function in enumerate(functions):
            if forced and function["name"] != forced:
                continue
            parameters = function.get("parameters")
            parameters = {"type": "object", "properties": {}} if parameters is None else parameters
            if isinstance(parameters, dict) and "type" not in parameters:
                parameters = {"type": "object", **parameters}
            where = f"tools[{i}].function.parameters"
            if not isinstance(parameters, dict) or parameters.get("type") != "object":
                raise UnsupportedSchema("function parameters must be an object schema", where + "#")
            arguments[function["name"]] = self._prepare(parameters, bool(function.get("strict")), where)
        rules = []
        for i, (name, schema) in enumerate(arguments.items()):
            rules.append(f"args{i}: %json {json.dumps(schema, ensure_ascii=False)}")
        if forced:  # the prompt ends with "<|assistant|>{name}\n": only the arguments are left to write
            lark = "start: args0\n" + "\n".join(rules)
            return self._build(lark, f"arguments of {forced}")
        calls = [f"call{i}: {_lark_string(name + chr(10))} args{i}" for i, name in enumerate(arguments)]
        call = "call: " + " | ".join(f"call{i}" for i in range(len(arguments)))
        if parallel and not self._has_separator:
            raise UnsupportedSchema(f"the tokenizer has no {CALL_SEPARATOR} token to separate parallel calls")
        start = f"start: call ({CALL_SEPARATOR} call)*" if parallel else "start: call"
        lark = "\n".join([start, call, *calls, *rules])
        description = ("parallel " if parallel else "") + "tool calls of " + ", ".join(arguments)
        constraint = self._build(lark, description)
        if tool_choice == "auto":
            return AutoToolCallConstraint(constraint, self.tokenizer)
        return constraint
