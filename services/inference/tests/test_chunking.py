"""A replica's message rate is shared by its streams, and no stream's end is held back."""

from __future__ import annotations

import pytest

from sluice_inference.chunking import hold_s


def test_the_rate_is_shared_by_the_running_streams() -> None:
    assert hold_s(running=1, messages_per_s=80, tokens_left=1000, tpot_s=0.001) == pytest.approx(0.0125)
    assert hold_s(running=8, messages_per_s=80, tokens_left=1000, tpot_s=0.001) == pytest.approx(0.1)


def test_a_stream_about_to_end_by_length_is_not_held_past_its_end() -> None:
    # 10 tokens left at 2 ms each: done in 20 ms, sooner than the 100 ms share.
    assert hold_s(running=8, messages_per_s=80, tokens_left=10, tpot_s=0.002) == pytest.approx(0.02)


def test_before_its_pace_is_known_a_stream_waits_its_share() -> None:
    assert hold_s(running=4, messages_per_s=80, tokens_left=3, tpot_s=0.0) == pytest.approx(0.05)


def test_no_rate_sends_each_step() -> None:
    assert hold_s(running=8, messages_per_s=0, tokens_left=100, tpot_s=0.002) == 0.0
