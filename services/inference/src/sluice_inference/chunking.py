"""How long a stream holds its next chunk: the replica's message rate shared by its streams.

Every message costs each hop (the replica's server, Envoy, the queue, the
client) about the same CPU whatever it carries, so a busy replica sends
fewer, larger chunks: its rate of messages is split between the streams
running on it. A stream expected to end by length within that time (its
pace so far times the tokens it has left) is not held past that end, so
that its last tokens and its finish are not late.
"""

from __future__ import annotations


def hold_s(running: int, messages_per_s: float, tokens_left: int, tpot_s: float) -> float:
    """Seconds to wait after a chunk before sending the next (0: send each engine step)."""
    if not messages_per_s:
        return 0.0
    share = max(1, running) / messages_per_s
    if tpot_s > 0:
        return min(share, max(0, tokens_left) * tpot_s)
    return share
