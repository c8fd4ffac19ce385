"""Prometheus request metrics with vLLM's names and meanings, one set per service.

``sluice_<service>_time_to_first_token_seconds`` means what
``vllm:time_to_first_token_seconds`` means, measured at that service's hop,
so the same panel compares the engine, the model server and the public API.
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Histogram

# Fine at the bottom for a small model on a CPU, and as far up as vLLM's own
# buckets for long generations on busy GPUs.
_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0, 7680.0,
)  # fmt: skip
_TOKEN_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip


class RequestMetrics:
    """The per-request histograms of one service (``service`` is the metric name infix)."""

    def __init__(self, service: str) -> None:
        prefix = f"sluice_{service}"
        self.time_to_first_token = Histogram(
            f"{prefix}_time_to_first_token_seconds", "Request arrival to first token sent.", buckets=_LATENCY_BUCKETS
        )
        self.inter_token_latency = Histogram(
            f"{prefix}_inter_token_latency_seconds",
            "Gap between successive output tokens (a chunk's gap shared by its tokens).",
            buckets=_TOKEN_BUCKETS,
        )
        self.time_per_output_token = Histogram(
            f"{prefix}_request_time_per_output_token_seconds",
            "Per request: (last token - first token) / (output tokens - 1).",
            buckets=_TOKEN_BUCKETS,
        )
        self.e2e_latency = Histogram(
            f"{prefix}_e2e_request_latency_seconds",
            "Request arrival to last token sent (to its end, for a request that sent none).",
            buckets=_LATENCY_BUCKETS,
        )
        self.queue_time = Histogram(
            f"{prefix}_request_queue_time_seconds", "Time waiting before generation started.", buckets=_LATENCY_BUCKETS
        )
        self.requests = Counter(f"{prefix}_requests", "Finished requests by outcome.", ["outcome"])
        self.messages = Counter(f"{prefix}_stream_messages", "Token messages sent, each with one or more tokens.")

    def stream(self) -> StreamTimer:
        return StreamTimer(self)


class StreamTimer:
    """Times one streamed request from arrival; records everything at ``finish``."""

    def __init__(self, metrics: RequestMetrics) -> None:
        self._metrics = metrics
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None
        self.tokens = 0

    def chunk(self, tokens: int) -> None:
        """A chunk of ``tokens`` output tokens is about to be sent."""
        now = time.perf_counter()
        self._metrics.messages.inc()
        if self.first is None:
            self.first = now
            self._metrics.time_to_first_token.observe(now - self.start)
        elif self.last is not None and tokens:
            # Tokens travel in chunks: a chunk of k tokens after a gap g stands for k
            # gaps of g / k, as the engine made them (vLLM's meaning), not one of g.
            gap = (now - self.last) / tokens
            for _ in range(tokens):
                self._metrics.inter_token_latency.observe(gap)
        self.last = now
        self.tokens += tokens

    @property
    def ttft_s(self) -> float:
        return (self.first - self.start) if self.first is not None else 0.0

    @property
    def total_s(self) -> float:
        return (self.last or time.perf_counter()) - self.start

    @property
    def tpot_s(self) -> float:
        if self.first is None or self.last is None or self.tokens < 2:
            return 0.0
        return (self.last - self.first) / (self.tokens - 1)

    def finish(self, outcome: str, queue_s: float | None = None) -> None:
        """Record the request, whatever its outcome (``queue_s``: how long it waited, if it did)."""
        self._metrics.requests.labels(outcome).inc()
        if queue_s is not None:
            self._metrics.queue_time.observe(queue_s)
        self._metrics.e2e_latency.observe(self.total_s)
        if self.tokens > 1:
            self._metrics.time_per_output_token.observe(self.tpot_s)


# A caller's deadline passes at the caller first: it resets the stream, and the
# reset reaches this hop while this hop's copy of the deadline, which started
# when the call arrived, still has a few milliseconds left.
_DEADLINE_SLACK_S = 0.1


def ended_early(time_remaining: float | None) -> str:
    """The outcome of a call cancelled under its handler: its deadline passed, or its caller went away."""
    if time_remaining is not None and time_remaining <= _DEADLINE_SLACK_S:
        return "deadline_exceeded"
    return "cancelled"
