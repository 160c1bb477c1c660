"""Soak: minutes of mixed, partly hostile traffic against one server; its RSS and open file descriptors over time.

    python bench/soak.py                 # 5 minutes, 12 clients
    python bench/soak.py --minutes 30 --clients 24

The traffic (each client loops, drawing one action at a time from MIX): streamed and whole replies, clients
that reset the connection mid-stream (TCP RST), malformed bodies, wrong types, oversized bodies (413), failing
model steps (the --test-hooks fault), unknown models, and more clients than batch slots + queue places, so 429s
happen too (a refused client backs off for 0.25 s). A failing step fails only the request that carries the
fault; the requests decoding beside it go on. Every few seconds the server process' RSS, open file descriptors
and threads are sampled (psutil).

Writes bench/results/soak.png (the curves), soak.md (the table and verdict) and soak.json. The verdict fails on
any 5xx, stream without [DONE] or dropped connection of a request that carried no fault, and on growth: the
samples right after the warm-up against the last ones, growth above a few MB of RSS or any lasting rise in file
descriptors is a leak. Not a test: it takes minutes (tests/test_load.py is the bounded version).
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import struct
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from common import (RESULTS, ServerProcess, describe_provenance, finish_provenance, machine_summary, markdown_table,
                    median, provenance)

import httpx
import psutil

SERVER_FLAGS = ("--test-hooks", "--max-num-seqs", "4", "--max-queue", "4")  # small: 12 clients overflow it
HELLO = [{"role": "user", "content": "Tell me about GLM-4."}]
MIX = [  # (action, weight)
    ("stream", 40), ("whole", 20), ("reset_mid_stream", 10), ("malformed", 8), ("wrong_types", 8),
    ("fault", 5), ("unknown_model", 5), ("oversized", 2), ("n_choices", 2),
]
RSS_GROWTH_LIMIT_MB = 16.0  # after warm-up; allocator noise on 2 cores stays well below this
FD_GROWTH_LIMIT = 2


def reset_mid_stream(port: int) -> str:
    body = json.dumps({"messages": HELLO, "stream": True, "max_tokens": 200}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        received = b""
        while received.count(b"data: ") < 2 and not received.startswith(b"HTTP/1.1 429"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return "reset" if b"data: " in received else received[:12].decode(errors="replace")


def act(http: httpx.Client, url: str, port: int, action: str, rng: random.Random) -> str:
    """Run one action; return an outcome label (a status code, 'reset', ...)."""
    chat = url + "/v1/chat/completions"
    if action == "stream":
        body = {"messages": HELLO, "stream": True, "max_tokens": rng.randint(8, 48), "temperature": 1}
        with http.stream("POST", chat, json=body) as response:
            text = response.read().decode()
        return str(response.status_code) + ("" if response.status_code != 200 or text.endswith("data: [DONE]\n\n")
                                            else " unterminated")
    if action == "whole":
        return str(http.post(chat, json={"messages": HELLO, "max_tokens": rng.randint(4, 32)}).status_code)
    if action == "reset_mid_stream":
        return reset_mid_stream(port)
    if action == "malformed":
        body = rng.choice([b"{not json", b"\xff\xfe", b"[]", b'{"messages": [' * 50, b""])
        return str(http.post(chat, content=body, headers={"content-type": "application/json"}).status_code)
    if action == "wrong_types":
        body = rng.choice([{"messages": "hi"}, {"messages": HELLO, "temperature": "hot"},
                           {"messages": HELLO, "max_tokens": -1}, {"messages": [{"role": "wizard"}]}])
        return str(http.post(chat, json=body).status_code)
    if action == "fault":
        body = {"messages": HELLO, "max_tokens": 20, "temperature": 1,
                "test_fault": rng.choice(["error", "oom"]), "stream": rng.random() < 0.5}
        return str(http.post(chat, json=body).status_code)
    if action == "unknown_model":
        return str(http.post(chat, json={"messages": HELLO, "model": "gpt-x"}).status_code)
    if action == "oversized":
        return str(http.post(chat, content=b" " * (9 * 2**20), headers={"content-type": "application/json"})
                   .status_code)
    if action == "n_choices":
        return str(http.post(chat, json={"messages": HELLO, "n": 3, "max_tokens": 8}).status_code)
    raise ValueError(action)


def client_loop(url: str, port: int, stop: threading.Event, seed: int, outcomes: Counter, lock: threading.Lock):
    rng = random.Random(seed)
    actions, weights = zip(*MIX)
    with httpx.Client(timeout=120) as http:
        while not stop.is_set():
            action = rng.choices(actions, weights)[0]
            try:
                outcome = act(http, url, port, action, rng)
            except (httpx.HTTPError, OSError) as error:
                outcome = type(error).__name__
            with lock:
                outcomes[f"{action} {outcome}"] += 1
            if "429" in outcome:
                time.sleep(0.25)  # a polite client backs off (the server said Retry-After)


def host_cache_mb(url: str) -> float:
    """The prefix cache's host-memory KV (bounded by --cache-ram): RSS that grows by design, not a leak."""
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("glm4_host_cache_bytes "):
            return float(line.split()[1]) / 2**20
    return 0.0


