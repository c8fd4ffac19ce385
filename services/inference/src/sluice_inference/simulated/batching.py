"""Continuous batching as vLLM's V1 scheduler does it, counted in tokens and KV-cache blocks.

Each step the running sequences are scheduled first (a decode is one token,
an unfinished prefill its next chunk), then waiting ones while slots, the
step's token budget and free blocks last. A running sequence that needs a
block when none is free preempts the one scheduled last (in priority mode,
the least urgent): its blocks are freed and it waits at the front of the
line to be computed again from its first token. No clock here: the engine
decides how long a step takes.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field

BLOCK_SIZE = 16  # tokens per KV-cache block, vLLM's default on GPUs


def blocks_for(tokens: int) -> int:
    return -(-tokens // BLOCK_SIZE)


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_tokens: int
    max_tokens: int
    priority: int = 0
    arrival: float = 0.0  # when it reached the engine; it is scheduled no earlier
    computed: int = 0  # tokens whose keys and values are in the cache
    generated: int = 0
    blocks: int = 0
    preemptions: int = 0
    first_scheduled: float | None = None
    order: tuple[int, int] = (0, 0)  # its place in the waiting line

    @property
    def tokens(self) -> int:
        """Tokens whose keys and values the next token needs: the prompt and what was generated."""
        return self.prompt_tokens + self.generated


@dataclass
class Step:
    """What one engine step computes."""

    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # each sequence and its new tokens
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def prefill_tokens(self) -> int:
        """Tokens computed beyond one per sequence: prompts (and recomputed preempted sequences)."""
        return sum(n for seq, n in self.scheduled if not _decoding(seq, n))


def _decoding(seq: Sequence, new_tokens: int) -> bool:
    return new_tokens == 1 and seq.generated > 0 and seq.computed == seq.tokens - 1


class Batcher:
    def __init__(self, max_num_seqs: int, max_batched_tokens: int, kv_blocks: int, priority: bool = False) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.kv_blocks = kv_blocks
        self.free_blocks = kv_blocks
        self.priority = priority
        self.running: list[Sequence] = []
        self.waiting: list[Sequence] = []  # sorted by `order`
        self.preemptions = 0
        self._arrivals = itertools.count()
        self._returns = itertools.count(-1, -1)  # preempted sequences go before every new one

    @property
    def kv_cache_usage(self) -> float:
        return 1.0 - self.free_blocks / self.kv_blocks

    def busy(self) -> bool:
        return bool(self.running or self.waiting)

    def add(self, seq: Sequence) -> None:
        seq.order = (seq.priority if self.priority else 0, next(self._arrivals))
        bisect.insort(self.waiting, seq, key=_order)

    def remove(self, seq: Sequence) -> None:
        """A finished or aborted sequence leaves the engine and frees its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._free(seq)

    def schedule(self, now: float) -> Step:
        step = Step()
        budget = self.max_batched_tokens
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            new = min(seq.tokens - seq.computed, budget)
            while (need := blocks_for(seq.computed + new) - seq.blocks) > self.free_blocks:
                victim = max(self.running, key=_order) if self.priority else self.running[-1]
                at = self.running.index(victim)
                budget += self._preempt(victim, step)
                if victim is seq:
                    break
                if at < index:  # one scheduled already, ahead of this one in the list
                    index -= 1
            else:
                self.free_blocks -= need
                seq.blocks += need
                step.scheduled.append((seq, new))
                budget -= new
                index += 1
                continue
            break
        if step.preempted:
            # As vLLM does: no new sequence joins a step that had to preempt.
            return step
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.arrival > now:
                break
            new = min(seq.tokens - seq.computed, budget)
            need = blocks_for(seq.computed + new) - seq.blocks
            if need > self.free_blocks:
                break
            self.waiting.pop(0)
            self.free_blocks -= need
            seq.blocks += need
            if seq.first_scheduled is None:
                seq.first_scheduled = now
            self.running.append(seq)
            step.scheduled.append((seq, new))
            budget -= new
        return step

    def complete(self, step: Step) -> list[Sequence]:
        """The step is over: the sequences that computed all their tokens each have a new one."""
        produced = []
        for seq, new in step.scheduled:
            seq.computed += new
            if seq.computed == seq.tokens:
                seq.generated += 1
                produced.append(seq)
        return produced

    def _preempt(self, seq: Sequence, step: Step) -> int:
        """Free a running sequence's blocks and put it back in line; returns the step tokens it gives back."""
        self.running.remove(seq)
        returned = 0
        for i, (scheduled, new) in enumerate(step.scheduled):
            if scheduled is seq:
                del step.scheduled[i]
                returned = new
                break
        self._free(seq)
        seq.computed = 0
        seq.preemptions += 1
        self.preemptions += 1
        if not self.priority:
            seq.order = (0, next(self._returns))
        bisect.insort(self.waiting, seq, key=_order)
        step.preempted.append(seq)
        return returned

    def _free(self, seq: Sequence) -> None:
        self.free_blocks += seq.blocks
        seq.blocks = 0


def _order(seq: Sequence) -> tuple[int, int]:
    return seq.order
