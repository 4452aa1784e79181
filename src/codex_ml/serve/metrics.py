"""The server's Prometheus metrics (``GET /metrics``), in a registry of its own per app."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from codex_ml.serve.scheduler import Scheduler

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    """Requests by route and status, tokens in and out, time to first token, time per output token,
    queue depth and running batch (read from the scheduler when scraped), secrets masked."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "codex_ml_requests", "HTTP requests answered, by route and status", ["route", "status"], registry=r
        )
        self.prompt_tokens = Counter("codex_ml_prompt_tokens", "prompt tokens of served requests", registry=r)
        self.completion_tokens = Counter("codex_ml_completion_tokens", "tokens generated", registry=r)
        self.time_to_first_token = Histogram(
            "codex_ml_time_to_first_token_seconds",
            "from queueing a sequence to its first token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "codex_ml_time_per_output_token_seconds",
            "mean time between a sequence's tokens after the first",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )
        self.queue_depth = Gauge("codex_ml_queue_depth", "sequences waiting for a KV-cache slot", registry=r)
        self.running_batch = Gauge("codex_ml_running_batch_size", "sequences decoding in the batch now", registry=r)
        self.running_requests = Gauge("codex_ml_running_requests", "requests with a sequence decoding now", registry=r)
        self.secrets_masked = Counter("codex_ml_secrets_masked", "secrets masked in completions, by kind", ["kind"], registry=r)

    def watch(self, scheduler: Scheduler) -> None:
        """Gauges read from the scheduler at scrape time."""
        self.queue_depth.set_function(lambda: scheduler.queue_depth)
        self.running_batch.set_function(lambda: scheduler.running)
        self.running_requests.set_function(lambda: scheduler.running_requests)

    def on_finished(self, per_token_s: float, n_tokens: int) -> None:
        self.time_per_output_token.observe(per_token_s)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
