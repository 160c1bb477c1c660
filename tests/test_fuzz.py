"""Schemathesis against the server's own OpenAPI spec: over 1,000 generated requests, zero 5xx, every error in
the OpenAI envelope, every response as the spec describes it.

How the run is shaped (and why):
- The spec is read from the live server (GET /openapi.json). Cases are drawn from a copy made cheaper to
  generate (`generation_spec`): objects closed (`additionalProperties: false`), arrays of at most 4 items,
  strings of at most 40 characters. Generating from the spec as served was ~5x slower on 2 cores (hypothesis
  writes arbitrary JSON for open objects and long lists); unknown fields, long lists and long strings are
  covered by tests/test_hostile.py. A "negative" case whose only fault is against these extra bounds is valid
  for the served spec: such cases are checked as positive ones (`served_validator`) and counted apart.
- `cap_generation` keeps the tiny model's work small: `max_tokens`/`max_completion_tokens` above 4 become 4
  (and `max_tokens: 4` is added when neither is set: a whole context window would take seconds), and an
  `n` of 3..16 becomes 2. Values the schema forbids (n > 16, negative numbers, wrong types) are left alone.
- Hypothesis is derandomized and its example database is off, and it is kept from mixing literals of the
  local modules into the data (`without_local_constants`): the same cases every run. Requests go out from a
  few threads while the next cases are generated, so the engine batches them, as with real clients.
- Every response gets schemathesis' checks (status code documented, content type, response schema,
  negative data rejected, positive data accepted) plus ours: no 5xx, the error envelope, and streams that end
  in [DONE] without an in-band error. A positive case may be refused for reasons JSON Schema cannot say
  (SEMANTIC_REFUSALS); those are counted, not failed.

`fuzz()` is also run by bench/reliability_report.py, which writes its figures to docs/RELIABILITY.md.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import copy
import json
import threading
import time
from dataclasses import dataclass, field

import httpx
import requests
# schemathesis imports its 4xx-body parsers lazily, in the middle of a Hypothesis run; on CPython 3.11.7 that
# (pytest-rewritten) import died with "SystemError: AST constructor recursion depth mismatch" in CI. Importing
# them here, at collection, keeps the parse out of the test run.
import schemathesis.core.error_feedback.parsers  # noqa: F401

ENVELOPE_KEYS = {"message", "type", "param", "code"}
MAX_TOKENS_CAP = 4  # completion tokens per generated request: the tiny model answers in ~20 ms
N_CAP = 2  # choices per generated request
# Budgets of generated cases per (mode, operation); hypothesis stops early where the space is smaller.
BUDGETS = {
    "positive": {"POST /v1/chat/completions": 520, "GET /v1/models/{model_id}": 60, "GET /v1/models": 5,
                 "GET /health": 5},
    "negative": {"POST /v1/chat/completions": 480, "GET /v1/models/{model_id}": 20},
}
# Ollama's /api (tests/test_ollama_api.py has the client-level tests); run apart, on the same server.
OLLAMA_BUDGETS = {
    "positive": {"POST /api/chat": 120, "POST /api/generate": 80, "POST /api/show": 20, "POST /api/embed": 15,
                 "POST /api/embeddings": 10, "GET /api/tags": 3, "GET /api/ps": 3, "GET /api/version": 3},
    "negative": {"POST /api/chat": 80, "POST /api/generate": 50, "POST /api/show": 15, "POST /api/embed": 15},
}
# Ollama's errors carry no code: the refusals JSON Schema cannot express, by the words of the message.
OLLAMA_REFUSALS = {
    "not found": "model_not_found",  # a generated model name
    "does not support": "capability",  # think on a model without reasoning, embed without an embedding model
    "num_ctx": "context_length_exceeded",  # num_ctx above the plan, or below the prompt
    "maximum context length": "context_length_exceeded",
    "format": "format",  # a generated object that is not a JSON schema the grammar compiler takes
    "tool": "tool_choice",  # a tool result or call that the prompt cannot place
}
# Schema-valid requests the server refuses with a 4xx for reasons JSON Schema cannot express.
SEMANTIC_REFUSALS = {
    "context_length_exceeded",  # prompt + max_tokens larger than the context window (depends on tokens)
    "model_not_found",  # "model" names a model this server does not serve
    "tool_choice",  # names a function that is not among the tools
    "unsupported_schema",  # a response_format / tool schema the grammar library cannot enforce (or two tools of one name)
}


@dataclass
class FuzzReport:
    requests: int = 0
    by_status: collections.Counter = field(default_factory=collections.Counter)  # "positive 200" → count
    server_errors: list[str] = field(default_factory=list)  # any 5xx, or an in-band error in a 200 stream
    envelope_errors: list[str] = field(default_factory=list)  # a 4xx whose body is not the OpenAI envelope
    check_failures: collections.Counter = field(default_factory=collections.Counter)  # schemathesis check → count
    failure_examples: list[str] = field(default_factory=list)
    semantic_refusals: collections.Counter = field(default_factory=collections.Counter)
    valid_for_served_spec: int = 0  # negative cases whose only fault is against the generation bounds
    streams: int = 0
    seconds: float = 0.0

    @property
    def failures(self) -> int:
        return len(self.server_errors) + len(self.envelope_errors) + sum(self.check_failures.values())

    def summary(self) -> str:
        lines = [f"{self.requests} requests in {self.seconds:.0f} s; {len(self.server_errors)} 5xx; "
                 f"{len(self.envelope_errors)} errors outside the envelope; checks failed: "
                 f"{dict(self.check_failures) or 'none'}; semantic refusals: {dict(self.semantic_refusals)}; "
                 f"negative cases valid for the served spec: {self.valid_for_served_spec}",
                 f"statuses: {dict(sorted(self.by_status.items()))}"]
        return "\n".join(lines + (self.server_errors + self.envelope_errors + self.failure_examples)[:10])


MAX_ITEMS = 4  # per generated array
MAX_LENGTH = 40  # characters per generated string


def request_schemas(spec: dict, root: str = "ChatCompletionRequest") -> set[str]:
    """Names of the component schemas a request body can reach (responses keep their own)."""
    schemas, seen, todo = spec["components"]["schemas"], set(), [root]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += [ref.rsplit("/", 1)[1] for ref in json.dumps(schemas[name]).split('"$ref": "')[1:]
                     for ref in [ref.split('"', 1)[0]]]
    return seen


def generation_spec(spec: dict) -> dict:
    """A copy of the spec that is cheaper to generate from: in the request schemas, closed objects and short
    arrays and strings (the response schemas stay as served: they validate the replies)."""
    spec = copy.deepcopy(spec)

    def bound(node):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            if node.get("type") == "array":
                node["maxItems"] = min(node.get("maxItems", MAX_ITEMS), MAX_ITEMS)
            if node.get("type") == "string" and "enum" not in node and "const" not in node:
                node["maxLength"] = min(node.get("maxLength", MAX_LENGTH), MAX_LENGTH)
            for value in node.values():
                bound(value)
        elif isinstance(node, list):
            for value in node:
                bound(value)

    roots = ["ChatCompletionRequest"] + [name for name in spec["components"]["schemas"]
                                         if name.startswith("Ollama") and name.endswith("Request")]
    for name in set().union(*(request_schemas(spec, root) for root in roots)):
        bound(spec["components"]["schemas"][name])
    return spec


def served_validator(spec: dict):
    """A JSON-Schema validator for the chat request body exactly as the server's spec states it (open objects)."""
    import jsonschema

    root = {"$ref": "#/components/schemas/ChatCompletionRequest", "components": spec["components"]}
    return jsonschema.Draft202012Validator(root)


