"""The server's Prometheus metrics (prometheus-client), in a registry of the app's own: requests by how they ended,
prompt and generated tokens, time to the first token and between tokens, and the engine's state read at each scrape
(running and waiting requests, KV-cache usage, prefix-cache hits)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
PREFIX = "qwen3gen"


class EngineState(Collector):
    """Gauges read from the engine's stats when scraped."""

    def __init__(self, stats: Callable[[], dict]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self.stats()
        usage = stats["kv_blocks_used"] / max(1, stats["kv_blocks_total"])
        queried = stats["prefix_cache_queried_tokens"]
        hit_rate = stats["prefix_cache_hit_tokens"] / queried if queried else 0.0
        gauges = [
            ("requests_running", "Requests in the running batch.", stats["running"]),
            ("requests_waiting", "Requests waiting to be admitted.", stats["waiting"]),
            ("kv_cache_usage_ratio", "Share of the KV pool's blocks held by requests.", usage),
            ("prefix_cache_hit_ratio", "Share of prompt tokens found in the prefix cache.", hit_rate),
        ]
        for name, description, value in gauges:
            yield GaugeMetricFamily(f"{PREFIX}_{name}", description, value)


class Metrics:
    def __init__(self, engine_stats: Callable[[], dict]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(f"{PREFIX}_requests", "Finished requests, by finish reason.", ["finish_reason"],
                                registry=self.registry)  # fmt: skip
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens of finished requests.",
                                     registry=self.registry)  # fmt: skip
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "Tokens generated.", registry=self.registry)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "From arrival to the first token.",
                              buckets=LATENCY_BUCKETS, registry=self.registry)  # fmt: skip
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds", "Between a request's outputs, per token.",
                             buckets=LATENCY_BUCKETS, registry=self.registry)  # fmt: skip
        self.registry.register(EngineState(engine_stats))

    def tokens(self, count: int, since_last: float | None, first: bool) -> None:
        """An output of `count` new tokens, `since_last` seconds after the request's previous output (or arrival)."""
        if count:
            self.generation_tokens.inc(count)
        if since_last is None or not count:
            return
        if first:
            self.ttft.observe(since_last)
        else:
            for _ in range(count):
                self.itl.observe(since_last / count)

    def finished(self, reason: str, prompt_tokens: int) -> None:
        self.requests.labels(finish_reason=reason).inc()
        self.prompt_tokens.inc(prompt_tokens)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