def sample(process: psutil.Process, url: str, started: float, done: int) -> dict:
    return {"t": round(time.monotonic() - started, 1), "rss_mb": process.memory_info().rss / 2**20,
            "host_cache_mb": host_cache_mb(url), "fds": process.num_fds(), "threads": process.num_threads(),
            "requests": done}


def verdict(samples: list[dict], warmup_s: float) -> dict:
    steady = [s for s in samples if s["t"] >= warmup_s]
    window = max(3, len(steady) // 5)
    head, tail = steady[:window], steady[-window:]
    result = {"rss_after_warmup_mb": median([s["rss_mb"] for s in head]),
              "rss_end_mb": median([s["rss_mb"] for s in tail]),
              "fds_after_warmup": median([s["fds"] for s in head]), "fds_end": median([s["fds"] for s in tail]),
              "fds_max": max(s["fds"] for s in samples), "threads_end": tail[-1]["threads"]}
    result["rss_growth_mb"] = result["rss_end_mb"] - result["rss_after_warmup_mb"]
    result["host_cache_growth_mb"] = median([s["host_cache_mb"] for s in tail]) - \
        median([s["host_cache_mb"] for s in head])
    result["unbounded_growth_mb"] = result["rss_growth_mb"] - result["host_cache_growth_mb"]
    result["fds_growth"] = result["fds_end"] - result["fds_after_warmup"]
    result["leak"] = result["unbounded_growth_mb"] > RSS_GROWTH_LIMIT_MB or result["fds_growth"] > FD_GROWTH_LIMIT
    return result


INNOCENT_ACTIONS = ("stream", "whole", "n_choices")  # requests that carry no fault of their own


def innocent_failures(outcomes: Counter | dict) -> dict[str, int]:
    """Outcomes of fault-free requests that are failures: a 5xx, a stream without [DONE], a dropped connection.
    (A 429 is the server saying "busy, retry": the client backs off, as told.)"""
    bad = {}
    for label, count in outcomes.items():
        action, _, outcome = label.partition(" ")
        if action in INNOCENT_ACTIONS and (outcome.startswith("5") or "unterminated" in outcome
                                           or not outcome[:1].isdigit()):
            bad[label] = count
    return bad


def plot(samples: list[dict], warmup_s: float, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] / 60 for s in samples]
    fig, (rss, fds) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    rss.plot(t, [s["rss_mb"] for s in samples], color="tab:blue")
    rss.set_ylabel("server RSS (MiB)")
    fds.plot(t, [s["fds"] for s in samples], color="tab:orange", label="open file descriptors")
    fds.plot(t, [s["threads"] for s in samples], color="tab:green", label="threads")
    fds.set_ylabel("count")
    fds.set_xlabel("minutes")
    fds.legend(loc="upper left")
    for axis in (rss, fds):
        axis.axvline(warmup_s / 60, color="grey", linestyle="--", linewidth=1)
        axis.grid(alpha=0.3)
    rss.set_title("Soak: mixed and hostile traffic against one server (dashed: end of warm-up)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--warmup", type=float, default=None, help="seconds; default: a fifth of the run")
    parser.add_argument("--out", default=str(RESULTS), help="folder for soak.json/.md/.png")
    args = parser.parse_args()
    record = provenance()
    duration = args.minutes * 60
    warmup = args.warmup if args.warmup is not None else duration / 5
    outcomes: Counter = Counter()
    lock = threading.Lock()
    samples: list[dict] = []
    with ServerProcess(*SERVER_FLAGS, log_name="soak") as server:
        process = psutil.Process(server.process.pid)
        stop = threading.Event()
        clients = [threading.Thread(target=client_loop, args=(server.url, server.port, stop, seed, outcomes, lock),
                                    daemon=True) for seed in range(args.clients)]
        started = time.monotonic()
        for thread in clients:
            thread.start()
        while time.monotonic() - started < duration:
            with lock:
                done = sum(outcomes.values())
            samples.append(sample(process, server.url, started, done))
            print(f"{samples[-1]['t']:7.1f} s  RSS {samples[-1]['rss_mb']:7.1f} MiB  fds {samples[-1]['fds']:3d}  "
                  f"threads {samples[-1]['threads']:3d}  requests {done}", flush=True)
            time.sleep(args.interval)
        stop.set()
        for thread in clients:
            thread.join(timeout=180)
        time.sleep(1)
        with lock:
            done = sum(outcomes.values())
        samples.append(sample(process, server.url, started, done))
        idle = httpx.get(server.url + "/metrics").text
        running = [line for line in idle.splitlines() if line.startswith(("glm4_requests_running ",
                                                                          "glm4_requests_waiting "))]
    result = verdict(samples, warmup)
    result.update(minutes=args.minutes, clients=args.clients, requests=done, warmup_s=warmup,
                  machine=machine_summary(), date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  idle_after=running, outcomes=dict(sorted(outcomes.items())))
    result["innocent_failures"] = innocent_failures(outcomes)
    result["failed"] = result["leak"] or bool(result["innocent_failures"])
    finish_provenance(record)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(samples, warmup, out / "soak.png")
    (out / "soak.json").write_text(json.dumps({"provenance": record, "result": result, "samples": samples}, indent=1))
    (out / "soak.md").write_text(report(result, samples, record))
    print(report(result, samples, record))
    return 1 if result["failed"] else 0