def cap_ollama_generation(body: dict, mode: str) -> None:
    """/api/chat and /api/generate: options.num_predict at most 4 (added when absent; 0, -1, -2 mean "unlimited"),
    and in positive cases the model name becomes the served one (most generated names would only be 404s)."""
    if mode == "positive" and isinstance(body.get("model"), str):
        body["model"] = "glm-4"
    options = body.get("options")
    if options is None or "options" not in body:
        body["options"] = options = {}
    if isinstance(options, dict):
        value = options.get("num_predict")
        if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                             and (value > MAX_TOKENS_CAP or -2 <= value <= 0)):
            options["num_predict"] = MAX_TOKENS_CAP


def cap_generation(case, mode: str = "positive") -> None:
    """Keep generated chat requests cheap for the tiny model without making valid data invalid or vice versa."""
    body = case.body
    if case.operation.path in ("/api/chat", "/api/generate") and isinstance(body, dict):
        cap_ollama_generation(body, mode)
        return
    if case.operation.path != "/v1/chat/completions" or not isinstance(body, dict):
        return
    limits = [key for key in ("max_completion_tokens", "max_tokens") if body.get(key) is not None]
    for key in limits:
        value = body[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > MAX_TOKENS_CAP:
            body[key] = MAX_TOKENS_CAP
    if not limits:  # null or absent: the server would fill the whole context window
        body["max_tokens"] = MAX_TOKENS_CAP
    n = body.get("n")
    if isinstance(n, (int, float)) and not isinstance(n, bool) and N_CAP < n <= 16:
        body["n"] = N_CAP


def envelope_problem(response, ollama: bool = False) -> str | None:
    if ollama:  # Ollama's shape: {"error": "message"}
        try:
            body = response.json()
        except ValueError:
            return "not JSON"
        if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(body["error"], str) \
                or not body["error"]:
            return f"not Ollama's error shape: {str(body)[:100]}"
        return None
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return "not JSON with an 'error' object"
    if not isinstance(error, dict) or set(error) != ENVELOPE_KEYS:
        return f"envelope keys {sorted(error) if isinstance(error, dict) else type(error).__name__}"
    if not isinstance(error["message"], str) or not error["message"] or not isinstance(error["type"], str):
        return "empty message or type"
    return None


def content_type(response) -> str:
    values = response.headers.get("content-type") or [""]  # schemathesis keeps a list per header
    return values[0] if isinstance(values, list) else values


def stream_problem(response, ollama: bool = False) -> str | None:
    """An OpenAI SSE stream must end with [DONE] and carry no error event; a legacy one ends with ["DONE"];
    an Ollama NDJSON stream ends with a done line and carries no error line."""
    text = response.text
    if ollama:
        if not content_type(response).startswith("application/x-ndjson"):
            return None
        parts = [json.loads(line) for line in text.split("\n") if line]
        if not parts or parts[-1].get("done") is not True:
            return f"Ollama stream without a final done line: ...{text[-300:]!r}"
        if any("error" in part for part in parts):
            return "in-band error in the Ollama stream"
        return None
    if content_type(response).startswith("text/event-stream"):
        events = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            return f"SSE stream without a final [DONE]: ...{text[-300:]!r}"
        if any('"error"' in event and "error" in json.loads(event) for event in events[:-1]):
            return "in-band error in the stream"
    elif content_type(response).startswith("application/x-ndjson"):
        lines = [line for line in text.split("\n") if line]
        if not lines or lines[-1] != '["DONE"]':
            return 'legacy stream without a final ["DONE"]'
        if any("error" in json.loads(line) for line in lines[:-1]):
            return "in-band error in the legacy stream"
    return None


def refusal_reason(response, ollama: bool = False) -> str | None:
    """The SEMANTIC_REFUSALS entry that explains a 4xx to a schema-valid request, if any."""
    if response.status_code not in (400, 404):
        return None
    if ollama:
        message = response.json().get("error", "")
        return next((reason for words, reason in OLLAMA_REFUSALS.items() if words in message), None)
    error = response.json().get("error", {})
    for reason in (error.get("code"), error.get("param")):
        if reason in SEMANTIC_REFUSALS:
            return reason
    return None


@contextlib.contextmanager
def without_local_constants():
    """Hypothesis mixes literals from every local module that is loaded (all collected test files, the calling
    script) into the data it draws, so the cases would change whenever unrelated code does. Draw with its global
    constants only. NOTE(reliability): a private hook of hypothesis 6.1xx; if it moves, generation still works,
    only less reproducibly."""
    try:
        from hypothesis.internal.conjecture import providers

        original, empty = providers._get_local_constants, providers.Constants()
    except (ImportError, AttributeError):
        yield
        return
    providers._get_local_constants = lambda: empty
    providers.CONSTANTS_CACHE.cache.clear()
    try:
        yield
    finally:
        providers._get_local_constants = original
        providers.CONSTANTS_CACHE.cache.clear()


def generate(schema, mode: str, label: str, budget: int) -> list:
    """Draw up to `budget` cases for one operation (deterministic: derandomized hypothesis, no database)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable

    from schemathesis import GenerationMode

    method, path = label.split(" ", 1)
    operation = schema[path][method]
    strategy = operation.as_strategy(generation_mode=GenerationMode(mode))
    cases: list = []

    @given(case=strategy)
    @settings(max_examples=budget, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    def collect(case):
        cases.append(case)

    try:
        with without_local_constants():
            collect()
    except Unsatisfiable:  # no schema-invalid data exists for this operation (e.g. a bare string path parameter)
        pass
    return cases


class Caller:
    """Sends cases from a thread pool (one requests.Session per thread) and validates each response."""

    def __init__(self, base_url: str, report: FuzzReport, workers: int, validator):
        self.base_url = base_url
        self.validator = validator
        self.report = report
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fuzz")
        self.local = threading.local()
        self.lock = threading.Lock()
        self.futures: list[concurrent.futures.Future] = []

    def submit(self, mode: str, case) -> None:
        self.futures.append(self.pool.submit(self.run, mode, case))

    def wait(self) -> None:
        for future in self.futures:
            future.result()
        self.pool.shutdown()

    def run(self, mode: str, case) -> None:
        from schemathesis.core.failures import FailureGroup

        session = getattr(self.local, "session", None)
        if session is None:
            session = self.local.session = requests.Session()
        valid_for_served_spec = (mode == "negative" and case.operation.path == "/v1/chat/completions"
                                 and self.validator.is_valid(case.body))
        cap_generation(case, mode)
        response = case.call(base_url=self.base_url, session=session, timeout=120)
        label = f"{mode} {case.operation.label}"
        ollama = case.operation.path.startswith("/api/")
        problems: list[tuple[str, str]] = []  # (kind, detail)
        if response.status_code >= 500:
            problems.append(("server_error", f"{response.status_code} {response.text[:200]}"))
        elif response.status_code >= 400:
            problem = envelope_problem(response, ollama)
            if problem:
                problems.append(("envelope", f"{response.status_code}: {problem}: {response.text[:200]}"))
        else:
            problem = stream_problem(response, ollama)
            if problem:
                problems.append(("server_error", problem))
        refusal = refusal_reason(response, ollama) if mode == "positive" or valid_for_served_spec else None
        try:
            case.validate_response(response)
        except FailureGroup as group:
            for failure in group.exceptions:
                name = type(failure).__name__
                if refusal and name == "RejectedPositiveData":
                    continue
                if valid_for_served_spec and name == "AcceptedNegativeData":
                    continue  # valid for the served spec: accepting it is right
                problems.append((name, f"{failure.title}: {response.status_code} {response.text[:200]}"))
        with self.lock:
            report = self.report
            report.requests += 1
            report.by_status[f"{label} {response.status_code}"] += 1
            report.streams += content_type(response).startswith(("text/event-stream", "application/x-ndjson"))
            if refusal:
                report.semantic_refusals[refusal] += 1
            report.valid_for_served_spec += valid_for_served_spec
            for kind, detail in problems:
                body = json.dumps(case.body, ensure_ascii=True)[:400] if isinstance(case.body, (dict, list)) else ""
                example = f"[{kind}] {label}: {detail} | body: {body}"
                if kind == "server_error":
                    report.server_errors.append(example)
                elif kind == "envelope":
                    report.envelope_errors.append(example)
                else:
                    report.check_failures[kind] += 1
                    report.failure_examples.append(example)


def fuzz(url: str, budgets: dict[str, dict[str, int]] = BUDGETS, workers: int = 4) -> FuzzReport:
    """Generate and send the cases against a running server at `url`; return the figures."""
    import schemathesis

    started = time.monotonic()
    spec = httpx.get(url + "/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(generation_spec(spec))
    report = FuzzReport()
    caller = Caller(url, report, workers, served_validator(spec))
    try:
        for mode, operations in budgets.items():
            for label, budget in operations.items():
                for case in generate(schema, mode, label, budget):
                    caller.submit(mode, case)
    finally:
        caller.wait()
    report.seconds = time.monotonic() - started
    return report


def test_fuzz_ollama_api_no_5xx_and_every_error_in_ollama_shape(server):
    report = fuzz(server.url, OLLAMA_BUDGETS)
    print(report.summary())
    assert report.requests >= 200, report.summary()
    assert not report.server_errors, report.summary()
    assert not report.envelope_errors, report.summary()
    assert not report.check_failures, report.summary()
    assert report.by_status["positive POST /api/chat 200"] >= 30, report.summary()  # most chats are answered
    assert report.by_status["negative POST /api/chat 400"] >= 30, report.summary()
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_spec_describes_the_request_and_response_models(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatCompletionRequest"}
    responses = chat["responses"]
    assert responses["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletionResponse")
    assert {"text/event-stream", "application/x-ndjson"} <= set(responses["200"]["content"])
    for status in ("400", "401", "404", "413", "429", "500", "503"):
        assert responses[status]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert not any("422" in op["responses"] for ops in spec["paths"].values() for op in ops.values())
    request = spec["components"]["schemas"]["ChatCompletionRequest"]
    assert "messages" in request["required"] and "max_completion_tokens" in request["properties"]
    assert not {"test_fault", "test_force_output"} & set(request["properties"])  # test hooks stay private
    models = spec["paths"]["/v1/models"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert models["$ref"].endswith("/ModelList")


def test_fuzz_over_1000_requests_no_5xx_and_every_error_enveloped(server):
    report = fuzz(server.url)
    print(report.summary())
    assert report.requests >= 1000, report.summary()
    assert not report.server_errors, report.summary()
    assert not report.envelope_errors, report.summary()
    assert not report.check_failures, report.summary()
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
