"""Shared helpers for the benchmarks: the tiny model, a live server subprocess, stats and tables.

Benchmarks are scripts, not tests: run them from the repository root, e.g. `python bench/concurrency.py`.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:  # `python bench/x.py` puts bench/ on the path, not the repository root
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

BENCH_MESSAGES = [{"role": "user", "content": "Write a long story about a robot who learns to paint."}]


def load_tiny(model: str = "tiny"):
    """The model through the project's own loader (same dtype and placement the server uses)."""
    from glm4.loading import load_model
    from glm4.settings import Settings

    return load_model(Settings(model=model))


def prompt_for(tokenizer, messages=BENCH_MESSAGES):
    from glm4.prompt import build_prompt

    return build_prompt(tokenizer, messages, None, None)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[rank]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    def cell(value: object) -> str:
        return f"{value:.1f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


VERSIONS = ("torch", "transformers", "tokenizers", "accelerate", "bitsandbytes", "gradio", "fastapi", "starlette",
            "uvicorn", "openai", "schemathesis")


def git(*args: str) -> str:
    result = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else ""


def provenance() -> dict:
    """Where, how and on what a figure was measured; every results file carries it (bench/readme_figures.py
    quotes nothing without it). Call it when the measurement starts: the load average is the box's at that time."""
    import torch

    versions = {"python": platform.python_version()}
    for name in VERSIONS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["torch"] = torch.__version__  # with its build tag (+cpu, +cu126)
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["python", str(shown), *sys.argv[1:]]),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", "app.py", "glm4", "bench",
                              ":!bench/results")),  # code that measures, not the results written so far
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "gpus": gpus},
        "versions": versions,
        "torch_threads": torch.get_num_threads(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }


def finish_provenance(record: dict) -> dict:
    """The load average when the measurement ended (a busy box at either end makes the figures suspect)."""
    record["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return record


def describe_provenance(record: dict) -> str:
    """One line for a markdown results file."""
    machine, versions = record["machine"], record["versions"]
    hardware = f"{machine['processor']}, {machine['cpus']} CPUs" + (f", {', '.join(machine['gpus'])}"
                                                                     if machine["gpus"] else "")
    dirty = " plus uncommitted changes" if record["git_dirty"] else ""
    end = record.get("load_average_end")
    return (f"Measured {record['date']} by `{record['command']}` at commit {record['git_commit'][:10]}{dirty} on "
            f"{hardware} ({machine['platform']}); python {versions['python']}, torch {versions['torch']}, "
            f"transformers {versions['transformers']}; load average {record['load_average_start'][0]:.1f} at "
            f"the start" + (f", {end[0]:.1f} at the end" if end else "") + ".")


def write_results(name: str, data: dict, folder: Path = RESULTS, title: str | None = None,
                  markdown: str = "") -> Path:
    """bench/results/<name>.json: the figures and their provenance, the only source README and docs quote;
    with a title also <name>.md, for people: the title, where the figures come from, then `markdown`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    if title is not None:
        (folder / f"{name}.md").write_text(f"# {title}\n\n{describe_provenance(data['provenance'])}\n\n{markdown}")
    return path


def machine_summary() -> str:
    """A short line for a script's console output."""
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"load average {load:.1f} at start")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`python app.py --model tiny --no-ui ...` on 127.0.0.1 as a subprocess, stopped by its PID."""

    def __init__(self, *args: str, log_name: str = "server"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        RESULTS.mkdir(parents=True, exist_ok=True)
        self.log_path = Path("/tmp") / f"glm4-bench-{log_name}-{self.port}.log"
        self._log = open(self.log_path, "w")
        command = [sys.executable, str(ROOT / "app.py"), "--model", "tiny", "--no-ui", "--host", "127.0.0.1",
                   "--port", str(self.port), "--log-level", "warning", *args]
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def wait_ready(self, timeout: float = 120.0) -> "ServerProcess":
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: see {self.log_path}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout} s: see {self.log_path}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()

    def __enter__(self) -> "ServerProcess":
        return self.wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()
