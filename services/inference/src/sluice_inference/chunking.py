"""When a stream sends its next chunk of tokens.

Every message costs each hop (the replica's server, Envoy, the queue, the
client) CPU whatever it carries, so a replica sends fewer, larger chunks as
its streams multiply: it aims at a rate of messages shared by its running
streams. That aim never holds a stream longer than the chunk interval, a
bound below what a reader notices, however many streams run.

The beat leaves a fifth of the interval to the hops between the replica and
the client (Envoy twice, the queue), whose own delays vary with their load:
what a reader sees stays within the interval.

The streams of a replica send on a shared beat: a chunk goes at the first
multiple of the hold after the stream's last one, so that the replica's
streams send together. A process woken for one message finds the others
waiting too, which costs each hop much less than a wake-up per message.

A stream expected to end by length sooner (its pace so far times the
tokens it has left) is not held past that end, so that its last tokens and
its finish are not late.
"""

from __future__ import annotations

import math

# The share of the chunk interval the replica keeps for itself.
REPLICA_SHARE = 0.8


def hold_s(running: int, messages_per_s: float, max_interval_s: float) -> float:
    """The replica's beat: how long its streams hold tokens between chunks (0: send each engine step)."""
    if not messages_per_s or not max_interval_s:
        return 0.0
    return min(max(1, running) / messages_per_s, REPLICA_SHARE * max_interval_s)


def next_send(last: float, hold: float, tokens_left: int, tpot_s: float) -> float:
    """When a stream that sent a chunk at ``last`` sends its next (``last`` itself: at once)."""
    if not hold:
        return last
    beat = math.floor(last / hold + 1) * hold
    if tpot_s > 0:
        return min(beat, last + max(0, tokens_left) * tpot_s)
    return beat
