"""A replica's message rate is shared by its streams, on one beat; no stream waits past the interval, or its end."""

from __future__ import annotations

import pytest

from sluice_inference.chunking import hold_s, next_send

INTERVAL_S = 0.05
BEAT_S = 0.04  # the replica's share of the interval


def test_the_rate_is_shared_by_the_running_streams() -> None:
    assert hold_s(running=1, messages_per_s=80, max_interval_s=INTERVAL_S) == pytest.approx(0.0125)
    assert hold_s(running=2, messages_per_s=80, max_interval_s=INTERVAL_S) == pytest.approx(0.025)


@pytest.mark.parametrize("running", [4, 16, 256, 4096])
def test_no_stream_is_held_past_the_interval_however_many_run(running: int) -> None:
    # The old rule held each of 256 streams for 3.2 s: a reader saw the answer freeze. The
    # replica keeps a fifth of the interval for the hops between it and the reader.
    assert hold_s(running=running, messages_per_s=80, max_interval_s=INTERVAL_S) == pytest.approx(0.8 * INTERVAL_S)


@pytest.mark.parametrize(("messages_per_s", "max_interval_s"), [(0, INTERVAL_S), (80, 0)])
def test_no_rate_or_no_interval_sends_each_step(messages_per_s: float, max_interval_s: float) -> None:
    assert hold_s(running=8, messages_per_s=messages_per_s, max_interval_s=max_interval_s) == 0.0
    assert next_send(last=12.34, hold=0.0, tokens_left=100, tpot_s=0.01) == 12.34


def test_streams_send_on_the_replicas_shared_beat_within_one_hold() -> None:
    # Streams whose last chunks went at different times send their next ones together.
    sends = [next_send(last, hold=BEAT_S, tokens_left=1000, tpot_s=0.01) for last in (10.001, 10.02, 10.039)]
    assert sends == [pytest.approx(10.04)] * 3
    for last in (10.0, 10.001, 10.039, 10.04):
        assert 0 < next_send(last, hold=BEAT_S, tokens_left=1000, tpot_s=0.01) - last <= BEAT_S + 1e-9


def test_a_stream_about_to_end_by_length_is_not_held_past_its_end() -> None:
    # 3 tokens left at 2 ms each: done 6 ms after the last chunk, sooner than the beat.
    assert next_send(last=10.0, hold=BEAT_S, tokens_left=3, tpot_s=0.002) == pytest.approx(10.006)


def test_before_its_pace_is_known_a_stream_waits_for_the_beat() -> None:
    assert next_send(last=10.01, hold=BEAT_S, tokens_left=3, tpot_s=0.0) == pytest.approx(10.04)
