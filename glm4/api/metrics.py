"""Prometheus metrics: HTTP requests, tokens, latency histograms, and the engine's live counters.

Each app gets its own registry (tests run several apps in one process). The engine's numbers are
read at scrape time from `engine.stats()`, so UI and API traffic land in the same series.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
FINISH_REASONS = ("stop", "length", "cancelled", "error")
disable_created_metrics()  # *_created series only add noise to a single-process server


class EngineCollector:
    """Turns engine.stats() into gauges and counters at scrape time."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats()
        for name, key, doc in (("glm4_requests_running", "running", "requests decoding now"),
                               ("glm4_requests_waiting", "waiting", "requests queued for a slot"),
                               ("glm4_batch_size", "batch_size", "rows in the current decode batch")):
            yield GaugeMetricFamily(name, doc, value=stats.get(key, 0))
        yield CounterMetricFamily("glm4_engine_requests_submitted", "requests accepted by the engine (API and UI)",
                                  value=stats.get("submitted", 0))
        yield CounterMetricFamily("glm4_requests_rejected", "requests refused because the queue was full",
                                  value=stats.get("rejected", 0))
        yield CounterMetricFamily("glm4_requests_cancelled", "requests cancelled (client gone, stop button)",
                                  value=stats.get("finished_cancelled", 0))
        finished = CounterMetricFamily("glm4_requests_finished", "finished requests by reason", labels=["reason"])
        for reason in FINISH_REASONS:
            finished.add_metric([reason], stats.get(f"finished_{reason}", 0))
        yield finished
        yield CounterMetricFamily("glm4_decode_steps", "batched decode steps run", value=stats.get("steps", 0))
        yield GaugeMetricFamily("glm4_requests_prefilling", "requests whose prompt is being prefilled",
                                value=stats.get("prefilling", 0))
        yield CounterMetricFamily("glm4_prefill_tokens", "prompt tokens run through the model (not reused)",
                                  value=stats.get("prompt_tokens", 0))
        yield CounterMetricFamily("glm4_prefix_cache_queries", "prompt tokens looked up in the prefix cache (tokens)",
                                  value=stats.get("prefix_query_tokens", 0))
        yield CounterMetricFamily("glm4_prefix_cache_hits", "prompt tokens whose KV was reused (tokens)",
                                  value=stats.get("prefix_hit_tokens", 0))
        admissions = CounterMetricFamily("glm4_prefix_cache_admissions", "admissions by where their KV came from",
                                         labels=["source"])
        for source in ("cold", "in-place", "slot-copy", "host"):
            admissions.add_metric([source], stats.get(f"admitted_{source}", 0))
        yield admissions
        yield GaugeMetricFamily("glm4_host_cache_bytes", "bytes of KV kept in host memory (--cache-ram)",
                                value=stats.get("host_cache_bytes", 0))
        yield GaugeMetricFamily("glm4_host_cache_entries", "conversations kept in the host cache",
                                value=stats.get("host_cache_entries", 0))
        yield CounterMetricFamily("glm4_host_cache_hits", "admissions that restored KV from host memory",
                                  value=stats.get("host_cache_hits", 0))
        yield CounterMetricFamily("glm4_step_retries", "batched decode steps that failed and were retried row by row",
                                  value=stats.get("step_retries", 0))
        yield from upstream_metrics(stats.get("upstreams") or [])


def upstream_metrics(upstreams: list[dict]):
    """Per-upstream series when the engine fronts other servers (--backend upstream)."""
    if not upstreams:
        return
    healthy = GaugeMetricFamily("glm4_upstream_healthy", "1 when the upstream answered its last check",
                                labels=["upstream"])
    outstanding = GaugeMetricFamily("glm4_upstream_outstanding", "requests in flight to the upstream",
                                    labels=["upstream"])
    requests = CounterMetricFamily("glm4_upstream_requests", "requests sent to the upstream by outcome",
                                   labels=["upstream", "outcome"])
    for upstream in upstreams:
        url = upstream["url"]
        healthy.add_metric([url], 1.0 if upstream["healthy"] else 0.0)
        outstanding.add_metric([url], upstream["outstanding"])
        for outcome in ("requests", "errors", "connect_errors", "cancelled"):
            requests.add_metric([url, outcome], upstream.get(outcome, 0))
    yield from (healthy, outstanding, requests)


class Metrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.http_requests = Counter("glm4_http_requests", "HTTP requests by route and status",
                                     ["route", "status"], registry=self.registry)
        self.prompt_tokens = Counter("glm4_prompt_tokens", "prompt tokens processed", registry=self.registry)
        self.generation_tokens = Counter("glm4_generation_tokens", "completion tokens generated",
                                         registry=self.registry)
        self.time_to_first_token = Histogram("glm4_time_to_first_token_seconds", "request start to first token",
                                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.time_per_output_token = Histogram("glm4_time_per_output_token_seconds",
                                               "mean time between tokens of one request",
                                               buckets=TOKEN_LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(EngineCollector(engine))

    def observe_request(self, *, prompt_tokens: int, completion_tokens: int, ttft: float | None,
                        duration: float) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        if ttft is not None:
            self.time_to_first_token.observe(ttft)
            if completion_tokens > 1:
                self.time_per_output_token.observe(max(0.0, duration - ttft) / (completion_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
