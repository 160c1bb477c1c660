"""Open WebUI against this server, in a real browser (not part of CI: Open WebUI is a multi-GB install).

    python bench/openwebui.py                                # starts our server (tiny model, default flags)
    python bench/openwebui.py --server http://127.0.0.1:8003 # against a server that is already running
    python bench/openwebui.py --install-only                 # just build Open WebUI's virtual environment

1. Installs open-webui==0.12.4 into its own virtual environment under the cache dir (once; a marker file says
   it is complete). `--torch-wheel` preinstalls a CPU torch there (Open WebUI's sentence-transformers would
   otherwise pull the CUDA build and its multi-GB libraries).
2. Starts Open WebUI with WEBUI_AUTH=False, OPENAI_API_BASE_URL=<our server>/v1, OFFLINE_MODE=True, Ollama off,
   a fresh data dir, and DEFAULT_MODELS=glm-4; its RAG embeddings point at our /v1/embeddings when our
   server has an embedding model.
3. Drives Debian's chromium through playwright: a first message (the reply must stream: the page changes
   many times while it grows), a second turn, a long reply stopped mid-way (our server must count a
   cancelled request), and a regenerate (our server must see one more request).
4. Writes bench/results/openwebui.json and openwebui.md, and a screenshot per step
   (bench/results/openwebui-<step>.png). Every step is recorded as passed or failed with what was seen;
   the script exits non-zero if any failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ServerProcess, free_port  # noqa: E402

import httpx  # noqa: E402

OPENWEBUI_VERSION = "0.12.4"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "glm4-bench" / \
    f"open-webui-{OPENWEBUI_VERSION}"
CHROMIUM_FLAGS = ["--no-sandbox", "--headless", "--disable-gpu", "--no-first-run", "--disable-sync"]
CHAT_INPUT = "#chat-input"
SEND = "#send-message-button"
ASSISTANT = ".chat-assistant"
# Open WebUI's stop button has carried no stable id across releases: try these, then its icon's path.
STOP_SELECTORS = ["#stop-response-button", "button[aria-label='Stop']", "button:has(svg path[d^='M2.25 12c0-5.385'])"]
REGENERATE_SELECTORS = ["button.regenerate-response-button:visible", "button[aria-label='Regenerate']"]
LONG_PROMPT = "Write a long story about a robot who learns to paint."
# Counts every change to the page's messages, so a stream is seen growing even when each step is quick.
WATCH_JS = """() => {
    window.glm4Mutations = 0;
    new MutationObserver(() => { window.glm4Mutations += 1; })
        .observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def ensure_installed(cache: Path, python: str, torch_wheel: str | None) -> Path:
    """Open WebUI's own virtual environment; returns its `open-webui` executable."""
    venv = cache / "venv"
    marker = venv / f".installed-open-webui-{OPENWEBUI_VERSION}"
    executable = venv / "bin" / "open-webui"
    if marker.exists() and executable.exists():
        return executable
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
    if torch_wheel:
        subprocess.run([*pip, torch_wheel], check=True)
    subprocess.run([*pip, f"open-webui=={OPENWEBUI_VERSION}"], check=True)
    marker.touch()
    return executable


class OpenWebUI:
    """`open-webui serve` on 127.0.0.1 with a fresh data dir, stopped by its PID."""

    def __init__(self, executable: Path, api_base: str, model: str, embedding_model: str | None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data = Path(tempfile.mkdtemp(prefix="glm4-openwebui-"))
        env = {**os.environ, "WEBUI_AUTH": "False", "OPENAI_API_BASE_URL": api_base, "OPENAI_API_KEY": "unused",
               "OFFLINE_MODE": "True", "ENABLE_OLLAMA_API": "False", "DATA_DIR": str(self.data),
               "DEFAULT_MODELS": model, "WEBUI_SECRET_KEY": "glm4-bench", "HF_HUB_OFFLINE": "1",
               "ANONYMIZED_TELEMETRY": "False", "DO_NOT_TRACK": "True", "SCARF_NO_ANALYTICS": "True",
               "ENABLE_VERSION_UPDATE_CHECK": "False"}
        if embedding_model:  # documents are embedded by our /v1/embeddings, not by a model Open WebUI downloads
            env.update({"RAG_EMBEDDING_ENGINE": "openai", "RAG_OPENAI_API_BASE_URL": api_base,
                        "RAG_OPENAI_API_KEY": "unused", "RAG_EMBEDDING_MODEL": embedding_model})
        self.log_path = RESULTS / "openwebui-server.log"
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen([str(executable), "serve", "--host", "127.0.0.1", "--port", str(self.port)],
                                        cwd=self.data, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 900.0) -> None:  # the first start runs migrations: minutes on 2 cores
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"open-webui exited with {self.process.returncode}: see {self.log_path}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"open-webui not ready after {timeout:.0f} s: see {self.log_path}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()
        shutil.rmtree(self.data, ignore_errors=True)


def metric(server_url: str, name: str, labels: str = "") -> float:
    """One sample from our /metrics (0 when absent)."""
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in httpx.get(server_url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def submitted(server_url: str) -> float:
    return metric(server_url, "glm4_engine_requests_submitted_total")


def cancelled(server_url: str) -> float:
    return metric(server_url, "glm4_requests_finished_total", 'reason="cancelled"')


def refused(server_url: str) -> float:
    """Chat requests our server answered with a 4xx (Open WebUI shows those as an error in the reply)."""
    return sum(metric(server_url, "glm4_http_requests_total", f'route="/v1/chat/completions",status="{status}"')
               for status in (400, 404, 413, 429))


def first_visible(page, selectors: list[str], timeout_ms: int = 10_000):
    """The first selector that matches a visible element within the timeout, or None."""
    deadline = time.monotonic() + timeout_ms / 1000
    while time.monotonic() < deadline:
        for selector in selectors:
            locator = page.locator(selector)
            if locator.count() and locator.last.is_visible():
                return locator.last
        time.sleep(0.1)
    return None


def replies(page) -> list[str]:
    return page.locator(ASSISTANT).all_inner_texts()


def send(page, text: str) -> None:
    page.click(CHAT_INPUT)
    page.keyboard.type(text)
    page.keyboard.press("Enter")


def wait_reply_done(page, server_url: str, count: int, timeout: float = 180.0) -> str:
    """Wait for reply number `count` to exist, our server to have nothing running, and its text to settle."""
    deadline = time.monotonic() + timeout
    last, stable_since = None, time.monotonic()
    while time.monotonic() < deadline:
        texts = replies(page)
        running = metric(server_url, "glm4_requests_running")
        text = texts[count - 1] if len(texts) >= count else None
        if text != last:
            last, stable_since = text, time.monotonic()
        if text and not running and time.monotonic() - stable_since > 1.5:
            return text
        time.sleep(0.25)
    raise TimeoutError(f"reply {count} did not finish in {timeout:.0f} s (saw {last!r})")


def drive(browser, owui_url: str, server_url: str) -> list[dict]:
    steps: list[dict] = []
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(120_000)

    def step(name: str, run) -> None:
        started = time.monotonic()
        record = {"step": name}
        try:
            record.update(run() or {})
            record["ok"] = True
        except Exception as error:  # noqa: BLE001 — record the failure, take the screenshot, go on
            record.update(ok=False, error=f"{type(error).__name__}: {error}")
        record["seconds"] = round(time.monotonic() - started, 1)
        shot = RESULTS / f"openwebui-{name}.png"
        try:
            page.screenshot(path=str(shot), full_page=True)
            record["screenshot"] = shot.name
        except Exception as error:  # noqa: BLE001
            record["screenshot_error"] = str(error)
        steps.append(record)
        print(json.dumps(record, ensure_ascii=False), flush=True)

    def load():
        page.goto(owui_url + "/", wait_until="domcontentloaded")
        page.wait_for_selector(CHAT_INPUT, timeout=300_000)
        for _ in range(3):  # release notes / welcome dialogs on a fresh data dir
            page.keyboard.press("Escape")
        page.evaluate(WATCH_JS)
        return {"title": page.title()}

    def first_message():
        before, refused_before = submitted(server_url), refused(server_url)
        page.evaluate("() => { window.glm4Mutations = 0; }")
        send(page, "你好，介绍一下你自己")
        text = wait_reply_done(page, server_url, 1)
        changes = page.evaluate("() => window.glm4Mutations")
        assert refused(server_url) == refused_before, f"our server refused the chat request: {text[:300]!r}"
        assert text.strip(), "empty reply"
        assert changes > 5, f"the page changed only {changes} times: the reply did not stream"
        return {"reply": text[:300], "page_changes": changes, "requests": submitted(server_url) - before}

    def second_turn():
        send(page, "How do I use 4-bit?")
        text = wait_reply_done(page, server_url, 2)
        assert len(replies(page)) >= 2
        return {"reply": text[:300]}

    def stop():
        before = cancelled(server_url)
        send(page, LONG_PROMPT)
        page.wait_for_function(f"(n) => document.querySelectorAll('{ASSISTANT}').length >= n "
                               f"&& document.querySelectorAll('{ASSISTANT}')[n - 1].innerText.length > 40", arg=3)
        button = first_visible(page, STOP_SELECTORS)
        assert button is not None, f"no stop button matched {STOP_SELECTORS}"
        button.click()
        time.sleep(2)
        at_stop = replies(page)[2]
        time.sleep(2)
        after = replies(page)[2]
        stopped = cancelled(server_url) - before
        assert after == at_stop, "the reply kept growing after stop"
        assert stopped >= 1, "our server counted no cancelled request: stop did not reach the engine"
        return {"reply_chars_at_stop": len(at_stop), "server_cancelled": stopped}

    def regenerate():
        before = submitted(server_url)
        page.locator(ASSISTANT).last.hover()
        button = first_visible(page, REGENERATE_SELECTORS)
        assert button is not None, f"no regenerate button matched {REGENERATE_SELECTORS}"
        button.click()
        deadline = time.monotonic() + 60
        while submitted(server_url) <= before and time.monotonic() < deadline:
            time.sleep(0.25)
        assert submitted(server_url) > before, "our server saw no new request"
        text = wait_reply_done(page, server_url, len(replies(page)))
        return {"reply": text[:300], "requests": submitted(server_url) - before}

    step("load", load)
    if steps[0]["ok"]:  # without the page there is nothing to drive
        for name, run in (("stream", first_message), ("second-turn", second_turn), ("stop", stop),
                          ("regenerate", regenerate)):
            step(name, run)
    context.close()
    return steps


def write_results(steps: list[dict], meta: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "openwebui.json").write_text(json.dumps({**meta, "steps": steps}, ensure_ascii=False, indent=2) + "\n")
    lines = [f"# Open WebUI {OPENWEBUI_VERSION} against this server", "",
             f"Written by `bench/openwebui.py` on {meta['date']} ({meta['server']}).", "",
             "| step | result | seconds | seen |", "|---|---|---:|---|"]
    for s in steps:
        seen = s.get("error") or ", ".join(f"{k}={v}" for k, v in s.items()
                                            if k not in ("step", "ok", "seconds", "screenshot"))
        lines.append(f"| {s['step']} | {'pass' if s['ok'] else 'FAIL'} | {s['seconds']} | "
                     f"{str(seen).replace('|', '/').replace(chr(10), ' ')[:200]} |")
    lines += [""] + [f"![{s['step']}](openwebui-{s['step']}.png)" for s in steps if s.get("screenshot")]
    (RESULTS / "openwebui.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", help="a running server's URL (without /v1); default: start one")
    parser.add_argument("--server-args", default="--embedding-model tiny",
                        help="extra flags for the server this script starts (default flags otherwise)")
    parser.add_argument("--model", default="glm-4", help="the model Open WebUI starts its chats with")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where Open WebUI's venv lives")
    parser.add_argument("--python", default=shutil.which("python3.11") or sys.executable,
                        help="interpreter for Open WebUI's venv (it needs Python 3.11 or 3.12)")
    parser.add_argument("--torch-wheel", help="a torch wheel (e.g. a CPU build) to install before Open WebUI")
    parser.add_argument("--install-only", action="store_true")
    args = parser.parse_args(argv)

    executable = ensure_installed(args.cache, args.python, args.torch_wheel)
    print(f"Open WebUI {OPENWEBUI_VERSION}: {executable}", flush=True)
    if args.install_only:
        return 0
    from playwright.sync_api import sync_playwright

    ours = None
    if args.server:
        server_url = args.server.rstrip("/")
    else:
        ours = ServerProcess(*args.server_args.split(), log_name="openwebui").wait_ready()
        server_url = ours.url
    models = [m["id"] for m in httpx.get(server_url + "/v1/models", timeout=10).json()["data"]]
    embedding_model = next((m for m in models if "embed" in m), None)
    owui = OpenWebUI(executable, server_url + "/v1", args.model, embedding_model)
    try:
        owui.wait_ready()
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_FLAGS)
            try:
                steps = drive(browser, owui.url, server_url)
            finally:
                browser.close()
    finally:
        owui.stop()
        if ours is not None:
            ours.stop()
    write_results(steps, {"open_webui": OPENWEBUI_VERSION, "server": server_url if args.server else
                          f"started here: app.py --model tiny {args.server_args}", "models": models,
                          "date": time.strftime("%Y-%m-%d %H:%M")})
    return 0 if all(s["ok"] for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
