"""Schemathesis against the /v1/files and /v1/vector_stores operations of the server's own OpenAPI spec: no 5xx,
every error in the OpenAI envelope, every response as the spec describes it (the harness is tests/test_fuzz.py's)."""

from __future__ import annotations

import httpx

from tests import test_fuzz

OPERATIONS = [
    "POST /v1/files", "GET /v1/files", "GET /v1/files/{file_id}", "DELETE /v1/files/{file_id}",
    "GET /v1/files/{file_id}/content",
    "POST /v1/vector_stores", "GET /v1/vector_stores", "GET /v1/vector_stores/{vector_store_id}",
    "POST /v1/vector_stores/{vector_store_id}", "DELETE /v1/vector_stores/{vector_store_id}",
    "POST /v1/vector_stores/{vector_store_id}/files", "GET /v1/vector_stores/{vector_store_id}/files",
    "GET /v1/vector_stores/{vector_store_id}/files/{file_id}",
    "POST /v1/vector_stores/{vector_store_id}/files/{file_id}",
    "DELETE /v1/vector_stores/{vector_store_id}/files/{file_id}",
    "GET /v1/vector_stores/{vector_store_id}/files/{file_id}/content",
    "POST /v1/vector_stores/{vector_store_id}/search",
    "POST /v1/vector_stores/{vector_store_id}/file_batches",
    "GET /v1/vector_stores/{vector_store_id}/file_batches/{batch_id}",
    "POST /v1/vector_stores/{vector_store_id}/file_batches/{batch_id}/cancel",
    "GET /v1/vector_stores/{vector_store_id}/file_batches/{batch_id}/files",
]
BUDGETS = {"positive": {label: 25 for label in OPERATIONS}, "negative": {label: 15 for label in OPERATIONS}}
# Schema-valid requests refused for what JSON Schema cannot say: a generated upload is rarely a readable
# document of a supported type; a generated id or cursor names no object; a chunk overlap over half the size.
KNOWLEDGE_REFUSALS = {"unsupported_file", "invalid_file", "not_found", "invalid_chunking_strategy"}


def test_knowledge_routes_fuzzed_no_5xx_and_every_error_enveloped(start_server, tmp_path, monkeypatch):
    server = start_server("--no-ui", "--data-dir", str(tmp_path))
    spec = httpx.get(server.url + "/openapi.json").json()
    assert set(OPERATIONS) <= {f"{method.upper()} {path}" for path, ops in spec["paths"].items() for method in ops}
    # schemathesis imports its object-authorization check lazily, on the first response with an owned object;
    # four fuzz threads doing that first import at once see a half-initialized module: import it here first
    import schemathesis.specs.openapi.object_authorization  # noqa: F401

    monkeypatch.setattr(test_fuzz, "SEMANTIC_REFUSALS", test_fuzz.SEMANTIC_REFUSALS | KNOWLEDGE_REFUSALS)
    report = test_fuzz.fuzz(server.url, BUDGETS)
    print(report.summary())
    assert report.requests >= 300, report.summary()
    assert not report.server_errors, report.summary()
    assert not report.envelope_errors, report.summary()
    assert not report.check_failures, report.summary()
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
