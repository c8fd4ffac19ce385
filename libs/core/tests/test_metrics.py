"""Request metrics: vLLM's meanings, whatever the outcome."""

from __future__ import annotations

from prometheus_client import REGISTRY

from sluice_core.metrics import RequestMetrics, ended_early

METRICS = RequestMetrics("test_metrics")


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(f"sluice_test_metrics_{name}", labels) or 0.0


def test_a_chunk_of_tokens_counts_as_that_many_inter_token_gaps() -> None:
    before = sample("inter_token_latency_seconds_count")
    timer = METRICS.stream()
    timer.chunk(1)
    timer.chunk(8)  # eight tokens made since the first, sent together
    assert sample("inter_token_latency_seconds_count") - before == 8


def test_a_request_refused_before_any_token_is_still_counted_and_timed() -> None:
    before = sample("requests_total", outcome="unauthenticated"), sample("e2e_request_latency_seconds_count")
    METRICS.stream().finish("unauthenticated")
    after = sample("requests_total", outcome="unauthenticated"), sample("e2e_request_latency_seconds_count")
    assert (after[0] - before[0], after[1] - before[1]) == (1, 1)


def test_a_call_cancelled_past_its_deadline_is_deadline_exceeded() -> None:
    assert ended_early(-0.01) == ended_early(0.0) == "deadline_exceeded"
    # The caller's reset arrives before this hop's later copy of the deadline runs out.
    assert ended_early(0.004) == "deadline_exceeded"
    assert ended_early(3.0) == ended_early(None) == "cancelled"
