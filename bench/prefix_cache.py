"""Prefix reuse, side by side in one run: the same traffic against a server with reuse on and one with
--no-enable-prefix-caching, over HTTP with the official openai SDK (streaming; TTFT = request sent → first
content chunk).

Scenarios (replies forced by the test hook to a fixed text, so every run grows the same history):
- conversation: 10 turns, each adding a ~160-token question and a ~400-token reply (≈ 5.5k tokens at the end);
- agent: an 18k-token shared prefix (instructions + tool schemas, as Codex CLI sends) for 3 sessions x 3 turns
  (the tiny model's positions are stretched to 32k for this);
- interleaved: 8 conversations taking turns on a --max-num-seqs 4 server, so the host cache must serve;
- cold: the last conversation turn's exact messages with a unique first line, so nothing matches, on both
  servers: the cold baseline of the same length for the warm/cold TTFT ratio, and the cost of reuse (lookups,
  moving warm K/V to the host cache) when there is nothing to reuse.
The two servers take turns request by request (A, B, A, B ...), so machine noise hits both alike. Cached tokens
per turn come from the usage chunk (prompt_tokens_details.cached_tokens) when the server reports it, else from
/metrics (glm4_prefix_cache_hits_total), read between sequential requests.

    python bench/prefix_cache.py [--quick]

Writes bench/results/prefix_cache.md, prefix_cache.json and prefix_cache.png.
Targets: a follow-up turn of a ~5k-token conversation has TTFT <= 0.1 x a cold prompt of the same length;
cached >= 0.95 of the previous turn's prompt on every follow-up; every interleaved follow-up served from a slot
or the host cache; with nothing to reuse, TTFT within 2 % of the server with reuse off.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from datetime import datetime, timezone

import httpx

from common import RESULTS, ServerProcess, finish_provenance, machine_summary, markdown_table, median, provenance

REPLY = "Here is what I found in the document, summarised in a few short sentences for you. " * 24  # ~400 tokens
WORDS = ("slot cache prefix token reply stream batch model server request prompt history turn agent tool "
         "schema memory host device graph kernel chunk decode prefill").split()


def user_text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)) + "?"


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def admissions(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("glm4_prefix_cache_admissions_total{"):
            source = line.split('source="', 1)[1].split('"', 1)[0]
            out[source] = float(line.rsplit(" ", 1)[1])
    return out


def turn(server: ServerProcess, messages: list[dict], tools: list[dict] | None = None) -> dict:
    """One streamed request; TTFT, prompt and cached tokens, where its KV came from."""
    hits_before, sources_before = metric(server.url, "glm4_prefix_cache_hits_total"), admissions(server.url)
    body = {"model": "glm-4", "messages": messages, "stream": True, "stream_options": {"include_usage": True},
            "temperature": 0, "test_force_output": REPLY}
    if tools:  # the forced reply is plain text: it stays content with tools offered
        body.update(tools=tools, tool_choice="auto")
    started, ttft, usage = time.perf_counter(), None, None
    with httpx.stream("POST", server.base_url + "/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - started
            if chunk.get("usage"):
                usage = chunk["usage"]
    reported = ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens")
    cached = reported if reported is not None else metric(server.url, "glm4_prefix_cache_hits_total") - hits_before
    sources = {k: v - sources_before.get(k, 0) for k, v in admissions(server.url).items()}
    source = next((k for k, v in sources.items() if v), "?")
    return {"ttft_s": ttft, "prompt_tokens": usage["prompt_tokens"], "cached_tokens": int(cached), "source": source}


def conversation(servers: dict[str, ServerProcess], turns: int, words: int, seed: int) -> tuple[dict, list]:
    """Returns per-server turn results, and the messages of the last turn (for the cold baseline)."""
    rng = random.Random(seed)
    texts = [user_text(rng, words) for _ in range(turns)]
    results: dict[str, list[dict]] = {name: [] for name in servers}
    histories = {name: [{"role": "system", "content": f"Conversation {seed}. You answer questions."}]
                 for name in servers}
    last: list[dict] = []
    for text in texts:
        for name, server in servers.items():  # A, B, A, B: noise hits both
            histories[name].append({"role": "user", "content": text})
            last = list(histories[name])
            results[name].append(turn(server, histories[name]))
            histories[name].append({"role": "assistant", "content": REPLY})
    return results, last


def agent(servers: dict[str, ServerProcess], prefix_words: int, sessions: int, turns: int) -> dict[str, list[dict]]:
    rng = random.Random(7)
    tools = [{"type": "function", "function": {"name": f"tool_{i}", "description": user_text(rng, 60),
                                               "parameters": {"type": "object", "properties": {
                                                   f"arg_{j}": {"type": "string", "description": user_text(rng, 20)}
                                                   for j in range(6)}}}} for i in range(10)]
    instructions = user_text(rng, prefix_words)
    results: dict[str, list[dict]] = {name: [] for name in servers}
    for session in range(sessions):
        histories = {name: [{"role": "system", "content": instructions}] for name in servers}
        for index in range(turns):
            text = f"session {session} turn {index}: " + user_text(rng, 40)
            for name, server in servers.items():
                histories[name].append({"role": "user", "content": text})
                result = turn(server, histories[name], tools)
                result["session"], result["turn"] = session, index
                results[name].append(result)
                histories[name].append({"role": "assistant", "content": REPLY})
    return results


def interleaved(server: ServerProcess, conversations: int, turns: int, words: int) -> list[dict]:
    rng = random.Random(11)
    histories = [[{"role": "system", "content": f"Conversation {c}: " + user_text(rng, 40)}]
                 for c in range(conversations)]
    results = []
    for index in range(turns):
        for c, history in enumerate(histories):
            history.append({"role": "user", "content": user_text(rng, words)})
            result = turn(server, history)
            result["conversation"], result["turn"] = c, index
            results.append(result)
            history.append({"role": "assistant", "content": REPLY})
    return results


def cold(servers: dict[str, ServerProcess], messages: list[dict], repeats: int) -> dict[str, list[dict]]:
    """These messages with a unique first line each time: the same length, nothing cached matches."""
    results: dict[str, list[dict]] = {name: [] for name in servers}
    for index in range(repeats):
        unique = [{"role": "system", "content": f"Run {index}: {random.Random(index).random()}. "
                   + messages[0]["content"]}] + messages[1:]
        for name, server in servers.items():
            results[name].append(turn(server, unique))
    return results


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conv = result["conversation"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    turns = range(1, len(conv["on"]) + 1)
    for name, style in (("on", "o-"), ("off", "s--")):
        axes[0].plot(turns, [r["ttft_s"] * 1000 for r in conv[name]], style, label=f"reuse {name}")
    axes[0].set(xlabel="turn", ylabel="TTFT (ms)", title="10-turn conversation")
    axes[0].legend()
    fractions = [r["cached_tokens"] / r["prompt_tokens"] for r in conv["on"]]
    axes[1].bar(turns, fractions)
    axes[1].set(xlabel="turn", ylabel="cached / prompt tokens", title="cached fraction (reuse on)", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: proves the script works, no figures")
    args = parser.parse_args()
    words, prefix_words, cold_repeats = (30, 1500, 2) if args.quick else (60, 4800, 5)
    started = time.time()
    record = provenance()
    flags = ("--test-hooks",)
    with ServerProcess(*flags, log_name="reuse-on") as on, \
            ServerProcess(*flags, "--no-enable-prefix-caching", log_name="reuse-off") as off:
        servers = {"on": on, "off": off}
        result = {}
        result["conversation"], last_messages = conversation(servers, 10, words, seed=1)
        result["cold"] = cold(servers, last_messages, cold_repeats)
        result["agent"] = agent(servers, prefix_words, sessions=3, turns=3)
    with ServerProcess(*flags, "--max-num-seqs", "4", log_name="interleaved") as four:
        result["interleaved"] = interleaved(four, conversations=8, turns=3, words=words)
    summary = summarise(result)
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine_summary(),
            "command": "python bench/prefix_cache.py" + (" --quick" if args.quick else ""),
            "minutes": round((time.time() - started) / 60, 1)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "prefix_cache-quick" if args.quick else "prefix_cache"
    record = finish_provenance(record)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"provenance": record, "meta": meta, "summary": summary,
                                                      "runs": result}, indent=1))
    plot(result, RESULTS / f"{stem}.png")
    report = render(meta, summary, result, stem)
    (RESULTS / f"{stem}.md").write_text(report)
    print(report)
    return 0


def summarise(result: dict) -> dict:
    conv_on, conv_off = result["conversation"]["on"], result["conversation"]["off"]
    last_on = conv_on[-1]
    cold_on = [r["ttft_s"] for r in result["cold"]["on"]]
    cold_off = [r["ttft_s"] for r in result["cold"]["off"]]
    follow_ups = [(prev["prompt_tokens"], cur["cached_tokens"]) for prev, cur in zip(conv_on, conv_on[1:])]
    agent_on = result["agent"]["on"]
    agent_follow = [r for r in agent_on if r["session"] or r["turn"]]
    inter_follow = [r for r in result["interleaved"] if r["turn"]]
    return {
        "last_turn_prompt_tokens": last_on["prompt_tokens"],
        "cold_prompt_tokens": result["cold"]["on"][0]["prompt_tokens"],
        "warm_over_cold_ttft": last_on["ttft_s"] / median(cold_on),
        "min_cached_over_previous_prompt": min(cached / previous for previous, cached in follow_ups),
        "cold_ttft_on_over_off": median(cold_on) / median(cold_off),
        "agent_prefix_tokens": agent_on[0]["prompt_tokens"],
        "agent_follow_up_min_cached_fraction": min(r["cached_tokens"] / r["prompt_tokens"] for r in agent_follow),
        "agent_ttft_on_over_off": median([r["ttft_s"] for r in agent_follow]) /
        median([r["ttft_s"] for r in result["agent"]["off"] if r["session"] or r["turn"]]),
        "interleaved_follow_ups": len(inter_follow),
        "interleaved_served_from": {s: sum(r["source"] == s for r in inter_follow)
                                    for s in sorted({r["source"] for r in inter_follow})},
        "interleaved_min_cached_fraction": min(r["cached_tokens"] / r["prompt_tokens"] for r in inter_follow),
        "conversation_turn1_ttft_on_over_off": conv_on[0]["ttft_s"] / conv_off[0]["ttft_s"],
    }


def render(meta: dict, summary: dict, result: dict, stem: str) -> str:
    conv = result["conversation"]
    rows = [[i + 1, on["prompt_tokens"], on["cached_tokens"], f"{on['cached_tokens'] / on['prompt_tokens']:.2f}",
             f"{on['ttft_s'] * 1000:.0f}", f"{off['ttft_s'] * 1000:.0f}", f"{on['ttft_s'] / off['ttft_s']:.2f}"]
            for i, (on, off) in enumerate(zip(conv["on"], conv["off"]))]
    agent_rows = [[r["session"], r["turn"], r["prompt_tokens"], r["cached_tokens"], r["source"],
                   f"{r['ttft_s'] * 1000:.0f}", f"{off['ttft_s'] * 1000:.0f}"]
                  for r, off in zip(result["agent"]["on"], result["agent"]["off"])]
    s = summary
    return "\n".join([
        "# Prefix reuse: reuse on vs --no-enable-prefix-caching, one run",
        "",
        f"{meta['date']} · {meta['machine']} · `{meta['command']}` · {meta['minutes']} min · tiny GLM-4 on CPU,"
        " live servers over HTTP (openai SDK shape, streamed), replies forced by the test hook · plot: "
        f"{stem}.png",
        "",
        "## Summary",
        "",
        markdown_table(["figure", "value", "target"], [
            ["TTFT of turn 10 (warm) / a cold prompt of similar length",
             f"{s['warm_over_cold_ttft']:.3f} ({s['last_turn_prompt_tokens']} vs {s['cold_prompt_tokens']} tokens)",
             "<= 0.1"],
            ["cached tokens / previous turn's prompt, worst follow-up", f"{s['min_cached_over_previous_prompt']:.3f}",
             ">= 0.95"],
            ["agent trace: shared prefix (tokens)", s["agent_prefix_tokens"], "~18k"],
            ["agent follow-ups: worst cached fraction", f"{s['agent_follow_up_min_cached_fraction']:.3f}", ""],
            ["agent follow-ups: TTFT reuse on / off (median)", f"{s['agent_ttft_on_over_off']:.3f}", ""],
            ["8 conversations over 4 slots: follow-ups served from", json.dumps(s["interleaved_served_from"]),
             "all from in-place / slot-copy / host"],
            ["interleaved follow-ups: worst cached fraction", f"{s['interleaved_min_cached_fraction']:.3f}", ""],
            ["nothing to reuse: cold TTFT reuse on / off (median)", f"{s['cold_ttft_on_over_off']:.3f}",
             "within 2 %"],
        ]),
        "",
        "## 10-turn conversation",
        "",
        markdown_table(["turn", "prompt tokens", "cached", "cached fraction", "TTFT on (ms)", "TTFT off (ms)",
                        "on / off"], rows),
        "",
        "## Agent trace (18k-token shared prefix, 3 sessions x 3 turns)",
        "",
        markdown_table(["session", "turn", "prompt tokens", "cached", "KV from", "TTFT on (ms)", "TTFT off (ms)"],
                       agent_rows),
        "",
    ])


if __name__ == "__main__":
    raise SystemExit(main())
