"""The simulated engine's Prometheus metrics, under vLLM's names and meanings.

Dashboards and autoscalers built on vLLM's metrics (requests running and
waiting in the engine, KV-cache use, preemptions, token counts) work
unchanged against a simulated replica. The engine's own CPU time is
counted apart, so that a benchmark can leave it out of the stack's cost.
"""

from __future__ import annotations

import functools

from prometheus_client import REGISTRY, Counter, Gauge, Histogram

_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip


class EngineStats:
    def __init__(self) -> None:
        labels = ["model_name"]
        self.running = Gauge("vllm:num_requests_running", "Requests in the engine's running batch.", labels)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting in the engine, preempted ones too.", labels)
        self.kv_cache_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache use, 1 = full.", labels)
        self.preemptions = Counter("vllm:num_preemptions", "Requests preempted (to be recomputed).", labels)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens prefilled.", labels)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", labels)
        self.time_to_first_token = Histogram(
            "vllm:time_to_first_token_seconds", "Arrival in the engine to its first token.", labels, buckets=_BUCKETS
        )
        self.queue_time = Histogram(
            "vllm:request_queue_time_seconds", "Arrival in the engine to first step.", labels, buckets=_BUCKETS
        )
        self.steps = Counter("sluice_inference_simulated_engine_steps", "Steps the simulated engine ran.", labels)
        self.cpu = Counter(
            "sluice_inference_simulated_engine_cpu_seconds",
            "CPU time of the simulated engine itself (scheduling and sampling), not of the server around it.",
            labels,
        )


@functools.cache
def engine_stats() -> EngineStats:
    """One set per process; vLLM's own metrics of the same names, if an engine registered them, give way."""
    names = ("vllm:", "sluice_inference_simulated_engine_")
    for collector, collected in list(REGISTRY._collector_to_names.items()):
        if any(name.startswith(names) for name in collected):
            REGISTRY.unregister(collector)
    return EngineStats()
