"""The simulated GPU engine: its steps take the model's time, its tokens are real tokens of the model's tokenizer."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from sluice_core.errors import ResourceExhausted
from sluice_core.sampling import Sampling
from sluice_devstack.waiting import eventually
from sluice_inference import tiny_model
from sluice_inference.engines import EngineOutput, engine_module
from sluice_inference.load import Load
from sluice_inference.requests import ValidRequest
from sluice_inference.settings import DEFAULT_TINY_MODEL_DIR, InferenceSettings
from sluice_inference.simulated.engine import SimulatedEngine, build

# Slow enough steps to see, fast enough to keep the tests short.
BASE_MS = 4.0
PER_SEQUENCE_MS = 1.0
PREFILL_PER_TOKEN_MS = 0.1
# Polled every millisecond: a state that lasts a few steps of a few milliseconds is not missed.
POLL_S = 0.001
STEPS = "sluice_inference_simulated_engine_steps_total"


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return tiny_model.ensure(DEFAULT_TINY_MODEL_DIR)


async def started(model_dir: Path, load: Load | None = None, **settings: object) -> SimulatedEngine:
    defaults: dict[str, object] = {
        "engine": "simulated",
        "max_model_len": 512,
        "max_num_seqs": 4,
        "simulated_step_base_ms": BASE_MS,
        "simulated_step_per_sequence_ms": PER_SEQUENCE_MS,
        "simulated_prefill_per_token_ms": PREFILL_PER_TOKEN_MS,
    }
    engine = build(InferenceSettings(**{**defaults, **settings}), str(model_dir), load or Load())  # type: ignore[arg-type]
    await engine.warm_up()
    return engine


@pytest.fixture
async def engine(model_dir: Path) -> AsyncIterator[SimulatedEngine]:
    engine = await started(model_dir)
    yield engine
    await engine.shutdown()


def request(engine: SimulatedEngine, name: str, prompt: str = "The river runs", **sampling: object) -> ValidRequest:
    params = Sampling(**{"max_tokens": 16, **sampling})  # type: ignore[arg-type]
    return ValidRequest(name, engine.tokenizer.encode(prompt), params, priority=0)


async def collect(engine: SimulatedEngine, req: ValidRequest) -> tuple[str, list[int], EngineOutput]:
    texts: list[str] = []
    ids: list[int] = []
    last = None
    async for output in engine.generate(req):
        texts.append(output.text)
        ids += output.token_ids
        last = output
    assert last is not None and last.finished
    return "".join(texts), ids, last


def metric(engine: SimulatedEngine, name: str) -> float:
    return REGISTRY.get_sample_value(name, {"model_name": engine.spec.name}) or 0.0


def test_the_setting_chooses_the_simulated_engine() -> None:
    module = engine_module(InferenceSettings(engine="simulated"))
    assert module.build.__module__ == "sluice_inference.simulated.engine"


async def test_a_lone_request_takes_one_step_of_prefill_then_one_step_per_token(engine: SimulatedEngine) -> None:
    req = request(engine, "lone", prompt="The river runs to the sea", max_tokens=8, ignore_eos=True)
    _, ids, last = await collect(engine, req)
    prompt = len(req.prompt_token_ids)
    first_step_ms = BASE_MS + PER_SEQUENCE_MS + PREFILL_PER_TOKEN_MS * prompt
    assert last.engine_ttft_s is not None
    # On the engine's own clock: the step starts when the request arrives (give or take the event loop).
    assert first_step_ms / 1e3 <= last.engine_ttft_s < first_step_ms / 1e3 + 0.02
    assert len(ids) == 8 and last.finish_reason == "length" and last.prompt_tokens == prompt


async def test_requests_beyond_the_slots_wait_in_the_engine(engine: SimulatedEngine) -> None:
    # Four slots; eight requests: four run, four wait, and the waiting ones start as slots free up.
    reqs = [request(engine, f"r{i}", max_tokens=20, ignore_eos=True) for i in range(8)]
    tasks = [asyncio.create_task(collect(engine, r)) for r in reqs]

    await eventually(
        lambda: engine.unfinished_requests() == 8 and metric(engine, "vllm:num_requests_running") == 4,
        5,
        "eight requests in the engine, four running",
        interval_s=POLL_S,
    )
    assert (metric(engine, "vllm:num_requests_running"), metric(engine, "vllm:num_requests_waiting")) == (4, 4)
    results = await asyncio.gather(*tasks)
    queue_s = sorted(last.queue_s or 0.0 for _, _, last in results)
    assert queue_s[:4] < [0.02] * 4 and min(queue_s[4:]) > 19 * BASE_MS / 1e3
    assert all(len(ids) == 20 for _, ids, _ in results)


async def test_a_full_engine_queue_sheds(model_dir: Path) -> None:
    engine = await started(model_dir, max_num_seqs=1, max_num_queued_reqs=1)
    try:
        first = asyncio.create_task(collect(engine, request(engine, "a", max_tokens=30, ignore_eos=True)))
        await eventually(
            lambda: metric(engine, "vllm:num_requests_running") == 1, 5, "the first request running", interval_s=POLL_S
        )
        second = asyncio.create_task(collect(engine, request(engine, "b", max_tokens=30, ignore_eos=True)))
        await eventually(lambda: engine.unfinished_requests() == 2, 5, "the second request waiting", interval_s=POLL_S)
        with pytest.raises(ResourceExhausted):
            await collect(engine, request(engine, "c"))
        await asyncio.gather(first, second)
    finally:
        await engine.shutdown()


async def test_a_full_kv_cache_preempts_and_every_request_still_gets_all_its_tokens(model_dir: Path) -> None:
    # 64 tokens of KV (four blocks) for four requests that each grow to 40 tokens.
    engine = await started(model_dir, max_model_len=64, simulated_kv_cache_tokens=64)
    before = metric(engine, "vllm:num_preemptions_total")
    try:
        reqs = [request(engine, f"p{i}", prompt="a river", max_tokens=36, ignore_eos=True, seed=i) for i in range(4)]
        results = await asyncio.gather(*(collect(engine, r) for r in reqs))
        assert metric(engine, "vllm:num_preemptions_total") > before
        assert [len(ids) for _, ids, _ in results] == [36] * 4
        # Recomputed, not restarted: the tokens are those the request would have had alone.
        alone = await collect(
            engine, request(engine, "alone", prompt="a river", max_tokens=36, ignore_eos=True, seed=3)
        )
        assert alone[1] == results[3][1]
    finally:
        await engine.shutdown()


async def test_the_same_seed_and_prompt_give_the_same_tokens(engine: SimulatedEngine) -> None:
    first = await collect(engine, request(engine, "s1", max_tokens=32, seed=7, ignore_eos=True))
    again = await collect(engine, request(engine, "s2", max_tokens=32, seed=7, ignore_eos=True))
    other = await collect(engine, request(engine, "s3", max_tokens=32, seed=8, ignore_eos=True))
    assert first[1] == again[1] and first[0] == again[0]
    assert other[1] != first[1]


async def test_the_text_is_the_tokenizers_own_decoding_of_the_ids(engine: SimulatedEngine) -> None:
    req = request(engine, "text", prompt="The keeper of the river", max_tokens=64, seed=1, ignore_eos=True)
    text, ids, _ = await collect(engine, req)
    words = engine.tokenizer.tokenizer
    prompt_text = words.decode(req.prompt_token_ids, skip_special_tokens=True)
    whole = words.decode(req.prompt_token_ids + ids, skip_special_tokens=True)
    # Streamed a token at a time, but for a character whose bytes are not all there yet at the end.
    assert whole[len(prompt_text) :].removesuffix("\N{REPLACEMENT CHARACTER}") == text
    assert len(text) > 20


async def test_a_stop_string_ends_the_text_before_it_and_is_never_streamed(engine: SimulatedEngine) -> None:
    text, _, _ = await collect(engine, request(engine, "full", max_tokens=64, seed=5, ignore_eos=True))
    stop = text[30:34]
    req = request(engine, "stopped", max_tokens=64, seed=5, ignore_eos=True, stop=(stop,))
    chunks = [output.text async for output in engine.generate(req)]
    cut = "".join(chunks)
    assert cut == text[: text.index(stop)]
    _, _, last = await collect(engine, request(engine, "again", max_tokens=64, seed=5, ignore_eos=True, stop=(stop,)))
    assert (last.finish_reason, last.stop_reason) == ("stop", stop)


async def test_end_of_sequence_waits_for_min_tokens_and_ignore_eos_runs_to_max_tokens(model_dir: Path) -> None:
    engine = await started(model_dir, simulated_eos_probability=1.0)
    try:
        _, ids, last = await collect(engine, request(engine, "eos"))
        assert (len(ids), last.finish_reason, last.stop_reason) == (1, "stop", None)
        _, ids, last = await collect(engine, request(engine, "min", min_tokens=5))
        assert (len(ids), last.finish_reason) == (6, "stop")
        _, ids, last = await collect(engine, request(engine, "ignore", max_tokens=12, ignore_eos=True))
        assert (len(ids), last.finish_reason) == (12, "length")
    finally:
        await engine.shutdown()


async def test_a_reader_that_falls_behind_gets_the_tokens_merged(engine: SimulatedEngine) -> None:
    stream = engine.generate(request(engine, "slow", max_tokens=40, ignore_eos=True))
    first = await anext(stream)
    steps = metric(engine, STEPS)
    await eventually(lambda: metric(engine, STEPS) >= steps + 4, 5, "four steps gone by unread", interval_s=POLL_S)
    second = await anext(stream)
    assert len(first.token_ids) == 1 and len(second.token_ids) > 3
    await stream.aclose()


async def test_closing_a_stream_frees_its_slot_and_kv_cache(model_dir: Path) -> None:
    load = Load()  # what the replica reports in GetLoad
    engine = await started(model_dir, load)
    try:
        stream = engine.generate(request(engine, "left", max_tokens=400, ignore_eos=True))
        await anext(stream)
        assert engine.unfinished_requests() == 1 and load.kv_cache_usage > 0
        await stream.aclose()
        assert engine.unfinished_requests() == 0
        await collect(engine, request(engine, "next", max_tokens=1))
        assert load.kv_cache_usage == 0
    finally:
        await engine.shutdown()


async def test_in_priority_mode_a_sequence_that_preempts_itself_does_not_stop_the_engine(model_dir: Path) -> None:
    engine = await started(model_dir, scheduling_policy="priority", max_model_len=32, simulated_kv_cache_tokens=32)
    try:
        batch = dataclasses.replace(
            request(engine, "batch", prompt="a river " * 5, max_tokens=12, ignore_eos=True), priority=2
        )
        first = asyncio.create_task(collect(engine, batch))
        await eventually(
            lambda: metric(engine, "vllm:num_requests_running") == 1, 5, "the batch request running", interval_s=POLL_S
        )
        urgent = dataclasses.replace(request(engine, "urgent", prompt="a", max_tokens=12, ignore_eos=True), priority=1)
        results = await asyncio.gather(first, collect(engine, urgent))
        assert [len(ids) for _, ids, _ in results] == [12, 12]
        assert not engine.errored
    finally:
        await engine.shutdown()
