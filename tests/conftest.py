"""Shared fixtures: the real tiny GLM-4 through the real loader, and the real server on 127.0.0.1."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
if "GLM4_DATA_DIR" not in os.environ:  # servers started by tests keep uploads out of the user's ~/.local/share
    os.environ["GLM4_DATA_DIR"] = tempfile.mkdtemp(prefix="glm4-test-data-")
    atexit.register(shutil.rmtree, os.environ["GLM4_DATA_DIR"], True)

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """`python app.py` as a subprocess; stopped by PID."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, wait: bool = True):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = ARTIFACTS / f"server-{self.port}.log"
        ARTIFACTS.mkdir(exist_ok=True)
        command = [sys.executable, str(ROOT / "app.py"), "--model", "tiny", "--host", "127.0.0.1",
                   "--port", str(self.port), *args]
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **(env or {})})
        if wait:
            self.wait_ready()

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log()[-3000:]}")

    def metric(self, name: str, labels: str = "") -> float:
        """One sample from /metrics, e.g. metric("glm4_requests_finished_total", 'reason="cancelled"')."""
        wanted = f"{name}{{{labels}}}" if labels else name
        for line in httpx.get(self.url + "/metrics", timeout=5).text.splitlines():
            if line.startswith(wanted + " "):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(wanted)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture(scope="session")
def server():
    """One API-only server for the whole session (tests must not depend on each other's traffic)."""
    live = LiveServer("--no-ui", "--test-hooks")
    yield live
    live.stop()


@pytest.fixture
def start_server():
    """Factory for servers with their own flags; each is stopped after the test."""
    started: list[LiveServer] = []

    def start(*args: str, **kwargs) -> LiveServer:
        live = LiveServer(*args, **kwargs)
        started.append(live)
        return live

    yield start
    for live in started:
        live.stop()


@pytest.fixture
def client(server):
    from openai import OpenAI

    with OpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as sdk:
        yield sdk


@pytest.fixture
def async_client(server):
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


@pytest.fixture(scope="session")
def tiny():
    """The tiny model and tokenizer through the project's own loader (no server)."""
    from glm4.loading import load_model
    from glm4.settings import Settings

    return load_model(Settings(model="tiny"))


@pytest.fixture(scope="session")
def tiny_glm4_dir(tmp_path_factory):
    """A random-weight tiny GLM-4-9B-0414-style checkpoint (model_type glm4, 0414-style chat template)."""
    from glm4.tiny import build_tiny_glm4

    return build_tiny_glm4(tmp_path_factory.mktemp("tiny-glm4-0414"), "0414")


@pytest.fixture(scope="session")
def tiny_z1_dir(tmp_path_factory):
    """A random-weight tiny GLM-Z1-9B-0414-style checkpoint: its generation prompt opens <think>."""
    from glm4.tiny import build_tiny_glm4

    return build_tiny_glm4(tmp_path_factory.mktemp("tiny-glm-z1"), "z1")


@pytest.fixture
async def engine(tiny):
    from glm4.engine.local import LocalEngine

    local = LocalEngine(tiny.models[0], tiny.tokenizer, tiny.info, max_num_seqs=8, max_queue=8, test_hooks=True)
    await local.start()
    yield local
    await local.shutdown()
