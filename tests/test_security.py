"""Security: with --api-key every /v1 route wants the key; Gradio's own routes want the --ui-auth login (and a
key without --ui-auth refuses to start while the UI is on); binding beyond loopback without a key warns; no
prompt text and no key reach the log at the default level. docs/SECURITY.md explains the rules.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
import uuid

import httpx
import pytest
from fastapi.testclient import TestClient

from glm4.server import UnsafeSettings, create_app
from glm4.settings import Settings, parse_settings
from tests.conftest import ROOT, LiveServer, free_port

KEY = "sk-test-" + uuid.uuid4().hex  # unique: grepping the log for it cannot match anything else
UI_USER, UI_PASSWORD = "alice", "pw-" + uuid.uuid4().hex[:12]
HELLO = [{"role": "user", "content": "hi"}]
ENVELOPE_KEYS = {"message", "type", "param", "code"}

# Gradio 6.31 routes that answer without the --ui-auth login, and why that is harmless: static files and
# metadata, the login itself, and routes that act only on an event or session id the caller cannot know
# (ids are random and only handed out to logged-in sessions). Everything else must say 401.
GRADIO_OPEN_BY_DESIGN = {
    "/openapi.json",  # Gradio's copy is shadowed: the app's own /openapi.json (the /v1 spec) answers first
    "/", "/favicon.ico", "/manifest.json", "/robots.txt", "/theme.css", "/gradio_api/theme.css",
    "/assets/{path:path}", "/static/{path:path}", "/svelte/{path:path}", "/pwa_icon", "/pwa_icon/{size}",
    "/login", "/login/", "/logout", "/gradio_api/user", "/gradio_api/user/", "/gradio_api/token",
    "/gradio_api/token/", "/gradio_api/app_id", "/gradio_api/app_id/", "/gradio_api/startup-events",
    "/gradio_api/runs", "/gradio_api/runs/",  # run history: off (run_history=False) → 404
    "/gradio_api/cancel", "/gradio_api/reset", "/gradio_api/reset/", "/gradio_api/heartbeat/{session_hash}",
    "/gradio_api/stream/{event_id}", "/gradio_api/stream/{event_id}/close",
    "/gradio_api/stream/{session_hash}/{run}/{component_id}/playlist.m3u8",
    "/gradio_api/stream/{session_hash}/{run}/{component_id}/playlist-file",
    "/gradio_api/stream/{session_hash}/{run}/{component_id}/{segment_id}.{ext}",
    "/gradio_api/custom_component/{id}/{environment}/{type}/{file_name}",
    "/monitoring/{key}",  # 403 unless monitoring is enabled, then it needs its random key
    "/gradio_api/vibe-edit", "/gradio_api/vibe-edit/", "/gradio_api/undo-vibe-edit",  # 403 outside --vibe mode
    "/gradio_api/undo-vibe-edit/", "/gradio_api/vibe-code", "/gradio_api/vibe-code/",
    "/gradio_api/vibe-starter-queries", "/gradio_api/vibe-starter-queries/",
}
# The ways to run the chat function or read the app: each must refuse a caller without the login.
GRADIO_GENERATION_ROUTES = [
    ("POST", "/gradio_api/queue/join"), ("GET", "/gradio_api/queue/data"), ("POST", "/gradio_api/call/respond"),
    ("POST", "/gradio_api/call/v2/respond"), ("POST", "/gradio_api/run/respond"), ("POST", "/gradio_api/api/respond"),
    ("GET", "/gradio_api/info"), ("GET", "/config"), ("POST", "/gradio_api/upload"),
    ("GET", "/gradio_api/file=/etc/passwd"),
]


def gradio_routes(app) -> list[tuple[str, str]]:
    """(method, path) of every route the Gradio mount serves, read from its routing table."""
    from fastapi.routing import _IncludedRouter  # FastAPI 0.165 keeps included routers as branches
    from starlette.routing import Mount

    def flat(routes, prefix=""):
        for route in routes:
            if isinstance(route, _IncludedRouter):
                yield from flat(route.original_router.routes, prefix + route.include_context.prefix)
            else:
                yield prefix, route

    mount = next(route for route in app.routes if isinstance(route, Mount) and route.path == "")
    return sorted({(method, prefix + route.path) for prefix, route in flat(mount.app.routes)
                   for method in (getattr(route, "methods", None) or ()) if method != "HEAD"})


# ---- /v1 and the API key ----

@pytest.fixture(scope="module")
def keyed():
    live = LiveServer("--no-ui", "--test-hooks", "--api-key", KEY, "--api-key", KEY + "-second",
                      "--embedding-model", "tiny", "--rerank-model", "tiny")  # so every /v1 route can serve
    yield live
    live.stop()


POST_BODIES = {"/v1/embeddings": {"input": "hello"}, "/v1/rerank": {"query": "hello", "documents": ["a", "b"]}}


def v1_operations(live) -> list[tuple[str, str]]:
    spec = httpx.get(live.url + "/openapi.json").json()
    return [(method.upper(), path.replace("{model_id}", "glm-4")) for path, operations in spec["paths"].items()
            if path.startswith("/v1/") for method in operations]


def test_spec_declares_bearer_auth_on_v1(keyed):
    spec = httpx.get(keyed.url + "/openapi.json").json()
    assert spec["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    for path, operations in spec["paths"].items():
        for operation in operations.values():
            # the OpenAI and Ollama APIs take the key; /health, /metrics and the UI do not
            assert (operation.get("security") == [{"bearer": []}]) == path.startswith(("/v1/", "/api/")), path


@pytest.mark.parametrize("headers", [
    pytest.param({}, id="no-header"),
    pytest.param({"authorization": "Bearer wrong"}, id="wrong-key"),
    pytest.param({"authorization": f"Bearer {KEY}x"}, id="key-plus-a-char"),
    pytest.param({"authorization": f"Bearer {KEY[:-1]}"}, id="key-minus-a-char"),
    pytest.param({"authorization": f"Basic {KEY}"}, id="basic-scheme"),
    pytest.param({"authorization": KEY}, id="no-scheme"),
    pytest.param({"x-api-key": KEY}, id="other-header"),
    pytest.param({"authorization": "Bearer"}, id="empty-bearer"),
])
def test_every_v1_route_refuses_without_the_key(keyed, headers):
    operations = v1_operations(keyed)
    assert {path for _, path in operations} >= {"/v1/chat/completions", "/v1/models", "/v1/models/glm-4"}
    for method, path in operations:
        response = httpx.request(method, keyed.url + path, headers=headers, timeout=30,
                                 json={"messages": HELLO, "max_tokens": 2} if method == "POST" else None)
        assert response.status_code == 401, (method, path, response.text)
        assert set(response.json()["error"]) == ENVELOPE_KEYS
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
    # the key in the query string is not a key
    assert httpx.get(keyed.url + f"/v1/models?api_key={KEY}").status_code == 401


SERVED_AS_CALLED = {("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/v1/models/glm-4")}


def test_every_v1_route_serves_with_either_key(keyed):
    for key in (KEY, KEY + "-second"):
        for method, path in v1_operations(keyed):
            body = POST_BODIES.get(path, {"messages": HELLO, "max_tokens": 2}) if method == "POST" else None
            response = httpx.request(method, keyed.url + path, headers={"authorization": f"bearer {key}"},
                                     json=body, timeout=30)
            if (method, path) in SERVED_AS_CALLED or path in POST_BODIES:
                assert response.status_code == 200, (method, path, response.text)
            else:  # routes that need other bodies or ids (files, vector stores): the key got past auth
                assert response.status_code not in (401, 403) and response.status_code < 500, (
                    method, path, response.text)


def test_health_and_metrics_stay_open_and_hold_no_secrets(keyed):
    assert httpx.get(keyed.url + "/health").json() == {"status": "ok"}
    metrics = httpx.get(keyed.url + "/metrics")
    assert metrics.status_code == 200 and KEY not in metrics.text


def test_no_prompt_or_key_in_the_log(keyed):
    marker = "MARKER-" + uuid.uuid4().hex
    auth = {"authorization": f"Bearer {KEY}"}
    url = keyed.url + "/v1/chat/completions"
    secret = [{"role": "user", "content": f"my secret is {marker}"}]
    assert httpx.post(url, headers=auth, json={"messages": secret, "max_tokens": 3}, timeout=30).status_code == 200
    with httpx.stream("POST", url, headers=auth, json={"messages": secret, "max_tokens": 3, "stream": True}) as r:
        assert r.status_code == 200 and r.read()
    # failures that log something: a failing model step, a validation error, an unknown model, a wrong key
    assert httpx.post(url, headers=auth, timeout=30, json={"messages": secret, "test_fault": "error",
                                                           "test_force_output": "x " * 10}).status_code == 500
    assert httpx.post(url, headers=auth, json={"messages": secret, "temperature": marker}).status_code == 400
    assert httpx.post(url, headers=auth, json={"messages": secret, "model": marker}).status_code == 404
    assert httpx.post(url, headers={"authorization": f"Bearer {marker}"}, json={"messages": secret}).status_code == 401
    time.sleep(0.5)  # let the server flush its log
    log = keyed.log()
    assert "failed: InjectedFault" in log  # the log is live: the failure above was logged...
    assert marker not in log  # ...without the prompt, the bad value, the model name or the wrong key
    assert KEY not in log


# ---- the Gradio UI next to a key ----

def test_api_key_with_an_open_ui_refuses_to_start():
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(ROOT / "app.py"), "--model", "tiny", "--port", str(free_port()),
                             "--api-key", KEY], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--ui-auth" in result.stderr and "--no-ui" in result.stderr
    assert KEY not in result.stderr + result.stdout
    assert time.monotonic() - started < 60  # refused before loading a model
    with pytest.raises(UnsafeSettings, match="--ui-auth"):
        create_app(Settings(model="tiny", api_key=[KEY]), engine=None)


@pytest.fixture
def ui_client(engine):
    settings = Settings(model="tiny", api_key=[KEY], ui_auth=f"{UI_USER}:{UI_PASSWORD}")
    with TestClient(create_app(settings, engine)) as client:
        yield client


def test_gradio_routes_need_the_ui_login(ui_client):
    routes = gradio_routes(ui_client.app)
    open_routes = []
    for method, path in routes:
        if path == "/gradio_api/heartbeat/{session_hash}":  # streams keep-alives forever: checked by name
            continue
        concrete = re.sub(r"\{[^}]+\}", "x", path)
        response = ui_client.request(method, concrete, json={} if method == "POST" else None)
        if response.status_code not in (401, 403, 404, 405, 422):
            open_routes.append(path)
        elif response.status_code != 401:
            assert path in GRADIO_OPEN_BY_DESIGN, (method, path, response.status_code)
    assert set(open_routes) <= GRADIO_OPEN_BY_DESIGN, sorted(set(open_routes) - GRADIO_OPEN_BY_DESIGN)
    for method, path in GRADIO_GENERATION_ROUTES:
        assert (method, re.sub(r"/respond$", "/{api_name}", path)) in routes or path.startswith(
            ("/gradio_api/file=", "/config")), (method, path)
        response = ui_client.request(method, path, json={"data": ["hi"], "fn_index": 0, "session_hash": "s"}
                                     if method == "POST" else None)
        assert response.status_code == 401, (method, path, response.status_code)
    # An API key is not a UI login: Gradio's routes do not take it.
    bearer = {"authorization": f"Bearer {KEY}"}
    assert ui_client.get("/config", headers=bearer).status_code == 401
    assert ui_client.post("/gradio_api/queue/join", headers=bearer, json={}).status_code == 401
    # The /v1 API wants the key, and only the key.
    assert ui_client.get("/v1/models").status_code == 401
    assert ui_client.get("/v1/models", headers=bearer).status_code == 200


def test_gradio_routes_work_after_the_ui_login(ui_client):
    assert ui_client.post("/login", data={"username": UI_USER, "password": "wrong"}).status_code == 400
    assert ui_client.post("/login", data={"username": UI_USER, "password": UI_PASSWORD}).status_code == 200
    assert ui_client.get("/config").status_code == 200
    info = ui_client.get("/gradio_api/info").json()
    assert "/respond" in info["named_endpoints"]  # the chat function, refused above without the login
    assert ui_client.post("/gradio_api/queue/join", json={}).status_code != 401
    assert ui_client.get("/v1/models").status_code == 401  # the UI login is not an API key either


# ---- where it listens ----

def read_until(process: subprocess.Popen, pattern: str, timeout: float = 120) -> str:
    """The process' output up to the first line matching pattern (then the process is killed)."""
    lines = []
    deadline = time.monotonic() + timeout
    try:
        for line in process.stdout:
            lines.append(line)
            if re.search(pattern, line) or time.monotonic() > deadline:
                break
    finally:
        process.kill()
        process.wait()
    return "".join(lines)


def start_app(*flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--model", "tiny", "--no-ui", "--port",
                             str(free_port()), *flags], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_default_bind_is_loopback():
    assert parse_settings([]).host == "127.0.0.1"
    assert Settings().host == "127.0.0.1"


def test_binding_all_interfaces_without_a_key_warns():
    # The warning comes before the model loads; the process is killed before it listens anywhere.
    output = read_until(start_app("--host", "0.0.0.0"), r"WARNING|Placement:")
    assert re.search(r"WARNING glm4: Listening on 0\.0\.0\.0 without --api-key: anyone who can reach this port "
                     r"can use the model\..*docs/SECURITY\.md", output), output
    output = read_until(start_app("--host", "0.0.0.0", "--api-key", KEY), r"WARNING|Placement:")
    assert "Placement:" in output and "WARNING" not in output and KEY not in output
