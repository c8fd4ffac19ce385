"""How long a stream holds its next chunk after sending one.

Every message costs each hop (the replica's server, Envoy, the queue, the
client) about the same CPU whatever it carries, so a replica sends fewer,
larger chunks as its streams multiply: it aims at a rate of messages shared
by its running streams. That aim never holds a stream longer than the
chunk interval, a bound below what a reader notices, however many streams
run. A stream expected to end by length sooner (its pace so far times the
tokens it has left) is not held past that end, so that its last tokens and
its finish are not late.
"""

from __future__ import annotations


def hold_s(running: int, messages_per_s: float, max_interval_s: float, tokens_left: int, tpot_s: float) -> float:
    """Seconds to wait after a chunk before sending the next (0: send each engine step)."""
    if not messages_per_s or not max_interval_s:
        return 0.0
    hold = min(max(1, running) / messages_per_s, max_interval_s)
    if tpot_s > 0:
        return min(hold, max(0, tokens_left) * tpot_s)
    return hold
