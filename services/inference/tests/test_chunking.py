"""A replica's message rate is shared by its streams; no stream waits past the interval, or past its end."""

from __future__ import annotations

import pytest

from sluice_inference.chunking import hold_s

INTERVAL_S = 0.05


def test_the_rate_is_shared_by_the_running_streams() -> None:
    assert hold_s(running=1, messages_per_s=80, max_interval_s=INTERVAL_S, tokens_left=1000, tpot_s=0.001) == (
        pytest.approx(0.0125)
    )
    assert hold_s(running=2, messages_per_s=80, max_interval_s=INTERVAL_S, tokens_left=1000, tpot_s=0.001) == (
        pytest.approx(0.025)
    )


@pytest.mark.parametrize("running", [4, 16, 256, 4096])
def test_no_stream_is_held_past_the_interval_however_many_run(running: int) -> None:
    # The old rule held each of 256 streams for 3.2 s: a reader saw the answer freeze.
    held = hold_s(running=running, messages_per_s=80, max_interval_s=INTERVAL_S, tokens_left=10_000, tpot_s=0.03)
    assert held == pytest.approx(INTERVAL_S)


def test_a_stream_about_to_end_by_length_is_not_held_past_its_end() -> None:
    # 10 tokens left at 2 ms each: done in 20 ms, sooner than the 50 ms interval.
    held = hold_s(running=8, messages_per_s=80, max_interval_s=INTERVAL_S, tokens_left=10, tpot_s=0.002)
    assert held == pytest.approx(0.02)


def test_before_its_pace_is_known_a_stream_waits_its_share() -> None:
    assert hold_s(running=2, messages_per_s=80, max_interval_s=INTERVAL_S, tokens_left=3, tpot_s=0.0) == (
        pytest.approx(0.025)
    )


@pytest.mark.parametrize(("messages_per_s", "max_interval_s"), [(0, INTERVAL_S), (80, 0)])
def test_no_rate_or_no_interval_sends_each_step(messages_per_s: float, max_interval_s: float) -> None:
    held = hold_s(running=8, messages_per_s=messages_per_s, max_interval_s=max_interval_s, tokens_left=9, tpot_s=0.01)
    assert held == 0.0
