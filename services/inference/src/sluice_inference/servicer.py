"""The ``sluice.inference.v1.Inference`` servicer: protobuf in and out, the model host in between."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from typing import Any

import grpc
from opentelemetry import trace

from sluice.common.v1 import common_pb2
from sluice.inference.v1 import inference_pb2, inference_pb2_grpc
from sluice_core.errors import SluiceError
from sluice_core.messages import TEMPLATE_CHARS_PER_MESSAGE
from sluice_core.metrics import RequestMetrics, StreamTimer, ended_early
from sluice_inference.chunking import hold_s, next_send
from sluice_inference.engines import EngineOutput
from sluice_inference.host import ModelHost
from sluice_inference.requests import ValidRequest, validate

METRICS = RequestMetrics("inference")
_tracer = trace.get_tracer(__name__)

_FINISH_REASONS = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
}

Context = grpc.aio.ServicerContext[Any, Any]

# Longer inputs are checked (tokenized, their history fitted) on a thread of
# their own: megabytes of text take seconds to tokenize, which must not stop
# every other stream of the replica. Shorter ones stay on the loop, where
# they take well under a millisecond.
_INLINE_INPUT_CHARS = 16_384


def _input_chars(request: inference_pb2.GenerateRequest) -> int:
    messages = request.messages.messages
    return len(request.prompt) + sum(len(m.content) for m in messages) + TEMPLATE_CHARS_PER_MESSAGE * len(messages)


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(
        self, host: ModelHost, replica_id: str, messages_per_s: float = 0.0, max_chunk_interval_s: float = 0.0
    ) -> None:
        self._host = host
        self._replica_id = replica_id
        self._messages_per_s = messages_per_s
        self._max_chunk_interval_s = max_chunk_interval_s
        # One thread: long inputs wait for each other rather than share the CPU (and the GIL).
        self._long_inputs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="long-inputs")

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        timer = METRICS.stream()
        try:
            valid = await self._validated(request)
        except SluiceError as exc:  # refused before reaching the engine: counted all the same
            timer.finish(exc.code.name.lower())
            raise
        except asyncio.CancelledError:
            timer.finish(ended_early(context.time_remaining()))
            raise
        outcome = "error"
        last: EngineOutput | None = None
        with self._host.admitted() as admission, _tracer.start_as_current_span("inference.generate") as span:
            span.set_attribute("sluice.request_id", valid.request_id)
            span.set_attribute("gen_ai.request.max_tokens", valid.sampling.max_tokens)
            try:
                async with aclosing(self._host.generate(valid)) as outputs:
                    # The engine takes the request while the accepted message is written.
                    first = asyncio.ensure_future(anext(outputs, None))
                    try:
                        yield inference_pb2.GenerateResponse(
                            accepted=inference_pb2.Accepted(
                                prompt_tokens=len(valid.prompt_token_ids),
                                history_messages_dropped=valid.history_dropped,
                            )
                        )
                        output = await first
                    finally:
                        if not first.done():
                            # The caller went away: the engine aborts the request, then `outputs` can close.
                            first.cancel()
                            await asyncio.wait([first])
                    while output is not None:
                        last = output
                        if output.token_ids:
                            if not admission.running:
                                admission.start()
                                span.add_event("first_token")
                            timer.chunk(len(output.token_ids))
                            yield inference_pb2.GenerateResponse(
                                delta=common_pb2.TokenDelta(text=output.text, token_ids=output.token_ids)
                            )
                        if output.finished:
                            outcome = output.finish_reason or "stop"
                            # Counted out before the last message goes: the engine has already
                            # freed the sequence, and the queue may hand its slot on at once.
                            admission.end()
                            yield inference_pb2.GenerateResponse(finished=self._finished(output, timer))
                        elif timer.last is not None:
                            # Tokens made meanwhile are merged by the engine into the next output.
                            hold = hold_s(self._host.load.running, self._messages_per_s, self._max_chunk_interval_s)
                            left = valid.sampling.max_tokens - timer.tokens
                            send = next_send(timer.last, hold, left, timer.tpot_s)
                            await asyncio.sleep(send - time.perf_counter())
                        output = await anext(outputs, None)
            except (asyncio.CancelledError, GeneratorExit):
                outcome = ended_early(context.time_remaining())
                raise
            finally:
                queue_s = last.queue_s if last is not None else None
                timer.finish(outcome, queue_s)
                _annotate(span, last, timer, queue_s, outcome)

    async def _validated(self, request: inference_pb2.GenerateRequest) -> ValidRequest:
        engine = self._host.require_ready()
        spec = engine.spec
        check = functools.partial(
            validate, request, engine.tokenizer, max_model_len=spec.max_model_len, vocab_size=spec.vocab_size
        )
        if _input_chars(request) > _INLINE_INPUT_CHARS:
            return await asyncio.get_running_loop().run_in_executor(self._long_inputs, check)
        return check()

    def _finished(self, output: EngineOutput, timer: StreamTimer) -> inference_pb2.Finished:
        return inference_pb2.Finished(
            reason=_FINISH_REASONS.get(output.finish_reason or "", common_pb2.FINISH_REASON_UNSPECIFIED),
            stop_reason="" if output.stop_reason is None else str(output.stop_reason),
            usage=common_pb2.Usage(
                prompt_tokens=output.prompt_tokens,
                completion_tokens=timer.tokens,
                cached_tokens=output.cached_tokens,
            ),
            timings=common_pb2.Timings(
                queue_ms=(output.queue_s or 0.0) * 1e3,
                time_to_first_token_ms=timer.ttft_s * 1e3,
                total_ms=(time.perf_counter() - timer.start) * 1e3,
                time_per_output_token_ms=timer.tpot_s * 1e3,
            ),
            replica_id=self._replica_id,
        )

    async def GetModelInfo(
        self, request: inference_pb2.GetModelInfoRequest, context: Context
    ) -> inference_pb2.ModelInfo:
        spec = self._host.require_ready().spec
        return inference_pb2.ModelInfo(
            model_name=spec.name,
            max_model_len=spec.max_model_len,
            dtype=spec.dtype,
            slots=spec.slots,
            replica_id=self._replica_id,
            quantization=spec.quantization,
            prefix_caching=spec.prefix_caching,
        )

    async def GetLoad(self, request: inference_pb2.GetLoadRequest, context: Context) -> inference_pb2.Load:
        load = self._host.load
        return inference_pb2.Load(
            running=load.running, waiting=load.waiting, kv_cache_usage=load.kv_cache_usage, replica_id=self._replica_id
        )


def _annotate(
    span: trace.Span, last: EngineOutput | None, timer: StreamTimer, queue_s: float | None, outcome: str
) -> None:
    span.set_attribute("sluice.outcome", outcome)
    span.set_attribute("gen_ai.usage.completion_tokens", timer.tokens)
    if last is not None:
        span.set_attribute("gen_ai.usage.prompt_tokens", last.prompt_tokens)
        if last.engine_ttft_s is not None:
            # The engine's own part of the time to first token: what the stack adds is the rest.
            span.set_attribute("sluice.engine.time_to_first_token", last.engine_ttft_s)
    if queue_s is not None:
        span.set_attribute("gen_ai.latency.time_in_queue", queue_s)
    if timer.first is not None:  # no token, no time to first token (not 0)
        span.set_attribute("gen_ai.latency.time_to_first_token", timer.ttft_s)
    span.set_attribute("gen_ai.latency.e2e", timer.total_s)
