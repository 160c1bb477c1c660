"""create_app(settings, engine): the FastAPI app with the /v1 router, /health, /metrics and the Gradio UI.

No model is loaded here: app.py builds the engine and hands it in, so tests can build apps cheaply.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from glm4 import __version__
from glm4.api import files, vector_stores
from glm4.api.chat_completions import ChatCompletions
from glm4.api.embeddings import install_embeddings
from glm4.api.errors import APIError, error_body, install_error_handlers
from glm4.api.knowledge import open_store, upload_body_limit
from glm4.api.metrics import Metrics
from glm4.api.ollama import install_ollama, ollama_request_schemas
from glm4.api.routes import public, v1
from glm4.api.serving import ChatService
from glm4.chat import build_core
from glm4.engine.base import Engine
from glm4.settings import Settings

log = logging.getLogger(__name__)

API_PREFIXES = ("/v1/", "/api/")  # the OpenAI and Ollama APIs: behind --api-key, refused while draining


def route_path(scope) -> str:
    """The path the app routes on: uvicorn puts --root-path in front of the path the client sent, and Starlette
    strips it again before matching routes (the same rule as Starlette's own, which is private)."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and (path == root or path.startswith(root + "/")):
        return path[len(root):]
    return path


class GuardMiddleware:
    """Pure ASGI: refuses bodies over --max-body-size (413), new work while draining (503), counts requests."""

    def __init__(self, app, state):
        self.app = app
        self.state = state  # the FastAPI app's state: settings, metrics, status

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, limit_flag = self.state.settings.max_body_size, "--max-body-size"
        if scope["path"] == "/v1/files" and scope.get("method") == "POST":  # uploads: up to --max-file-size
            limit, limit_flag = upload_body_limit(self.state.settings), "--max-file-size"
        status: dict[str, object] = {"sent": None, "refused": False}

        async def send_once(message):
            if status["refused"]:
                return  # our error response already went out (body overflow): drop the app's reply
            if message["type"] == "http.response.start":
                status["sent"] = message["status"]
            await send(message)

        async def refuse(error: APIError):
            if status["sent"] is None:
                await self._send_error(send_once, error)
            status["refused"] = True

        too_large = APIError(413, f"request body is larger than the server's limit of {limit} bytes "
                             f"({limit_flag})", code="request_too_large")
        seen = 0

        async def receive_limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # a chunked body that never declared its length
                    await refuse(too_large)
                    return {"type": "http.disconnect"}
            return message

        try:
            if self.state.status == "draining" and route_path(scope).startswith(API_PREFIXES):
                await refuse(APIError(503, "the server is shutting down; retry on another instance",
                                      code="unavailable", headers={"Retry-After": "5"}))
                return
            declared = dict(scope.get("headers") or []).get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                await refuse(too_large)
                return
            await self.app(scope, receive_limited, send_once)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or ("other" if route_path(scope).startswith("/v1") else "/")
            self.state.metrics.http_requests.labels(path, str(status["sent"] or 500)).inc()

    @staticmethod
    async def _send_error(send, error: APIError) -> None:
        import json
        body = json.dumps(error_body(error.message, error.type, error.param, error.code)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def describe_request_models(app: FastAPI, settings: Settings) -> None:
    """Make the OpenAPI spec say what the server does (schemathesis fuzzes against it: tests/test_fuzz.py).

    The chat route parses its body itself (any Content-Type), so its request model is added here; FastAPI's
    422 responses are dropped (validation errors are 400 in the OpenAI envelope); with --api-key the /v1
    operations declare bearer auth.
    """
    from fastapi.openapi.utils import get_openapi

    from glm4.api.protocol import ChatCompletionRequest

    def openapi():
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            request_schema = ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {})
            schemas = components.setdefault("schemas", {})
            schemas.update(request_schema.pop("$defs", {}))
            schemas["ChatCompletionRequest"] = request_schema
            schemas.update(ollama_request_schemas())
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            if settings.api_key:
                components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, operations in schema["paths"].items():
                for operation in operations.values():
                    operation["responses"].pop("422", None)
                    if settings.api_key and path.startswith(API_PREFIXES):
                        operation["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


class AcceptPrefixedPaths:
    """Pure ASGI, with --root-path: serve paths that still carry the prefix as well as those a proxy stripped.

    uvicorn's root_path assumes a proxy that strips the prefix (the client's /glm/v1/models arrives as
    /v1/models) and uses the prefix only to build URLs (the OpenAPI `servers`, Gradio's asset links). A proxy
    that passes the path on unchanged (nginx `proxy_pass http://host:8003;`), or a client talking to the
    server directly, sends /glm/v1/models: that would be a 404. Both now reach the same routes.
    """

    def __init__(self, app, root_path: str):
        self.app = app
        self.root_path = root_path.rstrip("/")

    async def __call__(self, scope, receive, send):
        if self.root_path and scope["type"] in ("http", "websocket"):
            route = route_path(scope)  # uvicorn put root_path in front of the path the client sent
            if route == self.root_path or route.startswith(self.root_path + "/"):
                cut = len(self.root_path)
                scope = {**scope, "path": scope["path"][cut:],
                         "raw_path": (scope.get("raw_path") or scope["path"].encode())[cut:]}
        await self.app(scope, receive, send)


class UnsafeSettings(ValueError):
    """Settings that would leave a way to generate open although the operator asked for auth."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_test_hooks(settings: Settings) -> None:
    """--test-hooks lets any client inject faults and force replies: tests only, so loopback only."""
    if settings.test_hooks and not is_loopback(settings.host):
        raise UnsafeSettings(f"--test-hooks lets any client inject faults and force replies; it is for tests on "
                             f"127.0.0.1 and is refused with --host {settings.host}. Drop --test-hooks (or bind "
                             "127.0.0.1).")


def check_safe_settings(settings: Settings) -> None:
    """The refusals, checked before any model loads (a refusal should take a second, not minutes)."""
    check_ui_protection(settings)
    check_test_hooks(settings)


def check_ui_protection(settings: Settings) -> None:
    """--api-key guards /v1 only. Gradio's own routes (/gradio_api/queue/join, /gradio_api/call/respond, ...)
    reach the same engine, so with a key set the UI must be behind --ui-auth (Gradio's login, which those
    routes check) or off. Refusing to start beats serving a protected API next to an open back door."""
    if settings.api_key and not settings.no_ui and not settings.ui_auth:
        raise UnsafeSettings("--api-key protects /v1, but the chat UI at / and its Gradio API (/gradio_api/...), "
                             "which can generate too, would stay open: add --ui-auth user:password, or --no-ui. "
                             "See docs/SECURITY.md.")


def create_app(settings: Settings, engine: Engine, embeddings=None) -> FastAPI:
    """embeddings: the loaded glm4.embeddings.EmbeddingService, or None (the routes then say none is configured)."""
    check_safe_settings(settings)
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        await asyncio.to_thread(app.state.knowledge.start)
        app.state.status = "ok"
        try:
            yield
        finally:
            app.state.status = "draining"
            await engine.shutdown(drain_timeout=settings.drain_timeout)
            await asyncio.to_thread(app.state.knowledge.close)

    app = FastAPI(title="GLM-4 chat server", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible chat completions over GLM-4, plus a Gradio chat UI at /.")
    app.state.settings = settings
    app.state.engine = engine
    app.state.status = "loading"
    app.state.metrics = Metrics(engine)
    app.state.chat = ChatService(engine, settings, app.state.metrics)
    app.state.core = build_core(engine, settings)  # every protocol and the UI translate onto this one core
    app.state.chat_completions = ChatCompletions(app.state.core, app.state.metrics, settings.legacy_stream)
    app.state.knowledge = open_store(settings)  # opened at startup (lifespan), closed at shutdown
    install_error_handlers(app)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(GuardMiddleware, state=app.state)
    app.include_router(v1)  # before the UI mount: a mount at "/" shadows routes added after it
    app.include_router(files.router)
    app.include_router(vector_stores.router)
    app.include_router(public)
    install_embeddings(app, embeddings)  # /v1/embeddings, /v1/rerank (+ /rerank, /v2/rerank)
    install_ollama(app)  # Ollama's /api (chat, generate, tags, show, embed, ...)
    describe_request_models(app, settings)
    if not settings.no_ui:
        from glm4.ui import mount_ui

        app = mount_ui(app, engine, settings)
    return app
