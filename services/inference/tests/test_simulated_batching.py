"""The simulated engine's batching: slots, the step's token budget, KV-cache blocks and preemption, as vLLM's V1."""

from __future__ import annotations

import pytest

from sluice_inference.settings import InferenceSettings
from sluice_inference.simulated.batching import BLOCK_SIZE, Batcher, Sequence, Step
from sluice_inference.simulated.timing import PRESETS, preset


def run_step(batcher: Batcher, now: float = 0.0) -> tuple[Step, list[Sequence]]:
    step = batcher.schedule(now)
    return step, batcher.complete(step)


def test_a_step_lasts_base_plus_per_sequence_plus_per_prefilled_token() -> None:
    gpu = PRESETS["h100-llama3-8b"]
    assert gpu.step_s(sequences=256, prefill_tokens=0) == pytest.approx(gpu.base_s + 256 * gpu.per_sequence_s)
    assert gpu.step_s(sequences=1, prefill_tokens=1000) == pytest.approx(
        gpu.base_s + gpu.per_sequence_s + 1000 * gpu.per_prefill_token_s
    )


def test_settings_override_the_preset() -> None:
    settings = InferenceSettings(
        engine="simulated",
        simulated_gpu="l4-llama3-8b",
        simulated_step_base_ms=2,
        simulated_kv_cache_tokens=4096,
        max_num_batched_tokens=512,
    )
    gpu = preset(settings)
    assert (gpu.base_s, gpu.kv_cache_tokens, gpu.max_batched_tokens) == (0.002, 4096, 512)
    assert gpu.per_prefill_token_s == PRESETS["l4-llama3-8b"].per_prefill_token_s


def test_requests_beyond_the_slots_wait() -> None:
    batcher = Batcher(max_num_seqs=2, max_batched_tokens=1000, kv_blocks=100)
    for i in range(3):
        batcher.add(Sequence(f"r{i}", prompt_tokens=10, max_tokens=5))
    step, produced = run_step(batcher)
    assert [seq.request_id for seq, _ in step.scheduled] == ["r0", "r1"]
    assert [seq.request_id for seq in batcher.waiting] == ["r2"]
    assert step.prefill_tokens == 20
    assert [seq.generated for seq in produced] == [1, 1]  # a whole prompt prefilled makes the first token


def test_a_long_prompt_is_prefilled_in_chunks_of_the_token_budget_beside_decodes() -> None:
    batcher = Batcher(max_num_seqs=8, max_batched_tokens=32, kv_blocks=100)
    short = Sequence("short", prompt_tokens=4, max_tokens=100)
    batcher.add(short)
    run_step(batcher)
    long = Sequence("long", prompt_tokens=70, max_tokens=100)
    batcher.add(long)
    chunks = []
    while long.generated == 0:
        step, _ = run_step(batcher)
        chunks.append(dict((seq.request_id, new) for seq, new in step.scheduled))
    # The running sequence decodes one token each step; the prompt takes what is left of the budget.
    assert chunks == [{"short": 1, "long": 31}, {"short": 1, "long": 31}, {"short": 1, "long": 8}]
    assert short.generated == 4


def test_a_request_whose_kv_does_not_fit_waits_for_blocks() -> None:
    batcher = Batcher(max_num_seqs=8, max_batched_tokens=1000, kv_blocks=4)
    first = Sequence("first", prompt_tokens=3 * BLOCK_SIZE, max_tokens=4)
    second = Sequence("second", prompt_tokens=2 * BLOCK_SIZE, max_tokens=4)
    batcher.add(first)
    batcher.add(second)
    step, _ = run_step(batcher)
    assert [seq.request_id for seq, _ in step.scheduled] == ["first"]
    assert batcher.waiting == [second]
    assert batcher.kv_cache_usage == pytest.approx(0.75)
    batcher.remove(first)
    step, _ = run_step(batcher)
    assert [seq.request_id for seq, _ in step.scheduled] == ["second"]


def test_a_sequence_that_needs_a_block_preempts_the_last_admitted_which_is_recomputed() -> None:
    batcher = Batcher(max_num_seqs=8, max_batched_tokens=1000, kv_blocks=2)
    old = Sequence("old", prompt_tokens=BLOCK_SIZE - 1, max_tokens=100)
    young = Sequence("young", prompt_tokens=BLOCK_SIZE - 1, max_tokens=100)
    batcher.add(old)
    batcher.add(young)
    run_step(batcher)  # both prefilled: one block each, the cache is full
    run_step(batcher)  # each computes its first token: its block is full now
    step, _ = run_step(batcher)  # the old one needs a second block
    assert step.preempted == [young]
    assert [seq.request_id for seq, _ in step.scheduled] == ["old"]
    assert (young.computed, young.blocks, young.preemptions) == (0, 0, 1)
    assert batcher.waiting == [young]
    # Back at the front of the line: once blocks are free it prefills its prompt and its tokens again.
    later = Sequence("later", prompt_tokens=1, max_tokens=1)
    batcher.add(later)
    batcher.remove(old)
    step, produced = run_step(batcher)
    assert step.scheduled[0] == (young, BLOCK_SIZE - 1 + 2)
    assert young in produced and young.generated == 3


def test_no_request_joins_a_step_that_preempted() -> None:
    batcher = Batcher(max_num_seqs=8, max_batched_tokens=1000, kv_blocks=2)
    for name in ("a", "b"):
        batcher.add(Sequence(name, prompt_tokens=BLOCK_SIZE - 1, max_tokens=100))
    run_step(batcher)
    run_step(batcher)
    batcher.add(Sequence("c", prompt_tokens=1, max_tokens=1))
    step, _ = run_step(batcher)
    assert step.preempted and "c" not in [seq.request_id for seq, _ in step.scheduled]


def test_in_priority_mode_the_least_urgent_is_preempted_even_if_scheduled_already() -> None:
    batcher = Batcher(max_num_seqs=8, max_batched_tokens=1000, kv_blocks=2, priority=True)
    batch = Sequence("batch", prompt_tokens=1, max_tokens=100, priority=2)
    batcher.add(batch)
    run_step(batcher)
    interactive = Sequence("interactive", prompt_tokens=BLOCK_SIZE - 1, max_tokens=100, priority=1)
    batcher.add(interactive)
    run_step(batcher)  # the cache is full: a block each
    run_step(batcher)
    # The batch request decodes first in the list; then the interactive one needs a block.
    step, produced = run_step(batcher)
    assert step.preempted == [batch]
    assert step.scheduled == [(interactive, 1)]
    assert produced == [interactive]
    assert batch.computed == 0 and batcher.waiting == [batch]


def test_in_priority_mode_a_sequence_that_preempts_itself_ends_the_steps_scheduling() -> None:
    # As vLLM: the least urgent sequence needing a block, first in the running list, gives way
    # itself, and the step schedules nothing more (the engine schedules again at once).
    batcher = Batcher(max_num_seqs=8, max_batched_tokens=1000, kv_blocks=2, priority=True)
    batch = Sequence("batch", prompt_tokens=BLOCK_SIZE - 1, max_tokens=100, priority=2)
    batcher.add(batch)
    run_step(batcher)
    interactive = Sequence("interactive", prompt_tokens=1, max_tokens=100, priority=1)
    batcher.add(interactive)
    run_step(batcher)  # the batch request decodes into a full block; the interactive one takes the other
    step, _ = run_step(batcher)
    assert (step.scheduled, step.preempted) == ([], [batch])
    step, produced = run_step(batcher)
    assert step.scheduled == [(interactive, 1)] and produced == [interactive]
