"""The process's top ASGI app: it listens at once, answers while the model loads, then hands over.

Loading GLM-4-9B takes a minute or more. A server that only listens afterwards refuses connections all that
time, which load balancers, orchestrators and clients read as "down". Until the engine is ready:

    /health   503 {"status": "loading"}
    /v1/...   503 in the OpenAI envelope, with Retry-After (the SDKs retry a 503 by themselves)
    the rest  503 with a small page that reloads itself (the chat UI lives at /)

The engine is built on a daemon thread (a SIGTERM during loading exits at once instead of waiting for the
weights). Then the real app is created, its lifespan is run here as uvicorn would run it (engine start,
Gradio's startup), and every request goes to it. On shutdown its lifespan shutdown (the drain) runs first.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Callable

from fastapi.responses import HTMLResponse, JSONResponse

from glm4.api.errors import APIError
from glm4.api.protocol import HealthResponse
from glm4.engine.base import Engine
from glm4.server import UnsafeSettings, route_path
from glm4.settings import Settings

log = logging.getLogger("glm4")

RETRY_AFTER = {"Retry-After": "5"}
LOADING_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="5"><title>GLM-4 chat: loading</title></head>
<body style="font-family: sans-serif; margin: 3em"><h1>GLM-4 chat</h1>
<p>The model is loading. This page reloads itself every 5 seconds until the chat is ready.</p></body></html>
"""


class StartupApp:
    """ASGI: the loading answers above until the real app (create_app over the built engine) has started."""

    def __init__(self, settings: Settings, build_engine: Callable[[], Engine],
                 create_app: Callable[[Settings, Engine], Any]):
        self.settings = settings
        self.build_engine = build_engine  # slow and blocking: runs on a thread
        self.create_app = create_app
        self.app: Any = None  # the real app, once its lifespan started
        self.exit_code = 0  # 2: the model could not be loaded (a message was logged); 1: an unexpected failure
        self.on_failure: Callable[[], None] = lambda: None  # app.py: stop the server
        self._loader: asyncio.Task | None = None
        self._starting: Any = None  # the real app while its lifespan starts
        self._lifespan: asyncio.Task | None = None
        self._to_app: asyncio.Queue = asyncio.Queue()
        self._from_app: asyncio.Queue = asyncio.Queue()
        self._state: dict = {}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self._serve_lifespan(scope, receive, send)
        if self.app is not None:
            return await self.app(scope, receive, send)
        return await self._answer_loading(scope, receive, send)

    # ---- while loading ----

    async def _answer_loading(self, scope, receive, send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1013})  # "try again later"
            return
        if scope["type"] != "http":
            return
        path = route_path(scope)
        if path == "/health":
            response = JSONResponse(HealthResponse(status="loading").model_dump(), status_code=503,
                                    headers=RETRY_AFTER)
        elif path == "/v1" or path.startswith("/v1/"):
            response = APIError(503, "the model is still loading; retry in a few seconds", code="model_loading",
                                headers=RETRY_AFTER).response()
        else:
            response = HTMLResponse(LOADING_PAGE, status_code=503, headers=RETRY_AFTER)
        await response(scope, receive, send)

    # ---- lifespan: ours, and the real app's run from it ----

    async def _serve_lifespan(self, scope, receive, send) -> None:
        self._state = scope.get("state", {})  # uvicorn copies this into every request scope
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._loader = asyncio.create_task(self._load())
                await send({"type": "lifespan.startup.complete"})  # listen now, answer "loading"
            elif message["type"] == "lifespan.shutdown":
                await self._shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _load(self) -> None:
        from glm4.loading import ModelLoadError
        from glm4.placement import PlacementError

        try:
            engine = await self._on_thread(self.build_engine)
            app = self._starting = self.create_app(self.settings, engine)
            await self._start_lifespan(app)
        except (ModelLoadError, PlacementError, UnsafeSettings) as error:
            log.error("%s", error)  # one paragraph a user can act on, no traceback
            self._fail(2)
            return
        except Exception:
            log.exception("loading the model failed")
            self._fail(1)
            return
        self.app = app
        settings = self.settings
        ui = "off" if settings.no_ui else f"http://{settings.host}:{settings.port}{settings.root_path}/"
        log.info("Serving %s: API http://%s:%d%s/v1 · UI %s", engine.info.name, settings.host, settings.port,
                 settings.root_path, ui)

    def _fail(self, code: int) -> None:
        self.exit_code = code
        self.on_failure()

    @staticmethod
    async def _on_thread(function: Callable[[], Any]) -> Any:
        """function() on a daemon thread (asyncio.to_thread's pool would hold the process until it returns)."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def settle(result: Any, error: BaseException | None) -> None:
            if not done.done():
                done.set_exception(error) if error is not None else done.set_result(result)

        def run() -> None:
            try:
                result, error = function(), None
            except BaseException as failure:  # handed to the awaiting task, which re-raises it
                result, error = None, failure
            try:
                loop.call_soon_threadsafe(settle, result, error)
            except RuntimeError:  # the loop closed meanwhile: the server stopped while we loaded
                pass

        threading.Thread(target=run, name="glm4-load", daemon=True).start()
        return await done

    async def _start_lifespan(self, app) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": self._state}
        self._lifespan = asyncio.create_task(app(scope, self._to_app.get, self._from_app.put))
        await self._to_app.put({"type": "lifespan.startup"})
        reply = await self._from_app.get()
        if reply["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"the app failed to start: {reply.get('message') or reply['type']}")

    async def _shutdown(self) -> None:
        if self._loader is not None and not self._loader.done():
            if self._starting is None:  # still loading weights: abandon the daemon thread
                self._loader.cancel()
            await asyncio.gather(self._loader, return_exceptions=True)
        if self._lifespan is not None and not self._lifespan.done():
            await self._to_app.put({"type": "lifespan.shutdown"})  # the real app drains and stops its engine
            await self._from_app.get()
            await asyncio.gather(self._lifespan, return_exceptions=True)
