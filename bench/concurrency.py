"""Concurrent streaming clients against a live server on 127.0.0.1: batched vs one-at-a-time.

Starts two servers with the tiny model (subprocesses, stopped by PID afterwards): the shipped
scheduler (`--max-num-seqs 8` by default) and `--max-num-seqs 1` as the "before batching" baseline.
For 1, 2, 4, 8, 16 concurrent clients (the official `openai` AsyncOpenAI SDK, streaming) it runs the
two servers in turns at each level (ABBA..., --repeats runs each), so machine noise hits both alike,
and reports aggregate tok/s (median run), per-stream tok/s (a client's decode rate once its first
token arrived), TTFT p50/p95, and the server's CPU time per token (robust to other load on the box).

Every request makes the same number of tokens: by default the server runs with --test-hooks and
each request forces a fixed reply (`test_force_output`), so the count does not depend on the weights
(trained tiny weights stop on their own). `--mode sampled` sends temperature 0.8 / top_p 0.8 with
max_tokens instead and counts what came back.

    python bench/concurrency.py [--clients 1,2,4,8,16] [--tokens 128] [--rounds 2] [--mode forced|sampled]

Writes bench/results/concurrency.json (figures + provenance: what bench/readme_figures.py quotes), .md and .png.
Targets: aggregate at 8 clients >= 5x single (never below 4x); single client >= 0.95x the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field

from common import (RESULTS, ServerProcess, finish_provenance, machine_summary, markdown_table,
                    median, percentile, provenance, write_results)

FORCED_SENTENCE = "The quick brown fox jumps over the lazy dog. "


@dataclass
class RequestResult:
    tokens: int
    ttft: float  # request sent → first content chunk, seconds
    decode_seconds: float  # first content chunk → last chunk
    seconds: float  # whole request


@dataclass
class LevelResult:
    server: str
    clients: int
    requests: int
    tokens: int
    seconds: float
    results: list[RequestResult]
    cpu_seconds: float = 0.0  # the server process's CPU time (all threads) during the level
    rates: list[float] = field(default_factory=list)  # aggregate tok/s of each repeat

    @property
    def aggregate(self) -> float:
        """Median over repeats of (tokens / wall time)."""
        return median(self.rates) if self.rates else self.tokens / self.seconds

    @property
    def cpu_ms_per_token(self) -> float:
        """Server CPU per generated token: what batching saves, whatever else the machine is doing."""
        return self.cpu_seconds / self.tokens * 1000

    def merge(self, other: "LevelResult") -> "LevelResult":
        return LevelResult(self.server, self.clients, self.requests + other.requests, self.tokens + other.tokens,
                           self.seconds + other.seconds, self.results + other.results,
                           self.cpu_seconds + other.cpu_seconds, self.rates + other.rates)

    @property
    def per_stream(self) -> float:
        return median([(r.tokens - 1) / r.decode_seconds for r in self.results if r.decode_seconds > 0])

    @property
    def ttft_p50(self) -> float:
        return percentile([r.ttft for r in self.results], 50)

    @property
    def ttft_p95(self) -> float:
        return percentile([r.ttft for r in self.results], 95)


def forced_text(tokens: int) -> str:
    """A reply of about `tokens` tokens for the tiny tokenizer (usage reports the exact count)."""
    from transformers import AutoTokenizer

    from glm4.tiny import TINY_MODEL_DIR

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    per_sentence = len(tokenizer.encode(FORCED_SENTENCE, add_special_tokens=False))
    text = FORCED_SENTENCE * (tokens // per_sentence + 1)
    ids = tokenizer.encode(text, add_special_tokens=False)[: tokens - 1]  # + the stop token = tokens
    return tokenizer.decode(ids)


async def one_request(client, args, text: str | None) -> RequestResult:
    body = {"model": "glm-4", "messages": [{"role": "user", "content": "Tell me a long story."}],
            "stream": True, "stream_options": {"include_usage": True}}
    extra = {}
    if text is not None:
        extra["test_force_output"] = text
        body["max_tokens"] = args.tokens + 8
        body["temperature"] = 0
    else:
        body["max_tokens"] = args.tokens
        body["temperature"], body["top_p"] = 0.8, 0.8
    started = time.perf_counter()
    first = last = None
    tokens = 0
    stream = await client.chat.completions.create(**body, extra_body=extra)
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or now
            last = now
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    last = last or time.perf_counter()
    first = first or last
    return RequestResult(tokens, first - started, last - first, time.perf_counter() - started)


def server_cpu_seconds(server: ServerProcess) -> float:
    import psutil

    times = psutil.Process(server.process.pid).cpu_times()
    return times.user + times.system


async def run_level(server: ServerProcess, name: str, clients: int, args, text: str | None) -> LevelResult:
    from openai import AsyncOpenAI

    cpu_before = server_cpu_seconds(server)
    async with AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=600) as client:
        async def worker() -> list[RequestResult]:
            return [await one_request(client, args, text) for _ in range(args.rounds)]

        started = time.perf_counter()
        per_client = await asyncio.gather(*(worker() for _ in range(clients)))
        seconds = time.perf_counter() - started
    results = [result for results in per_client for result in results]
    tokens = sum(r.tokens for r in results)
    return LevelResult(name, clients, len(results), tokens, seconds, results, server_cpu_seconds(server) - cpu_before,
                       [tokens / seconds])


def plot(levels: list[int], batched: list[LevelResult], baseline: list[LevelResult], path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for results, label, style in ((batched, f"batched ({batched[0].server})", "o-"),
                                  (baseline, f"before batching ({baseline[0].server})", "s--")):
        left.plot(levels, [r.aggregate for r in results], style, label=label)
        right.plot(levels, [r.ttft_p50 * 1000 for r in results], style, label=f"{label} p50")
        right.plot(levels, [r.ttft_p95 * 1000 for r in results], style, alpha=0.4, label=f"{label} p95")
    left.plot(levels, [batched[0].aggregate * n for n in levels], ":", color="grey", label="linear scaling")
    left.set(xscale="log", xlabel="concurrent streaming clients", ylabel="aggregate tok/s", title="Throughput")
    right.set(xscale="log", yscale="log", xlabel="concurrent streaming clients", ylabel="TTFT (ms)",
              title="Time to first token")
    for axis in (left, right):
        axis.set_xticks(levels, [str(n) for n in levels])
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,2,4,8,16", help="comma-separated concurrency levels")
    parser.add_argument("--tokens", type=int, default=128, help="completion tokens per request")
    parser.add_argument("--rounds", type=int, default=2, help="requests each client sends back to back")
    parser.add_argument("--repeats", type=int, default=4, help="runs per level and server, interleaved; medians")
    parser.add_argument("--max-num-seqs", type=int, default=8, help="the batched server's --max-num-seqs")
    parser.add_argument("--mode", choices=("forced", "sampled"), default="forced")
    parser.add_argument("--out", default=str(RESULTS), help="folder for concurrency.md / concurrency.png")
    args = parser.parse_args()
    levels = [int(n) for n in args.clients.split(",")]
    text = forced_text(args.tokens) if args.mode == "forced" else None
    hooks = ["--test-hooks"] if text is not None else []
    batched_name, baseline_name = f"--max-num-seqs {args.max_num_seqs}", "--max-num-seqs 1"
    print(machine_summary())
    record = provenance()
    servers = [ServerProcess("--max-num-seqs", str(args.max_num_seqs), "--max-queue", "64", *hooks, log_name="batched"),
               ServerProcess("--max-num-seqs", "1", "--max-queue", "64", *hooks, log_name="baseline")]
    batched: list[LevelResult] = []
    baseline: list[LevelResult] = []
    try:
        for server in servers:
            server.wait_ready()
            await run_level(server, "warm-up", 2, args, text)
        for clients in levels:
            merged: dict[str, LevelResult] = {}
            for repeat in range(args.repeats):
                pair = ((servers[0], batched_name), (servers[1], baseline_name))
                for server, name in pair if repeat % 2 == 0 else pair[::-1]:  # ABBA...: no first-mover bias
                    result = await run_level(server, name, clients, args, text)
                    merged[name] = merged[name].merge(result) if name in merged else result
            for name, results in ((batched_name, batched), (baseline_name, baseline)):
                result = merged[name]
                results.append(result)
                print(f"{name:>17} clients={clients:>2}: aggregate {result.aggregate:7.1f} tok/s  per-stream "
                      f"{result.per_stream:6.1f} tok/s  TTFT p50 {result.ttft_p50 * 1000:6.0f} ms  p95 "
                      f"{result.ttft_p95 * 1000:6.0f} ms  server CPU {result.cpu_ms_per_token:.2f} ms/token  "
                      f"({result.tokens / result.requests:.0f} tok/request, runs "
                      f"{', '.join(f'{rate:.0f}' for rate in result.rates)})", flush=True)
    finally:
        for server in servers:
            server.stop()

    rows = []
    for mine, before in zip(batched, baseline):
        rows.append([mine.clients, mine.aggregate, mine.per_stream, mine.ttft_p50 * 1000, mine.ttft_p95 * 1000,
                     f"{mine.cpu_ms_per_token:.2f}", before.aggregate, before.per_stream, before.ttft_p50 * 1000,
                     before.ttft_p95 * 1000, f"{before.cpu_ms_per_token:.2f}",
                     f"{mine.aggregate / batched[0].aggregate:.2f}x"])
    header = ["clients", "aggregate tok/s", "per-stream tok/s", "TTFT p50 ms", "TTFT p95 ms", "server CPU ms/tok",
              "before: aggregate", "before: per-stream", "before: TTFT p50", "before: TTFT p95",
              "before: CPU ms/tok", "scaling"]
    table = markdown_table(header, rows)
    single_ratio = batched[0].aggregate / baseline[0].aggregate
    lines = [f"single client vs before batching: {single_ratio:.2f}x (target >= 0.95)"]
    scale8 = None
    if 8 in levels:
        eight = batched[levels.index(8)]
        scale8 = eight.aggregate / batched[0].aggregate
        verdict = "meets" if scale8 >= 5 else "above the 4x floor, misses" if scale8 >= 4 else "MISSES"
        lines.insert(0, f"aggregate at 8 clients = {scale8:.2f}x single ({verdict} the >= 5x target)")
        lines.append(f"server CPU per token at 8 clients = 1/{batched[0].cpu_ms_per_token / eight.cpu_ms_per_token:.2f}"
                     " of single (CPU time: moves less with other load on the box than wall-clock)")
    tokens = batched[0].tokens / batched[0].requests
    setup = (f"tiny GLM-4 on CPU; {args.mode} replies of {tokens:.0f} tokens, {args.rounds} "
             f"requests per client back to back; batched = `{batched_name}`, before = `{baseline_name}`; "
             f"at each level the two servers take turns (ABBA...), {args.repeats} runs each (aggregate = median run)")
    print()
    print(table)
    print("\n".join(lines))
    if args.out:
        from pathlib import Path

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        finish_provenance(record)

        def level(r: LevelResult) -> dict:
            return {"clients": r.clients, "aggregate": r.aggregate, "per_stream": r.per_stream, "ttft_p50": r.ttft_p50,
                    "ttft_p95": r.ttft_p95, "cpu_ms_per_token": r.cpu_ms_per_token, "runs": r.rates}

        write_results("concurrency", {
            "provenance": record, "setup": setup, "levels": levels, "batched_flags": batched_name,
            "baseline_flags": baseline_name, "tokens_per_request": tokens, "single_vs_baseline": single_ratio,
            "scaling_at_8": scale8, "batched": [level(r) for r in batched], "baseline": [level(r) for r in baseline]},
            out, "Concurrency", f"{setup}.\n\n{table}\n\n" + "\n".join(f"- {line}" for line in lines)
            + "\n\n![concurrency](concurrency.png)\n")
        plot(levels, batched, baseline, out / "concurrency.png", setup[:160])
        print(f"wrote {out / 'concurrency.json'}, concurrency.md and concurrency.png")


if __name__ == "__main__":
    asyncio.run(main())
