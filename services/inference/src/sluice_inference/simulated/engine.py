"""The simulated engine: one timer steps every sequence; each request reads its merged deltas.

The steps run on a clock of their own, as a GPU's would: step ``k`` ends
``step_s`` after step ``k - 1`` ended, whenever this process gets round to
it. A process too busy to keep up (the server around the engine) does not
slow the simulated GPU down; it only hands over more tokens at once, which
is what a benchmark of the serving path must see. Requests reach the
engine when they arrive, and are scheduled no earlier than that.

Each step costs this process one pass over the sequences it computed, as
vLLM's front end does: the engine's part (scheduling, picking token ids) is
counted in ``sluice_inference_simulated_engine_cpu_seconds``; detokenizing
and stop strings, which vLLM's front end does too, belong to the server.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import zlib
from array import array
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from sluice_core.errors import InvalidArgument, ResourceExhausted, Unavailable
from sluice_inference.engines import EngineOutput
from sluice_inference.load import Load, ModelSpec
from sluice_inference.prompts import FastPromptTokenizer, read_json
from sluice_inference.requests import ValidRequest
from sluice_inference.settings import InferenceSettings
from sluice_inference.simulated.batching import BLOCK_SIZE, Batcher, Sequence, Step
from sluice_inference.simulated.detokenizer import Detokenizer
from sluice_inference.simulated.stats import engine_stats
from sluice_inference.simulated.timing import preset

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1.0
ENGINE_DEAD = "the simulated engine has stopped; this replica is out of service"


def build(settings: InferenceSettings, model_dir: str, load: Load) -> SimulatedEngine:
    return SimulatedEngine(settings, Path(model_dir), load)


class _Request:
    """One request's sampler, detokenizer and the delta its reader has not taken yet."""

    __slots__ = ("seq", "sampling", "detokenizer", "rng", "pending", "waiter", "failure", "queue_s", "ttft_s")

    def __init__(self, seq: Sequence, request: ValidRequest, detokenizer: Detokenizer) -> None:
        self.seq = seq
        self.sampling = request.sampling
        self.detokenizer = detokenizer
        self.rng = _rng(request)
        self.pending: EngineOutput | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.failure: BaseException | None = None
        self.queue_s: float | None = None
        self.ttft_s: float | None = None

    def put(self, text: str, token_id: int, prompt_tokens: int) -> EngineOutput:
        pending = self.pending
        if pending is None:
            self.pending = pending = EngineOutput(
                text, [token_id], prompt_tokens, queue_s=self.queue_s, engine_ttft_s=self.ttft_s
            )
        else:
            pending.text += text
            pending.token_ids.append(token_id)
        self._wake()
        return pending

    def fail(self, failure: BaseException) -> None:
        self.failure = failure
        self._wake()

    async def next(self) -> EngineOutput:
        while self.pending is None:
            if self.failure is not None:
                raise self.failure
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        output, self.pending = self.pending, None
        return output

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class SimulatedEngine:
    def __init__(self, settings: InferenceSettings, model_dir: Path, load: Load) -> None:
        self._settings = settings
        self._gpu = preset(settings)
        self.tokenizer = FastPromptTokenizer(model_dir)
        config = read_json(model_dir / "config.json")
        max_model_len = settings.max_model_len or int(config.get("max_position_embeddings", 2048))
        if self._gpu.kv_cache_tokens < max_model_len:
            raise ValueError(
                f"the simulated KV cache ({self._gpu.kv_cache_tokens} tokens) cannot hold one request of "
                f"max_model_len={max_model_len}; lower max_model_len, as vLLM would ask"
            )
        words = self.tokenizer.tokenizer
        vocab = words.get_vocab_size(with_added_tokens=True)
        self.spec = ModelSpec(
            name=settings.served_model_name or str(model_dir),
            max_model_len=max_model_len,
            vocab_size=int(config.get("vocab_size", vocab)),
            dtype="simulated",
            slots=settings.max_num_seqs,
            quantization="",
            prefix_caching=False,
        )
        self._eos = _eos_token_id(model_dir, config)
        special = {*words.get_added_tokens_decoder(), self._eos}
        self._candidates = [i for i in range(vocab) if i not in special]
        self._batcher = Batcher(
            settings.max_num_seqs,
            self._gpu.max_batched_tokens,
            self._gpu.kv_cache_tokens // BLOCK_SIZE,
            priority=settings.scheduling_policy == "priority",
        )
        self._requests: dict[str, _Request] = {}
        self._load = load
        self._stats = engine_stats()
        self._label = self.spec.name
        self._wake: asyncio.Event | None = None
        self._steps: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None

    @property
    def errored(self) -> bool:
        return self._failure is not None

    def unfinished_requests(self) -> int:
        return len(self._requests)

    async def warm_up(self) -> None:
        """Nothing to warm; the engine's clock starts here, on the server's event loop."""
        self._wake = asyncio.Event()
        self._steps = asyncio.create_task(self._run(), name="simulated-engine")

    async def generate(self, request: ValidRequest) -> AsyncGenerator[EngineOutput]:
        if self._failure is not None or self._wake is None:
            raise Unavailable(ENGINE_DEAD)
        limit = self._settings.max_num_queued_reqs
        if limit is not None and len(self._batcher.waiting) >= limit:
            raise ResourceExhausted(
                f"this replica's engine queue is full ({limit} requests waiting)", retry_after_s=RETRY_AFTER_S
            )
        words = self.tokenizer.tokenizer
        if request.request_id in self._requests:
            raise InvalidArgument.field("request_id", "a request with this id is already running")
        sampling = request.sampling
        seq = Sequence(
            request.request_id,
            prompt_tokens=len(request.prompt_token_ids),
            max_tokens=sampling.max_tokens,
            priority=request.priority,
            arrival=asyncio.get_running_loop().time(),
        )
        detokenizer = Detokenizer(words, request.prompt_token_ids, sampling.stop, sampling.min_tokens)
        state = _Request(seq, request, detokenizer)
        self._requests[seq.request_id] = state
        self._batcher.add(seq)
        self._wake.set()
        finished = False
        try:
            while not finished:
                output = await state.next()
                finished = output.finished
                yield output
        finally:
            if not finished:  # the caller went away: the request leaves the engine now
                self._end(seq)

    async def shutdown(self) -> None:
        if self._steps is not None:
            self._steps.cancel()
            await asyncio.wait([self._steps])
        for state in self._requests.values():
            state.fail(Unavailable(ENGINE_DEAD))

    async def _run(self) -> None:
        try:
            await self._step_forever()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("the simulated engine failed")
            self._failure = exc
            for state in self._requests.values():
                state.fail(Unavailable(ENGINE_DEAD))

    async def _step_forever(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        batcher = self._batcher
        clock = loop.time()  # when the step being run ends, on the simulated GPU's clock
        while True:
            if not batcher.busy():
                self._report()
                self._wake.clear()
                await self._wake.wait()
                clock = max(clock, loop.time())
            started = time.thread_time()
            step = batcher.schedule(clock)
            if not step.scheduled:
                # A sequence that preempted itself ends the step's scheduling (as in vLLM): schedule
                # again. Otherwise what waits arrived after this step's start, while catching up: the
                # GPU was idle until then.
                if not step.preempted:
                    arrival = min(seq.arrival for seq in batcher.waiting)
                    if arrival <= clock:
                        raise RuntimeError("requests wait that no step can take (a bug in the batching model)")
                    clock = arrival
                continue
            clock += self._gpu.step_s(len(step.scheduled), step.prefill_tokens)
            engine_cpu = time.thread_time() - started
            await asyncio.sleep(clock - loop.time())
            engine_cpu += self._finish_step(step, clock)
            self._stats.cpu.labels(self._label).inc(engine_cpu)

    def _finish_step(self, step: Step, clock: float) -> float:
        """Hand each sequence's new token to its reader; returns the engine's own CPU seconds."""
        started = time.thread_time()
        produced = self._batcher.complete(step)
        # A request whose caller left during the step is gone already.
        sampled = [(state, self._sample(state)) for seq in produced if (state := self._live(seq)) is not None]
        engine_cpu = time.thread_time() - started
        for state, token_id in sampled:
            self._emit(state, token_id, clock)
        stats, label = self._stats, self._label
        stats.steps.labels(label).inc()
        stats.generation_tokens.labels(label).inc(len(produced))
        if step.preempted:
            stats.preemptions.labels(label).inc(len(step.preempted))
        self._report()
        return engine_cpu

    def _live(self, seq: Sequence) -> _Request | None:
        state = self._requests.get(seq.request_id)
        return state if state is not None and state.seq is seq else None

    def _sample(self, state: _Request) -> int:
        if self._may_end(state) and state.rng.random() < self._settings.simulated_eos_probability:
            return self._eos
        return state.rng.choice(self._candidates)

    @staticmethod
    def _may_end(state: _Request) -> bool:
        """Whether end-of-sequence may end it now (vLLM keeps it from being sampled before min_tokens)."""
        return not state.sampling.ignore_eos and state.seq.generated > state.sampling.min_tokens

    def _emit(self, state: _Request, token_id: int, clock: float) -> None:
        seq = state.seq
        if state.ttft_s is None:
            state.ttft_s = clock - seq.arrival
            state.queue_s = (seq.first_scheduled or clock) - seq.arrival
            label = self._label
            self._stats.time_to_first_token.labels(label).observe(state.ttft_s)
            self._stats.queue_time.labels(label).observe(state.queue_s)
            self._stats.prompt_tokens.labels(label).inc(seq.prompt_tokens)
        end_of_sequence = token_id == self._eos and self._may_end(state)
        stop = state.detokenizer.add(token_id, end_of_sequence=end_of_sequence)
        reason = None
        if stop is not None or end_of_sequence:
            reason = "stop"
        elif seq.generated >= seq.max_tokens:
            reason = "length"
        output = state.put(state.detokenizer.take(finished=reason is not None), token_id, seq.prompt_tokens)
        if reason is not None:
            output.finished = True
            output.finish_reason = reason
            output.stop_reason = stop
            self._end(seq)

    def _end(self, seq: Sequence) -> None:
        if self._live(seq) is not None:
            del self._requests[seq.request_id]
            self._batcher.remove(seq)

    def _report(self) -> None:
        batcher, label = self._batcher, self._label
        self._stats.running.labels(label).set(len(batcher.running))
        self._stats.waiting.labels(label).set(len(batcher.waiting))
        self._stats.kv_cache_usage.labels(label).set(batcher.kv_cache_usage)
        self._load.kv_cache_usage = batcher.kv_cache_usage


def _rng(request: ValidRequest) -> random.Random:
    """Seeded by the request's seed and prompt, as a real model's sampling is; greedy ignores the seed."""
    sampling = request.sampling
    if sampling.seed is None and sampling.temperature > 0:
        return random.Random()
    prompt = zlib.crc32(array("q", request.prompt_token_ids).tobytes())
    seed = sampling.seed if sampling.temperature > 0 else None
    return random.Random(f"{seed}:{prompt}")


def _eos_token_id(model_dir: Path, config: dict[str, Any]) -> int:
    eos = read_json(model_dir / "generation_config.json").get("eos_token_id", config.get("eos_token_id"))
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if not isinstance(eos, int):
        raise ValueError(f"{model_dir} names no end-of-sequence token (eos_token_id in config.json)")
    return eos
