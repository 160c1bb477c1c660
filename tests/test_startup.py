"""Start-up through `python app.py`: the server listens while the model loads (503 "loading" on /health, /v1
and the UI), refusals exit 2 before any model loads, and --test-hooks warns and stays on loopback.

Loading the tiny model takes about a second, too short to watch; with --test-hooks the environment variable
GLM4_TEST_LOAD_DELAY (app.py) makes it take that many seconds longer.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.conftest import ROOT, free_port

HELLO = [{"role": "user", "content": "你好"}]
SLOW_LOAD = {"GLM4_TEST_LOAD_DELAY": "8"}


def first_answer(url: str, timeout: float = 60.0) -> httpx.Response:
    """The first response the server gives at all (connection refused until it listens)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return httpx.get(url, timeout=2)
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listened at {url} within {timeout} s")


def run_app(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "app.py"), "--model", "tiny", "--port", str(free_port()), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_health_api_and_ui_answer_loading_until_the_model_is_ready(start_server):
    live = start_server("--test-hooks", env=SLOW_LOAD, wait=False)  # with the UI, to see its loading page
    health = first_answer(live.url + "/health")
    assert (health.status_code, health.json()) == (503, {"status": "loading"})
    assert health.headers["retry-after"] == "5"
    with openai.OpenAI(base_url=live.base_url, api_key="unused", max_retries=0) as sdk:
        with pytest.raises(openai.InternalServerError) as caught:
            sdk.chat.completions.create(model="glm-4", messages=HELLO, max_tokens=4)
        assert caught.value.status_code == 503 and caught.value.code == "model_loading"
        assert caught.value.response.headers["retry-after"] == "5"
        assert caught.value.body["type"] == "service_unavailable" and "loading" in caught.value.body["message"]
        page = httpx.get(live.url + "/")
        assert page.status_code == 503 and page.headers["content-type"].startswith("text/html")
        assert "loading" in page.text and 'http-equiv="refresh"' in page.text
        assert "Loaded" not in live.log()  # all of the above was answered while the weights were loading

        live.wait_ready()
        assert httpx.get(live.url + "/health").json() == {"status": "ok"}
        reply = sdk.chat.completions.create(model="glm-4", messages=HELLO, max_tokens=4, temperature=0)
        assert reply.choices[0].message.content
    assert httpx.get(live.url + "/config").json()["title"] == "GLM-4 chat"  # the real UI took over
    assert live.stop() == 0


def test_sigterm_while_loading_exits_at_once(start_server):
    live = start_server("--no-ui", "--test-hooks", env={"GLM4_TEST_LOAD_DELAY": "120"}, wait=False)
    assert first_answer(live.url + "/health").status_code == 503
    started = time.monotonic()
    assert live.stop(timeout=20) == -signal.SIGTERM  # nothing to drain: uvicorn re-raises the signal
    assert time.monotonic() - started < 10  # not after the 120 s load


def test_load_delay_is_ignored_without_test_hooks(start_server):
    live = start_server("--no-ui", env={"GLM4_TEST_LOAD_DELAY": "120"}, wait=False)
    live.wait_ready(timeout=60)
    assert "GLM4_TEST_LOAD_DELAY" not in live.log()


def test_a_model_that_cannot_load_exits_2_before_listening():
    result = run_app("--model", "/no/such/dir", "--no-ui")
    assert result.returncode == 2
    assert "Could not load the model" in result.stderr and "Traceback" not in result.stderr
    assert "Uvicorn running" not in result.stderr  # refused before listening


def test_test_hooks_log_a_warning_at_startup(server):
    warning = next(line for line in server.log().splitlines() if "--test-hooks" in line)
    assert " WARNING " in warning
    assert "inject faults" in warning and "force the model's replies" in warning


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.test"])
def test_test_hooks_are_refused_beside_a_non_loopback_host(host):
    started = time.monotonic()
    result = run_app("--no-ui", "--test-hooks", "--host", host)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--test-hooks lets any client inject faults and force replies" in result.stderr
    assert f"refused with --host {host}" in result.stderr and "Traceback" not in result.stderr
    assert "Placement:" not in result.stderr and "Uvicorn running" not in result.stderr  # before the model loads
    assert time.monotonic() - started < 60