def verdict_words(result: dict) -> str:
    words = ["GROWTH — see below" if result["leak"] else "no growth after warm-up"]
    innocent = sum(result["innocent_failures"].values())
    words.append(f"{innocent} fault-free request(s) failed (5xx, no [DONE] or dropped): FAIL" if innocent
                 else "0 fault-free requests failed")
    return "; ".join(words)


def report(result: dict, samples: list[dict], record: dict) -> str:
    every = max(1, len(samples) // 12)
    rows = [[f"{s['t'] / 60:.1f}", s["rss_mb"], s["fds"], s["threads"], s["requests"]] for s in samples[::every]]
    if samples[-1] not in samples[::every]:
        last = samples[-1]
        rows.append([f"{last['t'] / 60:.1f}", last["rss_mb"], last["fds"], last["threads"], last["requests"]])
    outcome_rows = [[name, count] for name, count in result["outcomes"].items()]
    return "\n".join([
        f"# Soak: {result['minutes']:g} minutes, {result['clients']} clients, {result['requests']} requests",
        "",
        f"{describe_provenance(record)} Server flags `{' '.join(SERVER_FLAGS)}`; plot: soak.png.",
        "",
        f"**Verdict: {verdict_words(result)}.** "
        f"RSS {result['rss_after_warmup_mb']:.1f} → {result['rss_end_mb']:.1f} MiB "
        f"({result['rss_growth_mb']:+.1f} MiB, of which {result['host_cache_growth_mb']:+.1f} MiB is KV kept by "
        f"the bounded host prompt cache; {result['unbounded_growth_mb']:+.1f} MiB beyond it, limit "
        f"{RSS_GROWTH_LIMIT_MB:g}), open file descriptors "
        f"{result['fds_after_warmup']:g} → {result['fds_end']:g} (max {result['fds_max']}), "
        f"warm-up {result['warmup_s']:.0f} s. Afterwards: {', '.join(result['idle_after'])}.",
        "",
        markdown_table(["minute", "RSS MiB", "open fds", "threads", "requests so far"], rows),
        "",
        "Outcomes (action, then status or result):",
        "",
        markdown_table(["action and outcome", "count"], outcome_rows),
        "",
    ])


if __name__ == "__main__":
    raise SystemExit(main())
